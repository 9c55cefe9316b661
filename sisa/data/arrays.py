"""Validated in-memory samples: ``LabeledArrays`` and ``as_arrays``, the single gate all data passes.

Every bad input raises a :class:`~sisa.errors.DataError` that names the problem and its fix.
"""

from __future__ import annotations

import decimal
import logging
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sisa.errors import DataError

__all__ = [
    "items_to_arrays",
    "ID_RULE",
    "MAX_ID",
    "LabeledArrays",
    "as_arrays",
    "check_id_values",
    "check_labels",
    "parse_id_text",
    "to_numpy",
    "validated",
]

log = logging.getLogger(__name__)

# 2**63 - 1 stays free so callers may use it as a sentinel next to int64 ids.
MAX_ID = 2**63 - 2


# eq=False: the generated __eq__ would compare arrays elementwise and raise.
@dataclass(frozen=True, eq=False)
class LabeledArrays:
    """Validated samples: features, labels and stable sample ids.

    Attributes:
        x: float32 (or, read for a store, the caller's integer or float dtype), C-contiguous,
            shape ``(n, *feature_shape)``, ``n >= 1``.
        y: int64 labels, shape ``(n,)``.
        ids: int64 ids, shape ``(n,)``, unique, each in ``[0, MAX_ID]``.
        numbered: True when no ids were given and ``ids`` is the placeholder ``0..n-1``: a store
            that already holds samples numbers them after the largest id it has held instead.
        scale: None: ``x`` is what the model sees. A number: ``x`` holds raw values (uint8
            pixels, say) and the model sees ``x.astype(float32) / scale``; a store keeps the
            raw values (1 byte a pixel) and divides when a shard loads (loaders give this
            form when asked for ``raw`` data).
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    numbered: bool = False
    scale: float | None = None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def to_numpy(value: Any) -> np.ndarray:
    """Arrays, nested lists or torch tensors as numpy, without importing torch."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return np.asarray((t.float() if t.dtype == torch.bfloat16 else t).numpy())
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise DataError(f"cannot make an array of the input ({exc}); give equal-length rows") from exc


def items_to_arrays(ds: Any, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stack the ``(features, label)`` items ``indices`` of a map-style Dataset into x and y.

    Raises:
        DataError: On an item that is not a pair, features of another shape than the first
            item's, or a label that is not a scalar (naming the item).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i in indices:
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"Dataset item {i} must be a (features, label) pair, not {item!r:.60}")
        feats, label = to_numpy(item[0]), to_numpy(item[1])
        if xs and feats.shape != xs[0].shape:
            raise DataError(
                f"Dataset items have inconsistent feature shapes: item 0 is {xs[0].shape}, "
                f"item {i} is {feats.shape}; pad or resize the features to one shape"
            )
        if label.size != 1:
            raise DataError(f"Dataset item {i} has a label of shape {label.shape}; use scalar labels")
        xs.append(feats)
        ys.append(label.reshape(()))
    if not xs:
        raise DataError("x is empty (0 samples); give at least one sample")
    return np.stack(xs), np.stack(ys)


def _from_dataset(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stack a whole map-style Dataset of ``(features, label)`` items into x and y."""
    if not hasattr(ds, "__len__"):
        raise DataError("a Dataset passed as x needs len(); use a map-style Dataset")
    return items_to_arrays(ds, range(len(ds)))


def _check_x(x: np.ndarray, copy: bool, native: bool = False) -> np.ndarray:
    """C-contiguous, finite features of shape ``(n, ...)``: float32, or with ``native`` their own dtype."""
    if x.ndim >= 1 and x.shape[0] == 0:
        raise DataError("x is empty (0 samples); give at least one sample")
    if x.dtype.kind not in "iuf":  # bool, complex, str, object
        raise DataError(f"features x must be numeric, not {x.dtype}; convert them first (e.g. x.astype(np.float32))")
    if x.ndim < 2:
        raise DataError(
            f"x must have shape (n, features...), not {x.shape}; reshape it, "
            "e.g. x.reshape(-1, 1) for one feature per sample"
        )
    with np.errstate(over="ignore"):  # overflow becomes inf and is reported below
        out = np.array(x, np.float32, order="C", copy=True) if copy else np.ascontiguousarray(x, np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"x holds {int(bad.sum())} NaN/inf value(s) (after float32 conversion), "
            f"the first at index {first}; clean or impute them before training"
        )
    if native and x.dtype != np.float32 and not (x.dtype.kind == "f" and x.dtype.itemsize > 4):
        # Kept as given (little-endian): training converts to float32 when a shard loads, which
        # gives the very values the conversion above gave, so nothing trained changes. Floats
        # wider than float32 are not: the model sees their float32 values only, kept above.
        return np.array(x, x.dtype.newbyteorder("<"), order="C", copy=True)
    return out


def _int_vector(a: np.ndarray, n: int, name: str, hi: int, rule: str, fix: str) -> np.ndarray:
    """A fresh int64 copy of ``a`` after checking: 1-D, length n, integral, in [0, hi]."""
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D of shape (n,), not {a.shape}; try {name}.ravel()")
    if len(a) != n:
        raise DataError(f"len({name})={len(a)} != len(x)={n}; give one per sample")
    if a.dtype.kind not in "iuf":  # bool, str, object (mixed types) have no safe integer reading
        raise DataError(f"{rule}; got dtype {a.dtype}; {fix}")
    bad = (a < 0) | (a > hi)
    if a.dtype.kind == "f":
        # 2.0**63 is exact, whereas float(MAX_ID) rounds up to 2**63 and would let it pass.
        bad |= ~np.isfinite(a) | (a != np.floor(a)) | (a >= 2.0**63)
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise DataError(f"{rule}; found {a[p].item()!r} at position {p}; {fix}")
    return np.array(a, dtype=np.int64, copy=True)


ID_RULE = "ids must be integers in [0, 2**63 - 2]"
_ID_FIX = "give each sample a non-negative integer id (as integers, e.g. np.int64, not floats)"


def _id_problem(value: Any, exact_below: int | None) -> str | None:
    """Why ``value`` is not a valid id, or ``None`` if it is (one value, Python or numpy scalar).

    Args:
        value: The candidate id.
        exact_below: For floats, ``2**bits`` of the float type the value came in (a float above it
            cannot hold every integer, so its id may already have been rounded); ``None`` takes
            the value's own type.
    """
    if isinstance(value, (bool, np.bool_)):
        return f"a {type(value).__name__}, not an integer"
    if isinstance(value, (float, np.floating)):
        kind = np.dtype(type(value)) if isinstance(value, np.floating) else np.dtype(np.float64)
        limit = exact_below if exact_below is not None else 2 ** (np.finfo(kind).nmant + 1)
        if not math.isfinite(value) or not float(value).is_integer():
            return "not a whole number"
        if abs(value) > limit:
            return (
                f"a {kind.name} above 2**{limit.bit_length() - 1}, where {kind.name} cannot hold every integer, "
                "so this id may already have been rounded (and two ids may have become one)"
            )
        value = int(value)
    elif not isinstance(value, (int, np.integer)):
        return f"a {type(value).__name__}, not an integer"
    if not 0 <= int(value) <= MAX_ID:
        return f"id {int(value)} is outside [0, {MAX_ID}]"
    return None


def check_id_values(ids: Any) -> np.ndarray:
    """The one rule for sample ids, wherever they come from (ingest, CSV, delete, lookup).

    An id is an integer in ``[0, MAX_ID]``; a float is accepted only if it is a whole number
    that its float type holds exactly (at most ``2**53`` for float64, ``2**24`` for float32:
    above that neighbouring integers share one float, so the id may already have been rounded).
    Bools, strings and other types are refused. Uniqueness is the caller's to check.

    Args:
        ids: A list or tuple (checked value by value: numpy would read ``True`` as 1 and round
            big ints mixed with floats), or a 1-D array or tensor (checked by dtype).

    Returns:
        A fresh 1-D int64 array.

    Raises:
        DataError: Naming the first bad value, its position and why.
    """
    if isinstance(ids, (list, tuple)):
        for p, v in enumerate(ids):
            why = _id_problem(v, None)
            if why is not None:
                raise DataError(f"{ID_RULE}; found {v!r} at position {p}: {why}; {_ID_FIX}")
        return np.array([int(v) for v in ids], dtype=np.int64).reshape(len(ids))
    a = to_numpy(ids)
    if a.ndim != 1:
        raise DataError(f"ids must be 1-D of shape (n,), not {a.shape}; try ids.ravel()")
    if a.dtype.kind not in "iuf":  # bool, str, object (mixed types) have no safe integer reading
        raise DataError(f"{ID_RULE}; got dtype {a.dtype}; {_ID_FIX}")
    if a.dtype.kind == "f":
        limit = 2 ** (np.finfo(a.dtype).nmant + 1)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(a) | (a != np.floor(a)) | (np.abs(a) > limit) | (a < 0)
    else:
        bad = (a < 0) | (a > MAX_ID)
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        v = a[p]
        why = _id_problem(v, 2 ** (np.finfo(a.dtype).nmant + 1) if a.dtype.kind == "f" else None)
        raise DataError(f"{ID_RULE}; found {v.item()!r} at position {p}: {why}; {_ID_FIX}")
    return np.array(a, dtype=np.int64, copy=True)


# ASCII decimal only: int() and Decimal() would also take "1_000", "+5" spelled oddly and "١٢".
_ID_TEXT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def parse_id_text(text: str) -> int:
    """One sample id written as text (CLI ``--ids``, ids files, CSV cells): the id rule for text.

    Read exactly, as a decimal, never through a float: ``17``, ``17.0`` and ``1.7e1`` are 17,
    and an id above ``2**53`` keeps every digit. The range is checked by :func:`check_id_values`.

    Raises:
        ValueError: On anything else (``17.5``, ``0x10``, ``1_000``, ``nan``, non-ASCII digits),
            or a number of 19 digits or more (outside ``[0, 2**63 - 2]`` in any case).
    """
    item = text.strip()
    if not _ID_TEXT.fullmatch(item):
        raise ValueError(f"{item[:40]!r} is not an integer id")
    value = decimal.Decimal(item)
    if value.adjusted() >= 19:  # checked before int(): "1e999999999" would build a huge integer
        raise ValueError(f"{item[:40]!r} is outside [0, 2**63 - 2]")
    if value != value.to_integral_value():
        raise ValueError(f"{item[:40]!r} is not an integer id (it has a fractional part)")
    return int(value)


def _check_ids(ids: Any, n: int) -> np.ndarray:
    """Unique int64 ids in ``[0, MAX_ID]`` under :func:`check_id_values`; ``None`` gives ``0..n-1``."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    out = check_id_values(ids)
    if len(out) != n:
        raise DataError(f"len(ids)={len(out)} != len(x)={n}; give one per sample")
    order = np.argsort(out, kind="stable")
    dup = out[order[1:]] == out[order[:-1]]
    if dup.any():
        second = int(order[1:][dup].min())  # the earliest position that repeats an id
        first = int(np.flatnonzero(out == out[second])[0])
        raise DataError(
            f"ids must be unique; id {out[second]} appears at positions {first} and "
            f"{second}; drop or renumber the duplicates"
        )
    return out


def check_labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    """Labels as a fresh int64 array after checking: 1-D, ``n`` of them, integers in ``[0, num_classes)``.

    Raises:
        DataError: Naming the first bad label (or the bad shape) and the fix.
    """
    k = int(num_classes)
    rule, fix = f"labels must be integers in [0, {k})", "check data.num_classes or your labels"
    return _int_vector(to_numpy(y), n, "y", k - 1, rule, fix)


def validated(x: Any, y: Any, ids: Any, num_classes: int, copy: bool, native: bool = False) -> LabeledArrays:
    """Validate samples and build :class:`LabeledArrays` (what :func:`as_arrays` does).

    Args:
        x: Features, or a torch ``Dataset`` of ``(features, label)`` with ``y=None``.
        y: Labels.
        ids: Sample ids or None for ``0..n-1``.
        num_classes: Labels must lie in ``[0, num_classes)``.
        copy: False only for arrays the caller owns outright (the loaders), to save a copy.
        native: Keep integer and float features in their own dtype (what a store keeps)
            instead of converting them to float32.

    Returns:
        The validated arrays.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DataError(f"num_classes={num_classes!r} must be an integer >= 1; set data.num_classes")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.utils.data.Dataset):
        if y is not None:
            raise DataError("x is a Dataset of (features, label) pairs; pass y=None")
        xa, ya = _from_dataset(x)
        copy = False  # np.stack already made fresh arrays
    elif y is None:
        raise DataError("labels y are required unless x is a Dataset of (features, label) pairs")
    else:
        xa, ya = to_numpy(x), to_numpy(y)
    xf = _check_x(xa, copy, native)
    return LabeledArrays(xf, check_labels(ya, len(xf), num_classes), _check_ids(ids, len(xf)), numbered=ids is None)


def as_arrays(x: Any, y: Any = None, ids: Any = None, *, num_classes: int) -> LabeledArrays:
    """Validate user data and return fresh float32/int64 arrays.

    Args:
        x: Features of shape ``(n, ...)``: numpy array, nested list or torch tensor (cast
            to float32, never rescaled), or a map-style torch Dataset of
            ``(features, label)`` items with ``y=None``.
        y: Integer labels of shape ``(n,)``; integral floats such as ``3.0`` are accepted.
        ids: Unique sample ids in ``[0, MAX_ID]``; ``None`` means ``0..n-1`` (marked
            ``numbered``: ingesting into a store that holds samples continues after its largest id).
        num_classes: Labels must lie in ``[0, num_classes)``.

    Returns:
        LabeledArrays holding copies, never views of the caller's memory.

    Raises:
        DataError: On empty, ragged, non-numeric or non-finite features, bad labels or bad ids.
    """
    return validated(x, y, ids, num_classes, copy=True)
