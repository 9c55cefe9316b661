"""Record layout of the store: the named databases, their keys, and record-level reads and writes.

Keys are big-endian so LMDB's byte order is numeric order: a prefix scan of
``members`` lists one slice of one shard in id order, and of ``stages`` one shard's
stages in order. Every write here runs inside a caller's transaction, so a logical
change composed of several of them stays atomic.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb
import numpy as np

from sisa.config.settings import SisaConfig
from sisa.data.inputs import model_inputs
from sisa.errors import IntegrityError, StoreChangedError, StoreError
from sisa.store.cipher import OVERHEAD, TOKEN_SIZE, new_key, new_token, open_record, seal_record, seal_records
from sisa.store.digests import recipe_digest, sha256
from sisa.store.environment import Tables

if TYPE_CHECKING:
    from sisa.store.keyring import KeyRing, SliceKey

__all__ = [
    "DBS",
    "TABLES",
    "Records",
    "checkpoint_ad",
    "id_key",
    "RUN_MAX",
    "SEAL_OVERHEAD",
    "run_key",
    "RunCipher",
    "sample_ad",
    "shard_key",
    "stage_key",
]

# samples: id -> sealed label + features; assign: id -> (shard, slice, run); members: (shard, slice, run) -> the
# run's ids, packed (a slice's membership in full pages; see RUN_MAX);
# ckpt: key -> checkpoint bytes; stages: (shard, stage) -> record; live: shard -> live record;
# requests: request id -> deletion request; deleted: keyed hash of an id -> request id; audit: seq -> entry.
DBS = ("meta", "samples", "assign", "members", "ckpt", "stages", "live", "requests", "deleted", "audit")
# Tables added after format 2 was fixed: a writable open creates them, a read-only open of an older
# store reads them as empty. ``staged``: ids an unfinished ingest wrote (invisible until it commits).
# The shared backbone's bytes live in ``ckpt`` under :data:`BACKBONE_PREFIX` + its digest (sealed like a
# checkpoint, so the key sweep keeps its key), described by the meta's ``backbone`` record.
# ``core``: ids of the core set (never deletable; they train the shared backbone), key -> b"".
# ``commits``: per shard, the cached bucketed manifest commitment (:mod:`sisa.unlearn.commitcache`).
LATER_DBS = ("staged", "core", "commits")
TABLES = Tables(fixed=DBS, later=LATER_DBS)
BACKBONE_PREFIX = "backbone-"
T = TypeVar("T")


def id_key(sample_id: int) -> bytes:
    """Big-endian key of a sample id, so LMDB's byte order is numeric order."""
    return struct.pack(">Q", sample_id)


# Ids per membership run: 508 little-endian u64 and LMDB's 16-byte header fill one 4 KiB overflow
# page. One key per id (the obvious index) cost 47 bytes a sample here, as ingest's inserts into the
# middle of the table split pages in half; full runs cost 8.
RUN_MAX = 508
_PLACE = struct.Struct(">IIQ")  # shard, slice, run


def run_key(shard: int, slice_: int, run: int) -> bytes:
    """Key of one membership run of a slice; a prefix scan of (shard, slice) lists the slice."""
    return _PLACE.pack(shard, slice_, run)


def stage_key(shard: int, stage: int) -> bytes:
    """Key of a stage record."""
    return struct.pack(">II", shard, stage)


def shard_key(shard: int) -> bytes:
    """Key of a shard's live-model record."""
    return struct.pack(">I", shard)


# A sample's plaintext body: int32 label, then its features in the store's dtype. Sealed, it is the
# body with AES-GCM's nonce in front and tag behind (28 bytes): 4 Fashion-MNIST records (816 bytes)
# fill a 4 KiB LMDB page. The keystream's 8-byte digest fitted 5, but it was unkeyed (forgeable).
SEAL_OVERHEAD = OVERHEAD
_LABEL = struct.Struct("<i")
DEFAULT_DTYPE = "<f4"  # what a store without samples yet reports
# Associated data of a sealed sample: what it is and where it lives. The open of a record moved to
# another id, run (or slice or shard) or key generation, or of another kind, fails to authenticate.
_SAMPLE_KIND = b"sisa-smp"  # then the id key (big-endian id), then _SAMPLE_PLACE
_SAMPLE_PLACE = struct.Struct(">IIQI")  # shard, slice, run, generation
_CKPT_KIND, _BACKBONE_KIND = b"sisa-ckpt|", b"sisa-backbone|"


def sample_ad(sid_key: bytes, place: tuple[int, int, int], generation: int) -> bytes:
    """The associated data a sample is sealed with: kind, id, shard, slice, run and key generation."""
    return _SAMPLE_KIND + sid_key + _SAMPLE_PLACE.pack(*place, generation)


def checkpoint_ad(token: bytes, name: str) -> bytes:
    """The associated data of a checkpoint (or the backbone): its token and its key in the ``ckpt`` table."""
    kind = _BACKBONE_KIND if name.startswith(BACKBONE_PREFIX) else _CKPT_KIND
    return kind + token + b"|" + name.encode()


class RunCipher:
    """The keys of one membership run, ready to open and seal many of its samples.

    A run's samples share their associated data but for the id, so its tail (place and key
    generation) is packed once per key, not once per record: at about a microsecond of cipher
    per record, the Python around it is what re-encryption, ingest and reads wait on.

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
        self._tails = [(entry.key, _SAMPLE_PLACE.pack(*place, entry.generation)) for entry in self.keys]

    def open(self, sid_key: bytes, sealed: bytes | memoryview) -> bytes | None:
        """The plaintext body of a sealed sample, trying each key in order; None if none opens it.

        Args:
            sid_key: The sample's id key (:func:`id_key`).
            sealed: The stored record.
        """
        if self._sealed_len is not None and len(sealed) != self._sealed_len:
            return None
        for key, tail in self._tails:
            plain = open_record(key, sealed, _SAMPLE_KIND + sid_key + tail)
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
        return seal_records(key, [(body, _SAMPLE_KIND + sid_key + tail) for sid_key, body in items])


class Records:
    """Record-level operations, mixed into :class:`~sisa.store.database.Store`."""

    path: Path

    def db(self, name: str) -> Any:  # pragma: no cover - provided by Store
        """Handle of a named database."""
        raise NotImplementedError

    @property
    def _dbs(self) -> dict[str, Any]:  # pragma: no cover - provided by Store
        raise NotImplementedError

    def meta(self, txn: lmdb.Transaction | None = None) -> dict[str, Any]:  # pragma: no cover - provided by Store
        """The store's metadata."""
        raise NotImplementedError

    def put_meta(self, txn: lmdb.Transaction, **values: Any) -> None:  # pragma: no cover - provided by Store
        """Set metadata keys inside the caller's write transaction."""
        raise NotImplementedError

    # ------------------------------------------------------------------ samples
    @property
    def keys(self) -> KeyRing:  # pragma: no cover - provided by Store
        """The store's key environment."""
        raise NotImplementedError

    def checkpoint_tokens(self) -> set[bytes]:  # pragma: no cover - provided by Store
        """The token of every stored checkpoint."""
        raise NotImplementedError

    def changed_since(self, txn: lmdb.Transaction) -> bool:  # pragma: no cover - provided by Store
        """Whether a write committed after ``txn``'s snapshot."""
        raise NotImplementedError

    def key_snapshot(self, txn: lmdb.Transaction) -> AbstractContextManager[lmdb.Transaction]:  # pragma: no cover
        """The key environment's snapshot paired with ``txn``."""
        raise NotImplementedError

    def read(self) -> AbstractContextManager[lmdb.Transaction]:  # pragma: no cover - provided by Store
        """A read transaction of the bulk environment."""
        raise NotImplementedError

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:  # pragma: no cover - provided by Store
        """Run ``fn`` in one write transaction."""
        raise NotImplementedError

    def feature_dtype(self, txn: lmdb.Transaction) -> np.dtype[Any]:
        """The dtype samples are stored in (set by the first ingest; float32 before any)."""
        return np.dtype(self.meta(txn).get("feature_dtype", DEFAULT_DTYPE))

    def sealed_checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any]) -> bytes | None:
        """The stored (encrypted) bytes of a stage's checkpoint, as on disk; None if absent. For audits and tests."""
        raw = txn.get(record["key"].encode(), db=self._dbs["ckpt"])
        return bytes(raw) if raw is not None else None

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
        body_len = _LABEL.size + dtype.itemsize * width
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
                at_run: tuple[int, int, int] = _PLACE.unpack(bytes(place))  # (shard, slice, run): one run, one key
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
                y[i] = _LABEL.unpack_from(plain)[0]
                x[i] = np.frombuffer(plain, dtype=dtype, offset=_LABEL.size, count=width)
        # The one stored input transform (divided in float32, as a loader scales pixels), in place:
        # ``x`` is this call's own buffer, and the core set may be large.
        x = model_inputs(x, meta.get("feature_scale"), owned=True)
        return x.reshape((len(ids), *feature_shape)), y

    # -------------------------------------------------------------- checkpoints
    def stage_record(self, txn: lmdb.Transaction, shard: int, stage: int) -> dict[str, Any] | None:
        """The committed record of a stage checkpoint, or None."""
        raw = txn.get(stage_key(shard, stage), db=self._dbs["stages"])
        return json.loads(bytes(raw)) if raw is not None else None

    def stage_records(self, txn: lmdb.Transaction, shard: int) -> list[dict[str, Any]]:
        """All stage records of a shard, in stage order."""
        out = []
        cur = txn.cursor(db=self._dbs["stages"])
        prefix = struct.pack(">I", shard)
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:4] != prefix:
                    break
                out.append(json.loads(bytes(value)))
        return out

    def checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any]) -> bytes:
        """Checkpoint bytes of a stage record, checked against the recorded sha256.

        Raises:
            IntegrityError: If the bytes are missing or altered.
        """
        where = f"shard {record['shard']} stage {record['stage']} (trained on slices 0..{record['stage'] - 1})"
        return self._open_checkpoint(txn, record, where)

    def recipe_digest(self, txn: lmdb.Transaction, config: SisaConfig) -> str:
        """The recipe digest stages are keyed by now: ``config``'s, with the stored backbone's digest.

        A config with a backbone and none stored yet (before its first fit) gets a digest no
        stored stage has, so nothing counts as trained until the backbone exists.
        """
        if not config.backbone.enabled:
            return recipe_digest(config)
        record = self.meta(txn).get("backbone")
        return recipe_digest(config, record["digest"] if record else "none stored")

    def backbone_bytes(self, txn: lmdb.Transaction) -> tuple[dict[str, Any], bytes] | None:
        """The shared backbone's record (meta ``backbone``) and its bytes, checked; None if none is stored.

        Raises:
            IntegrityError: If its bytes are missing or altered.
        """
        record = self.meta(txn).get("backbone")
        if record is None:
            return None
        return record, self._open_checkpoint(txn, record, "the shared backbone")

    def put_backbone(self, txn: lmdb.Transaction, record: dict[str, Any], sealed: bytes) -> None:
        """Store a backbone (``record``: ``key``, ``sha256``, ``digest``, ...) in place of the old one, in ``txn``.

        The old bytes go in the same transaction; their key is destroyed by the next key sweep.
        """
        old = self.meta(txn).get("backbone")
        if old is not None and old["key"] != record["key"]:
            txn.delete(old["key"].encode(), db=self._dbs["ckpt"])
        txn.put(record["key"].encode(), sealed, db=self._dbs["ckpt"])
        self.put_meta(txn, backbone=record)

    def _open_checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any], where: str) -> bytes:
        """Open the ``ckpt`` entry named by ``record["key"]`` (bound to that name) and check ``record["sha256"]``."""
        raw = txn.get(record["key"].encode(), db=self._dbs["ckpt"])
        if raw is None:
            raise IntegrityError(f"checkpoint of {where} is missing from store {self.path}")
        token = bytes(raw[:TOKEN_SIZE])
        with self.key_snapshot(txn) as ktxn:
            key = self.keys.checkpoint_key(ktxn, token)
        if key is None:
            if self.changed_since(txn):
                raise StoreChangedError(
                    f"store {self.path} changed while the checkpoint of {where} was read (it was retired); read again"
                )
            raise IntegrityError(
                f"checkpoint of {where} in store {self.path} has no key (keys/ is damaged or was replaced); "
                "restore the store from a backup"
            )
        blob = open_record(key, memoryview(raw)[TOKEN_SIZE:], checkpoint_ad(token, record["key"]))
        if blob is None:
            raise IntegrityError(
                f"checkpoint of {where} (store key {record['key']}) in store {self.path} was modified or moved: "
                "its bytes fail to authenticate under its key; `sisa resume` after removing it, or restore the "
                "store from a backup"
            )
        if sha256(blob) != record["sha256"]:
            raise IntegrityError(
                f"checkpoint of {where} was modified: its sha256 does not match the record; "
                "`sisa resume` after removing it, or restore the store from a backup"
            )
        return blob

    def live(self, txn: lmdb.Transaction) -> dict[int, dict[str, Any]]:
        """Live-model record of every shard that has one."""
        return {struct.unpack(">I", k)[0]: json.loads(bytes(v)) for k, v in txn.cursor(db=self._dbs["live"])}

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
                shard, slice_, _ = _PLACE.unpack(bytes(raw))
                out[int(sid)] = (shard, slice_)
        return out

    def seal_checkpoint(self, blob: bytes, name: str) -> bytes:
        """Seal checkpoint bytes under a fresh key, committed to the key environment first.

        Args:
            blob: The checkpoint (or backbone) bytes.
            name: Its key in the ``ckpt`` table (a stage record's ``key``, or the backbone's):
                the seal is bound to it, so the bytes open under no other name.

        Returns:
            What :meth:`commit_stage` stores: the key's token, then the sealed bytes.
        """
        token, key = new_token(), new_key()
        self.keys.put_checkpoint_key(token, key)
        return token + seal_record(key, blob, checkpoint_ad(token, name))

    def checkpoint_keys(self, txn: lmdb.Transaction) -> list[str]:
        """Key of every checkpoint stored (live, stage or retained stale), sorted."""
        cur = txn.cursor(db=self._dbs["ckpt"])  # keys only: a checkpoint's bytes are megabytes
        return [bytes(k).decode() for k in cur.iternext(keys=True, values=False)]

    def largest_id(self, txn: lmdb.Transaction) -> int | None:
        """The largest sample id stored now (None for an empty store)."""
        cursor = txn.cursor(db=self._dbs["samples"])
        return struct.unpack(">Q", bytes(cursor.key()))[0] if cursor.last() else None

    # ------------------------------------------------------------------ writes
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
            bodies = [(sid_keys[i], _LABEL.pack(labels[i]) + rows[i].tobytes()) for i in members]
            for i, record in zip(members, RunCipher([keys[at_run]], at_run).seal(bodies), strict=True):
                sealed[i] = record
        for i, sid in enumerate(ids.tolist()):
            k = sid_keys[i]
            if not txn.put(k, sealed[i], db=samples, overwrite=False, append=append):
                raise StoreError(f"sample id {sid} is already in the store")
            txn.put(k, _PLACE.pack(*places[i]), db=assign, append=append)
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
                last = (_PLACE.unpack(bytes(cur.key()))[2], np.frombuffer(cur.value(), dtype="<u8"))
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

    def place(self, txn: lmdb.Transaction, sample_id: int) -> tuple[int, int, int] | None:
        """Where a stored id lives: (shard, slice, run), or None."""
        raw = txn.get(id_key(sample_id), db=self._dbs["assign"])
        return _PLACE.unpack(bytes(raw)) if raw is not None else None

    def run_ids(self, txn: lmdb.Transaction, shard: int, slice_: int, run: int) -> np.ndarray:
        """Ids of one membership run (sorted)."""
        held = txn.get(run_key(shard, slice_, run), db=self._dbs["members"])
        return np.empty(0, np.int64) if held is None else np.frombuffer(held, dtype="<u8").astype(np.int64)

    def remove_member(self, txn: lmdb.Transaction, sample_id: int) -> tuple[int, int, int] | None:
        """Take one id out of membership and assignment (not its record); returns its (shard, slice, run)."""
        k = id_key(sample_id)
        place = txn.get(k, db=self._dbs["assign"])
        if place is None:
            return None
        shard, slice_, run = _PLACE.unpack(bytes(place))
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

    def commit_stage(self, txn: lmdb.Transaction, record: dict[str, Any], sealed: bytes, live: bool) -> None:
        """Store a finished stage checkpoint, inside the caller's write transaction.

        A stage whose key changed invalidates every later stage of the shard (they
        descend from the old checkpoint): their records and bytes go in the same
        transaction, and so does a live pointer to one of them.

        Args:
            txn: Open write transaction.
            record: JSON-able stage record (``shard``, ``stage``, ``key``, ``sha256``, ...).
            sealed: The checkpoint as :meth:`seal_checkpoint` encrypted it.
            live: Whether this stage is the shard's last, making it the live model.
        """
        shard, stage = record["shard"], record["stage"]
        stages, ckpts = self._dbs["stages"], self._dbs["ckpt"]
        old = self.stage_record(txn, shard, stage)
        if old is not None and old["key"] != record["key"]:
            for later in self.stage_records(txn, shard):
                if later["stage"] >= stage:
                    txn.delete(later["key"].encode(), db=ckpts)
                    txn.delete(stage_key(shard, later["stage"]), db=stages)
            self.set_live(txn, shard, None)
        txn.put(record["key"].encode(), sealed, db=ckpts)
        txn.put(stage_key(shard, stage), json.dumps(record, sort_keys=True).encode(), db=stages)
        if live:
            fields = ("stage", "key", "sha256", "weights", "manifest", "n_samples", "domain")
            self.set_live(txn, shard, {k: record[k] for k in fields if k in record})

    def set_live(self, txn: lmdb.Transaction, shard: int, record: dict[str, Any] | None) -> None:
        """Point ``shard``'s live model at ``record`` (None: out of service), in the caller's transaction.

        A live model that no stage record references (one kept by the serve-stale policy
        after a deletion retired its stage) has nothing else pointing at its bytes: they
        are deleted with the pointer, since that model trained on deleted ids.

        Args:
            txn: Open write transaction.
            shard: Shard index.
            record: The live record (``stage``, ``key``, ``sha256``, ...), or None.
        """
        lives = self._dbs["live"]
        old_raw = txn.get(shard_key(shard), db=lives)
        if old_raw is not None:
            old_key = json.loads(bytes(old_raw))["key"]
            if (record is None or record["key"] != old_key) and not self._key_in_stages(txn, shard, old_key):
                txn.delete(old_key.encode(), db=self._dbs["ckpt"])
        if record is None:
            txn.delete(shard_key(shard), db=lives)
        else:
            txn.put(shard_key(shard), json.dumps(record, sort_keys=True).encode(), db=lives)

    def _key_in_stages(self, txn: lmdb.Transaction, shard: int, key: str) -> bool:
        return any(r["key"] == key for r in self.stage_records(txn, shard))
