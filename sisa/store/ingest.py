"""Ingest: validate samples, place them in shards and slices, and write them in one transaction.

All-or-nothing: everything that can fail (shapes, labels, ids already stored or deleted
before, a bad deletion prior, a bound that cuts another number of shards) is decided
before the write transaction opens, so a rejected call leaves the store's files byte for
byte as they were.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.data.arrays import MAX_ID, LabeledArrays, as_arrays
from sisa.errors import DataError
from sisa.partition.placement import place
from sisa.store.database import Store
from sisa.store.tombstones import deleted_ids

__all__ = ["ingest", "number_after_stored"]

log = logging.getLogger(__name__)


def number_after_stored(store: Store, data: LabeledArrays) -> LabeledArrays:
    """``data`` whose ids were not given, numbered after the largest id this store has held.

    The first ingest keeps ``0..n-1``; later ones (``add`` without ids) continue from the
    store's ``next_id`` (for stores written before it was kept: the largest stored id + 1).
    :func:`ingest` calls it for data marked ``numbered``; call it first to learn the ids.

    Args:
        store: The store.
        data: Validated samples; returned unchanged unless ``data.numbered``.

    Returns:
        The same samples with their ids (no longer marked ``numbered``).

    Raises:
        DataError: If the numbers would pass ``2**63 - 2``.
    """
    if not data.numbered:
        return data
    with store.read() as txn:
        start = store.meta(txn).get("next_id")
        if start is None:
            largest = store.largest_id(txn)
            start = 0 if largest is None else largest + 1
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


def ingest(
    store: Store,
    config: SisaConfig,
    x: Any,
    y: Any = None,
    ids: Any = None,
    *,
    new_slice: bool = False,
    probabilities: Any = None,
) -> int:
    """Add samples to the store, assigned to shards and slices by the partitioner.

    With ``new_slice`` (what ``Ensemble.add`` uses), the samples go into one new slice
    appended to each shard they land in, so training them touches no earlier stage.
    Under ``partition.strategy: distribution-aware`` the first ingest cuts shards with
    SISA's Algorithm 1 and later ones place each new sample in the shard expecting the
    fewest deletions (see :mod:`sisa.partition.assign`); each shard's expected deletions
    are kept in the store so those later placements know them.

    Args:
        store: A writable store.
        config: The store's config.
        x: Features as an array ``(n, ...)``, a ``torch.utils.data.Dataset`` of
            ``(features, label)`` pairs (then ``y`` is None), or a
            :class:`~sisa.data.arrays.LabeledArrays`.
        y: Integer labels in ``[0, num_classes)``.
        ids: Unique non-negative int ids; default ``0..n-1`` for a store's first samples,
            and after the largest id the store has ever held for later ones.
        new_slice: Append a slice per touched shard instead of the hashed slice.
        probabilities: Deletion probabilities aligned with the samples, for the
            ``distribution-aware`` strategy; overrides the ``partition.probabilities`` file.

    Returns:
        Number of samples written.

    Raises:
        DataError: On bad shapes, NaN/inf, bad labels, ids already stored or deleted
            before, or a bad or missing deletion prior.
        ConfigError: If ``partition.bound`` cuts the data into another number of shards.
    """
    data = x if isinstance(x, LabeledArrays) else as_arrays(x, y, ids, num_classes=config.data.num_classes)
    data = number_after_stored(store, data)
    shape = store.meta().get("feature_shape")
    if shape is not None and data.feature_shape != tuple(shape):
        raise DataError(
            f"samples have shape {data.feature_shape}, but this store holds samples of shape {tuple(shape)}; "
            "reshape the data to match"
        )
    with store.read() as txn:
        clash = [i for i in data.ids.tolist() if store.has_sample(txn, i)]
    if clash:
        raise DataError(f"{len(clash)} id(s) are already in the store (first: {clash[0]}); pass new, unique ids")
    gone = deleted_ids(store, data.ids.tolist())
    if gone:
        raise DataError(
            f"{len(gone)} id(s) were deleted by earlier requests (first: {gone[0]}); "
            "a deleted id is never reused: give the new samples new ids"
        )
    shard, slice_, masses = place(config, data.ids, probabilities, store.meta().get("shard_mass"))

    def change(txn: Any) -> None:
        counts = store.slice_counts(txn, config.shards, config.slices)
        if new_slice:
            # Stable too: the shard is the partitioner's; only the slice is new.
            slice_[:] = np.asarray(counts)[shard]
            for s in np.unique(shard).tolist():
                counts[s] += 1
        store.put_samples(txn, data.ids, data.x, data.y, shard, slice_)
        extra: dict[str, Any] = {} if masses is None else {"shard_mass": masses}
        # The largest id ever stored, so that unnumbered data added later (even after that id
        # was deleted, when no record of it is left in the clear) never reuses an id.
        extra["next_id"] = max(int(store.meta(txn).get("next_id", 0)), int(data.ids.max()) + 1)
        store.put_meta(txn, feature_shape=list(data.feature_shape), shard_slices=counts, **extra)

    store.write(change)
    log.info("ingested %d samples into %s", len(data), store.path)
    return len(data)
