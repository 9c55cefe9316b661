"""Exact preprocessing for :class:`sisa.sklearn.SISAClassifier`: a fitted transformer inside each network.

A store keeps the *raw* rows; each shard's network is ``inner(transformer.transform(x))``, built by
:func:`preprocessed_model` from the config, whose ``model.options`` hold the fitted transformer's
state (:func:`sisa.sklearn_state.dump_state`: canonical JSON for an allow-list of transformers, never
pickled, so opening a store runs no code from it). So that state is part of the recipe, hence of every
checkpoint key: changing it makes every checkpoint of the store stale (a retrain from scratch), it
survives reopening the store, and ``verify`` retrains on it. Two layouts use this:

* ``preprocess="shard"``: one store per shard (``shard-000``, ...; each ``shards=1``) with that shard's
  own transformer, fitted on its current rows and refitted when a deletion touches it
  (:class:`ShardStores`).
* ``preprocess="core"``: one store, one transformer fitted on the never-deletable core rows.

Importing this module imports scikit-learn (the optional extra), like :mod:`sisa.sklearn`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import nn

from sisa.config.fields import config_to_dict
from sisa.config.loader import config_from_dict
from sisa.config.settings import ModelConfig, SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, CoreSetError, DataError, IntegrityError
from sisa.partition.assign import uniform_assignment
from sisa.serve import aggregate
from sisa.sklearn_state import dump_state, load_state, same_state
from sisa.train.models import build_model
from sisa.unlearn import normalize_ids

__all__ = [
    "MODEL_SPEC",
    "Preprocessed",
    "ShardStores",
    "check_core",
    "check_store",
    "core_ids",
    "core_matches",
    "fit_transformer",
    "plan_stores",
    "preprocessed_model",
    "refit",
    "refuse_core",
    "shard_seed",
    "stored_rows",
    "stored_transformer",
    "transformer_matches",
    "with_transformer",
]

# What ``model.name`` names in a store whose networks carry a transformer.
MODEL_SPEC = "sisa.sklearn_preprocess:preprocessed_model"


class Preprocessed(nn.Module):
    """``inner(transformer.transform(x))``: the transformer is fitted state, not a trained parameter.

    The transform runs in NumPy on the CPU (any scikit-learn transformer works, none is differentiated
    through); its float32 output is what ``inner`` trains on and predicts from.
    """

    def __init__(self, transformer: Any, inner: nn.Module, output_shape: Sequence[int]) -> None:
        super().__init__()
        self.transformer = transformer
        self.inner = inner
        self.output_shape = tuple(int(d) for d in output_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the rows (flattened) and run the network on the result."""
        flat = x.detach().reshape(len(x), -1).cpu().numpy()
        out = self.transformer.transform(flat)
        if hasattr(out, "toarray"):  # a sparse output (one-hot encoders)
            out = out.toarray()
        t = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return self.inner(t.reshape(len(x), *self.output_shape).to(x.device))


def preprocessed_model(
    input_shape: Sequence[int],
    num_classes: int,
    inner: dict[str, Any],
    preprocessor: str,
    output_shape: Sequence[int],
    **refit_by: Any,
) -> nn.Module:
    """Build a shard's network: the stored transformer, then the configured network on its output.

    Args:
        input_shape: Shape of one stored (raw) row.
        num_classes: Output width.
        inner: The ``model`` section the network is built from (``mlp``, ``cnn``, a callable).
        preprocessor: The fitted transformer's state (:func:`~sisa.sklearn_state.dump_state`).
        output_shape: Shape the transformed row is reshaped to before ``inner``.
        refit_by: What a refit needs (``template``, ``sample_shape``, ``core_ids``); not the network's.
    """
    del input_shape, refit_by  # the stored rows are flat; the inner network sees output_shape
    net = build_model(ModelConfig(**inner), tuple(output_shape), num_classes)
    return Preprocessed(load_state(preprocessor), net, output_shape)


def fit_transformer(template: Any, x: np.ndarray, sample_shape: Sequence[int] | None) -> tuple[Any, list[int]]:
    """A clone of ``template`` fitted on ``x`` (rows in id order), and the shape of one transformed row.

    Raises:
        ValueError: If the transformer's output cannot take ``sample_shape``.
    """
    fitted = clone(template).fit(x)
    out = fitted.transform(x[:1])
    width = int(out.shape[1])
    if sample_shape is None:
        return fitted, [width]
    shape = [int(d) for d in sample_shape]
    if math.prod(shape) != width:
        raise ValueError(
            f"the preprocessor outputs {width} features per row, which cannot be reshaped to sample_shape={shape}; "
            "pass a sample_shape with that many elements or None"
        )
    return fitted, shape


def with_transformer(
    cfg: SisaConfig,
    template: Any,
    rows: np.ndarray,
    sample_shape: Sequence[int] | None,
    core_ids: np.ndarray | None = None,
) -> SisaConfig:
    """``cfg`` whose networks first run a clone of ``template`` fitted on ``rows`` (its state joins the recipe).

    The options also keep the unfitted ``template``, ``sample_shape`` and ``core_ids``, so a refit
    (:func:`refit`) and a check (:func:`transformer_matches`) need nothing but the store.
    No rows (a shard whose every row was deleted) store the template unfitted.

    Raises:
        ConfigError: If ``cfg`` uses a backbone or adapters (their networks take no transformer), or
            the transformer (fitted or not) is not one :func:`~sisa.sklearn_state.dump_state` can store
            (:data:`~sisa.sklearn_state.SUPPORTED`).
        ValueError: If the transformer's output cannot take ``sample_shape``.
    """
    unfitted = dump_state(clone(template))  # refuses an unsupported transformer before fitting it
    if cfg.backbone.source != "none" or cfg.model.adapter != "none":
        raise ConfigError(
            "preprocessor= cannot be combined with a backbone or adapters (backbone.source="
            f"{cfg.backbone.source}, model.adapter={cfg.model.adapter}); drop one of them"
        )
    tree = config_to_dict(cfg)
    inner = {k: tree["model"][k] for k in ("name", "hidden", "channels", "dropout", "options")}
    if inner["name"] == MODEL_SPEC:  # a refit: replace the transformer, keep the network
        inner = tree["model"]["options"]["inner"]
    if len(rows):
        fitted, output_shape = fit_transformer(template, rows, sample_shape)
    else:
        fitted, output_shape = clone(template), tree["model"]["options"]["output_shape"]
    tree["model"].update(
        name=MODEL_SPEC,
        options={
            "inner": inner,
            "preprocessor": dump_state(fitted),
            "output_shape": [int(d) for d in output_shape],
            "template": unfitted,
            "sample_shape": None if sample_shape is None else [int(d) for d in sample_shape],
            "core_ids": None if core_ids is None else [int(i) for i in core_ids],
        },
    )
    # The transform runs in NumPy, which a vmapped forward cannot trace.
    tree["aggregate"]["backend"] = "loop"
    return config_from_dict(tree)


def refit(cfg: SisaConfig, rows: np.ndarray) -> SisaConfig:
    """``cfg`` with its transformer refitted on ``rows`` (template, shape and core ids as stored)."""
    opts = cfg.model.options
    return with_transformer(cfg, load_state(opts["template"]), rows, opts["sample_shape"], opts["core_ids"])


def stored_transformer(cfg: SisaConfig) -> Any:
    """The fitted transformer a store's config holds (:func:`~sisa.sklearn_state.load_state` says what it refuses)."""
    return load_state(cfg.model.options["preprocessor"])


def check_store(cfg: SisaConfig) -> None:
    """Refuse a store whose stored transformer or template is not a state :func:`~sisa.sklearn_state.dump_state` writes.

    Building a network would refuse it too, but as a ``ModelError`` from inside the model builder;
    this names the problem when the estimator opens the store.

    Raises:
        ConfigError: If a stored state names a class outside :data:`~sisa.sklearn_state.SUPPORTED`.
        IntegrityError: If a stored state is malformed (a pickle, say), or missing.
    """
    if cfg.model.name != MODEL_SPEC:
        return
    opts = cfg.model.options
    if "preprocessor" not in opts or "template" not in opts:
        raise IntegrityError(f"the store's model.name is {MODEL_SPEC} but its options hold no preprocessor state")
    load_state(opts["preprocessor"])
    load_state(opts["template"])


def core_ids(cfg: SisaConfig) -> np.ndarray | None:
    """The core ids the store's transformer was fitted on (``preprocess="core"``), else None."""
    ids = cfg.model.options.get("core_ids")
    return None if ids is None else np.asarray(ids, dtype=np.int64)


def transformer_matches(cfg: SisaConfig, rows: np.ndarray) -> bool:
    """Whether the stored transformer is exactly the template refitted on ``rows`` (an empty shard: unfitted)."""
    return same_state(stored_transformer(refit(cfg, rows)), stored_transformer(cfg))


def stored_rows(ens: Ensemble, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids (sorted) and raw rows of a store: ``ids``, or every current sample of every shard."""
    planner = ens.planner
    with ens.store.read() as txn:
        if ids is None:
            # Each shard's own slices (not its training slices, which under a shard graph repeat its links' ids).
            counts = planner.slice_counts(txn)
            parts = [ens.store.slice_ids(txn, s, r) for s in range(planner.config.shards) for r in range(counts[s])]
            ids = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        else:
            ids = np.sort(np.asarray(ids, dtype=np.int64))
        x, _ = ens.store.load_samples(txn, ids, ens.feature_shape or (0,))
    return ids, x


def check_core(core_ids: Any, ids: np.ndarray, mode: str | None) -> np.ndarray | None:
    """The sorted core ids (``preprocess="core"`` needs some, among ``ids``; other modes take none).

    Raises:
        ValueError: If core ids are missing, not training ids, or given without ``preprocess="core"``.
    """
    if mode != "core":
        if core_ids is not None:
            raise ValueError(
                "core_ids declares the rows a preprocess='core' preprocessor is fitted on; "
                "set preprocessor=... with preprocess='core', or drop core_ids"
            )
        return None
    core = np.unique(np.asarray([] if core_ids is None else core_ids))
    if core.size == 0 or core.dtype.kind not in "iu":
        raise ValueError(
            "preprocess='core' fits the preprocessor on core rows: pass fit(..., core_ids=ids) with at least "
            "one integer id of a training row (rows that may never be deleted)"
        )
    outside = core[~np.isin(core, ids)]
    if len(outside):
        raise ValueError(
            f"{len(outside)} core id(s) are not training ids (first: {outside[:5].tolist()}); "
            "core_ids must name rows of X by their sample_ids (row positions by default)"
        )
    return core.astype(np.int64)


def refuse_core(cfg: SisaConfig, ids: Any) -> None:
    """Refuse a deletion that names a core row of the store's transformer.

    Raises:
        CoreSetError: If ``ids`` names a core id (nothing is changed).
    """
    core = core_ids(cfg)
    named = np.intersect1d(np.asarray(normalize_ids(ids), dtype=np.int64), core if core is not None else [])
    if len(named):
        raise CoreSetError(
            f"{len(named)} id(s) are core rows the preprocessor was fitted on (first: {named[:5].tolist()}); "
            "core rows can never be deleted: fit a new estimator without them to forget them"
        )


def core_matches(ens: Ensemble) -> bool:
    """Whether the store's transformer is exactly the template refitted on its core rows, as stored now."""
    _, rows = stored_rows(ens, core_ids(ens.config))
    return transformer_matches(ens.config, rows)


Plan = list[tuple[str, SisaConfig, np.ndarray, np.ndarray, np.ndarray]]


def plan_stores(
    mode: str,
    cfg: SisaConfig,
    template: Any,
    sample_shape: Sequence[int] | None,
    x: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    core: np.ndarray | None,
) -> Plan:
    """The stores a fit creates: (directory under the store path, config, raw rows, labels, ids) each.

    ``core``: one store of ``cfg``'s shards, its transformer fitted on the core rows. ``shard``: one
    store per shard (``shards=1``, a seed of its own), each transformer fitted on its shard's rows.
    Transformers are fitted on rows in id order, the order a refit reads them from a store.

    Raises:
        ConfigError: If ``shard`` meets a partition other than uniform, or a backbone or adapters.
        ValueError: If a transformer refuses the rows or its output does not fit ``sample_shape``.
    """
    order = np.argsort(ids, kind="stable")
    if mode == "core":
        rows = order[np.isin(ids[order], core if core is not None else [])]
        return [("", with_transformer(cfg, template, x[rows], sample_shape, core), x, labels, ids)]
    if cfg.partition.strategy != "uniform":
        raise ConfigError(
            "preprocess='shard' places rows with the uniform partition; partition.strategy="
            f"{cfg.partition.strategy} is not supported with it: drop that override or use preprocess='core'"
        )
    where = ShardStores.assign(ids, cfg.seed, cfg.shards)
    plan: Plan = []
    for s, path in enumerate(ShardStores.paths(Path(), cfg.shards)):
        rows = order[where[order] == s]
        one = dataclasses.replace(cfg, shards=1, seed=shard_seed(cfg.seed, s))
        plan.append(
            (str(path), with_transformer(one, template, x[rows], sample_shape), x[rows], labels[rows], ids[rows])
        )
    return plan


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard``'s own store: distinct per shard, a pure function of (seed, shard)."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ShardStores:
    """One store per shard, each with its own transformer fitted on that shard's current rows."""

    def __init__(self, ensembles: list[Ensemble]) -> None:
        self.ensembles = ensembles

    @staticmethod
    def paths(root: Path, shards: int) -> list[Path]:
        """The store directory of each shard under ``root``."""
        return [root / f"shard-{s:03d}" for s in range(shards)]

    @staticmethod
    def assign(ids: np.ndarray, seed: int, shards: int) -> np.ndarray:
        """Shard of each id (the uniform partition: a pure function of (seed, id))."""
        return uniform_assignment(ids, seed, shards, 1)[0]

    def predict_proba(self, x: np.ndarray, method: str) -> np.ndarray:
        """Every shard's network on the raw rows (each transforms them its own way), aggregated."""
        models: list[nn.Module] = []
        sizes: list[float] = []
        for ens in self.ensembles:
            live = ens.live_models()
            if live:  # a shard whose every row was deleted has no model
                models.append(live[0])
                sizes.append(float(len(stored_rows(ens)[0])) if method == "weighted" else 1.0)
        probas = aggregate.shard_probas(models, torch.from_numpy(np.ascontiguousarray(x)), backend="loop")
        return aggregate.combine(probas, method, sizes if method == "weighted" else None).cpu().numpy()

    def delete(self, ids: Any) -> dict[str, Any]:
        """Forget ids: erase them, refit the touched shards' transformers on what remains, retrain those shards.

        The new transformer changes every input of its shard, so the shard retrains from scratch
        (not from its last clean slice).

        Raises:
            DataError: On malformed ids or ids no shard holds or deleted (nothing is changed).
        """
        wanted = normalize_ids(ids)
        groups: dict[int, list[int]] = {}
        found: set[int] = set()
        for s, ens in enumerate(self.ensembles):  # refuse unknown ids before any store changes
            here = [r["id"] for r in ens.lookup(wanted) if r["deleted"] or r["in_store"]]
            if here:
                groups[s] = here
                found.update(here)
        unknown = [i for i in wanted if i not in found]
        if unknown:
            raise DataError(f"{len(unknown)} id(s) were never trained on (first: {unknown[:5]}); pass ids given to fit")
        certificates: list[dict[str, Any]] = []
        for s, group in groups.items():
            ens = self.ensembles[s]
            ens.delete(group, defer=True)  # erased now; out of service until the apply below
            if not ens.pending():
                continue  # every id was deleted before: nothing changed
            # A shard left empty stores its template unfitted: no state fitted on deleted rows stays.
            ens.reconfigure(refit(ens.config, stored_rows(ens)[1]))
            for cert in ens.apply():
                certificates.append({**cert, "shard": s})
        return {"deleted": sum(int(c.get("deleted", 0)) for c in certificates), "certificates": certificates}

    def verify(self) -> dict[str, Any]:
        """Retrain every shard from scratch and refit its transformer; ``ok`` only if all match bit for bit."""
        shards: dict[int, Any] = {}
        transformers: dict[int, bool] = {}
        for s, ens in enumerate(self.ensembles):
            shards[s] = ens.verify()
            transformers[s] = transformer_matches(ens.config, stored_rows(ens)[1])
        ok = all(r["ok"] for r in shards.values()) and all(transformers.values())
        return {"ok": ok, "shards": shards, "preprocessors": transformers}
