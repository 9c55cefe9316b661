"""One store state's live models as plain bytes, and the immutable view a serving replica answers from.

The store side (:mod:`sisa.serve.publisher`) reads the live set in one read transaction and
ships each model's weights as bytes through Ray's object store; a replica builds a
:class:`ModelView` from them. A response reads one view, so it never mixes two store states.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import lmdb
import numpy as np
import torch
from torch import nn

from sisa.config.settings import UNLEARN_POLICIES, SisaConfig
from sisa.errors import DataError, ModelError, NotTrainedError
from sisa.serve import aggregate
from sisa.serve.serving import checked_inputs
from sisa.store.database import Store
from sisa.train.adapters import build_shard_model
from sisa.train.trainer import load_checkpoint

__all__ = [
    "METHODS",
    "POLICIES",
    "ModelView",
    "ShardEntry",
    "backbone_key",
    "read_models",
    "read_state",
    "served_by",
    "wanted_keys",
]

POLICIES = UNLEARN_POLICIES  # exclude, serve-clean, serve-stale: what a response may use while a deletion is pending
METHODS = ("mean", "vote", "weighted")
# The metadata a replica needs besides the weights: how inputs are checked and scaled.
_META_KEYS = ("feature_shape", "feature_scale", "feature_dtype")


@dataclass(frozen=True)
class ShardEntry:
    """What a shard serves in one store state.

    Attributes:
        shard: The shard.
        key: Checkpoint key of its live model (the provenance a response reports).
        sha256: Digest of the checkpoint's bytes (what certificates name in ``removed_checkpoints``).
        n_samples: Its training-set size (the ``weighted`` aggregation's weight).
        status: ``live`` (trained on the shard's current samples), ``stale`` (kept by ``serve-stale``
            while a deletion is pending: it saw a deleted id) or ``interim`` (an earlier, clean
            slice's model served by ``serve-clean`` until the retrain finishes).
    """

    shard: int
    key: str
    sha256: str
    n_samples: int
    status: str


def served_by(status: str, policy: str | None) -> bool:
    """Whether a shard model of ``status`` may answer under the serving ``policy`` (None: the store's own).

    The store already applied the deleting process's policy when it journaled the request
    (a ``stale`` model exists only under ``serve-stale``, an ``interim`` one only under
    ``serve-clean``), so a serving policy can only be stricter than that, never looser:
    ``exclude`` answers with fully trained clean models only, ``serve-clean`` adds the
    interim ones, ``serve-stale`` (and None) everything the store serves.
    """
    if policy is None or policy == "serve-stale":
        return True
    if policy == "serve-clean":
        return status != "stale"
    return status == "live"


def _status(record: dict[str, Any]) -> str:
    return "stale" if record.get("stale") else "interim" if record.get("interim") else "live"


def read_state(store: Store, txn: lmdb.Transaction) -> tuple[str, dict[str, Any]]:
    """The serving state of ``store`` in ``txn``: a digest that changes with what a replica must serve, and its parts.

    Cheap (the live records and the metadata only, no checkpoint bytes): the publisher reads it
    every poll interval. Any ``delete``, ``apply``, ``add``, ``fit`` or ``reconfigure`` that
    changes a live model, a shard's service status or the config changes the digest.

    Returns:
        ``(digest, state)``; ``state`` holds ``shards`` (ShardEntry fields per shard in service,
        before any serving policy), ``config`` (the stored config dict) and ``meta``.
    """
    meta = store.meta(txn)
    shards = []
    for shard, record in sorted(store.live(txn).items()):
        shards.append(
            {
                "shard": shard,
                "key": record["key"],
                "sha256": record.get("sha256", ""),
                "n_samples": int(record["n_samples"]),
                "status": _status(record),
                "stage": record["stage"],
            }
        )
    backbone = meta.get("backbone")
    state = {
        "shards": shards,
        "config": meta["config"],
        "meta": {k: meta.get(k) for k in _META_KEYS},
        # The shared frozen backbone's digest (None without one): its weights travel once, like a model's.
        "backbone": backbone["digest"] if backbone else None,
    }
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    return digest, state


def backbone_key(state: dict[str, Any]) -> str | None:
    """The key the shared backbone's weights travel under in ``state`` (None: no backbone)."""
    digest = state.get("backbone")
    return f"backbone:{digest}" if digest else None


def wanted_keys(state: dict[str, Any]) -> list[str]:
    """Every key whose weights a replica needs to serve ``state``: each shard's model, and the backbone."""
    keys = [entry["key"] for entry in state["shards"]]
    bkey = backbone_key(state)
    return [*keys, bkey] if bkey else keys


def read_models(store: Store, txn: lmdb.Transaction, state: dict[str, Any], have: set[str]) -> dict[str, bytes]:
    """The weights (a ``state_dict`` saved by torch) of every model in ``state`` whose key is not in ``have``.

    Read in the same transaction as ``state``. Only the weights travel: a checkpoint's
    optimizer state and RNG are for training, not serving. A shared backbone travels once,
    under :func:`backbone_key`, as the bytes the store holds (:func:`sisa.train.backbone.encode`);
    checkpoints then hold only each shard's head or adapters.

    Raises:
        IntegrityError: If a stored checkpoint was modified.
    """
    out: dict[str, bytes] = {}
    bkey = backbone_key(state)
    if bkey is not None and bkey not in have:
        got = store.backbone_bytes(txn)
        if got is None:  # pragma: no cover - its record was read in this transaction
            raise NotTrainedError(f"store {store.path} has no backbone yet; run fit (sisa train) first")
        out[bkey] = got[1]
    for entry in state["shards"]:
        if entry["key"] in have or entry["key"] in out:
            continue
        # A stale model kept by the serve-stale policy has only its live record.
        shard = entry["shard"]
        record = store.live(txn)[shard]
        full = store.stage_record(txn, shard, entry["stage"]) or record
        ckpt = load_checkpoint(store.checkpoint(txn, {**full, "shard": shard}))
        buf = io.BytesIO()
        torch.save(ckpt["model"], buf)
        out[entry["key"]] = buf.getvalue()
    return out


class ModelView:
    """The models of one store state, built once, read by every response that starts while it is current.

    Immutable after construction: a replica swaps the whole view, so a response that holds one
    answers entirely from one store state.
    """

    def __init__(
        self,
        version: int,
        digest: str,
        state: dict[str, Any],
        weights: dict[str, bytes],
        cache: dict[str, nn.Module] | None = None,
        device: str = "cpu",
        previous: ModelView | None = None,
    ) -> None:
        """Build the models of ``state`` from ``weights`` (key -> bytes), reusing ``cache`` (key -> model).

        With ``previous`` (the view this one replaces) an unchanged stored config is not parsed again:
        a swap that only takes shards out (``exclude``) then builds nothing but the new entries.

        New models (and a new backbone) go to ``device``; cached ones are there already (a replica
        keeps one device for its life). Inputs follow the models' device in
        :func:`sisa.serve.aggregate.predict_proba`; outputs come back to the CPU.

        Raises:
            ModelError: If a model's weights do not fit the network the stored config builds.
        """
        from sisa.config.stored import config_from_stored

        self.version = version
        self.digest = digest
        self.device = device
        self._stored_config: dict[str, Any] = state["config"]
        if previous is not None and previous._stored_config == state["config"]:
            self.config: SisaConfig = previous.config  # frozen dataclasses: shared, never changed
        else:
            self.config = config_from_stored(state["config"])
        self.meta: dict[str, Any] = state["meta"]
        self.entries = [ShardEntry(**{k: v for k, v in e.items() if k != "stage"}) for e in state["shards"]]
        shape = tuple(self.meta.get("feature_shape") or ())
        # Every model of this view, by key; a shared backbone too (under backbone_key), so the next view reuses it.
        self.models: dict[str, nn.Module] = {}
        backbone = self._backbone(state, shape, weights, cache or {})
        for entry in self.entries:
            if cache is not None and entry.key in cache:
                self.models[entry.key] = cache[entry.key]
                continue
            model = build_shard_model(self.config, shape, self.config.data.num_classes, backbone)
            state_dict = torch.load(io.BytesIO(weights[entry.key]), weights_only=True)
            try:
                model.load_state_dict(state_dict)
            except RuntimeError as exc:
                raise ModelError(
                    f"the live model of shard {entry.shard} does not fit the stored config's network: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            self.models[entry.key] = model.to(device).eval()

    def _backbone(
        self, state: dict[str, Any], shape: tuple[int, ...], weights: dict[str, bytes], cache: dict[str, nn.Module]
    ) -> nn.Module | None:
        """The shared frozen backbone of ``state`` (None without one): from ``cache``, else decoded and checked.

        Its key holds its digest, and the digest enters every shard's checkpoint key: a new
        backbone comes with new keys, so no cached head ever runs on another backbone.

        Raises:
            IntegrityError: If its bytes do not fit the config's network or do not hash to the digest.
        """
        from sisa.train.backbone import build_network, decode

        key = backbone_key(state)
        if key is None:
            return None
        module = cache.get(key)
        if module is None:
            module = decode(weights[key], build_network(self.config, shape), str(state["backbone"])).module
            # Before the heads are built on it: an adapter holds it unregistered, so their .to() would not move it.
            module = module.to(self.device)
        self.models[key] = module
        return module

    def predict(self, features: Any, policy: str | None = None, method: str | None = None) -> dict[str, Any]:
        """Labels, probabilities and provenance for ``features`` under the serving ``policy``.

        Raises:
            DataError: On an unknown policy or method, or features that are not ``n`` samples of
                the stored shape, finite numbers.
            NotTrainedError: If no shard may answer under ``policy`` (all out of service).
        """
        if policy is not None and policy not in POLICIES:
            raise DataError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        method = method or self.config.aggregate.method
        if method == "combiner":
            # A replica holds the live models' weights, not the core set a combiner is fitted on (nor the
            # store, to read a stored one): refused here, never answered by another method.
            raise DataError(
                "aggregate.method combiner is not served by Ray Serve replicas yet: pass method mean, vote or "
                "weighted with the request, or predict in-process (Ensemble.predict, sisa eval), which "
                "applies the combiner"
            )
        if method not in METHODS:
            raise DataError(f"unknown aggregation method {method!r}; use one of {', '.join(METHODS)}")
        try:
            xa = np.asarray(features)
        except (ValueError, TypeError) as exc:  # ragged lists
            raise DataError(f"features must be a list of equally long rows of numbers ({exc})") from None
        if xa.ndim < 2 or xa.shape[0] == 0:
            raise DataError(f"features must be a non-empty list of samples (rows), got an array of shape {xa.shape}")
        x = checked_inputs(xa, self.meta)
        used = [e for e in self.entries if served_by(e.status, policy)]
        if not used:
            raise NotTrainedError(
                f"no shard may answer under policy {policy or 'of the store'}: every shard is out of service until "
                "the pending deletions are applied (sisa apply)"
            )
        weights = [float(e.n_samples) for e in used] if method == "weighted" else None
        with torch.inference_mode():
            proba = aggregate.predict_proba(
                [self.models[e.key] for e in used],
                x,
                method=method,
                weights=weights,
                backend=self.config.aggregate.backend,
            )
        out = proba.cpu().numpy()
        return {
            "labels": out.argmax(axis=1).tolist(),
            "probabilities": out.tolist(),
            "provenance": {str(e.shard): e.key for e in used},
            "version": self.version,
            "state": self.digest,
            "policy": policy or "store",
        }
