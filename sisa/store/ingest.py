"""Ingest: validate samples, place them in shards and slices, and write them, all or nothing.

Arrays are checked whole (shapes, labels, ids already stored or deleted before, the
deletion prior, the bound) before anything is written, so a rejected call leaves the
store's files byte for byte as they were. Anything larger than one batch, and every
stream (a torch Dataset, a ``ray.data.Dataset``, an iterator of batches), is written in
bounded transactions: each sample is marked *staged* until the last transaction publishes
the whole call at once. No reader sees staged samples; a failure (a bad batch, a full
disk, an exception from the source) takes them back before the error is raised, and a
crash leaves them for the next writable open to take back. Memory holds one batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.data.arrays import MAX_ID, LabeledArrays, check_id_values
from sisa.data.batches import DEFAULT_BATCH, Columns, read_source
from sisa.errors import DataError
from sisa.partition.placement import place
from sisa.store.database import Store
from sisa.store.tombstones import deleted_ids

__all__ = ["ingest", "number_after_stored"]

log = logging.getLogger(__name__)


def _next_number(store: Store, txn: Any) -> int:
    """The first id to number unnumbered samples with: after every id this store has held."""
    start = store.meta(txn).get("next_id")
    if start is None:  # stores from before ``next_id`` was kept
        largest = store.largest_id(txn)
        start = 0 if largest is None else largest + 1
    return int(start)


def number_after_stored(store: Store, data: LabeledArrays, start: int | None = None) -> LabeledArrays:
    """``data`` whose ids were not given, numbered after the largest id this store has held.

    The first ingest keeps ``0..n-1``; later ones (``add`` without ids) continue from the
    store's ``next_id`` (for stores written before it was kept: the largest stored id + 1).
    :func:`ingest` calls it for data marked ``numbered``; call it first to learn the ids.

    Args:
        store: The store.
        data: Validated samples; returned unchanged unless ``data.numbered``.
        start: The first number, where the caller keeps count (a stream's later batches).

    Returns:
        The same samples with their ids (no longer marked ``numbered``).

    Raises:
        DataError: If the numbers would pass ``2**63 - 2``.
    """
    if not data.numbered:
        return data
    if start is None:
        with store.read() as txn:
            start = _next_number(store, txn)
    if start == 0:
        return data
    if start + len(data) - 1 > MAX_ID:
        raise DataError(
            f"numbering {len(data)} new samples after the store's largest id {start - 1} would pass "
            f"{MAX_ID}; give them ids"
        )
    log.info("no ids given: numbering %d samples %d..%d", len(data), start, start + len(data) - 1)
    return LabeledArrays(data.x, data.y, np.arange(start, start + len(data), dtype=np.int64), scale=data.scale)


def _check_new(store: Store, data: LabeledArrays, shape: tuple[int, ...] | None, streaming: bool) -> None:
    """Refuse samples of another shape, ids the store holds (or this call wrote) and ids deleted before."""
    if shape is not None and data.feature_shape != shape:
        raise DataError(
            f"samples have shape {data.feature_shape}, but this store holds samples of shape {shape}; "
            "reshape the data to match"
        )
    with store.read() as txn:
        clash = [i for i in data.ids.tolist() if store.has_sample(txn, i)]
    if clash:
        earlier = " or in an earlier batch of this ingest" if streaming else ""
        raise DataError(
            f"{len(clash)} id(s) are already in the store{earlier} (first: {clash[0]}); pass new, unique ids"
        )
    gone = deleted_ids(store, data.ids.tolist())
    if gone:
        raise DataError(
            f"{len(gone)} id(s) were deleted by earlier requests (first: {gone[0]}); "
            "a deleted id is never reused: give the new samples new ids"
        )


class _Writer:
    """The writes of one ingest call: staged batches, then one transaction that publishes them."""

    def __init__(self, store: Store, config: SisaConfig, new_slice: bool, core: Any = None) -> None:
        self.store, self.config, self.new_slice = store, config, new_slice
        # The core set this call declares: every sample (True), the listed ids, or none.
        self.core_all = core is True
        self.core: np.ndarray | None = None
        if core is not None and core is not False and core is not True:
            self.core = np.unique(check_id_values(core))
        self.core_written: list[np.ndarray] = []  # with core=True: the ids written so far
        if (self.core_all or self.core is not None) and config.backbone.source != "core":
            raise DataError(
                "core ids declare the samples a core-set backbone trains on (never deletable), and this store's "
                f"backbone.source is {config.backbone.source}: set backbone.source: core with backbone.name, or "
                "ingest without core ids"
            )
        with store.read() as txn:
            self.counts = store.slice_counts(txn, config.shards, config.slices)
            self.next_number = _next_number(store, txn)
            stored = store.meta(txn).get("feature_shape")
            dtype = store.meta(txn).get("feature_dtype")
            self.scale: float | None = store.meta(txn).get("feature_scale")
        self.shape: tuple[int, ...] | None = tuple(stored) if stored is not None else None
        # None until the first samples of a new store decide it (their dtype, as given)
        self.dtype: np.dtype[Any] | None = np.dtype(dtype) if dtype is not None else None
        self.touched: set[int] = set()
        self.written = 0
        self.largest = -1

    def slices_for(self, shard: np.ndarray, slice_: np.ndarray) -> np.ndarray:
        """With ``new_slice``, every sample goes into the slice after its shard's last (stable too)."""
        if not self.new_slice:
            return slice_
        self.touched.update(np.unique(shard).tolist())
        return np.asarray(self.counts, dtype=slice_.dtype)[shard]

    def meta_change(self, txn: Any, masses: list[float] | None) -> None:
        """The meta update that makes the written samples part of the store."""
        counts = [c + (s in self.touched) for s, c in enumerate(self.counts)]
        extra: dict[str, Any] = {} if masses is None else {"shard_mass": masses}
        # The largest id ever stored, so that unnumbered data added later (even after that id
        # was deleted, when no record of it is left in the clear) never reuses an id.
        extra["next_id"] = max(int(self.store.meta(txn).get("next_id", 0)), self.largest + 1)
        if self.dtype is not None:
            extra["feature_dtype"] = self.dtype.str
        if self.scale is not None:
            extra["feature_scale"] = self.scale
        self.store.put_meta(txn, feature_shape=list(self.shape or ()), shard_slices=counts, **extra)
        core = np.concatenate(self.core_written) if self.core_all and self.core_written else self.core
        if core is not None and len(core):
            self.store.put_core(txn, core)  # with the samples: a core id is never deletable, from its first instant
            log.info("declared %d core sample(s)", len(core))

    def check_core(self, ids: np.ndarray) -> None:
        """Refuse core ids that are not among ``ids`` (the samples of this call), before any write."""
        if self.core is None:
            return
        outside = self.core[~np.isin(self.core, ids)]
        if len(outside):
            raise DataError(
                f"{len(outside)} core id(s) are not among the samples of this ingest (first: {outside[:5].tolist()}); "
                "core ids must name samples given in the same call"
            )

    def written_ids(self, ids: np.ndarray) -> None:
        """Note ids written by this call (they are all core with ``core=True``)."""
        if self.core_all:
            self.core_written.append(np.asarray(ids, dtype=np.int64))

    def conform(self, data: LabeledArrays) -> LabeledArrays:
        """``data`` in the store's feature dtype, which the first samples of a store set.

        Another dtype is converted when training would see the same float32 values either
        way (uint8 pixels into an int16 store, float64 into a float32 one); otherwise the
        samples are refused, since storing them would change what a model trains on.

        Raises:
            DataError: If converting would change a value that training sees.
        """
        if self.dtype is None:  # no sample yet: the first batch sets the store's dtype and scale
            self.dtype, self.scale = data.x.dtype.newbyteorder("<"), data.scale
            _warn_unscaled_bytes(data)
            return data
        stored = self.dtype
        if (data.scale is not None and data.scale != self.scale) or (
            data.scale is None and self.scale is not None and data.x.dtype.kind == "f"
        ):
            have = f"raw {stored.name} values divided by {self.scale:g} when loaded" if self.scale else "model inputs"
            given = f"raw values to divide by {data.scale:g}" if data.scale else f"{data.x.dtype.name} model inputs"
            raise DataError(
                f"this store keeps {have}, and these samples are {given}; give them in the store's form "
                "(raw pixels: a loader's raw=True), or ingest them into a new store"
            )
        if data.x.dtype == stored:
            return data
        with np.errstate(all="ignore"):
            converted = data.x.astype(stored)
        same = converted.astype(np.float32) == data.x.astype(np.float32)
        if not same.all():
            first = tuple(int(i) for i in np.argwhere(~same)[0])
            raise DataError(
                f"this store keeps features as {stored.name}; these samples are {data.x.dtype.name} and "
                f"{int((~same).sum())} value(s) would change in {stored.name} (the first at index {first}); "
                f"convert them to {stored.name} yourself, or ingest them into a new store"
            )
        return LabeledArrays(np.ascontiguousarray(converted), data.y, data.ids, data.numbered, data.scale)

    def stage(self, data: LabeledArrays, shard: np.ndarray, slice_: np.ndarray, batch_size: int) -> None:
        """Write ``data`` as staged samples, ``batch_size`` per transaction."""
        for start in range(0, len(data), batch_size):
            part = slice(start, start + batch_size)

            def change(txn: Any, part: slice = part) -> None:
                ids, x, y = data.ids[part], data.x[part], data.y[part]
                self.store.put_samples(txn, ids, x, y, shard[part], slice_[part], dtype=self.dtype, staged=True)

            self.store.write(change)
        self.written += len(data)
        self.largest = max(self.largest, int(data.ids.max()))
        self.next_number = max(self.next_number, self.largest + 1)

    def publish(self, masses: list[float] | None) -> None:
        """One transaction: the meta that counts the new samples, and every staged mark dropped."""

        def change(txn: Any) -> None:
            self.meta_change(txn, masses)
            self.store.commit_staged(txn)

        self.store.write(change)


def _warn_unscaled_bytes(data: LabeledArrays) -> None:
    """Warn when a new store's first samples look like raw pixels given without their scale.

    A raw loader's ``x`` taken out of its LabeledArrays loses the scale: the store then keeps
    the values as model inputs (0..255), and the loader's float images (0..1) predict nonsense.
    The data cannot say which was meant, so this warns instead of guessing.
    """
    if data.scale is None and data.x.dtype == np.uint8 and len(data) and int(data.x.max()) > 1:
        warnings.warn(
            "these uint8 features come without a scale, so the models will see the values 0..255 as they are "
            "(and predict takes float inputs as they are). If they are raw pixels, pass scale=255 (or the "
            "loader's LabeledArrays, which carries it): the models then see x / 255 as float32, the same as "
            "the loader's float images",
            UserWarning,
            stacklevel=2,
        )


def _with_scale(source: LabeledArrays | Iterator[LabeledArrays], scale: Any) -> Any:
    """``source``'s samples marked as raw values that a model sees divided by ``scale``.

    Raises:
        DataError: If ``scale`` is not a positive finite number, or the samples carry another scale.
    """
    ok = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool)
    if not ok or not math.isfinite(scale) or scale <= 0:
        raise DataError(f"scale={scale!r} must be a positive number (255 for raw uint8 pixels), or None")
    value = float(scale)

    def mark(data: LabeledArrays) -> LabeledArrays:
        if data.scale is not None and data.scale != value:
            raise DataError(f"these samples carry scale {data.scale:g} and scale={value:g} was given; give one")
        return dataclasses.replace(data, scale=value)

    if isinstance(source, LabeledArrays):
        return mark(source)
    return (mark(batch) for batch in source)


def ingest(
    store: Store,
    config: SisaConfig,
    x: Any,
    y: Any = None,
    ids: Any = None,
    *,
    new_slice: bool = False,
    probabilities: Any = None,
    batch_size: int = DEFAULT_BATCH,
    columns: Columns | None = None,
    core: Any = None,
    scale: float | None = None,
) -> int:
    """Add samples to the store, assigned to shards and slices by the partitioner, all or nothing.

    With ``new_slice`` (what ``Ensemble.add`` uses), the samples go into one new slice
    appended to each shard they land in, so training them touches no earlier stage.
    Under ``partition.strategy: distribution-aware`` the first ingest cuts shards with
    SISA's Algorithm 1 and later ones place each new sample in the shard expecting the
    fewest deletions (see :mod:`sisa.partition.assign`); each shard's expected deletions
    are kept in the store so those later placements know them.

    Args:
        store: A writable store.
        config: The store's config.
        x: Features as an array ``(n, ...)`` (with ``y``), a
            :class:`~sisa.data.arrays.LabeledArrays`, a map-style ``torch.utils.data.Dataset``
            of ``(features, label)`` pairs (read ``batch_size`` items at a time), a
            ``ray.data.Dataset`` (streamed with ``iter_batches``), or an iterator of batches
            (each ``(x, y)``, ``(x, y, ids)``, a dict of columns or a LabeledArrays).
        y: Integer labels in ``[0, num_classes)``, beside array features.
        ids: Unique non-negative int ids, beside array features or a torch Dataset; default
            ``0..n-1`` for a store's first samples, and after the largest id the store has
            ever held for later ones (streams number their unnumbered batches on from there).
        new_slice: Append a slice per touched shard instead of the hashed slice.
        probabilities: Deletion probabilities aligned with array samples, for the
            ``distribution-aware`` strategy; overrides the ``partition.probabilities`` file.
        batch_size: Samples per batch read and per write transaction.
        columns: Column names of a Ray Dataset or of dict batches.
        core: The core set this call declares (``backbone.source: core`` only): ``True`` for
            every sample of the call, or the ids of some of them. Core samples train the shared
            backbone and can never be deleted (a deletion naming one is refused).
        scale: The features are raw values a model sees divided by ``scale`` in float32
            (255: uint8 pixels), as a loader's ``raw=True`` LabeledArrays says by itself. The
            store keeps the raw values and records the scale; predict scales integer inputs
            the same way. None: the features are model inputs (or carry their own scale).

    Returns:
        Number of samples written.

    Raises:
        DataError: On bad shapes, NaN/inf, bad labels, ids already stored or deleted
            before, a bad or missing deletion prior, or a stream under a partition that
            needs the whole ingest at once; nothing of the call stays in the store.
        ConfigError: If ``partition.bound`` cuts the data into another number of shards.
    """
    source = read_source(
        x, y, ids, num_classes=config.data.num_classes, batch_size=batch_size, columns=columns, native=True
    )
    if scale is not None:
        source = _with_scale(source, scale)
    writer = _Writer(store, config, new_slice, core)
    if isinstance(source, LabeledArrays):
        return _ingest_arrays(writer, source, probabilities, batch_size)
    return _ingest_stream(writer, source, probabilities)


def _ingest_arrays(writer: _Writer, data: LabeledArrays, probabilities: Any, batch_size: int) -> int:
    """In-memory samples: checked and placed whole, then written in one or in staged transactions."""
    store, config = writer.store, writer.config
    data = writer.conform(number_after_stored(store, data, writer.next_number))
    _check_new(store, data, writer.shape, streaming=False)
    writer.check_core(data.ids)
    writer.written_ids(data.ids)
    # Everything that can fail is decided before the first write transaction opens, so a bad
    # prior leaves the store's files byte for byte as they were.
    shard, slice_, masses = place(config, data.ids, probabilities, store.meta().get("shard_mass"))
    slice_ = writer.slices_for(shard, slice_)
    writer.shape = data.feature_shape
    writer.largest = int(data.ids.max())
    if len(data) <= batch_size:

        def change(txn: Any) -> None:
            store.put_samples(txn, data.ids, data.x, data.y, shard, slice_, dtype=writer.dtype)
            writer.meta_change(txn, masses)

        store.write(change)
    else:
        try:
            writer.stage(data, shard, slice_, batch_size)
            writer.publish(masses)
        except BaseException:
            store.roll_back_ingest()
            raise
    log.info("ingested %d samples into %s", len(data), store.path)
    return len(data)


def _ingest_stream(writer: _Writer, batches: Iterator[LabeledArrays], probabilities: Any) -> int:
    """Batches from a stream: each checked, placed and staged in turn; published when the stream ends."""
    store, config = writer.store, writer.config
    part = config.partition
    if part.strategy != "uniform" or part.uses_prior:
        raise DataError(
            f"partition.strategy={part.strategy} with slice_order={part.slice_order} places an ingest as a whole "
            "(by its deletion probabilities); a stream is placed batch by batch: pass the samples as arrays "
            "(or a LabeledArrays), or use partition.strategy: uniform with slice_order: hashed"
        )
    if probabilities is not None:
        raise DataError("probabilities= goes with array samples; a stream cannot carry them")
    if writer.core is not None:
        raise DataError(
            "core ids go with array samples (checked against them before anything is written); with a stream, "
            "pass core=True to declare every sample of the stream core, or ingest the core set as arrays"
        )
    try:
        for batch in batches:
            data = writer.conform(number_after_stored(store, batch, writer.next_number))
            _check_new(store, data, writer.shape, streaming=True)
            shard, slice_, _ = place(config, data.ids, None, None)
            writer.shape = data.feature_shape
            writer.stage(data, shard, writer.slices_for(shard, slice_), len(data))
            writer.written_ids(data.ids)
        if writer.written == 0:
            raise DataError("the stream gave no samples (0 batches); give at least one sample")
        writer.publish(None)
    except BaseException:
        store.roll_back_ingest()
        raise
    log.info("ingested %d samples from a stream into %s", writer.written, store.path)
    return writer.written
