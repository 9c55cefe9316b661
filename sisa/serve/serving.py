"""Serving: load each shard's live model from the store (cached by checkpoint key) and predict.

Every prediction reads the live set from one store snapshot, so it uses the old
ensemble or the new one, never a mix, and never a shard a deletion took out of service.
One handle may serve several threads at once (a server's request threads, while another
thread deletes); each thread's provenance is that of its own last prediction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.settings import AGGREGATE_METHODS, SisaConfig
from sisa.data.arrays import LabeledArrays, check_labels, to_numpy
from sisa.data.inputs import request_inputs
from sisa.errors import ConfigError, DataError, NotTrainedError, StoreChangedError
from sisa.serve import aggregate
from sisa.store.database import Store
from sisa.train.backbone import Backbone, load_stored
from sisa.train.combiner import Basis, fit_on_core, read_core, require_core, stored_stacker
from sisa.train.live import load_live_model
from sisa.train.stacking import Stacker, apply_weights
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
        self._fitted: tuple[str, Stacker] | None = None  # the combiner of one served set: (basis digest, it)
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
            self._fitted = None

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
                module = backbone.module if backbone is not None else None
                model = load_live_model(store, cfg, txn, shard, record, shape, module)
                self._cache[shard] = (record["key"], model, int(record["n_samples"]))
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
        """Aggregated class probabilities, ``(n, num_classes)``; ``weighted`` weighs by shard size.

        ``combiner``: the stored combiner of exactly the models served, else one fitted now on
        them (kept in memory only, until the served set changes; see :mod:`sisa.train.combiner`).
        """
        return self.predict_probas(x, (method,), batch_size)[method]

    def predict_probas(self, x: Any, methods: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
        """:meth:`predict_proba` of every method in ``methods``, from one forward of each shard model.

        Each method's probabilities are the bytes :meth:`predict_proba` gives for it alone: the
        methods differ only in how they combine the same shard logits.

        Raises:
            ConfigError: On an unknown method, or ``combiner`` without a core set (before any forward).
        """
        live, _, out = self._pass(self.as_tensor(x), methods, batch_size)
        self._last.used = {shard: key for shard, (key, _, _) in live.items()}
        return {m: p.cpu().numpy() for m, p in out.items()}

    def _pass(
        self, x: torch.Tensor, methods: Sequence[str], batch_size: int
    ) -> tuple[dict[int, tuple[str, nn.Module, int]], torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of every live model on ``x`` (checked inputs).

        Returns:
            The live set, the shard probabilities ``(S, n, C)`` and each method's ``(n, C)``.
        """
        for m in methods:
            if m not in AGGREGATE_METHODS:
                raise ConfigError(f"unknown method {m!r}; allowed: {', '.join(AGGREGATE_METHODS)}")
        live = self._snapshot()
        models = [model for _, model, _ in live.values()]
        # The combiner is looked up (or refused, without a core set) before the forwards are paid for.
        stacker = (
            self._stacker({shard: (key, model) for shard, (key, model, _) in live.items()})
            if "combiner" in methods
            else None
        )
        logits = aggregate.shard_logits(models, x, backend=self._config().aggregate.backend, batch_size=batch_size)
        probas = aggregate.probas_of(logits)
        sizes = [float(n) for _, _, n in live.values()]
        out = {
            m: apply_weights(logits, stacker)
            if stacker is not None and m == "combiner"
            else aggregate.combine(probas, m, sizes if m == "weighted" else None)
            for m in dict.fromkeys(methods)
        }
        return live, probas, out

    def _stacker(self, served: dict[int, tuple[str, nn.Module]]) -> Stacker:
        """The combiner of exactly the ``served`` models (shard -> (checkpoint key, model)).

        The stored one when it was fitted on them; otherwise (a reduced set while a deletion is
        pending, a config switched to the combiner before a fit) one fitted now on the same
        inputs, which gives the bytes a fit would store. Never one fitted on other models.

        Raises:
            ConfigError: If the store has no core set.
        """
        store, cfg = self._store, self._config()
        with store.read() as txn:
            require_core(cfg, store.core_count(txn))
            basis = Basis({shard: key for shard, (key, _) in served.items()}, store.core_ids(txn))
            with self._cache_lock:
                if self._fitted is not None and self._fitted[0] == basis.digest:
                    return self._fitted[1]
            stacker = stored_stacker(store, txn, basis)
            if stacker is None:
                stacker, _ = Stacker.decode(fit_on_core(cfg, served, read_core(store, cfg, txn)))
        with self._cache_lock:
            self._fitted = (basis.digest, stacker)  # one entry: the served set's; an older one is dropped
        return stacker

    def shard_scores(self, x: Any, y: Any) -> dict[int, float]:
        """Accuracy of each live shard model on ``(x, y)``.

        Raises:
            DataError: On bad inputs, or labels that are not ``len(x)`` integers in ``[0, num_classes)``.
        """
        return self.scores(x, y, (), 1024)[1]

    def scores(
        self, x: Any, y: Any, methods: Sequence[str], batch_size: int
    ) -> tuple[dict[str, float], dict[int, float]]:
        """Accuracy on ``(x, y)`` of each method in ``methods``, and of each live shard, from one forward pass.

        Raises:
            DataError: On bad inputs, or labels that are not ``len(x)`` integers in ``[0, num_classes)``.
            ConfigError: As :meth:`predict_probas`.
        """
        xt = self.as_tensor(x)
        y_np = check_labels(y, xt.shape[0], self._config().data.num_classes)  # before the forwards
        live, probas, out = self._pass(xt, methods, batch_size)
        if methods:
            self._last.used = {shard: key for shard, (key, _, _) in live.items()}
        labels = probas.argmax(dim=2).cpu().numpy()
        per_shard = {shard: float((labels[i] == y_np).mean()) for i, shard in enumerate(live)}
        return {m: float((p.argmax(dim=1).cpu().numpy() == y_np).mean()) for m, p in out.items()}, per_shard
