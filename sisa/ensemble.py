"""The public ``Ensemble``: create or open a store, ingest data, train on Ray, predict.

This module is the conductor: it reads and writes the store, plans which stages of
which shards need training, and hands the work to the orchestrator. It holds no
training or aggregation logic of its own.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sisa.config.settings import SisaConfig, config_fields, config_from_dict, config_to_dict, fixed_changes
from sisa.data.arrays import MAX_ID, check_labels
from sisa.data.loaders import LabeledArrays, as_arrays
from sisa.errors import ConfigError, DataError, DomainUnavailableError, NotTrainedError, StoreError
from sisa.partition.placement import check_shard_sizes, place
from sisa.serve.serving import Serving
from sisa.store.database import Store
from sisa.store.digests import checkpoint_key, manifest_digest
from sisa.train.domain import Domain, domain_id, missing_reason, unavailable_message
from sisa.train.slices import StoredSlices
from sisa.train.trainer import ShardJob, StageResult

__all__ = ["Ensemble", "FitReport"]

log = logging.getLogger(__name__)


def _migrate(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config as this version reads it.

    Stores created before ``resources.cpu_isa`` existed trained unpinned, which is
    ``native``; reading them with today's default (``avx2``) would call every checkpoint
    stale and retrain (or fail to verify) the lot.
    """
    raw = dict(stored)
    resources = dict(raw.get("resources") or {})
    resources.setdefault("cpu_isa", "native")
    raw["resources"] = resources
    return raw


def _require_config(config: Any) -> None:
    if not isinstance(config, SisaConfig):
        raise ConfigError(
            f"config must be a SisaConfig, not {type(config).__name__}; "
            "build one with sisa.load_config(path, overrides)"
        )


@dataclass
class FitReport:
    """What one :meth:`Ensemble.fit` call trained.

    Attributes:
        trained: Shard -> stages trained in this call.
        skipped: Shards whose live model was already current.
        empty: Shards with no samples (after deletions), which have no model.
        seconds: Wall time of the call.
        stage_seconds: Sum of per-stage training times (compute spent).
        retries: Shard tasks that lost their worker or node and were resubmitted from
            the last stage received (each a dict: shard, after_stage, attempt, error).
        rebound: Shard -> why it was retrained from scratch in another determinism
            domain (no node of its own was available; ``resources.on_missing_domain``):
            ``{"from_domain": id, "to_domain": id, "reason": text}``.
    """

    trained: dict[int, list[int]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: float = 0.0
    retries: list[dict[str, Any]] = field(default_factory=list)
    rebound: dict[int, dict[str, Any]] = field(default_factory=dict)


class Ensemble:
    """A SISA ensemble backed by one store directory.

    Create with :meth:`create`, reopen with :meth:`open`; use as a context manager
    or call :meth:`close` to release the store's writer lock.
    """

    def __init__(self, store: Store, address: str | None = None) -> None:
        """Wrap an open store; use :meth:`create` or :meth:`open` instead."""
        self.store = store
        self.address = address
        meta = store.meta()
        self.config: SisaConfig = config_from_dict(_migrate(meta["config"]))
        self._serving = Serving(self)

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | Path, config: SisaConfig, *, address: str | None = None) -> Ensemble:
        """Create a new store directory for an ensemble.

        Args:
            path: Directory to create.
            config: The ensemble's config, stored with it.
            address: Ray address used by :meth:`fit` (default: ``RAY_ADDRESS`` or local).

        Returns:
            The ensemble, open for writing.

        Raises:
            ConfigError: If ``config`` is not a :class:`~sisa.config.settings.SisaConfig`.
            StoreError: If ``path`` is a file, a store, or a non-empty directory.
        """
        _require_config(config)
        meta = {
            "config": config_to_dict(config),
            "feature_shape": None,
            "shard_slices": [config.slices] * config.shards,
        }
        store = Store.create(path, meta)
        return cls(store, address)

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
            config: Not accepted: a store keeps its own config. Passing one raises a
                ``ConfigError`` that says to call :meth:`reconfigure` on the open ensemble.
            readonly: Read without taking the writer lock (predict, status, eval).
            address: Ray address used by :meth:`fit`.
            resume: When writable, finish the deletions that a crash interrupted (retrain,
                erase, certify) before returning: exactly those requests are certified and
                only their shards retrained (see :func:`sisa.unlearn.requests.apply` with
                ``requests``). Deferred requests stay pending; a shard one of them shares
                with an interrupted request is retrained without its ids too (the journal
                removed them), and the next :meth:`apply` certifies it.
            lock_timeout: Seconds to wait for the writer lock while another process (a
                running apply, say) holds it; 0 fails at once with ``StoreLockedError``.

        Returns:
            The ensemble.

        Raises:
            ConfigError: If a ``config`` is passed.
        """
        if config is not None:
            raise ConfigError(
                "Ensemble.open takes no config: a store keeps the config it was created with. To change it, "
                "open the store and call ens.reconfigure(config) (recipe changes retrain at the next fit; "
                "seed, shards, slices, partition and data.num_classes cannot change)"
            )
        ens = cls(Store.open(path, readonly=readonly, lock_timeout=lock_timeout), address)
        interrupted = [r["request_id"] for r in ens.pending() if not r["defer"]] if not readonly and resume else []
        if interrupted:
            log.info("finishing interrupted deletion request(s) %s in %s", interrupted, path)
            try:
                ens.apply(requests=interrupted)
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
    def feature_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample, fixed by the first ingest."""
        shape = self.store.meta().get("feature_shape")
        return tuple(shape) if shape is not None else None

    def reconfigure(self, config: SisaConfig) -> None:
        """Replace the stored config (recipe, resources, aggregation); how to change it from Python.

        Every field is classified in :data:`sisa.config.settings.FIELD_ROLES`. A changed recipe field
        (model, train, threads, device, CPU kernel level) makes :meth:`fit` retrain every
        shard (checkpoint keys cover the recipe); fixed fields (seed, shards, slices,
        partition strategy / bound / slice order, ``data.num_classes``) cannot change,
        since they decide where samples live and what the stored labels mean; the rest
        (aggregation, policy, resources that only place tasks, data paths) takes effect
        without retraining.

        Args:
            config: The new config, e.g. ``sisa.load_config(path, overrides)`` or
                ``config_from_dict(config_to_dict(ens.config), ["train.lr=0.01"])``.

        Raises:
            ConfigError: If ``config`` is not a SisaConfig, or a fixed field differs (nothing is written).
        """
        _require_config(config)
        changed = fixed_changes(self.config, config)
        if changed:
            stored = config_fields(self.config)
            raise ConfigError(
                f"{', '.join(changed)} of store {self.path} cannot change after creation "
                f"(stored: {', '.join(f'{k}={stored[k]}' for k in changed)}); they decide where samples live "
                "and what a label means: keep the stored values, or train a new --store"
            )
        new = config_to_dict(config)
        self.store.write(lambda txn: self.store.put_meta(txn, config=new))
        self.config = config

    # ------------------------------------------------------------------- ingest
    def ingest(
        self, x: Any, y: Any = None, ids: Any = None, *, new_slice: bool = False, probabilities: Any = None
    ) -> int:
        """Add samples to the store, assigned to shards and slices by the partitioner.

        All-or-nothing: any bad sample rejects the whole call and nothing is written.
        With ``new_slice`` (what :meth:`add` uses), the samples go into one new slice
        appended to each shard they land in, so training them touches no earlier stage.

        Under ``partition.strategy: distribution-aware`` the first ingest cuts shards with
        SISA's Algorithm 1 and later ones place each new sample in the shard expecting the
        fewest deletions (see :mod:`sisa.partition.assign`); each shard's expected deletions are
        kept in the store so those later placements know them.

        Args:
            x: Features as an array ``(n, ...)``, or a ``torch.utils.data.Dataset``
                of ``(features, label)`` pairs (then ``y`` is None), or a
                :class:`~sisa.data.loaders.LabeledArrays`.
            y: Integer labels in ``[0, num_classes)``.
            ids: Unique non-negative int ids; default ``0..n-1`` for a store's first samples,
                and after the largest id the store has ever held for later ones (also for a
                :class:`~sisa.data.loaders.LabeledArrays` loaded from a file without ids).
            new_slice: Append a slice per touched shard instead of the hashed slice.
            probabilities: Deletion probabilities aligned with the samples, for the
                ``distribution-aware`` strategy; overrides the ``partition.probabilities`` file.

        Returns:
            Number of samples written.

        Raises:
            DataError: On bad shapes, NaN/inf, bad labels, ids already stored, or a bad or
                missing deletion prior.
            ConfigError: If ``partition.bound`` cuts the data into another number of shards.
        """
        data = x if isinstance(x, LabeledArrays) else as_arrays(x, y, ids, num_classes=self.config.data.num_classes)
        if data.numbered:
            data = self.number_after_stored(data)
        shape = self.feature_shape
        if shape is not None and data.feature_shape != shape:
            raise DataError(
                f"samples have shape {data.feature_shape}, but this store holds samples of shape {shape}; "
                "reshape the data to match"
            )
        with self.store.read() as txn:
            clash = [i for i in data.ids.tolist() if self.store.has_sample(txn, i)]
        if clash:
            raise DataError(f"{len(clash)} id(s) are already in the store (first: {clash[0]}); pass new, unique ids")
        from sisa.unlearn.requests import deleted_ids  # local: unlearn builds on this module

        gone = deleted_ids(self.store, data.ids.tolist())
        if gone:
            raise DataError(
                f"{len(gone)} id(s) were deleted by earlier requests (first: {gone[0]}); "
                "a deleted id is never reused: give the new samples new ids"
            )
        # Everything that can fail is decided before the write transaction opens, so a bad
        # prior leaves the store's files byte for byte as they were.
        shard, slice_, masses = place(self.config, data.ids, probabilities, self.store.meta().get("shard_mass"))

        def change(txn: Any) -> None:
            counts = self.slice_counts(txn)
            if new_slice:
                # Stable too: the shard is the partitioner's; only the slice is new.
                slice_[:] = np.asarray(counts)[shard]
                for s in np.unique(shard).tolist():
                    counts[s] += 1
            self.store.put_samples(txn, data.ids, data.x, data.y, shard, slice_)
            extra: dict[str, Any] = {} if masses is None else {"shard_mass": masses}
            # The largest id ever stored, so that unnumbered data added later (even after that id
            # was deleted, when no record of it is left in the clear) never reuses an id.
            extra["next_id"] = max(int(self.store.meta(txn).get("next_id", 0)), int(data.ids.max()) + 1)
            self.store.put_meta(txn, feature_shape=list(data.feature_shape), shard_slices=counts, **extra)

        self.store.write(change)
        log.info("ingested %d samples into %s", len(data), self.path)
        return len(data)

    def number_after_stored(self, data: LabeledArrays) -> LabeledArrays:
        """``data`` whose ids were not given, numbered after the largest id this store has held.

        The first ingest keeps ``0..n-1``; later ones (``add`` without ids) continue from the
        store's ``next_id`` (for stores written before it was kept: the largest stored id + 1).
        :meth:`ingest` calls it for data marked ``numbered``; call it first to learn the ids.

        Args:
            data: Validated samples; returned unchanged unless ``data.numbered``.

        Returns:
            The same samples with their ids (no longer marked ``numbered``).

        Raises:
            DataError: If the numbers would pass ``2**63 - 2``.
        """
        if not data.numbered:
            return data
        with self.store.read() as txn:
            start = self.store.meta(txn).get("next_id")
            if start is None:
                cursor = txn.cursor(db=self.store.db("samples"))
                start = struct.unpack(">Q", bytes(cursor.key()))[0] + 1 if cursor.last() else 0
        start = int(start)
        if start == 0:
            return data
        if start + len(data) - 1 > MAX_ID:
            raise DataError(
                f"numbering {len(data)} new samples after the store's largest id {start - 1} would pass "
                f"{MAX_ID}; give them ids"
            )
        log.info("no ids given: numbering %d samples %d..%d", len(data), start, start + len(data) - 1)
        return LabeledArrays(data.x, data.y, np.arange(start, start + len(data), dtype=np.int64))

    # -------------------------------------------------------------------- train
    def slice_counts(self, txn: Any) -> list[int]:
        """Number of slices of each shard (R, plus one per :meth:`add` that touched it)."""
        counts = self.store.meta(txn).get("shard_slices")
        return list(counts) if counts else [self.config.slices] * self.config.shards

    def _shard_slices(self, txn: Any, shard: int) -> list[np.ndarray]:
        return [self.store.slice_ids(txn, shard, r) for r in range(self.slice_counts(txn)[shard])]

    def shard_job(
        self,
        txn: Any,
        shard: int,
        start_stage: int = 0,
        slice_ids: Sequence[np.ndarray] | None = None,
        *,
        snapshot: bool = False,
        domain: str | None = None,
    ) -> ShardJob:
        """The job that trains ``shard`` from ``start_stage`` on its current samples.

        The job's slices are lazy (:class:`~sisa.train.slices.StoredSlices`): each is
        read from the store when the trainer or the orchestrator asks for it, not here.

        Args:
            txn: Read transaction (for the slice ids and the parent checkpoint).
            shard: Shard index.
            start_stage: Stages to take from the store (0 = from scratch).
            slice_ids: The shard's slice ids when the caller has read them already, in
                ``txn`` or while holding the writer lock.
            snapshot: Load the slices from ``txn`` itself (which must then stay open
                until they are loaded) instead of one short transaction per slice.
            domain: Determinism domain the job must run in; default: its parent
                checkpoint's (none from scratch). A replay for ``verify`` names the live model's.

        Returns:
            The job, with the stage ``start_stage`` checkpoint as parent when > 0.
        """
        # From txn, not self.feature_shape: that opens a transaction of its own, which in a
        # reader may reopen a compacted store and so end the snapshot ``txn`` belongs to.
        shape = tuple(self.store.meta(txn)["feature_shape"])
        ids = self._shard_slices(txn, shard) if slice_ids is None else slice_ids
        slices = StoredSlices(self.store, shard, ids, shape, txn if snapshot else None)
        parent = self.store.stage_record(txn, shard, start_stage) if start_stage > 0 else None
        if start_stage > 0 and parent is None:
            raise StoreError(f"shard {shard}: stage {start_stage} has no checkpoint to resume from")
        return ShardJob(
            config=self.config,
            shard=shard,
            slices=slices,
            start_stage=start_stage,
            parent=self.store.checkpoint(txn, parent) if parent else None,
            parent_key=parent["key"] if parent else None,
            input_shape=shape,
            num_classes=self.config.data.num_classes,
            slice_sizes=slices.sizes,
            domain=domain if domain is not None else domain_id(parent),
        )

    def shard_jobs(
        self,
        plan: Sequence[tuple[int, int]],
        slice_ids: Mapping[int, Sequence[np.ndarray]] | None = None,
        snapshot: Any = None,
        domains: Mapping[int, str] | None = None,
    ) -> Iterator[ShardJob]:
        """Jobs for ``(shard, start_stage)`` pairs, each built when the consumer asks for it.

        The orchestrator pulls the next job only when it submits it, so the driver
        holds the parent checkpoint of one shard at a time (and, through the lazy
        slices, its samples only while they are shipped or trained on).

        Args:
            plan: Shards to train and the stage each starts after.
            slice_ids: Shard -> its slice ids, where the caller planned with them
                (saves reading them again); others are read here.
            snapshot: An open read transaction to build and load every job from (it must
                stay open until the jobs are consumed); None: short transactions.
            domains: Shard -> the domain its job must run in, where not its parent's.

        Yields:
            One job per pair, in order.
        """
        known, bound = slice_ids or {}, domains or {}
        for shard, start_stage in plan:
            if snapshot is not None:
                yield self.shard_job(
                    snapshot, shard, start_stage, known.get(shard), snapshot=True, domain=bound.get(shard)
                )
                continue
            with self.store.read() as txn:
                job = self.shard_job(txn, shard, start_stage, known.get(shard), domain=bound.get(shard))
            yield job  # outside the transaction: the consumer commits stages meanwhile

    def _plan(self, txn: Any, shard: int, slice_ids: list[np.ndarray]) -> tuple[int, dict[str, Any] | None]:
        """Last stage whose stored checkpoint is exactly what training now would produce.

        A stage counts only in the domain of the stage before it: a chain never mixes domains.
        """
        recipe = self.config.recipe_digest()
        parent: dict[str, Any] | None = None
        for stage in range(1, len(slice_ids) + 1):
            record = self.store.stage_record(txn, shard, stage)
            if record is None or (parent is not None and domain_id(record) != domain_id(parent)):
                return stage - 1, parent
            expected = checkpoint_key(
                recipe,
                shard,
                stage,
                manifest_digest(slice_ids[:stage]),
                parent["key"] if parent else None,
                domain_id(record),
            )
            if record["key"] != expected:
                return stage - 1, parent
            parent = record
        return len(slice_ids), parent

    def fit(
        self, progress: Callable[[StageResult], None] | None = None, *, shards: Sequence[int] | None = None
    ) -> FitReport:
        """Train every shard stage whose checkpoint is missing or stale, in parallel on Ray.

        Resumes each shard from its last valid stage, so re-running after a crash
        (or after new data) redoes only what is needed.

        Args:
            progress: Called after each stage is committed (e.g. to advance a progress bar).
            shards: Train only these shards (an apply of chosen requests); default: all.

        Returns:
            What was trained.

        Raises:
            ConfigError: At the first fit, if a shard holds fewer samples than slices (or none).
        """
        from sisa.train import orchestrator  # the one Ray import; keeps predict/status Ray-free

        started = time.perf_counter()
        cfg, report = self.config, FitReport()
        shape = self.feature_shape
        if shape is None:
            raise NotTrainedError(f"store {self.path} holds no samples; ingest data before fit")
        plan: list[tuple[int, int]] = []
        total_slices: dict[int, int] = {}
        with self.store.read() as txn:
            live = self.store.live(txn)
            all_slices = [self._shard_slices(txn, shard) for shard in range(cfg.shards)]
            # Before the first training, a shard smaller than R is a configuration mistake;
            # after deletions it is a fact to handle (an empty shard simply has no model).
            if not self.store.meta(txn).get("trained"):
                check_shard_sizes(cfg, [sum(len(s) for s in slice_ids) for slice_ids in all_slices])
            for shard, slice_ids in enumerate(all_slices):
                if shards is not None and shard not in shards:
                    continue
                size = sum(len(s) for s in slice_ids)
                if size == 0:
                    report.empty.append(shard)
                    continue
                done, parent = self._plan(txn, shard, slice_ids)
                if done == len(slice_ids) and shard in live and parent and live[shard]["key"] == parent["key"]:
                    report.skipped.append(shard)
                    continue
                # All stages valid but no live pointer (retired by a deletion that touched
                # only later data, say): replay the last stage, which re-derives the same bytes.
                plan.append((shard, min(done, len(slice_ids) - 1)))
                total_slices[shard] = len(slice_ids)

        def commit(result: StageResult) -> None:
            record = {
                "shard": result.shard,
                "stage": result.stage,
                "key": result.key,
                "sha256": result.sha256,
                "weights": result.weights,
                "manifest": result.manifest,
                "parent": result.parent,
                "n_samples": result.n_samples,
                "epochs": result.epochs,
                "seconds": round(result.seconds, 4),
                "domain": result.domain,
            }
            last = result.stage == total_slices[result.shard]

            def change(txn: Any) -> None:
                self.store.commit_stage(txn, record, result.checkpoint, last)
                self.store.put_meta(txn, trained=True)  # from now on, small shards come from deletions

            self.store.write(change)
            report.trained.setdefault(result.shard, []).append(result.stage)
            report.stage_seconds += result.seconds
            if progress is not None:
                progress(result)

        def unavailable(job: ShardJob, available: list[Domain]) -> ShardJob:
            with self.store.read() as txn:
                needed = (self.store.stage_record(txn, job.shard, job.start_stage) or {}).get("domain")
            if cfg.resources.on_missing_domain == "refuse":
                raise DomainUnavailableError(unavailable_message(job.shard, needed, job.domain or "?", available))
            # Rebind: from scratch wherever nodes exist; stage 1's key names the new domain, so
            # committing it drops every stage of the old chain (they descend from another domain).
            reason = missing_reason(needed, job.domain or "?", available)
            log.info("rebinding shard %d (retraining it from scratch): %s", job.shard, reason)
            report.rebound[job.shard] = {"from_domain": job.domain, "reason": reason}
            return replace(job, start_stage=0, parent=None, parent_key=None, domain=None)

        jobs = self.shard_jobs(plan, dict(enumerate(all_slices)))
        retries = orchestrator.execute(self.address, jobs, commit, unavailable)
        for shard, info in report.rebound.items():
            with self.store.read() as txn:
                info["to_domain"] = domain_id(self.store.stage_record(txn, shard, 1))
        report.retries = [asdict(r) for r in retries]
        report.seconds = time.perf_counter() - started
        log.info("fit: trained %s, skipped %s in %.1fs", report.trained, report.skipped, report.seconds)
        return report

    # --------------------------------------------------------------- unlearning
    def add(
        self,
        x: Any,
        y: Any = None,
        ids: Any = None,
        progress: Callable[[StageResult], None] | None = None,
        *,
        probabilities: Any = None,
    ) -> FitReport:
        """Continual learning: add samples as a new slice of each shard they land in, train only that.

        Each touched shard trains one new stage from its last checkpoint; others are
        untouched. Before the first :meth:`fit` this is plain :meth:`ingest` + :meth:`fit`.
        Under distribution-aware sharding each new sample goes to the shard expecting the
        fewest deletions; ``probabilities`` (else the prior file) gives their probabilities.

        Returns:
            What was trained.
        """
        with self.store.read() as txn:
            trained = any(self.store.stage_records(txn, s) for s in range(self.config.shards))
        self.ingest(x, y, ids, new_slice=trained, probabilities=probabilities)
        return self.fit(progress)

    def delete(
        self, ids: Any, *, defer: bool = False, progress: Callable[[StageResult], None] | None = None
    ) -> dict[str, Any]:
        """Forget samples; returns when the request is durable and (unless ``defer``) the model is clean.

        See :func:`sisa.unlearn.requests.delete` for the steps and the returned certificate.
        """
        from sisa.unlearn import requests as unlearn

        return unlearn.delete(self, ids, defer=defer, progress=progress)

    def apply(
        self, progress: Callable[[StageResult], None] | None = None, *, requests: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Apply pending (deferred or interrupted) requests as one batch; returns their certificates.

        Args:
            progress: Called after each retrained stage is committed.
            requests: Request ids to apply (only their shards are retrained); default: every
                pending request. See :func:`sisa.unlearn.requests.apply`.
        """
        from sisa.unlearn import requests as unlearn

        return unlearn.apply(self, progress, requests=requests)

    def pending(self) -> list[dict[str, Any]]:
        """Requests journaled but not yet applied."""
        from sisa.unlearn import requests as unlearn

        return unlearn.pending(self.store)

    def resume(self, progress: Callable[[StageResult], None] | None = None) -> dict[str, Any]:
        """Finish whatever a crash interrupted: pending deletions, then any unfinished training."""
        certificates = self.apply(progress)
        report = self.fit(progress)
        return {
            "applied": certificates,
            "trained": {str(k): v for k, v in report.trained.items()},
            "rebound": {str(k): v for k, v in report.rebound.items()},
        }

    def verify(
        self, shards: Sequence[int] | None = None, progress: Callable[[StageResult], None] | None = None
    ) -> dict[str, Any]:
        """Retrain shards from scratch and compare with the live models; ``ok`` only if bit-identical."""
        from sisa.unlearn import requests as unlearn

        return unlearn.verify(self, shards, progress)

    def audit(self) -> Any:
        """Recompute the audit log's hash chain; returns an :class:`~sisa.unlearn.audit.AuditReport`."""
        from sisa.unlearn.audit import check_chain

        return check_chain(self.store, self.store.secret())

    def certificates(self) -> list[dict[str, Any]]:
        """Every deletion certificate in the audit log, oldest first, each with its ``audit_seq``.

        These are the stored entries as read; :meth:`audit` checks that none was edited.
        """
        from sisa.unlearn.audit import certificates

        return certificates(self.store)

    def lookup(self, ids: Any) -> list[dict[str, Any]]:
        """Was each id deleted, when, and by which request? The question an auditor asks.

        The ids are named by their keyed hash under the store's secret
        (:func:`sisa.unlearn.audit.keyed_hash` documents the exact input), as the store records them.

        Args:
            ids: An id or a sequence of ids (the rule of :meth:`delete`).

        Returns:
            One dict per distinct id (see :func:`sisa.unlearn.audit.lookup_ids`): ``deleted``, and the
            ``request_id``, ``state``, ``requested_at``, ``applied_at`` and ``audit_seq`` of the
            request that deleted it, or ``in_store`` and a message for an id never deleted.

        Raises:
            DataError: On an empty list, non-integers or ids outside ``[0, 2**63 - 2]``.
        """
        from sisa.unlearn.audit import lookup_ids
        from sisa.unlearn.requests import normalize_ids

        return lookup_ids(self.store, self.store.secret(), normalize_ids(ids))

    # ------------------------------------------------------------------ predict
    def live_models(self) -> dict[int, nn.Module]:
        """The live model of every shard in service, loaded (and cached) from the store.

        Raises:
            NotTrainedError: If no shard is in service.
            IntegrityError: If a live checkpoint was modified.
        """
        return {shard: model for shard, (model, _) in self._serving.snapshot().items()}

    def forget_cached_models(self) -> None:
        """Drop loaded shard models, so the next prediction reloads what is live now."""
        self._serving.clear()

    def predict_proba(self, x: Any, *, method: str | None = None, batch_size: int = 1024) -> np.ndarray:
        """Ensemble class probabilities.

        Args:
            x: Features ``(n, ...)`` (numpy or torch), a :class:`~sisa.data.loaders.LabeledArrays`,
                or a map-style ``torch.utils.data.Dataset`` of ``(features, label)`` items or
                bare features (labels are ignored; :meth:`score` takes them separately).
            method: ``mean`` (default from config), ``vote`` or ``weighted`` (by shard size).
            batch_size: Rows per forward pass.

        Returns:
            ``(n, num_classes)`` float array; rows sum to 1.
        """
        return self._serving.predict_proba(x, method or self.config.aggregate.method, batch_size)

    def provenance(self) -> dict[int, str]:
        """Which models answered the calling thread's last prediction with this handle: shard -> checkpoint key.

        Every prediction reads the live set from one store snapshot; this is that set. An
        auditor can check it against certificates (a retired key must never appear after
        its deletion was acknowledged). Per thread, so threads serving from one handle
        each see their own. Empty before the thread's first prediction.
        """
        return dict(self._serving.last_used)

    def predict(self, x: Any, *, method: str | None = None, batch_size: int = 1024) -> np.ndarray:
        """Ensemble labels: argmax of :meth:`predict_proba`."""
        return self.predict_proba(x, method=method, batch_size=batch_size).argmax(axis=1)

    def score(self, x: Any, y: Any, *, method: str | None = None) -> float:
        """Ensemble accuracy on ``(x, y)``.

        Raises:
            DataError: On bad inputs, or labels that are not ``len(x)`` integers in ``[0, num_classes)``.
        """
        predicted = self.predict(x, method=method)
        return float((predicted == check_labels(y, len(predicted), self.config.data.num_classes)).mean())

    def shard_scores(self, x: Any, y: Any) -> dict[int, float]:
        """Accuracy of each live shard model on ``(x, y)``."""
        return self._serving.shard_scores(x, y)

    # ------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Shards, slices, sample counts per shard and slice, and live checkpoint digests.

        Returns:
            A JSON-able dict.
        """
        cfg = self.config
        with self.store.read() as txn:
            live = self.store.live(txn)
            slice_counts = self.slice_counts(txn)
            masses = self.store.meta(txn).get("shard_mass")
            shards = []
            for shard in range(cfg.shards):
                counts = [int(len(self.store.slice_ids(txn, shard, r))) for r in range(slice_counts[shard])]
                stages = self.store.stage_records(txn, shard)
                rec = live.get(shard)
                shards.append(
                    {
                        "shard": shard,
                        "samples": sum(counts),
                        "slice_samples": counts,
                        "stages_done": len(stages),
                        "live": rec is not None,
                        "stale": bool(rec and rec.get("stale")),
                        # serve-clean: serving the last clean stage until a pending deletion is applied
                        "interim": bool(rec and rec.get("interim")),
                        "live_stage": rec["stage"] if rec else None,
                        "live_checkpoint": rec["sha256"] if rec else None,
                        "live_weights": rec["weights"] if rec else None,
                        "live_manifest": rec["manifest"] if rec else None,
                        # where the live model was trained: a replay must run there to be bit-identical
                        "domain": rec.get("domain") if rec else None,
                        # distribution-aware only: prior mass placed here at ingest (deletions keep it)
                        "expected_deletions": masses[shard] if masses else None,
                    }
                )
            n = self.store.count_samples(txn)
        return {
            "store": str(self.path),
            "shards": cfg.shards,
            "slices": cfg.slices,
            # slices per shard now: R, plus one per add() that touched the shard
            "shard_slices": slice_counts,
            "samples": n,
            "feature_shape": list(self.feature_shape or []),
            "num_classes": cfg.data.num_classes,
            "model": cfg.model.name,
            "recipe": cfg.recipe_digest(),
            "trained_shards": len(live),
            "per_shard": shards,
        }
