"""A shard's slices as a lazy sequence that reads one slice from the store when indexed.

The driver side of a :class:`~sisa.train.jobs.ShardJob`: nothing is loaded until the
trainer (in-process) or the orchestrator (shipping to Ray) asks for a slice, so the
driver never needs every shard's data in memory at once. It never leaves the driver:
workers do not open the store, and pickling one is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sisa.train.jobs import LazySlices, SliceData

if TYPE_CHECKING:
    from sisa.store.database import Store

__all__ = ["StoredSlices"]


class StoredSlices(LazySlices):
    """Slices of one shard, each read (and digest-checked) in its own short read transaction.

    Args:
        store: The open store; only the driver holds one.
        shard: Shard index (for error messages).
        slice_ids: Sorted ids of each slice, read when the job was planned.
        feature_shape: Shape of one sample.
        txn: A read transaction to load every slice from, so that they come from the
            snapshot the ids were read in (``verify`` on a store another process may be
            writing); None: a short transaction per slice (``fit``, which holds the lock).
    """

    def __init__(
        self,
        store: Store,
        shard: int,
        slice_ids: Sequence[np.ndarray],
        feature_shape: tuple[int, ...],
        txn: Any = None,
    ):
        self._store = store
        self._shard = shard
        self._ids = tuple(slice_ids)
        self._shape = feature_shape
        self._txn = txn

    def __len__(self) -> int:
        return len(self._ids)

    def load(self, index: int) -> SliceData:
        """Read slice ``index`` and check every sample's digest."""
        ids = self._ids[index]
        where = f"shard {self._shard} slice {index}"
        if self._txn is not None:
            x, y = self._store.load_samples(self._txn, ids, self._shape, where)
            return SliceData(ids, x, y)
        # A short transaction per slice: a reader never pins an old snapshot for the
        # length of a training, and the writer's stage commits go on meanwhile. The ids
        # cannot change underneath: this process holds the writer lock during a fit.
        with self._store.read() as txn:
            x, y = self._store.load_samples(txn, ids, self._shape, where)
        return SliceData(ids, x, y)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows of each slice, known without loading any."""
        return tuple(len(ids) for ids in self._ids)

    def __reduce__(self) -> tuple[object, ...]:
        # Shipping this to a worker would make it open the store, which only the driver may
        # do (no shared filesystem is assumed): the orchestrator must load the slices first.
        raise TypeError(
            "StoredSlices reads the store and stays in the driver; ship its slices "
            "(tuple(job.slices)) or object refs to a task instead"
        )
