"""The key environment: the only place keys live, small enough to rewrite at every erasure.

``keys/`` inside the store directory is its own LMDB environment with three tables:

- ``slice``: (shard, slice, run, generation) -> 32-byte AES-256 key + the request id it was made for.
  A *run* is the unit of a slice's membership (up to 508 ids, see
  :data:`~sisa.store.layout.RUN_MAX`); every sample of a run is encrypted under the run's
  newest key, and a deletion *rotates* the runs it touched (new key, re-encrypt the at most
  507 samples left, delete the old key), so the deleted samples' ciphertext, wherever it
  lies, is under a key that no longer exists. The cost of a deletion's erasure is thus a
  few hundred records, whatever the size of the store.
- ``ckpt``: checkpoint token -> 32-byte key. Each committed checkpoint has its own key; a retired
  checkpoint's key is deleted by the sweep that follows every apply.
- ``meta``: the format record (compaction needs one record to seal the copy).

Ordering between the two environments keeps readers safe without a shared transaction:
a key is written (committed) before any bulk record that needs it, and deleted only after
the bulk records encrypted under it are gone or re-encrypted. A reader whose bulk snapshot
predates a rotation may find its key gone; :class:`~sisa.errors.StoreChangedError` tells
it to read again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from sisa.errors import StoreError
from sisa.store import environment
from sisa.store.cipher import KEY_SIZE, new_key

__all__ = ["KEY_DIR", "KeyRing", "SliceKey"]

KEY_DIR = "keys"
KEY_FORMAT = 2  # 1: 128-bit keystream keys (store format 3); 2: 256-bit AES-GCM keys (store format 4)
_TABLES = environment.Tables(fixed=("meta", "slice", "ckpt"))
_SLICE = struct.Struct(">IIQI")  # shard, slice, run, generation
_RUN = struct.Struct(">IIQ")  # the prefix of one run's keys
_SINCE = struct.Struct(">Q")  # the request id a slice key was made for (0: at ingest)

T = TypeVar("T")


class SliceKey(tuple[int, bytes, int]):
    """One key of a run of a slice: ``(generation, key, since)``, newest generation first in lists."""

    __slots__ = ()

    @property
    def generation(self) -> int:
        """Counts the run's keys from 0 (ingest)."""
        return self[0]

    @property
    def key(self) -> bytes:
        """The key bytes."""
        return self[1]

    @property
    def since(self) -> int:
        """The deletion request this key was made for: the run was rotated for every request up to it."""
        return self[2]


def _entry(key: bytes | memoryview, value: bytes | memoryview) -> SliceKey:
    return SliceKey((_SLICE.unpack(key)[3], bytes(value[:KEY_SIZE]), _SINCE.unpack(value[KEY_SIZE:])[0]))


class KeyRing:
    """The key environment of one store (opened with it, closed with it).

    Args:
        root: The store directory (the environment is ``root/keys``).
        readonly: Open without writing (a read-only store handle).
        create: Create the environment (a new store).
    """

    def __init__(self, root: Path, *, readonly: bool, create: bool = False) -> None:
        self.root = root
        self.path = root / KEY_DIR
        if create:
            self.path.mkdir(mode=0o700)
        elif not (self.path / "data.mdb").is_file():
            raise StoreError(f"store {root} has no key environment ({self.path}); it is damaged or not a sisa store")
        self._shared = environment.acquire(self.path, _TABLES, readonly=readonly, create=create)
        if create:
            self.write(lambda txn: txn.put(b"format", str(KEY_FORMAT).encode(), db=self._db("meta")))

    def _db(self, name: str) -> Any:
        return self._shared.dbs[name]

    def close(self) -> None:
        """Release this handle on the environment."""
        environment.release(self._shared)

    # -------------------------------------------------------------- transactions
    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction of the key environment (the caller holds the writer lock)."""
        return environment.write(self._shared, fn, self.root)

    @contextmanager
    def read(self, follow: bool = True) -> Iterator[lmdb.Transaction]:
        """A read transaction of the key environment (follows another process's compaction)."""
        with environment.read(self._shared, follow) as txn:
            yield txn

    def compact(self) -> tuple[int, int]:
        """Rewrite the key file without free pages: what makes deleted keys unrecoverable."""
        return environment.compact(self._shared, self.root)

    # ------------------------------------------------------------------ run keys
    def run_keys(self, txn: lmdb.Transaction, shard: int, slice_: int, run: int) -> list[SliceKey]:
        """Every key of one run, newest generation first (one, except during a rotation)."""
        prefix = _RUN.pack(shard, slice_, run)
        out: list[SliceKey] = []
        cur = txn.cursor(db=self._db("slice"))
        if cur.set_range(prefix):
            for key, value in cur:
                if key[: _RUN.size] != prefix:
                    break
                out.append(_entry(key, value))
        return out[::-1]

    def all_runs(self, txn: lmdb.Transaction) -> dict[tuple[int, int, int], list[SliceKey]]:
        """Keys of every run that has one: (shard, slice, run) -> keys, newest first."""
        out: dict[tuple[int, int, int], list[SliceKey]] = {}
        for key, value in txn.cursor(db=self._db("slice")):
            shard, slice_, run, _ = _SLICE.unpack(key)
            out.setdefault((shard, slice_, run), []).insert(0, _entry(key, value))
        return out

    def ensure_run_keys(self, runs: Iterable[tuple[int, int, int]]) -> dict[tuple[int, int, int], SliceKey]:
        """The newest key of each run, making (and committing) one where a run has none."""
        wanted = sorted(set(runs))
        with self.read(follow=False) as txn:
            found = {r: keys[0] for r in wanted if (keys := self.run_keys(txn, *r))}
        missing = [r for r in wanted if r not in found]
        if missing:
            made = {r: SliceKey((0, new_key(), 0)) for r in missing}

            def change(txn: lmdb.Transaction) -> None:
                for (shard, slice_, run), sk in made.items():
                    txn.put(_SLICE.pack(shard, slice_, run, 0), sk.key + _SINCE.pack(0), db=self._db("slice"))

            self.write(change)
            found.update(made)
        return found

    def add_generations(self, since: Mapping[tuple[int, int, int], int]) -> dict[tuple[int, int, int], SliceKey]:
        """Make and commit the next key of every run in ``since`` in one transaction (a rotation's first step).

        One commit (two fsyncs) for the whole batch instead of one per run: at a few dozen
        runs per deletion that was most of a rotation's time besides the cipher.

        Args:
            since: (shard, slice, run) -> the request id the new key is made for.

        Returns:
            The new key of each run.
        """

        def change(txn: lmdb.Transaction) -> dict[tuple[int, int, int], SliceKey]:
            made = {}
            for (shard, slice_, run), request in sorted(since.items()):
                keys = self.run_keys(txn, shard, slice_, run)
                gen = keys[0].generation + 1 if keys else 0
                entry = SliceKey((gen, new_key(), request))
                txn.put(_SLICE.pack(shard, slice_, run, gen), entry.key + _SINCE.pack(request), db=self._db("slice"))
                made[(shard, slice_, run)] = entry
            return made

        return self.write(change)

    def drop_keys(self, older_of: Iterable[tuple[int, int, int]], all_of: Iterable[tuple[int, int, int]]) -> int:
        """In one transaction, delete every key but the newest of the runs ``older_of``, and every key of ``all_of``.

        A rotation's last step for a whole batch: ``all_of`` are runs whose last samples were
        deleted, which need no key at all. Returns how many keys went.
        """

        def change(txn: lmdb.Transaction) -> int:
            gone = 0
            for (shard, slice_, run), keep in [*((r, 1) for r in older_of), *((r, 0) for r in all_of)]:
                for old in self.run_keys(txn, shard, slice_, run)[keep:]:
                    txn.delete(_SLICE.pack(shard, slice_, run, old.generation), db=self._db("slice"))
                    gone += 1
            return gone

        return self.write(change)

    def put_checkpoint_key(self, token: bytes, key: bytes) -> None:
        """Commit a checkpoint's key (before the checkpoint's bytes are committed)."""
        self.write(lambda txn: txn.put(token, key, db=self._db("ckpt")))

    def checkpoint_key(self, txn: lmdb.Transaction, token: bytes) -> bytes | None:
        """The key of the checkpoint named by ``token``, or None (retired, or never committed)."""
        raw = txn.get(token, db=self._db("ckpt"))
        return bytes(raw) if raw is not None else None

    def drop_checkpoint_keys(self, keep: set[bytes]) -> int:
        """Delete the key of every checkpoint token not in ``keep`` (the tokens the bulk store still holds).

        Returns:
            Keys deleted.
        """

        def change(txn: lmdb.Transaction) -> int:
            gone = [bytes(k) for k in txn.cursor(db=self._db("ckpt")).iternext(keys=True, values=False)]
            gone = [k for k in gone if k not in keep]
            for token in gone:
                txn.delete(token, db=self._db("ckpt"))
            return len(gone)

        return self.write(change)
