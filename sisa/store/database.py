"""The LMDB store of one ensemble: samples, assignments, config, checkpoints and live models.

One directory per ensemble: the bulk environment (``data.mdb``: encrypted samples and
checkpoints, assignments, journal, audit) and the small key environment (``keys/``, see
:mod:`sisa.store.keyring`). Every logical change is one write transaction of the bulk
environment, so a crash leaves the old or the new state (invariant 5); keys are written
before and deleted after the bulk records that use them. A writer holds an exclusive
``flock`` on ``writer.lock``; readers use LMDB's MVCC snapshots and need no lock. Within
one process every handle on a directory shares its environments
(:mod:`sisa.store.environment`), so a serving thread and a deleting thread can use one
store at the same time.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from sisa.errors import StoreError, StoreLockedError
from sisa.store import environment
from sisa.store import secret as secret_file
from sisa.store.cipher import TOKEN_SIZE
from sisa.store.keyring import KEY_DIR, KeyRing
from sisa.store.layout import TABLES, id_key, run_key, shard_key, stage_key
from sisa.store.records import CheckpointRecords
from sisa.store.samples import SampleRecords

__all__ = ["FORMAT_VERSION", "Store", "format_message", "id_key", "run_key", "shard_key", "stage_key"]

log = logging.getLogger(__name__)

# 2: sample records carry a BLAKE2b digest. 3: samples and checkpoints encrypted under keys in
# keys/ (erasure destroys keys), samples in their native dtype. 4: sealed with AES-256-GCM, bound to
# what each record is (the keystream and unkeyed digests of format 3 were forgeable).
FORMAT_VERSION = 4
_LOCK_NAME = "writer.lock"
# Meta key: the (shard, slice, run) of every sample a taken-back ingest removed, until their keys are replaced.
ROLLBACK_RUNS = "rollback_runs"

T = TypeVar("T")


def format_message(path: Path, version: object) -> str:
    """What to tell the user whose store has another format than this sisa reads."""
    convert = (
        f"Convert it into a new directory with `sisa migrate --store {path} --to NEW`, "
        "then use NEW (the old directory is left as it was)"
    )
    if version == 2:
        return (
            f"{path} has store format 2 (float32 samples in the clear, erased by rewriting the whole file); "
            f"this sisa reads format {FORMAT_VERSION} (samples sealed with AES-256-GCM in their own dtype, erased "
            f"by destroying keys). {convert}"
        )
    if version == 3:
        return (
            f"{path} has store format 3 (samples and checkpoints under a SHAKE-256 keystream with unkeyed "
            f"check values, which anyone who knows a sample can forge); this sisa reads format {FORMAT_VERSION} "
            f"(every record sealed with AES-256-GCM, bound to what it is). {convert}"
        )
    return (
        f"{path} has store format {version!r}; this sisa reads format {FORMAT_VERSION}: "
        "train a new store from the original data (`sisa train --store NEW ...`)"
    )


class Store(SampleRecords, CheckpointRecords):
    """An open store directory: samples from :class:`SampleRecords`, models from :class:`CheckpointRecords`.

    Use :meth:`create` or :meth:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: Path, shared: environment.SharedEnv, lock_fd: int | None) -> None:
        """Wrap an open environment; use :meth:`create` or :meth:`open` instead."""
        self.path = path
        self._shared = shared
        self._lock_fd = lock_fd
        self._closed = False
        self._keyring: KeyRing | None = None
        self._key_txns: dict[int, lmdb.Transaction] = {}  # id of a read transaction -> its key snapshot

    @property
    def _env(self) -> lmdb.Environment:
        return self._shared.env

    @property
    def _dbs(self) -> dict[str, Any]:
        return self._shared.dbs

    @property
    def keys(self) -> KeyRing:
        """The store's key environment (``keys/``)."""
        if self._keyring is None:
            raise StoreError(f"store {self.path} is closed")
        return self._keyring

    # ----------------------------------------------------------------- lifecycle
    @staticmethod
    def _lock(path: Path, wait: float = 0.0) -> int:
        """Take the writer lock, polling for up to ``wait`` seconds while another process holds it."""
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left > 0:
                    # Polling rather than a blocking flock: a blocking call cannot time out, and
                    # a writer (an apply) may hold the lock for minutes.
                    time.sleep(min(0.1, left))
                    continue
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                waited = f" (waited {wait:g}s)" if wait > 0 else ""
                raise StoreLockedError(
                    f"store {path} is locked by pid {holder}{waited}: another process is writing it; "
                    "wait for it to finish (the CLI's --wait SECONDS, Ensemble.open(lock_timeout=...)), "
                    "or open read-only (sisa status/eval, Ensemble.open(readonly=True))"
                ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        return fd

    @classmethod
    def _open_env(cls, path: Path, readonly: bool, create: bool = False) -> environment.SharedEnv:
        # Later tables only in a store of this format: one of another is refused below and must stay unchanged.
        tables = dataclasses.replace(TABLES, version=("meta", "format", FORMAT_VERSION))
        return environment.acquire(path, tables, readonly=readonly, create=create)

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], *, secret: bytes | None = None) -> Store:
        """Create a new store directory and write its metadata.

        Args:
            path: Directory to create (must not be an existing store; an empty dir is fine).
            meta: JSON-able metadata, e.g. the config.
            secret: The 32-byte HMAC secret to keep (a migrated store keeps its source's, so
                its keyed id hashes and audit MACs stay valid); default a new random one.

        Returns:
            The store, open for writing.

        Raises:
            StoreError: If ``path`` already holds a store or other files.
        """
        p = Path(path)
        if secret is not None and len(secret) != 32:
            raise StoreError(f"an HMAC secret has 32 bytes, not {len(secret)}")
        cls.check_new_path(p)
        secret_file.preflight(secret)  # a bad SISA_SECRET_FILE fails before anything is written
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(p, 0o700)
        fd = cls._lock(p)
        where = secret_file.create(p, secret)  # hmac.key here, or the file SISA_SECRET_FILE names
        store = cls(p, cls._open_env(p, readonly=False, create=True), fd)
        store._keyring = KeyRing(p, readonly=False, create=True)
        store.write(lambda txn: store._put_meta(txn, {"format": FORMAT_VERSION, **meta, "secret": where}))
        return store

    @staticmethod
    def check_new_path(path: str | Path) -> None:
        """Refuse a path that cannot become a new store: a file, a store, a non-empty directory.

        Raises:
            StoreError: Naming the problem and the fix.
        """
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not a directory; pick a new or empty directory for the store")
        if p.exists() and any(p.iterdir()):
            if (p / "data.mdb").exists():
                raise StoreError(f"{p} already holds a store; open it with Ensemble.open / --store, or pick a new path")
            raise StoreError(f"{p} exists and is not empty; pick a new or empty directory for the store")

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, lock_timeout: float = 0.0) -> Store:
        """Open an existing store.

        Args:
            path: The store directory.
            readonly: Open for reading only (no writer lock is taken).
            lock_timeout: Seconds to wait for the writer lock while another process holds
                it (0: fail at once).

        Returns:
            The open store.

        Raises:
            StoreError: If ``path`` is not a store.
            StoreLockedError: If another process is still writing after ``lock_timeout``
                seconds and ``readonly`` is False.
        """
        p = Path(path)
        if p.exists() and not p.is_dir():
            # Not "create one there": a file can never become a store, so that advice would fail next.
            raise StoreError(f"{p} is a file, not a sisa store; --store names the store's directory")
        if not (p / "data.mdb").is_file():
            raise StoreError(f"{p} is not a sisa store (no data.mdb); create one with `sisa train --store {p}`")
        if (p / "data.mdb").stat().st_size == 0:  # LMDB would initialise it: refuse, write nothing
            raise StoreError(
                f"{p} is not a sisa store (its data.mdb is empty); point --store at a store `sisa train` made"
            )
        fd = None if readonly else cls._lock(p, lock_timeout)
        if fd is not None:
            # A crash during compaction leaves a partial copy (of live data only): drop it.
            environment.drop_partial_copy(p)
            environment.drop_partial_copy(p / KEY_DIR)
        store: Store | None = None
        try:
            store = cls(p, cls._open_env(p, readonly=readonly), fd)
            version = store.meta().get("format")
        except (lmdb.Error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            if store is not None:
                store.close()
            elif fd is not None:
                os.close(fd)
            raise StoreError(
                f"{p} is not a readable sisa store ({exc}); point --store at a store `sisa train` made"
            ) from exc
        if version != FORMAT_VERSION:
            store.close()
            raise StoreError(format_message(p, version))
        try:
            store._keyring = KeyRing(p, readonly=readonly)
        except BaseException:
            store.close()
            raise
        if fd is not None:
            store.roll_back_ingest()
        return store

    def roll_back_ingest(self, batch: int = 10_000) -> int:
        """Take back what an ingest wrote before it failed or its process died (idempotent).

        An ingest writes in bounded transactions, each sample marked staged until the last
        transaction publishes them all; until then no reader sees them. Removing them in
        bounded transactions too keeps a crash here harmless: the next writable open goes on.

        The taken-back samples' ciphertext stays in free pages under their runs' keys, so those
        runs are re-keyed (and the key file compacted) before the keys are used again. Which runs
        is recorded durably (the meta's ``rollback_runs``) in the very transaction that unstages
        their samples, and cleared only after the re-keying: a crash at any step leaves the
        record, and the next writable open finishes the work before anything else is written.

        Args:
            batch: Staged samples removed per write transaction.

        Returns:
            Samples removed.
        """
        from sisa.store.erasure import finish_erasure, finish_rotations, rotate  # erasure builds on this module

        def unstage(txn: lmdb.Transaction) -> int:
            n, touched = self.unstage(txn, batch)
            if touched:
                runs = {tuple(r) for r in self.meta(txn).get(ROLLBACK_RUNS, [])} | touched
                self.put_meta(txn, **{ROLLBACK_RUNS: [list(r) for r in sorted(runs)]})
            return n

        removed = 0
        while n := self.write(unstage):
            removed += n
        runs = [(int(s), int(r), int(u)) for s, r, u in self.meta().get(ROLLBACK_RUNS, [])]
        if runs:
            # Fresh keys for every run a taken-back sample was in: its old key, which sealed the
            # taken-back bytes, goes (rotate marks the key file for compaction before the drop).
            rotate(self, runs, fresh=True)
            self.write(lambda txn: txn.delete(ROLLBACK_RUNS.encode(), db=self._dbs["meta"]))
        if removed:
            log.info("rolled back %d samples of an ingest that did not finish in %s", removed, self.path)
        finish_rotations(self)  # a rotation a crash cut short (a scan of the small key file)
        finish_erasure(self)  # compact the key file if a key was dropped since its last compaction
        return removed

    def close(self) -> None:
        """Close the environment and release the writer lock."""
        if self._closed:
            return
        self._closed = True
        if self._keyring is not None:
            self._keyring.close()
            self._keyring = None
        environment.release(self._shared)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def secret(self) -> bytes:
        """The store's 32-byte HMAC secret: ``hmac.key`` (owner-only), or the file ``SISA_SECRET_FILE`` names.

        Raises:
            IntegrityError: If the store's ``hmac.key`` is missing or has the wrong size.
            ConfigError: If the store keeps its secret outside and ``SISA_SECRET_FILE`` is
                unset, unreadable or another store's (see :mod:`sisa.store.secret`).
        """
        return secret_file.read(self.path, self.meta().get("secret"))

    @property
    def writable(self) -> bool:
        """True when this handle holds the writer lock."""
        return self._lock_fd is not None

    # -------------------------------------------------------------- transactions
    @property
    def map_size(self) -> int:
        """Bytes the LMDB map may grow to now (doubled on demand by :meth:`write`)."""
        return int(self._env.info()["map_size"])

    def db(self, name: str) -> Any:
        """Handle of a named database."""
        return self._dbs[name]

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map and retrying if it is full.

        Args:
            fn: Does every put/delete of one logical change; may run more than once.

        Returns:
            What ``fn`` returned.

        Raises:
            StoreError: If this handle is read-only.
            StoreFullError: If the disk is full; nothing of the change is written.
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; open it for writing to change it")
        return environment.write(self._shared, fn, self.path)

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction: one consistent snapshot of the store.

        The key environment's snapshot is taken right after the bulk one and lives as long:
        keys are deleted only after the records they encrypt, so every record of this
        snapshot decrypts for as long as it is held, even while another process deletes
        (a replay of a whole shard reads from it). Safe to use from several threads at
        once, also while another thread of this process writes or compacts the store.
        """
        with environment.read(self._shared, follow=not self.writable) as txn:
            if self._keyring is None:  # opening: the format is checked before keys/ is opened
                yield txn
                return
            with self._keyring.read(follow=not self.writable) as ktxn:
                self._key_txns[id(txn)] = ktxn
                try:
                    yield txn
                finally:
                    self._key_txns.pop(id(txn), None)

    @contextmanager
    def key_snapshot(self, txn: lmdb.Transaction) -> Iterator[lmdb.Transaction]:
        """The key environment's snapshot that goes with the bulk transaction ``txn``.

        A write transaction (or one not opened by :meth:`read`) gets a fresh one.
        """
        paired = self._key_txns.get(id(txn))
        if paired is not None:
            yield paired
            return
        with self.keys.read(follow=False) as ktxn:
            yield ktxn

    def changed_since(self, txn: lmdb.Transaction) -> bool:
        """Whether a write committed after ``txn``'s snapshot was taken (its data may be outdated)."""
        with environment.read(self._shared, follow=False) as fresh:
            return bool(fresh.id() != txn.id())

    def checkpoint_tokens(self) -> set[bytes]:
        """The token (name of the key) of every stored checkpoint.

        Read through memoryviews of the mapped pages: only each checkpoint's first bytes are
        touched, never its megabytes (S x R of them).
        """
        with self._shared.lock.shared(), self._env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._dbs["ckpt"])
            return {bytes(value[:TOKEN_SIZE]) for _, value in cur.iternext(keys=True, values=True)}

    def compact(self) -> tuple[int, int]:
        """Rewrite ``data.mdb`` without its free pages (reclaims space; erasure does not need it).

        Deleted samples and retired checkpoints in free pages are already unreadable (their
        keys are destroyed); this returns the pages to the filesystem and drops the
        deleted ids' assignment entries, which free pages keep in the clear until then.

        Returns:
            File size in bytes before and after.

        Raises:
            StoreError: If this handle is read-only.
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; open it for writing to compact it")
        return environment.compact(self._shared, self.path)

    # ----------------------------------------------------------------- metadata
    def _put_meta(self, txn: lmdb.Transaction, values: dict[str, Any]) -> None:
        for k, v in values.items():
            txn.put(k.encode(), json.dumps(v).encode(), db=self._dbs["meta"])

    def put_meta(self, txn: lmdb.Transaction, **values: Any) -> None:
        """Set metadata keys inside the caller's write transaction."""
        self._put_meta(txn, values)

    def meta(self, txn: lmdb.Transaction | None = None) -> dict[str, Any]:
        """All metadata as a dict."""
        if txn is None:
            with self.read() as t:
                return self.meta(t)
        return {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=self._dbs["meta"])}

    def meta_value(self, txn: lmdb.Transaction, key: str, default: Any = None) -> Any:
        """One metadata key's value (``default`` when unset), without decoding the others."""
        raw = txn.get(key.encode(), db=self._dbs["meta"])
        return default if raw is None else json.loads(bytes(raw))
