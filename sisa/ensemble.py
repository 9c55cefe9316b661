"""The public ``Ensemble``: one object per store, delegating to the layers that do the work.

Lifecycle and config changes live here; ingest is :mod:`sisa.store.ingest`, training is the
:class:`~sisa.train.planner.Planner`, deletion and verify are :mod:`sisa.unlearn`, prediction
is :class:`~sisa.serve.serving.Serving`, the status report is :mod:`sisa.store.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sisa import unlearn
from sisa.config.fields import config_to_dict
from sisa.config.settings import AGGREGATE_METHODS, SisaConfig
from sisa.config.stored import config_from_stored, refuse_config_at_open, require_config, require_same_fixed
from sisa.data.arrays import check_labels
from sisa.data.batches import DEFAULT_BATCH, Columns
from sisa.errors import ConfigError, ProofError
from sisa.receipt.keys import load_signer
from sisa.receipt.notes import Verifier
from sisa.serve.serving import Serving
from sisa.store import ingest as ingesting
from sisa.store.database import Store
from sisa.store.report import locate, status
from sisa.train.combiner import has_core
from sisa.train.planner import FitReport, Planner, Progress
from sisa.unlearn import audit, receipts, tlog

__all__ = ["Ensemble", "FitReport"]


class Ensemble:
    """A SISA ensemble backed by one store directory.

    Create with :meth:`create`, reopen with :meth:`open`; use as a context manager or call
    :meth:`close` to release the store's writer lock. ``planner`` plans and runs training
    (its jobs are what scripts and tests drive directly).
    """

    def __init__(self, store: Store, address: str | None = None) -> None:
        """Wrap an open store; use :meth:`create` or :meth:`open` instead."""
        self.store = store
        self.planner = Planner(store, config_from_stored(store.meta()["config"]), address)
        self._serving = Serving(store, lambda: self.planner.config)

    @classmethod
    def create(cls, path: str | Path, config: SisaConfig, *, address: str | None = None) -> Ensemble:
        """Create a new store directory for an ensemble (``address``: the Ray address :meth:`fit` uses).

        Raises:
            ConfigError: If ``config`` is not a :class:`~sisa.config.SisaConfig`.
            StoreError: If ``path`` is a file, a store, or a non-empty directory.
        """
        require_config(config)
        layout = {"feature_shape": None, "shard_slices": [config.slices] * config.shards}
        return cls._around(Store.create(path, {"config": config_to_dict(config), **layout}), address)

    @classmethod
    def _around(cls, store: Store, address: str | None) -> Ensemble:
        """An ensemble on ``store``; if building it raises (a bad stored config, say), the store is closed.

        Without this the store's LMDB environments and its writer lock would stay held by an
        object nobody can reach, and every later writable open in this process would fail.
        """
        try:
            return cls(store, address)
        except BaseException:
            store.close()
            raise

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: object = None,
        *,
        readonly: bool = False,
        address: str | None = None,
        resume: bool = True,
        lock_timeout: float = 0.0,
    ) -> Ensemble:
        """Open an existing ensemble.

        Args:
            path: The store directory.
            config: Not accepted: a store keeps its own config (call :meth:`reconfigure`).
            readonly: Read without taking the writer lock (predict, status, eval).
            address: Ray address used by :meth:`fit`.
            resume: When writable, finish the deletions a crash interrupted before returning:
                exactly those requests are certified and only their shards retrained
                (:func:`sisa.unlearn.apply` with ``requests``); deferred requests stay pending.
                With or without it, a writable open first finishes any erasure a crash cut
                short (:func:`sisa.unlearn.recover_erasure`: the key file compacted, every
                pending request's runs re-keyed), so no deleted sample stays decryptable.
            lock_timeout: Seconds to wait for the writer lock (0: fail at once with ``StoreLockedError``).

        Raises:
            ConfigError: If a ``config`` is passed.
        """
        refuse_config_at_open(config)
        ens = cls._around(Store.open(path, readonly=readonly, lock_timeout=lock_timeout), address)
        try:
            if not readonly:
                unlearn.recover_erasure(ens.store)  # no Ray, no retrain: keys only
                tlog.publish(ens.planner)  # a log written before it was signed gets its first checkpoint
            if resume and not readonly:
                unlearn.finish_interrupted(ens.planner)
        except BaseException:
            ens.close()
            raise
        return ens

    def close(self) -> None:
        """Release the store (and its writer lock)."""
        self.store.close()

    def __enter__(self) -> Ensemble:
        """Enter a ``with`` block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on leaving a ``with`` block."""
        self.close()

    @property
    def path(self) -> Path:
        """The store directory."""
        return self.store.path

    @property
    def config(self) -> SisaConfig:
        """The store's config."""
        return self.planner.config

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample, fixed by the first ingest."""
        shape = self.store.meta().get("feature_shape")
        return tuple(shape) if shape is not None else None

    def reconfigure(self, config: SisaConfig) -> None:
        """Replace the stored config; fields are classified in :data:`sisa.config.FIELD_ROLES`.

        A changed recipe field (model, train, threads, device, CPU kernel level) makes
        :meth:`fit` retrain every shard; fixed fields (seed, shards, slices, partition,
        ``data.num_classes``) cannot change; the rest takes effect without retraining.

        Raises:
            ConfigError: If ``config`` is not a SisaConfig, or a fixed field differs (nothing is written).
        """
        require_same_fixed(self.config, require_config(config), self.path)
        new = config_to_dict(config)
        self.store.write(lambda txn: self.store.put_meta(txn, config=new))
        self.planner.config = config
        self._serving.clear()  # loaded models were built as the old config's networks

    def ingest(
        self,
        x: Any,
        y: Any = None,
        ids: Any = None,
        *,
        new_slice: bool = False,
        probabilities: Any = None,
        features: str | list[str] | None = None,
        label: str | None = None,
        id: str | None = None,  # noqa: A002 - the column's name, as Ray Data calls it
        batch_size: int = DEFAULT_BATCH,
        core: Any = None,
        scale: float | None = None,
    ) -> int:
        """Add samples, all or nothing, placed by the partitioner; see :func:`sisa.store.ingest.ingest`.

        ``x`` may be arrays, a LabeledArrays (alone: it carries its labels and ids), a torch Dataset,
        an iterator of batches or a ``ray.data.Dataset`` (streamed ``batch_size`` rows at a time;
        ``features``, ``label``, ``id`` name its columns).
        ``core`` declares core samples (``True``: all of them; or their ids): they train a
        ``backbone.source: core`` backbone and can never be deleted. ``scale``: the features are
        raw values the models see divided by it (255 for uint8 pixels given as bare arrays; a
        loader's ``raw=True`` LabeledArrays carries its own).
        """
        columns = Columns(features, label, id)
        kwargs = {"new_slice": new_slice, "probabilities": probabilities, "batch_size": batch_size, "core": core}
        kwargs["scale"] = scale
        return ingesting.ingest(self.store, self.config, x, y, ids, columns=columns, **kwargs)

    def fit(self, progress: Progress | None = None, *, shards: Sequence[int] | None = None) -> FitReport:
        """Train every missing or stale stage, in parallel on Ray; see :meth:`sisa.train.planner.Planner.fit`."""
        report = self.planner.fit(progress, shards=shards)
        tlog.publish(self.planner)  # the changed live models, in the transparency log under a signed checkpoint
        return report

    def add(
        self,
        x: Any,
        y: Any = None,
        ids: Any = None,
        progress: Progress | None = None,
        *,
        probabilities: Any = None,
        core: Any = None,
        scale: float | None = None,
    ) -> FitReport:
        """Continual learning: add samples as a new slice of each shard they land in, train only that.

        Before the first :meth:`fit` this is plain :meth:`ingest` + :meth:`fit`. New ``core``
        samples change the core set, so the backbone and every shard retrain. ``scale`` as for
        :meth:`ingest`.
        """
        with self.store.read() as txn:
            trained = any(self.store.stage_records(txn, s) for s in range(self.config.shards))
        self.ingest(x, y, ids, new_slice=trained, probabilities=probabilities, core=core, scale=scale)
        return self.fit(progress)

    def delete(
        self, ids: Any, *, defer: bool = False, progress: Progress | None = None, receipts: bool = False
    ) -> dict[str, Any]:
        """Forget samples; returns when the data is erased from the store and (unless ``defer``) the model is clean.

        See :func:`sisa.unlearn.delete` for the steps and the returned certificate. With
        ``receipts``, an applied certificate also carries ``receipts``: each deleted id's receipt
        (:meth:`receipt`), by id. Receipts name ids: they are returned here, never logged or stored.
        """
        out = unlearn.delete(self.planner, ids, defer=defer, progress=progress, on_journal=self._serving.clear)
        if receipts and out.get("state") == "applied":
            out["receipts"] = {i: self.receipt(i) for i in unlearn.normalize_ids(ids)}
        return out

    def receipt(self, sample_id: int) -> dict[str, Any]:
        """The signed receipt of a deleted id, for its data subject; see :func:`sisa.unlearn.receipts.issue_receipt`.

        Raises:
            DataError: If the id was never deleted or its deletion is still pending.
            ConfigError: If the operator's signing key is not found (``sisa keys``).
        """
        [checked] = unlearn.normalize_ids([sample_id])
        return receipts.issue_receipt(self.store, load_signer(create=False, store_root=self.path), checked)

    def apply(self, progress: Progress | None = None, *, requests: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Apply pending (deferred or interrupted) requests as one batch; see :func:`sisa.unlearn.apply`."""
        return unlearn.apply(self.planner, progress, requests=requests)

    def pending(self) -> list[dict[str, Any]]:
        """Requests journaled but not yet applied."""
        return unlearn.pending(self.store)

    def resume(self, progress: Progress | None = None) -> dict[str, Any]:
        """Finish whatever a crash interrupted: pending deletions, then any unfinished training."""
        applied, report = self.apply(progress), self.fit(progress)
        trained = {str(k): v for k, v in report.trained.items()}
        return {"applied": applied, "trained": trained, "rebound": {str(k): v for k, v in report.rebound.items()}}

    def verify(self, shards: Sequence[int] | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Retrain shards from scratch and compare with the live models; ``ok`` only if bit-identical."""
        return unlearn.verify(self.planner, shards, progress)

    def audit(self, key: str | None = None) -> audit.AuditReport:
        """Check the audit log: its HMAC chain, its Merkle tree and the latest signed checkpoint.

        Args:
            key: The verifier key (``name+hash+base64``) to check the checkpoint with; default the
                operator's own (:func:`sisa.receipt.keys.load_signer`).

        Returns:
            An :class:`~sisa.unlearn.audit.AuditReport`; ``ok`` only if the chain, the tree and the signature hold.
        """
        report = audit.check_chain(self.store, self.store.secret())
        verifier = _verifier(key)
        problems, info = tlog.check_log(self.store, verifier)
        report.problems += problems
        report.ok = report.ok and not problems
        report.log_size, report.checkpoint = info["log_size"], info["checkpoint"]
        return report

    def checkpoint(self) -> str | None:
        """The latest signed checkpoint of the transparency log (a C2SP signed note), or None before the first."""
        with self.store.read() as txn:
            return tlog.log_state(self.store, txn).checkpoint

    def consistency(self, old_checkpoint: str, key: str | None = None) -> dict[str, Any]:
        """Prove the log only grew since a kept signed checkpoint; see :func:`sisa.unlearn.tlog.consistency`."""
        verifier = _verifier(key)
        with self.store.read() as txn:
            state = tlog.log_state(self.store, txn)
        return tlog.consistency(state, old_checkpoint, verifier)

    def certificates(self) -> list[dict[str, Any]]:
        """Every deletion certificate in the audit log, oldest first, each with its ``audit_seq``."""
        return audit.certificates(self.store)

    def lookup(self, ids: Any) -> list[dict[str, Any]]:
        """Was each id deleted, when, and by which request? See :func:`sisa.unlearn.audit.lookup_ids`."""
        return audit.lookup_ids(self.store, self.store.secret(), unlearn.normalize_ids(ids))

    def locate(self, ids: Any) -> dict[int, tuple[int, int]]:
        """Where each id lives now: id -> (shard, slice), both from 0.

        Raises:
            DataError: On malformed ids, or ids not in the store (deleted or never ingested).
        """
        return locate(self.store, unlearn.normalize_ids(ids))

    def live_models(self) -> dict[int, nn.Module]:
        """The live model of every shard in service, loaded (and cached) from the store."""
        return {shard: model for shard, (model, _) in self._serving.snapshot().items()}

    def forget_cached_models(self) -> None:
        """Drop loaded shard models, so the next prediction reloads what is live now."""
        self._serving.clear()

    def predict_proba(self, x: Any, *, method: str | None = None, batch_size: int = 1024) -> np.ndarray:
        """Ensemble class probabilities ``(n, num_classes)``; ``method``: mean, vote, weighted or combiner.

        Without ``method``, the config's ``aggregate.method``.
        """
        return self._serving.predict_proba(x, method or self.config.aggregate.method, batch_size)

    def provenance(self) -> dict[int, str]:
        """Which models answered the calling thread's last prediction: shard -> checkpoint key."""
        return dict(self._serving.last_used)

    def predict(self, x: Any, *, method: str | None = None, batch_size: int = 1024) -> np.ndarray:
        """Ensemble labels: argmax of :meth:`predict_proba`."""
        return self.predict_proba(x, method=method, batch_size=batch_size).argmax(axis=1)

    def score(self, x: Any, y: Any, *, method: str | None = None) -> float:
        """Ensemble accuracy on ``(x, y)``."""
        predicted = self.predict(x, method=method)
        return float((predicted == check_labels(y, len(predicted), self.config.data.num_classes)).mean())

    def shard_scores(self, x: Any, y: Any) -> dict[int, float]:
        """Accuracy of each live shard model on ``(x, y)``."""
        return self._serving.shard_scores(x, y)

    def scores(self, x: Any, y: Any, *, methods: Sequence[str] | None = None, batch_size: int = 1024) -> dict[str, Any]:
        """Accuracy on ``(x, y)`` of several aggregation methods and of every shard, from one forward pass.

        Each number equals what :meth:`score` (per method) and :meth:`shard_scores` give, at the cost
        of one pass of the shard models instead of one per method: how to compare aggregations.

        Args:
            x: Inputs, as for :meth:`predict_proba`.
            y: One label per input.
            methods: Aggregation methods; None: every one this store can serve (``combiner`` only
                with a core set).
            batch_size: Rows per forward.

        Returns:
            ``{"accuracy": {method: accuracy}, "per_shard_accuracy": {shard: accuracy}}``.

        Raises:
            ConfigError: On an unknown method, or ``combiner`` without a core set.
            DataError: On bad inputs or labels.
        """
        if methods is None:
            methods = [m for m in AGGREGATE_METHODS if m != "combiner" or self._serves_combiner()]
        accuracy, per_shard = self._serving.scores(x, y, list(methods), batch_size)
        return {"accuracy": accuracy, "per_shard_accuracy": per_shard}

    def _serves_combiner(self) -> bool:
        """Whether this store can serve ``aggregate.method: combiner`` (a core backbone and core ids)."""
        with self.store.read() as txn:
            return has_core(self.config, self.store.core_count(txn))

    def status(self) -> dict[str, Any]:
        """Shards, slices, sample counts and live checkpoint digests; see :func:`sisa.store.report.status`."""
        return status(self.store, self.config)


def _verifier(key: str | None) -> Verifier:
    """The verifier key given (``name+hash+base64``), else the operator's own.

    Raises:
        ConfigError: If no key is given and this user has no signing key (an auditor passes ``key``).
    """
    if key:
        try:
            return Verifier.decode(key)
        except ProofError as exc:
            raise ConfigError(f"--key: {exc}") from exc
    try:
        return load_signer(create=False).verifier
    except ConfigError as exc:
        raise ConfigError(f"{exc}; an auditor without the operator's key passes its verifier key (--key)") from exc
