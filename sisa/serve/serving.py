"""Serving: load each shard's live model from the store (cached by checkpoint key) and predict.

Every prediction reads the live set from one store snapshot, so it uses the old
ensemble or the new one, never a mix, and never a shard a deletion took out of service.
One handle may serve several threads at once (a server's request threads, while another
thread deletes); each thread's provenance is that of its own last prediction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays, check_labels, to_numpy
from sisa.data.inputs import request_inputs
from sisa.errors import DataError, ModelError, NotTrainedError, StoreChangedError
from sisa.serve import aggregate
from sisa.store.database import Store
from sisa.train.adapters import build_shard_model
from sisa.train.backbone import Backbone, load_stored
from sisa.train.trainer import load_checkpoint
from sisa.unlearn.journal import requests

__all__ = ["Serving", "checked_inputs", "dataset_features"]


def _is_dataset(x: Any) -> bool:
    return isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor)


def dataset_features(ds: Any) -> np.ndarray:
    """The features of a map-style ``torch.utils.data.Dataset``, stacked: what predictions are made on.

    Each item is a ``(features, label)`` pair (the label is ignored), a ``(features,)`` tuple
    (a one-tensor ``TensorDataset``), or bare features.

    Raises:
        DataError: If the Dataset has no ``len()``, is empty, or its items' feature shapes differ.
    """
    if not hasattr(ds, "__len__"):
        raise DataError(
            "a Dataset to predict on needs len(); use a map-style Dataset, or pass the features as an array"
        )
    rows: list[np.ndarray] = []
    for i in range(len(ds)):
        item = ds[i]
        # (features, label) or (features,) as TensorDataset gives them; a list of numbers is bare features
        paired = isinstance(item, (tuple, list)) and len(item) in (1, 2) and not np.isscalar(item[0])
        rows.append(to_numpy(item[0] if paired else item))
        if rows[-1].shape != rows[0].shape:
            raise DataError(
                f"Dataset items have inconsistent feature shapes: item 0 is {rows[0].shape}, item {i} is "
                f"{rows[-1].shape}; pad or resize the features to one shape"
            )
    if not rows:
        raise DataError("the Dataset to predict on is empty; give at least one sample")
    return np.stack(rows)


def checked_inputs(xa: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
    """Features ``xa`` as the float32 model inputs of a store whose metadata is ``meta``.

    Shared by in-process prediction and the Ray Serve replicas (:mod:`sisa.serve.app`), which hold
    a copy of the store's metadata and never the store: both refuse the same inputs alike.

    Raises:
        DataError: If the inputs are not numeric, hold NaN/inf, or the sample shape differs.
    """
    stored = meta.get("feature_shape")
    shape = tuple(stored) if stored is not None else None
    if xa.dtype.kind not in "iuf":  # bool, str, object: as ingest refuses them
        raise DataError(f"inputs must be numeric features, not {xa.dtype}; convert them (e.g. x.astype(np.float32))")
    if shape is not None and tuple(xa.shape[1:]) != shape:
        raise DataError(f"inputs have sample shape {tuple(xa.shape[1:])}, the ensemble expects {shape}")
    with np.errstate(over="ignore"):  # overflow becomes inf and is reported below
        # Integers are raw values, scaled as a shard's samples are; floats are model inputs.
        xf = request_inputs(xa, meta.get("feature_scale"), meta.get("feature_dtype"))
    bad = int((~np.isfinite(xf)).sum())
    if bad:  # a NaN input gives NaN scores whose argmax is class 0: refuse, do not guess
        raise DataError(f"inputs hold {bad} NaN/inf value(s) (after float32 conversion); clean or impute them first")
    return torch.from_numpy(xf)


class Serving:
    """Live shard models of one ensemble, and predictions from them."""

    def __init__(self, store: Store, config: Callable[[], SisaConfig]) -> None:
        """Serve the live models of ``store``; nothing is loaded until the first prediction.

        Args:
            store: The store.
            config: Returns the store's config now (a reconfigure may change the aggregation).
        """
        self._store = store
        self._config = config
        self._cache: dict[int, tuple[str, nn.Module, int]] = {}  # shard -> (checkpoint key, model, samples)
        self._cache_lock = threading.Lock()  # the cache is shared by the threads predicting with this handle
        self._backbone: Backbone | None = None  # the shared backbone every cached model runs on
        self._last = threading.local()  # per thread: shard -> checkpoint key of its last prediction's models

    @property
    def last_used(self) -> dict[int, str]:
        """Shard -> checkpoint key of each model the calling thread's last prediction used."""
        used: dict[int, str] = getattr(self._last, "used", {})
        return used

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._cache_lock:
            self._cache.clear()

    def snapshot(self) -> dict[int, tuple[nn.Module, int]]:
        """Every shard in service: its model and its training-set size, from one read snapshot.

        Raises:
            NotTrainedError: If no shard is in service.
            IntegrityError: If a live checkpoint was modified.
        """
        return {shard: (model, n) for shard, (_, model, n) in self._snapshot().items()}

    def _snapshot(self) -> dict[int, tuple[str, nn.Module, int]]:
        """:meth:`snapshot` with each model's checkpoint key."""
        with self._cache_lock:
            try:
                return self._load_live()
            except StoreChangedError:
                # A deletion in another process retired a checkpoint between this read's two
                # snapshots (bulk, then keys); the next read's snapshot no longer names it.
                return self._load_live()

    def _load_live(self) -> dict[int, tuple[str, nn.Module, int]]:
        store, cfg = self._store, self._config()
        with store.read() as txn:
            stored_shape = store.meta(txn).get("feature_shape")
            shape = tuple(stored_shape) if stored_shape is not None else None
            live = store.live(txn)
            if not live or shape is None:
                if store.stage_records(txn, 0) or any(r["state"] == "pending" for r in requests(store, txn)):
                    raise NotTrainedError(
                        f"every shard of {store.path} is out of service until pending deletions are applied; "
                        "run `sisa apply` (or Ensemble.apply())"
                    )
                raise NotTrainedError(f"store {store.path} has no trained shards; run fit (sisa train) first")
            backbone = load_stored(store, cfg, txn, self._backbone)
            if backbone is not self._backbone:
                self._cache.clear()  # every model ran on the old backbone (and its key named it)
                self._backbone = backbone
            for shard, record in live.items():
                cached = self._cache.get(shard)
                if cached is not None and cached[0] == record["key"]:
                    continue
                # A stale model kept by the serve-stale policy has only its live record.
                full = store.stage_record(txn, shard, record["stage"]) or record
                ckpt = load_checkpoint(store.checkpoint(txn, {**full, "shard": shard}))
                model = build_shard_model(
                    cfg, shape, cfg.data.num_classes, backbone.module if backbone is not None else None
                )
                try:
                    model.load_state_dict(ckpt["model"])
                except RuntimeError as exc:  # another network than the one it was trained as
                    raise ModelError(
                        f"the live model of shard {shard} was trained as another network than the store's config "
                        f"builds now (the model, adapter or backbone settings changed since): run `sisa train "
                        f"--store {store.path}` (Ensemble.fit) to retrain under the new config. torch said: "
                        f"{str(exc).splitlines()[0]}"
                    ) from exc
                self._cache[shard] = (record["key"], model.eval(), int(record["n_samples"]))
        for gone in set(self._cache) - set(live):
            del self._cache[gone]
        return {shard: self._cache[shard] for shard in sorted(live)}

    def as_tensor(self, x: Any) -> torch.Tensor:
        """Inputs as a float32 tensor, checked against the stored sample shape.

        ``x`` is an array or tensor of features, a :class:`~sisa.data.arrays.LabeledArrays`, or a
        map-style Dataset of ``(features, label)`` items or bare features (labels are ignored).

        Raises:
            DataError: If the inputs are not numeric, hold NaN/inf, or the sample shape differs.
        """
        xa = x.x if isinstance(x, LabeledArrays) else dataset_features(x) if _is_dataset(x) else to_numpy(x)
        return checked_inputs(xa, self._store.meta())

    def predict_proba(self, x: Any, method: str, batch_size: int) -> np.ndarray:
        """Aggregated class probabilities, ``(n, num_classes)``; ``weighted`` weighs by shard size."""
        live = self._snapshot()
        self._last.used = {shard: key for shard, (key, _, _) in live.items()}
        models = [model for _, model, _ in live.values()]
        weights = [float(n) for _, _, n in live.values()] if method == "weighted" else None
        out = aggregate.predict_proba(
            models,
            self.as_tensor(x),
            method=method,
            weights=weights,
            backend=self._config().aggregate.backend,
            batch_size=batch_size,
        )
        return out.cpu().numpy()

    def shard_scores(self, x: Any, y: Any) -> dict[int, float]:
        """Accuracy of each live shard model on ``(x, y)``.

        Raises:
            DataError: On bad inputs, or labels that are not ``len(x)`` integers in ``[0, num_classes)``.
        """
        live = self.snapshot()
        xt = self.as_tensor(x)
        y_np = check_labels(y, xt.shape[0], self._config().data.num_classes)
        probas = aggregate.shard_probas(
            [model for model, _ in live.values()], xt, backend=self._config().aggregate.backend
        )
        labels = probas.argmax(dim=2).cpu().numpy()
        return {shard: float((labels[i] == y_np).mean()) for i, shard in enumerate(live)}
