"""A fitted scikit-learn transformer's state as canonical JSON, for an allow-list of classes: never pickled.

**No code runs from a store.** Opening a store must never execute code written in its files (stores
are read by an adversarial reader model; checkpoints load with ``weights_only=True``), so the state
of the transformer inside a store's networks (:mod:`sisa.sklearn_preprocess`) is not pickled.
:func:`dump_state` writes canonical JSON: each transformer as the public name of one of
:data:`SUPPORTED` (a fixed allow-list of scikit-learn classes whose state is numbers, strings,
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
differ, as with scikit-learn's own pickles). :func:`same_state` compares two fitted states bit for bit.

Importing this module imports scikit-learn (the optional extra), like :mod:`sisa.sklearn`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import warnings
from typing import Any, Literal

import numpy as np
import sklearn
from sklearn import decomposition, feature_selection, pipeline, preprocessing

from sisa.errors import ConfigError, IntegrityError

__all__ = ["SUPPORTED", "dump_state", "load_state", "same_state"]


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
