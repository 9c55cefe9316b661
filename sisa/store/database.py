"""The LMDB store of one ensemble: samples, assignments, config, checkpoints and live models.

One directory per ensemble. Every logical change is one write transaction, so a crash
leaves the old or the new state (invariant 5). A writer holds an exclusive ``flock``
on ``writer.lock``; readers use LMDB's MVCC snapshots and need no lock. Within one
process, every handle on a directory shares one environment, guarded by a readers-writer
lock: transactions share it, and swapping, closing or resizing the environment takes it
alone, so a serving thread and a deleting thread can use one store at the same time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from sisa.errors import IntegrityError, StoreError, StoreFullError, StoreLockedError
from sisa.store.records import DBS, LATER_DBS, Records, id_key, member_key, shard_key, stage_key

__all__ = ["FORMAT_VERSION", "Store", "id_key", "member_key", "shard_key", "stage_key"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: sample records carry a BLAKE2b digest
_INITIAL_MAP = 1 << 28  # 256 MiB; grown by doubling on MapFullError
_LOCK_NAME = "writer.lock"
_SECRET_NAME = "hmac.key"  # per-store HMAC secret for keyed hashes of ids and the audit chain
# OS error texts (as LMDB words them) of a write that failed for lack of room.
_WRITE_FAILURES = ("No space left", "Input/output error", "File too large", "Disk quota exceeded")
_COMPACT_DIR = ".compact"  # where a compacted copy is built before it replaces data.mdb

T = TypeVar("T")


class _EnvLock:
    """Readers-writer lock of one shared environment, between the threads of this process.

    Every transaction holds it shared; closing, swapping (compaction, following another
    process's compaction) and resizing the environment hold it exclusively, because LMDB
    forbids those while any transaction of the process is open, and a closed environment
    fails every handle that still uses it. Shared holds are reentrant per thread (reads
    nest: a read inside a read or a write), and a thread that holds it exclusively may
    also take it shared. A waiting exclusive holder goes before new readers, so a stream
    of predictions cannot starve a compaction. Other processes are not involved: each has
    its own environment, and follows a swap on its next read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding it shared
        self._owner: int | None = None  # the thread holding it exclusively
        self._waiting = 0  # threads waiting to hold it exclusively
        self._local = threading.local()

    def held_shared(self) -> bool:
        """True when the calling thread holds the lock shared (inside a transaction)."""
        return getattr(self._local, "depth", 0) > 0

    def held_exclusive(self) -> bool:
        """True when the calling thread holds the lock exclusively."""
        return self._owner == threading.get_ident()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the block (reentrant in one thread)."""
        depth = getattr(self._local, "depth", 0)
        outer = depth == 0 and not self.held_exclusive()
        if outer:
            with self._cond:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if outer:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone for the block: no transaction of this process is open meanwhile.

        Raises:
            StoreError: If the calling thread is inside a transaction of this store (it
                would wait for itself).
        """
        if self.held_exclusive():
            yield
            return
        if self.held_shared():
            raise StoreError(
                "cannot close, swap or resize a store's environment inside one of its own transactions; "
                "finish the transaction first"
            )
        with self._cond:
            self._waiting += 1
            try:
                while self._owner is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._owner = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._owner = None
                self._cond.notify_all()


class _SharedEnv:
    """One LMDB environment per directory and process, shared by every Store handle on it.

    py-lmdb refuses to open an environment twice in a process, and compaction swaps the
    environment under all handles, so handles hold this object rather than the env, and
    use ``env`` and ``dbs`` only while holding ``lock`` (see :class:`_EnvLock`).
    """

    def __init__(self, path: Path, readonly: bool, create: bool = False) -> None:
        self.path = path
        self.count = 0  # open Store handles on it (changed under _ENVS_LOCK)
        self.lock = _EnvLock()
        self.env_readonly = readonly
        # Only a new store creates its tables: opening an LMDB directory that is not a sisa
        # store must fail without writing tables into it.
        self.env, self.dbs = self._open(create)

    def _open(self, create: bool = False) -> tuple[lmdb.Environment, dict[str, Any]]:
        data = self.path / "data.mdb"
        size = max(_INITIAL_MAP, data.stat().st_size if data.exists() else 0)
        env = lmdb.open(
            str(self.path),
            map_size=size,
            max_dbs=len(DBS) + len(LATER_DBS) + 4,
            readonly=self.env_readonly,
            subdir=True,
            mode=0o600,
        )
        try:
            dbs: dict[str, Any] = {
                name: env.open_db(name.encode(), create=create and not self.env_readonly) for name in DBS
            }
            for name in LATER_DBS:
                try:
                    dbs[name] = env.open_db(name.encode(), create=not self.env_readonly)
                except lmdb.NotFoundError:
                    dbs[name] = None  # a read-only look at a store from before the table: empty
        except lmdb.Error:
            env.close()  # else this process could never open the directory again
            raise
        self.ident = _file_ident(data)
        return env, dbs

    def reopen(self) -> None:
        """Open the directory's data.mdb again (after compaction replaced it); hold ``lock`` exclusively."""
        self.env, self.dbs = self._open()

    def follow_swap(self) -> None:
        """Reopen if another process's compaction replaced data.mdb since we opened it.

        Without this a long-lived reader would keep the old file's frozen snapshot and
        never see later deletions take shards out of service. Checked again under the
        exclusive lock: a compaction by this process's own writer (another thread) also
        changes the file, and reopens the environment itself.
        """
        if _file_ident(self.path / "data.mdb") == self.ident:
            return
        with self.lock.exclusive():
            if _file_ident(self.path / "data.mdb") != self.ident:
                log.info("data.mdb of %s was compacted by another process; reopening", self.path)
                self.env.close()
                self.reopen()

    def adopt_size(self, size: int) -> None:
        """Set the map size (0: adopt the size another process grew it to), with no transaction open.

        LMDB allows a resize only while the process has no open transaction. A thread that
        is inside a transaction of this store (a write nested in a read) cannot wait for
        the others; it resizes at once, as before this lock existed.
        """
        if self.lock.held_shared() and not self.lock.held_exclusive():
            self.env.set_mapsize(size)
            return
        with self.lock.exclusive():
            self.env.set_mapsize(size)

    def close(self) -> None:
        """Close the environment once no thread is inside one of its transactions."""
        with self.lock.exclusive():
            self.env.close()


# realpath -> the shared environment of that directory in this process
_ENVS: dict[str, _SharedEnv] = {}
_ENVS_LOCK = threading.Lock()  # guards _ENVS and every _SharedEnv.count


def _file_ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_copy(path: Path, map_size: int) -> None:
    """Make both meta pages of a compacted copy hold its data, with one no-op commit.

    A compacting copy keeps the data in meta page 1 (txnid 1) and leaves page 0 an empty
    database. Every process picks the current meta page by the parity of the txnid in
    ``lock.mdb``, and that file outlives the swap while another process (a reader) has
    the store open: with an even txnid there, the writer and readers would all see page
    0, an empty store, and the next commit would overwrite the real data. Rewriting one
    key with its own value, in the copy's own environment, commits txnid 2 into page 0
    with the same content, so either parity finds the data.
    """
    env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DBS) + len(LATER_DBS) + 4, subdir=True, mode=0o600)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True) as txn:
            value = txn.get(b"format", db=meta)
            if value is None:  # every store has it (create writes it first)
                raise StoreError(f"compacted copy in {path} has no format record")
            txn.put(b"format", value, db=meta)
    finally:
        env.close()


class Store(Records):
    """An open store directory (record-level reads and writes come from :class:`Records`).

    Use :meth:`create` or :meth:`open`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: Path, shared: _SharedEnv, lock_fd: int | None) -> None:
        """Wrap an open environment; use :meth:`create` or :meth:`open` instead."""
        self.path = path
        self._shared = shared
        self._lock_fd = lock_fd
        self._closed = False

    @property
    def _env(self) -> lmdb.Environment:
        return self._shared.env

    @property
    def _dbs(self) -> dict[str, Any]:
        return self._shared.dbs

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
    def _open_env(cls, path: Path, readonly: bool, create: bool = False) -> _SharedEnv:
        real = os.path.realpath(path)
        with _ENVS_LOCK:
            shared = _ENVS.get(real)
            if shared is None:
                # Opened writable whenever the files allow it, so a reader opened first does not
                # stop a later writer in this process; the writer lock decides who writes.
                shared = _SharedEnv(path, readonly and not os.access(path / "data.mdb", os.W_OK), create)
                _ENVS[real] = shared
            shared.count += 1
            return shared

    def _release_env(self) -> None:
        with _ENVS_LOCK:
            self._shared.count -= 1
            last = self._shared.count <= 0
            if last:
                _ENVS.pop(os.path.realpath(self.path), None)
        if last:
            self._shared.close()

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any]) -> Store:
        """Create a new store directory and write its metadata.

        Args:
            path: Directory to create (must not be an existing store; an empty dir is fine).
            meta: JSON-able metadata, e.g. the config.

        Returns:
            The store, open for writing.

        Raises:
            StoreError: If ``path`` already holds a store or other files.
        """
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not a directory; pick a new or empty directory for the store")
        if p.exists() and any(p.iterdir()):
            if (p / "data.mdb").exists():
                raise StoreError(f"{p} already holds a store; open it with Ensemble.open / --store, or pick a new path")
            raise StoreError(f"{p} exists and is not empty; pick a new or empty directory for the store")
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(p, 0o700)
        fd = cls._lock(p)
        secret = os.open(p / _SECRET_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(secret, os.urandom(32))
            os.fsync(secret)
        finally:
            os.close(secret)
        store = cls(p, cls._open_env(p, readonly=False, create=True), fd)
        store.write(lambda txn: store._put_meta(txn, {"format": FORMAT_VERSION, **meta}))
        return store

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
        if not (p / "data.mdb").is_file():
            raise StoreError(f"{p} is not a sisa store (no data.mdb); create one with `sisa train --store {p}`")
        if (p / "data.mdb").stat().st_size == 0:  # LMDB would initialise it: refuse, write nothing
            raise StoreError(
                f"{p} is not a sisa store (its data.mdb is empty); point --store at a store `sisa train` made"
            )
        fd = None if readonly else cls._lock(p, lock_timeout)
        if fd is not None:
            # A crash during compaction leaves a partial copy (of live data only): drop it.
            shutil.rmtree(p / _COMPACT_DIR, ignore_errors=True)
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
            raise StoreError(
                f"{p} has store format {version!r}; this sisa reads format {FORMAT_VERSION}: "
                "train a new store from the original data (`sisa train --store NEW ...`)"
            )
        if fd is not None:
            store.roll_back_ingest()
        return store

    def roll_back_ingest(self, batch: int = 10_000) -> int:
        """Take back what an ingest wrote before it failed or its process died (idempotent).

        An ingest writes in bounded transactions, each sample marked staged until the last
        transaction publishes them all; until then no reader sees them. Removing them in
        bounded transactions too keeps a crash here harmless: the next writable open goes on.

        Returns:
            Samples removed.
        """
        removed = 0
        while True:
            n = self.write(lambda txn: self.unstage(txn, batch))
            removed += n
            if n == 0:
                break
        if removed:
            log.info("rolled back %d samples of an ingest that did not finish in %s", removed, self.path)
        return removed

    def close(self) -> None:
        """Close the environment and release the writer lock."""
        if self._closed:
            return
        self._closed = True
        self._release_env()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def secret(self) -> bytes:
        """The store's 32-byte HMAC secret (file ``hmac.key``, owner-only).

        Raises:
            IntegrityError: If the file is missing or has the wrong size.
        """
        try:
            key = (self.path / _SECRET_NAME).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"store {self.path}: its HMAC secret {_SECRET_NAME} cannot be read ({exc})") from exc
        if len(key) != 32:
            raise IntegrityError(f"store {self.path}: its HMAC secret {_SECRET_NAME} is corrupt")
        return key

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
        while True:
            try:
                with self._shared.lock.shared(), self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                new_size = self._env.info()["map_size"] * 2
                log.info("store map full; growing to %d MiB", new_size >> 20)
                self._shared.adopt_size(new_size)  # outside the transaction: no other may be open
            except lmdb.Error as exc:
                # LMDB reports a short write at commit as EIO; a size limit as EFBIG.
                if isinstance(exc, lmdb.DiskError) or any(m in str(exc) for m in _WRITE_FAILURES):
                    raise StoreFullError(
                        f"store {self.path}: the write failed ({exc}): the disk is full, over quota or "
                        "failing; nothing of the change was written (the store is as before). Free space and retry"
                    ) from exc
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise StoreFullError(
                        f"store {self.path}: the write failed ({exc.strerror}); nothing of the change was written. "
                        "Free space and retry"
                    ) from exc
                raise

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction: one consistent snapshot of the whole store.

        Safe to use from several threads at once, also while another thread of this
        process writes or compacts the store (it waits for a swap to finish).
        """
        lock = self._shared.lock
        if not self.writable and not lock.held_shared():
            # Not inside another read: following a swap there would end the outer snapshot.
            self._shared.follow_swap()
        for attempt in (1, 2):
            with lock.shared():
                try:
                    txn = self._env.begin()
                except lmdb.MapResizedError:
                    if attempt == 2:
                        raise
                else:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._shared.adopt_size(0)  # adopt the size another process grew the map to

    def compact(self) -> tuple[int, int]:
        """Rewrite ``data.mdb`` without its free pages, then atomically swap it in.

        LMDB frees pages on delete but does not scrub them, so deleted bytes stay in the
        file until it is rewritten; a compacting copy holds live pages only. The copy is
        fsync'd, renamed over ``data.mdb`` (atomic), and the directory fsync'd, so a crash
        leaves either the old file or the new one.

        Returns:
            File size in bytes before and after.

        Raises:
            StoreError: If this handle is read-only.
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; open it for writing to compact it")
        # Alone on the environment from the copy to the reopen: no other thread of this process
        # may start a transaction on the old environment while it is closed and swapped.
        with self._shared.lock.exclusive():
            return self._compact()

    def _compact(self) -> tuple[int, int]:
        data, tmp = self.path / "data.mdb", self.path / _COMPACT_DIR
        before = data.stat().st_size
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        copied = tmp / "data.mdb"
        try:
            self._env.copy(str(tmp), compact=True)
            _seal_copy(tmp, self._env.info()["map_size"])
            os.chmod(copied, 0o600)
            _fsync(copied)
        except (lmdb.Error, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            # data.mdb is untouched; a pending deletion stays pending and `sisa resume` erases it later.
            raise StoreFullError(
                f"store {self.path}: compaction could not write its copy ({exc}); the store is unchanged. "
                "Free space (the copy needs about the size of data.mdb) and run `sisa resume`"
            ) from exc
        self._env.close()
        try:
            os.replace(copied, data)
            _fsync(self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._shared.reopen()
        after = data.stat().st_size
        log.info("compacted %s: %d -> %d bytes", data, before, after)
        return before, after

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
