"""Every ingest source as validated batches: arrays whole, everything else a bounded batch at a time.

Arrays (numpy, tensors, nested lists, :class:`~sisa.data.arrays.LabeledArrays`) are already in
memory and are validated whole. A map-style ``torch.utils.data.Dataset`` is read in chunks, an
iterator of batches one batch at a time, and a ``ray.data.Dataset`` through its streaming
``iter_batches``, so memory holds one batch, not the dataset.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from sisa.data.arrays import LabeledArrays, items_to_arrays, validated
from sisa.errors import DataError

__all__ = ["DEFAULT_BATCH", "Columns", "is_stream", "read_source"]

DEFAULT_BATCH = 8192  # samples per batch: a few MB of features, one bounded write transaction each


class Columns:
    """Which columns of a table (a Ray Dataset's or a dict batch's) hold what.

    Attributes:
        features: One column holding each sample's features (an array per row), or several
            scalar columns stacked in the order given.
        label: The label column.
        id: The id column; None reads a column ``ids`` where there is one and numbers the
            samples where there is not.
    """

    def __init__(
        self, features: str | list[str] | tuple[str, ...] | None = None, label: str | None = None, id: str | None = None
    ) -> None:
        """Name the columns (defaults: ``x``, ``y``, and ``ids`` if present); see the attributes."""
        chosen = "x" if features is None else features
        self.features = [chosen] if isinstance(chosen, str) else list(chosen)
        if not self.features or not all(isinstance(f, str) for f in self.features):
            raise DataError(f"features must name a column or a list of columns, not {features!r}")
        self.label = "y" if label is None else label
        self.id = id

    def arrays(self, batch: Mapping[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(x, y, ids)`` of one dict batch (``ids`` None when the samples are to be numbered)."""
        id_column = self.id if self.id is not None else ("ids" if "ids" in batch else None)
        wanted = [*self.features, self.label, *([id_column] if id_column else [])]
        missing = [c for c in wanted if c not in batch]
        if missing:
            raise DataError(
                f"{where} has no column {missing[0]!r} (columns: {', '.join(map(str, batch))}); "
                "name the right columns with features=, label= and id="
            )
        if len(self.features) == 1:
            x = np.asarray(batch[self.features[0]])
            if x.dtype == object:  # variable-shaped tensor column: one array per row
                x = np.stack([np.asarray(row) for row in x])
            x = x.reshape(len(x), -1) if x.ndim == 1 else x
        else:
            x = np.stack([np.asarray(batch[c]) for c in self.features], axis=1)
        ids = np.asarray(batch[id_column]) if id_column else None
        return x, np.asarray(batch[self.label]), ids


def _is_ray_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("ray.data") and hasattr(x, "iter_batches")


def _is_torch_dataset(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.utils.data.Dataset)


def is_stream(x: Any) -> bool:
    """Whether ``x`` is read in batches (a Dataset, a Ray Dataset or an iterator of batches), not whole."""
    if _is_ray_dataset(x) or _is_torch_dataset(x):
        return True
    if isinstance(x, (LabeledArrays, np.ndarray, list, tuple, str, bytes, Mapping)) or hasattr(x, "__array__"):
        return False
    return isinstance(x, Iterable)


def _dataset_chunks(ds: Any, ids: Any, num_classes: int, batch_size: int, native: bool) -> Iterator[LabeledArrays]:
    if not hasattr(ds, "__len__"):
        raise DataError("a Dataset passed as x needs len(); use a map-style Dataset")
    n = len(ds)
    if n == 0:
        raise DataError("x is empty (0 samples); give at least one sample")
    given = None if ids is None else np.asarray(ids)
    if given is not None and len(given) != n:
        raise DataError(f"len(ids)={len(given)} != len(x)={n}; give one per sample")
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x, y = items_to_arrays(ds, range(start, stop))
        yield validated(x, y, None if given is None else given[start:stop], num_classes, copy=False, native=native)


def _ray_batches(ds: Any, columns: Columns, num_classes: int, batch_size: int, native: bool) -> Iterator[LabeledArrays]:
    for k, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)):
        x, y, ids = columns.arrays(batch, f"batch {k} of the Ray Dataset")
        yield validated(x, y, ids, num_classes, copy=False, native=native)


def _iterator_batches(
    source: Iterable[Any], columns: Columns, num_classes: int, native: bool
) -> Iterator[LabeledArrays]:
    for k, item in enumerate(source):
        where = f"batch {k}"
        if isinstance(item, LabeledArrays):
            yield item
        elif isinstance(item, Mapping):
            x, y, ids = columns.arrays(item, where)
            yield validated(x, y, ids, num_classes, copy=True, native=native)
        elif isinstance(item, tuple) and len(item) in (2, 3):
            third = item[2] if len(item) == 3 else None
            yield validated(item[0], item[1], third, num_classes, copy=True, native=native)
        else:
            raise DataError(
                f"{where} of the iterator is a {type(item).__name__}; each batch must be (x, y), (x, y, ids), "
                "a dict of columns or a LabeledArrays"
            )


def _refuse_beside_labeled(data: LabeledArrays, y: Any, ids: Any) -> None:
    """Refuse ``y``/``ids`` given beside a LabeledArrays: it carries its own, and they would be ignored.

    Raises:
        DataError: If ``y`` or ``ids`` is not None.
    """
    given = [name for name, value in (("y", y), ("ids", ids)) if value is not None]
    if not given:
        return
    names = " and ".join(f"{name}=" for name in given)
    scale = f" (and scale={data.scale:g}, the scale it carries)" if data.scale is not None else ""
    raise DataError(
        f"x is a LabeledArrays, which carries its own labels and ids: {names} given beside it would be ignored; "
        f"pass the LabeledArrays alone, or its .x with y= and ids={scale}"
    )


def read_source(
    x: Any,
    y: Any = None,
    ids: Any = None,
    *,
    num_classes: int,
    batch_size: int = DEFAULT_BATCH,
    columns: Columns | None = None,
    native: bool = False,
) -> LabeledArrays | Iterator[LabeledArrays]:
    """Read an ingest source: the validated arrays when it is in memory, else an iterator of batches.

    Args:
        x: Features ``(n, ...)``, a :class:`~sisa.data.arrays.LabeledArrays`, a map-style
            ``torch.utils.data.Dataset`` of ``(features, label)`` items, a ``ray.data.Dataset``,
            or an iterator of batches (each ``(x, y)``, ``(x, y, ids)``, a dict of columns or a
            LabeledArrays).
        y: Labels, for arrays only.
        ids: Ids, for arrays (or aligned with a torch Dataset); batches carry their own.
        num_classes: Labels must lie in ``[0, num_classes)``.
        batch_size: Samples per batch read from a Dataset or a Ray Dataset.
        columns: Column names of dict batches and Ray Datasets (default ``x``, ``y``, ``ids``).
        native: Keep features in their own dtype (a store keeps them so) instead of float32.

    Returns:
        LabeledArrays for in-memory input; an iterator of validated batches otherwise (each
        batch is validated when it is read, so a bad one is found after the ones before it).

    Raises:
        DataError: On bad input found before reading starts (a bad batch size, labels given
            beside a stream, labels or ids beside a LabeledArrays, a Dataset without ``len``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r} must be an integer >= 1")
    if not is_stream(x):
        if isinstance(x, LabeledArrays):
            _refuse_beside_labeled(x, y, ids)
            return x
        return validated(x, y, ids, num_classes, copy=True, native=native)
    if y is not None:
        raise DataError(
            f"x is a {type(x).__name__} that carries its labels; pass y=None (and name the columns with label=)"
        )
    if _is_torch_dataset(x):
        return _dataset_chunks(x, ids, num_classes, batch_size, native)
    if ids is not None:
        raise DataError("ids= goes with arrays or a torch Dataset; a stream of batches carries its own ids (id=)")
    cols = columns or Columns()
    if _is_ray_dataset(x):
        return _ray_batches(x, cols, num_classes, batch_size, native)
    return _iterator_batches(x, cols, num_classes, native)
