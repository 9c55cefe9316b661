"""Exact preprocessing for :class:`sisa.sklearn.SISAClassifier`: a fitted transformer inside each network.

A store keeps the *raw* rows; each shard's network is ``inner(transformer.transform(x))``, built by
:func:`preprocessed_model` from the config, whose ``model.options`` hold the fitted transformer's
state (:func:`dump_state`). So that state is part of the recipe, hence of every checkpoint key:
changing it makes every checkpoint of the store stale (a retrain from scratch), it survives reopening
the store, and ``verify`` retrains on it. Two layouts use this:

* ``preprocess="shard"``: one store per shard (``shard-000``, ...; each ``shards=1``) with that shard's
  own transformer, fitted on its current rows and refitted when a deletion touches it
  (:class:`ShardStores`).
* ``preprocess="core"``: one store, one transformer fitted on the never-deletable core rows.

**No code runs from a store.** Opening a store must never execute code written in its files (stores
are read by an adversarial reader model; checkpoints load with ``weights_only=True``), so the state
is not pickled. :func:`dump_state` writes canonical JSON: each transformer as the public name of
one of :data:`SUPPORTED` (a fixed allow-list of scikit-learn classes whose state is numbers, strings,
``None``, tuples/lists/dicts of them, numeric arrays and nested supported transformers) and its
attributes; arrays as dtype (``b``/``i``/``u``/``f`` kinds only), shape and raw bytes.
:func:`load_state` parses that with ``json`` alone, builds only classes of :data:`SUPPORTED` (looked
up in a table, never imported by a stored name) and only sets attributes; anything else is refused
(``ConfigError`` for a type outside the list, ``IntegrityError`` for a malformed blob). ``fit``
refuses an unsupported preprocessor with a ``ConfigError`` naming the supported ones, before any
store is touched. A ``Pipeline`` must have ``memory=None`` (a joblib cache directory would be read
back as pickles on a refit).

Why not ``skops.io`` (scikit-learn's recommended "secure" format), evaluated for this: (1) its bytes
are not deterministic (zip timestamps, and member names and ids taken from ``id()`` of the objects),
but the state is part of every checkpoint key and the same fitted state must give the same key;
(2) it trusts every scikit-learn class and many NumPy functions by default (``FunctionTransformer``
with a NumPy callable loads with ``get_untrusted_types`` empty), so a strict allow-list would have
meant walking its schema ourselves anyway; (3) its loader is a large parser with a record of
trust-check bypasses, and another dependency. The cost of the choice here: only the transformers of
:data:`SUPPORTED` (and ``Pipeline``/``FeatureUnion`` of them) can be used; a demanding user gets a
clear refusal at ``fit`` instead of a store that runs code when opened.

The canonical JSON is deterministic (sorted keys, exact float ``repr``, raw array bytes): the same
fitted state always gives the same string, so the same recipe and checkpoint keys. It records the
scikit-learn version that wrote it; another version loads it with a warning (its ``transform`` may
differ, as with scikit-learn's own pickles).

Importing this module imports scikit-learn (the optional extra), like :mod:`sisa.sklearn`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sklearn
import torch
from sklearn import decomposition, feature_selection, pipeline, preprocessing
from sklearn.base import clone
from torch import nn

from sisa.config.settings import ModelConfig, SisaConfig, config_from_dict, config_to_dict
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, CoreSetError, DataError, IntegrityError
from sisa.partition.assign import uniform_assignment
from sisa.serve import aggregate
from sisa.train.models import build_model
from sisa.unlearn import normalize_ids

__all__ = [
    "MODEL_SPEC",
    "SUPPORTED",
    "Preprocessed",
    "ShardStores",
    "check_store",
    "dump_state",
    "fit_transformer",
    "load_state",
    "preprocessed_model",
    "check_core",
    "core_ids",
    "core_matches",
    "plan_stores",
    "refuse_core",
    "refit",
    "same_state",
    "shard_seed",
    "stored_rows",
    "stored_transformer",
    "transformer_matches",
    "with_transformer",
]

# What ``model.name`` names in a store whose networks carry a transformer.
MODEL_SPEC = "sisa.sklearn_preprocess:preprocessed_model"


# The transformers a store may hold, by public name; load_state builds nothing else.
_CLASSES: dict[str, Any] = {
    f"{module.__name__}.{name}": getattr(module, name)
    for module, names in (
        (
            preprocessing,
            (
                "StandardScaler",
                "MinMaxScaler",
                "MaxAbsScaler",
                "RobustScaler",
                "Normalizer",
                "Binarizer",
                "PolynomialFeatures",
                "QuantileTransformer",
                "PowerTransformer",
            ),
        ),
        (decomposition, ("PCA", "TruncatedSVD")),
        (feature_selection, ("VarianceThreshold",)),
        (pipeline, ("Pipeline", "FeatureUnion")),
    )
    for name in names
}
_NAMES = {cls: name for name, cls in _CLASSES.items()}
SUPPORTED: tuple[str, ...] = tuple(_CLASSES)
_FORMAT = "sisa.sklearn-state/1"
_DTYPE = re.compile(r"[<>|][biuf][0-9]{1,2}")  # numeric dtypes only: never object, string or structured


def _unsupported(where: str, what: str) -> ConfigError:
    names = ", ".join(n.rsplit(".", 1)[1] for n in SUPPORTED)
    return ConfigError(
        f"{where} is {what}, which sisa cannot store without pickle (opening a store never runs code from it); "
        f"preprocessor= takes one of {names} (a Pipeline or FeatureUnion of them), with plain parameters"
    )


def _order(arr: np.ndarray) -> Literal["C", "F"]:
    """``"F"`` for a Fortran-ordered array (PCA's ``components_``), else ``"C"``: the layout is state too.

    BLAS gives other bits for the same values in another layout. A strided view (randomized PCA's
    ``components_``) is stored as its C-order copy, which may change the last bits of ``transform``
    against the in-memory object; sisa only ever uses the stored state (training, predict, verify).
    """
    return "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"


def _tree(value: Any, where: str) -> Any:
    """``value`` as JSON-able data (tagged dicts for everything JSON cannot tell apart)."""
    if value is None or type(value) in (bool, int, float, str):  # exact types: np.float64 is a float too
        return value
    if type(value) is np.ndarray or isinstance(value, np.generic):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" or not _DTYPE.fullmatch(arr.dtype.str):
            raise _unsupported(where, f"an array of dtype {arr.dtype}")
        order = _order(arr)
        data = base64.b64encode(arr.tobytes(order=order)).decode("ascii")
        kind = "array" if isinstance(value, np.ndarray) else "scalar"
        return {"$": kind, "dtype": arr.dtype.str, "shape": list(arr.shape), "order": order, "data": data}
    if type(value) in (list, tuple):
        return {"$": type(value).__name__, "items": [_tree(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if type(value) is dict:
        if not all(type(k) is str for k in value):
            raise _unsupported(where, "a dict with keys that are not strings")
        return {"$": "dict", "items": {k: _tree(v, f"{where}[{k!r}]") for k, v in value.items()}}
    name = _NAMES.get(type(value))
    if name is None:
        raise _unsupported(where, f"a {type(value).__module__}.{type(value).__qualname__}")
    if getattr(value, "memory", None) is not None:
        raise _unsupported(f"{where}.memory", "a cache (read back as pickles)")
    return {"$": "estimator", "class": name, "attrs": {k: _tree(v, f"{where}.{k}") for k, v in vars(value).items()}}


def dump_state(transformer: Any) -> str:
    """The transformer's state as canonical JSON (the same state gives the same string).

    Raises:
        ConfigError: If it (or a step, or an attribute) is not what :data:`SUPPORTED` allows.
    """
    tree = {"format": _FORMAT, "sklearn": sklearn.__version__, "state": _tree(transformer, "preprocessor")}
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), allow_nan=True)


class _Malformed(Exception):
    """A stored state that :func:`dump_state` cannot have written."""


def _fields(node: dict[str, Any], *names: str) -> list[Any]:
    if set(node) != {"$", *names}:
        raise _Malformed(f"a {node['$']!r} node holds {sorted(node)}")
    return [node[n] for n in names]


def _array(node: dict[str, Any]) -> Any:
    dtype, shape, order, data = _fields(node, "dtype", "shape", "order", "data")
    if not (isinstance(dtype, str) and _DTYPE.fullmatch(dtype) and isinstance(data, str) and order in ("C", "F")):
        raise _Malformed(f"array dtype {dtype!r} or order {order!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _Malformed(f"array shape {shape!r}")
    dt = np.dtype(dtype)
    raw = base64.b64decode(data, validate=True)
    if dt.kind not in "biuf" or len(raw) != math.prod(shape) * dt.itemsize:
        raise _Malformed(f"{len(raw)} bytes for an array {dtype} of shape {shape}")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape, order=order).copy(order=order)
    if node["$"] == "scalar":
        if shape:
            raise _Malformed("a scalar with a shape")
        return arr[()]
    return arr


def _value(node: Any) -> Any:
    """What :func:`_tree` turned into ``node``; builds only classes of :data:`SUPPORTED`."""
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is not dict or node.get("$") not in ("array", "scalar", "list", "tuple", "dict", "estimator"):
        raise _Malformed(f"a node {str(node)[:80]!r}")
    kind = node["$"]
    if kind in ("array", "scalar"):
        return _array(node)
    if kind in ("list", "tuple"):
        (items,) = _fields(node, "items")
        if type(items) is not list:
            raise _Malformed(f"{kind} items")
        values = [_value(v) for v in items]
        return values if kind == "list" else tuple(values)
    if kind == "dict":
        (items,) = _fields(node, "items")
        if type(items) is not dict:
            raise _Malformed("dict items")
        return {k: _value(v) for k, v in items.items()}
    name, attrs = _fields(node, "class", "attrs")
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise _unsupported("the store's preprocessor", f"a {str(name)[:80]!r} (not written by sisa: refused)")
    if type(attrs) is not dict or not all(k.isidentifier() and not k.startswith("__") for k in attrs):
        raise _Malformed(f"{name} attributes")
    obj = cls.__new__(cls)  # as unpickling does: no __init__, then the attributes
    obj.__dict__.update({k: _value(v) for k, v in attrs.items()})
    if getattr(obj, "memory", None) is not None:
        raise _unsupported("the store's preprocessor memory", "a cache (read back as pickles)")
    return obj


def load_state(text: Any) -> Any:
    """The transformer :func:`dump_state` wrote; runs no code from ``text`` (JSON, numbers, supported classes).

    Raises:
        ConfigError: If it names a class outside :data:`SUPPORTED` (or a Pipeline with a cache).
        IntegrityError: If it is not a state :func:`dump_state` writes (a pickle, say).
    """
    try:
        if not isinstance(text, str):
            raise _Malformed(f"a {type(text).__name__}, not JSON text")
        tree = json.loads(text)
        if type(tree) is not dict or set(tree) != {"format", "sklearn", "state"} or tree["format"] != _FORMAT:
            raise _Malformed(f"no {_FORMAT} header")
        if type(tree["sklearn"]) is not str:
            raise _Malformed("no scikit-learn version")
        value = _value(tree["state"])
    except ConfigError:
        raise
    except (_Malformed, ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise IntegrityError(
            f"the store's preprocessor state is not one sisa writes ({type(exc).__name__}: {str(exc)[:200]}); "
            "refused without running it: the store's config was tampered with or corrupted, fit a new store"
        ) from exc
    if tree["sklearn"] != sklearn.__version__:
        warnings.warn(
            f"the store's preprocessor was fitted with scikit-learn {tree['sklearn'][:40]}, this is "
            f"{sklearn.__version__}: its transform may differ (verify retrains to check)",
            UserWarning,
            stacklevel=2,
        )
    return value


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
        preprocessor: The fitted transformer's state (:func:`dump_state`).
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
            the transformer (fitted or not) is not one :func:`dump_state` can store (:data:`SUPPORTED`).
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
    """The fitted transformer a store's config holds (see :func:`load_state` for what it refuses)."""
    return load_state(cfg.model.options["preprocessor"])


def check_store(cfg: SisaConfig) -> None:
    """Refuse a store whose stored transformer or template is not a state :func:`dump_state` writes.

    Building a network would refuse it too, but as a ``ModelError`` from inside the model builder;
    this names the problem when the estimator opens the store.

    Raises:
        ConfigError: If a stored state names a class outside :data:`SUPPORTED`.
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


def same_state(a: Any, b: Any) -> bool:
    """Whether two fitted transformers hold exactly the same state (arrays bit for bit, and their layout)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and _order(a) == _order(b)
        return same and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(p, q) for p, q in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return same_state(vars(a), vars(b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


def stored_rows(ens: Ensemble, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids (sorted) and raw rows of a store: ``ids``, or every current sample of every shard."""
    planner = ens.planner
    with ens.store.read() as txn:
        if ids is None:
            parts = [i for shard in range(planner.config.shards) for i in planner.shard_slices(txn, shard)]
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
