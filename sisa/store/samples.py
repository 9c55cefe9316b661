"""A store's samples: sealed records, their membership runs, staging by an unfinished ingest, and the core set.

Every sample is sealed under the key of its membership run (:class:`RunCipher`), bound to its
id, place and key generation. Every write here runs inside a caller's transaction, so a logical
change composed of several of them stays atomic.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from sisa.data.inputs import model_inputs
from sisa.errors import IntegrityError, StoreChangedError, StoreError
from sisa.partition import graph
from sisa.store.cipher import open_record, seal_records
from sisa.store.layout import (
    DEFAULT_DTYPE,
    LABEL,
    PLACE,
    RUN_MAX,
    SAMPLE_KIND,
    SAMPLE_PLACE,
    SEAL_OVERHEAD,
    StoreHost,
    id_key,
    run_key,
)

if TYPE_CHECKING:
    from sisa.store.keyring import SliceKey

__all__ = ["RunCipher", "SampleRecords"]


class RunCipher:
    """The keys of one membership run, ready to open and seal many of its samples.

    A run's samples share their associated data but for the id, so its tail (place and key
    generation) is packed once per key, not once per record: the cipher costs so little per record
    (docs/benchmarks.md, "Erasure with AES-256-GCM against the keystream") that the Python around
    it is what re-encryption, ingest and reads wait on.

    Args:
        keys: The run's keys, newest first (each with the generation a seal is bound to).
        place: The run's (shard, slice, run).
        body_len: A sample's plaintext length (label + features), from the store's shape and dtype:
            a record of another length is refused before any key is tried. None: any length
            (the tag still authenticates it).
    """

    __slots__ = ("_sealed_len", "_tails", "keys", "place")

    def __init__(self, keys: Sequence[SliceKey], place: tuple[int, int, int], body_len: int | None = None) -> None:
        self.keys, self.place = list(keys), place
        self._sealed_len = None if body_len is None else body_len + SEAL_OVERHEAD
        self._tails = [(entry.key, SAMPLE_PLACE.pack(*place, entry.generation)) for entry in self.keys]

    def open(self, sid_key: bytes, sealed: bytes | memoryview) -> bytes | None:
        """The plaintext body of a sealed sample, trying each key in order; None if none opens it.

        Args:
            sid_key: The sample's id key (:func:`id_key`).
            sealed: The stored record.
        """
        if self._sealed_len is not None and len(sealed) != self._sealed_len:
            return None
        for key, tail in self._tails:
            plain = open_record(key, sealed, SAMPLE_KIND + sid_key + tail)
            if plain is not None:
                return plain
        return None

    def seal(self, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """Seal plaintext bodies under the newest key, each bound to its id, the place and the generation.

        Args:
            items: ``(sid_key, body)`` of each sample.

        Returns:
            The sealed records, in order.
        """
        key, tail = self._tails[0]
        return seal_records(key, [(body, SAMPLE_KIND + sid_key + tail) for sid_key, body in items])


class SampleRecords(StoreHost):
    """Sample-level reads and writes: a base of :class:`~sisa.store.database.Store`, which provides the host."""

    def feature_dtype(self, txn: lmdb.Transaction) -> np.dtype[Any]:
        """The dtype samples are stored in (set by the first ingest; float32 before any)."""
        return np.dtype(self.meta(txn).get("feature_dtype", DEFAULT_DTYPE))

    def sealed_sample(self, txn: lmdb.Transaction, sample_id: int) -> bytes | None:
        """The stored (encrypted) record of a sample, as on disk; None if absent. For audits and tests."""
        raw = txn.get(id_key(sample_id), db=self._dbs["samples"])
        return bytes(raw) if raw is not None else None

    def count_samples(self, txn: lmdb.Transaction) -> int:
        """Number of stored samples (not counting those an unfinished ingest has written)."""
        return int(txn.stat(self._dbs["samples"])["entries"]) - self.staged_count(txn)

    def staged_count(self, txn: lmdb.Transaction) -> int:
        """Samples written by an ingest that has not committed (0 almost always)."""
        staged = self._dbs.get("staged")
        return 0 if staged is None else int(txn.stat(staged)["entries"])

    def is_staged(self, txn: lmdb.Transaction, sample_id: int) -> bool:
        """Whether ``sample_id`` was written by an ingest that has not committed."""
        staged = self._dbs.get("staged")
        return staged is not None and txn.get(id_key(sample_id), db=staged) is not None

    def has_sample(self, txn: lmdb.Transaction, sample_id: int) -> bool:
        """Whether ``sample_id`` is stored."""
        return txn.get(id_key(sample_id), db=self._dbs["samples"]) is not None

    def member_ids(self, txn: lmdb.Transaction, shard: int, slice_: int) -> np.ndarray:
        """Sorted ids of every record in one slice, staged ones included."""
        prefix = struct.pack(">II", shard, slice_)
        runs: list[np.ndarray] = []
        cur = txn.cursor(db=self._dbs["members"])
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:8] != prefix:
                    break
                runs.append(np.frombuffer(value, dtype="<u8"))
        if not runs:
            return np.empty(0, dtype=np.int64)
        return np.sort(np.concatenate(runs)).astype(np.int64)

    def slice_ids(self, txn: lmdb.Transaction, shard: int, slice_: int) -> np.ndarray:
        """Sorted ids of one slice of one shard."""
        out = self.member_ids(txn, shard, slice_)
        if len(out) and self.staged_count(txn):
            # An ingest in another process is writing in bounded transactions: what it has written
            # is not part of the store until its last transaction commits, so no reader trains on it.
            out = np.asarray([i for i in out.tolist() if not self.is_staged(txn, i)], dtype=np.int64)
        return out

    def shard_graph(self, txn: lmdb.Transaction) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
        """The stored config's shard graph (``partition.graph``): each shard's group and each shard's readers.

        Returns:
            ``(groups, readers)``: ``groups[s]`` the shards whose slices s trains on (s first),
            ``readers[t]`` the shards that train on t's slices (t included); see :mod:`sisa.partition.graph`.
        """
        config = self.meta_value(txn, "config") or {}
        spec = str((config.get("partition") or {}).get("graph", "none"))
        seed, shards = int(config.get("seed", 0)), int(config.get("shards", 1))
        return graph.groups(spec, seed, shards), graph.readers(spec, seed, shards)

    def training_slices(self, txn: lmdb.Transaction, shard: int, stages: int | None = None) -> list[np.ndarray]:
        """The sorted ids each stage of ``shard`` adds to its training set: its manifest's slices.

        Without a shard graph these are the shard's own slices. With one, slice r is the union of
        slice r of the shard and of every shard it is linked to (a shard with fewer slices adds
        nothing there), so stage r trains on slices 1..r of all of them and its manifest covers
        exactly those ids.

        Args:
            txn: Read transaction.
            shard: Shard index.
            stages: How many slices (default: all the group has: the most any of its shards has).
        """
        groups, _ = self.shard_graph(txn)
        group = groups[shard] if shard < len(groups) else (shard,)
        config = self.meta_value(txn, "config") or {}
        counts = self.meta_value(txn, "shard_slices") or [int(config.get("slices", 1))] * len(groups)
        n = max(counts[m] for m in group) if stages is None else stages
        if len(group) == 1:
            return [self.slice_ids(txn, shard, r) for r in range(n)]
        out = []
        for r in range(n):
            parts = [self.slice_ids(txn, m, r) for m in group if r < counts[m]]
            out.append(np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64))
        return out

    def load_samples(
        self, txn: lmdb.Transaction, ids: np.ndarray, feature_shape: tuple[int, ...], where: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features (as float32) and labels of ``ids``, in the given order, each decrypted and checked.

        Features are converted from the stored dtype to float32, then divided by the store's
        ``feature_scale`` where it has one (raw pixels stored as uint8), by
        :func:`sisa.data.inputs.model_inputs`: every training path (slices, the core set,
        verify) gets its inputs here.

        Args:
            txn: Read transaction.
            ids: Sample ids.
            feature_shape: Shape of one sample.
            where: Where the ids live (e.g. ``shard 2 slice 1``), named in errors.

        Raises:
            IntegrityError: If an id has no record, or its record was modified.
            StoreChangedError: If a deletion destroyed a key this snapshot still needed
                (another process rotated the slice after ``txn`` began): read again.
        """
        width = int(np.prod(feature_shape))
        meta = self.meta(txn)
        dtype = np.dtype(meta.get("feature_dtype", DEFAULT_DTYPE)).newbyteorder("<")
        body_len = LABEL.size + dtype.itemsize * width
        x = np.empty((len(ids), width), dtype=np.float32)
        y = np.empty(len(ids), dtype=np.int64)
        samples, assign = self._dbs["samples"], self._dbs["assign"]
        at = f" ({where})" if where else ""
        cache: dict[tuple[int, int, int], RunCipher] = {}
        # The key snapshot was taken after the bulk one: keys are deleted only after the records
        # that need them, so every record this snapshot holds still has its key, unless a
        # rotation finished in between (then the record is outdated: StoreChangedError).
        with self.key_snapshot(txn) as ktxn:
            for i, sid in enumerate(ids.tolist()):
                k = id_key(sid)
                raw = txn.get(k, db=samples)
                place = txn.get(k, db=assign)
                if raw is None or place is None:
                    raise IntegrityError(f"sample {sid}{at} is missing from store {self.path}")
                at_run: tuple[int, int, int] = PLACE.unpack(bytes(place))  # (shard, slice, run): one run, one key
                cipher = cache.get(at_run)
                if cipher is None:
                    cipher = cache[at_run] = RunCipher(self.keys.run_keys(ktxn, *at_run), at_run, body_len)
                plain = cipher.open(k, raw)
                if plain is None:
                    if self.changed_since(txn):
                        raise StoreChangedError(
                            f"store {self.path} changed while sample {sid}{at} was read (a deletion re-keyed "
                            "its slice); read again"
                        )
                    raise IntegrityError(
                        f"sample {sid}{at} in store {self.path} was modified or moved: its record (shard {at_run[0]} "
                        f"slice {at_run[1]} run {at_run[2]}) fails to authenticate under its run's {len(cipher.keys)} "
                        "key(s); restore the store from a backup or re-ingest the data into a new store"
                    )
                y[i] = LABEL.unpack_from(plain)[0]
                x[i] = np.frombuffer(plain, dtype=dtype, offset=LABEL.size, count=width)
        # The one stored input transform (divided in float32, as a loader scales pixels), in place:
        # ``x`` is this call's own buffer, and the core set may be large.
        x = model_inputs(x, meta.get("feature_scale"), owned=True)
        return x.reshape((len(ids), *feature_shape)), y

    def slice_counts(self, txn: lmdb.Transaction, shards: int, slices: int) -> list[int]:
        """Number of slices of each shard: ``slices`` (R), plus one per ``add`` that touched it.

        Args:
            txn: Read transaction.
            shards: S, for a store whose meta does not hold the counts.
            slices: R, likewise.
        """
        counts = self.meta(txn).get("shard_slices")
        return list(counts) if counts else [slices] * shards

    def locate(self, txn: lmdb.Transaction, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Where each stored id lives: id -> (shard, slice), both counted from 0; absent ids are left out."""
        assign = self._dbs["assign"]
        out: dict[int, tuple[int, int]] = {}
        for sid in ids:
            raw = txn.get(id_key(int(sid)), db=assign)
            if raw is not None:
                shard, slice_, _ = PLACE.unpack(bytes(raw))
                out[int(sid)] = (shard, slice_)
        return out

    def largest_id(self, txn: lmdb.Transaction) -> int | None:
        """The largest sample id stored now (None for an empty store)."""
        cursor = txn.cursor(db=self._dbs["samples"])
        return struct.unpack(">Q", bytes(cursor.key()))[0] if cursor.last() else None

    def place(self, txn: lmdb.Transaction, sample_id: int) -> tuple[int, int, int] | None:
        """Where a stored id lives: (shard, slice, run), or None."""
        raw = txn.get(id_key(sample_id), db=self._dbs["assign"])
        return PLACE.unpack(bytes(raw)) if raw is not None else None

    def run_ids(self, txn: lmdb.Transaction, shard: int, slice_: int, run: int) -> np.ndarray:
        """Ids of one membership run (sorted)."""
        held = txn.get(run_key(shard, slice_, run), db=self._dbs["members"])
        return np.empty(0, np.int64) if held is None else np.frombuffer(held, dtype="<u8").astype(np.int64)

    def put_samples(
        self,
        txn: lmdb.Transaction,
        ids: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        shard: np.ndarray,
        slice_: np.ndarray,
        *,
        dtype: np.dtype[Any] | None = None,
        staged: bool = False,
    ) -> None:
        """Write samples with their assignment, encrypted under their slices' keys, in the caller's transaction.

        The features are stored in ``dtype`` (default: the store's ``feature_dtype``; the
        caller has checked that ``x`` converts to it without changing a trained value).
        Runs without a key get one, committed to the key environment before this
        transaction (a key may outlive a failed write; never the reverse). With ``staged``,
        each id is also marked as written by an ingest that has not yet committed
        (:meth:`commit_staged` publishes them, :meth:`unstage` takes them back).
        """
        samples, assign = self._dbs["samples"], self._dbs["assign"]
        dtype = self.feature_dtype(txn) if dtype is None else dtype
        # the plaintext body of a sample: int32 label, then its features in the store's dtype, little-endian
        rows = np.ascontiguousarray(x.reshape(len(ids), -1), dtype=dtype.newbyteorder("<"))
        # Ids that come after every stored one (the common case: numbered data) are appended,
        # which fills LMDB pages completely instead of splitting them in half.
        last = self.largest_id(txn)
        append = last is None or (len(ids) > 0 and bool(np.all(np.diff(ids) > 0)) and int(ids[0]) > last)
        runs = self._add_members(txn, ids, shard, slice_)
        places = list(zip(shard.tolist(), slice_.tolist(), runs.tolist(), strict=True))
        keys = self.keys.ensure_run_keys(places)
        sid_keys = [id_key(sid) for sid in ids.tolist()]
        labels = y.tolist()
        # Sealed run by run (one key, one nonce draw each), then written in id order.
        of_run: dict[tuple[int, int, int], list[int]] = {}
        for i, at_run in enumerate(places):
            of_run.setdefault(at_run, []).append(i)
        sealed: list[bytes] = [b""] * len(ids)
        for at_run, members in of_run.items():
            bodies = [(sid_keys[i], LABEL.pack(labels[i]) + rows[i].tobytes()) for i in members]
            for i, record in zip(members, RunCipher([keys[at_run]], at_run).seal(bodies), strict=True):
                sealed[i] = record
        for i, sid in enumerate(ids.tolist()):
            k = sid_keys[i]
            if not txn.put(k, sealed[i], db=samples, overwrite=False, append=append):
                raise StoreError(f"sample id {sid} is already in the store")
            txn.put(k, PLACE.pack(*places[i]), db=assign, append=append)
            if staged:
                txn.put(k, b"", db=self._dbs["staged"])

    def _add_members(self, txn: lmdb.Transaction, ids: np.ndarray, shard: np.ndarray, slice_: np.ndarray) -> np.ndarray:
        """Add ``ids`` to their slices' membership runs; returns each id's run number.

        A slice's last run is filled up to :data:`RUN_MAX` first, then new runs follow,
        numbered after the slice's last, so runs stay full whatever the ingest's batch size.
        """
        members = self._dbs["members"]
        out = np.empty(len(ids), dtype=np.int64)
        pairs = np.stack([shard, slice_], axis=1) if len(ids) else np.empty((0, 2), dtype=np.int64)
        for s, r in {(int(a), int(b)) for a, b in pairs.tolist()}:
            where = np.flatnonzero((shard == s) & (slice_ == r))
            fresh = ids[where].astype("<u8")
            cur = txn.cursor(db=members)
            prefix = struct.pack(">II", s, r)
            last: tuple[int, np.ndarray] | None = None
            # the slice's last run: the key before the next slice's first
            if cur.set_range(struct.pack(">II", s, r + 1) if r < 0xFFFFFFFF else b"\xff" * 16):
                found = cur.prev()
            else:
                found = cur.last()
            if found and bytes(cur.key())[:8] == prefix:
                last = (PLACE.unpack(bytes(cur.key()))[2], np.frombuffer(cur.value(), dtype="<u8"))
            taken = 0
            number = 0
            if last is not None:
                number, held = last
                room = RUN_MAX - len(held)
                if room > 0:
                    taken = min(room, len(fresh))
                    merged = np.sort(np.concatenate([held, fresh[:taken]]))
                    txn.put(run_key(s, r, number), merged.tobytes(), db=members)
                    out[where[:taken]] = number
                number += 1
            for start in range(taken, len(fresh), RUN_MAX):
                part = fresh[start : start + RUN_MAX]
                txn.put(run_key(s, r, number), np.sort(part).tobytes(), db=members)
                out[where[start : start + len(part)]] = number
                number += 1
        return out

    def remove_member(self, txn: lmdb.Transaction, sample_id: int) -> tuple[int, int, int] | None:
        """Take one id out of membership and assignment (not its record); returns its (shard, slice, run)."""
        k = id_key(sample_id)
        place = txn.get(k, db=self._dbs["assign"])
        if place is None:
            return None
        shard, slice_, run = PLACE.unpack(bytes(place))
        members, key = self._dbs["members"], run_key(shard, slice_, run)
        held = txn.get(key, db=members)
        if held is not None:
            rest = np.frombuffer(held, dtype="<u8")
            rest = rest[rest != sample_id]
            if len(rest):
                txn.put(key, rest.tobytes(), db=members)
            else:
                txn.delete(key, db=members)
        txn.delete(k, db=self._dbs["assign"])
        return shard, slice_, run

    def put_core(self, txn: lmdb.Transaction, ids: np.ndarray) -> None:
        """Declare stored ids part of the core set (never deletable), in the caller's transaction."""
        core = self._dbs["core"]
        for sid in np.asarray(ids, dtype=np.int64).tolist():
            txn.put(id_key(sid), b"", db=core)

    def core_ids(self, txn: lmdb.Transaction) -> np.ndarray:
        """Sorted ids of the core set (empty for a store without one)."""
        core = self._dbs.get("core")
        if core is None:
            return np.empty(0, dtype=np.int64)
        keys = txn.cursor(db=core).iternext(keys=True, values=False)
        return np.fromiter((struct.unpack(">Q", bytes(k))[0] for k in keys), dtype=np.int64)

    def core_count(self, txn: lmdb.Transaction) -> int:
        """Number of ids in the core set (the table's entry count: no scan)."""
        core = self._dbs.get("core")
        return 0 if core is None else int(txn.stat(core)["entries"])

    def core_members(self, txn: lmdb.Transaction, ids: Sequence[int]) -> list[int]:
        """Those of ``ids`` that are in the core set."""
        core = self._dbs.get("core")
        if core is None:
            return []
        return [int(i) for i in ids if txn.get(id_key(int(i)), db=core) is not None]

    def commit_staged(self, txn: lmdb.Transaction) -> None:
        """Publish every staged sample at once: the staged marks go in one operation (LMDB's drop)."""
        txn.drop(self._dbs["staged"], delete=False)

    def unstage(self, txn: lmdb.Transaction, limit: int) -> tuple[int, set[tuple[int, int, int]]]:
        """Remove up to ``limit`` staged samples (records, assignment, membership, mark).

        Returns:
            How many were removed (0 when none are left), and the (shard, slice, run) they were in.
        """
        staged = self._dbs["staged"]
        keys = []
        touched: set[tuple[int, int, int]] = set()
        cursor = txn.cursor(db=staged)
        for key in cursor.iternext(keys=True, values=False):
            keys.append(bytes(key))
            if len(keys) >= limit:
                break
        for key in keys:
            place = self.remove_member(txn, struct.unpack(">Q", key)[0])
            if place is not None:
                touched.add(place)
            txn.delete(key, db=self._dbs["samples"])
            txn.delete(key, db=staged)
        return len(keys), touched
