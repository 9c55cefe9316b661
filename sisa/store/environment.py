"""Shared LMDB environments: one per directory and process, with a readers-writer lock.

py-lmdb refuses to open an environment twice in one process, and compaction swaps the
file under every handle, so handles hold a :class:`SharedEnv` rather than the env. This
module owns that sharing, map growth on ``MapFullError``, and compaction by an atomic
swap of a compacted copy. A store has two such environments: the bulk one (samples,
checkpoints, journal, audit) and the small key environment that erasure compacts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from sisa.errors import StoreError, StoreFullError

__all__ = [
    "EnvLock",
    "SharedEnv",
    "Tables",
    "acquire",
    "compact",
    "drop_partial_copy",
    "file_ident",
    "fsync_path",
    "read",
    "release",
    "seal_copy",
    "write",
]

log = logging.getLogger(__name__)

INITIAL_MAP = 1 << 28  # 256 MiB; grown by doubling on MapFullError
_COMPACT_DIR = ".compact"  # where a compacted copy is built before it replaces data.mdb
# OS error texts (as LMDB words them) of a write that failed for lack of room.
_WRITE_FAILURES = ("No space left", "Input/output error", "File too large", "Disk quota exceeded")

T = TypeVar("T")


@dataclass(frozen=True)
class Tables:
    """The named databases of one kind of environment.

    Attributes:
        fixed: Tables every environment of this kind has (created with it).
        later: Tables added after the format was fixed: a writable open creates them, a
            read-only open of an older environment reads them as absent (``None``).
        version: ``(table, key, value)``: a writable open creates the ``later`` tables only where that
            fixed table holds that JSON value under that key (or in a new environment), so opening one of
            another format, which its opener then refuses, leaves it exactly as it was.
    """

    fixed: tuple[str, ...]
    later: tuple[str, ...] = ()
    version: tuple[str, str, object] | None = None

    @property
    def max_dbs(self) -> int:
        """LMDB's ``max_dbs`` for this kind, with room to spare."""
        return len(self.fixed) + len(self.later) + 4


class EnvLock:
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


class SharedEnv:
    """One LMDB environment per directory and process, shared by every Store handle on it.

    py-lmdb refuses to open an environment twice in a process, and compaction swaps the
    environment under all handles, so handles hold this object rather than the env, and
    use ``env`` and ``dbs`` only while holding ``lock`` (see :class:`EnvLock`).
    """

    def __init__(self, path: Path, tables: Tables, readonly: bool, create: bool = False) -> None:
        self.path = path
        self.tables = tables
        self.count = 0  # open Store handles on it (changed under _ENVS_LOCK)
        self.lock = EnvLock()
        self.env_readonly = readonly
        # Only a new store creates its tables: opening an LMDB directory that is not a sisa
        # store must fail without writing tables into it.
        self.env, self.dbs = self._open(create)

    def _open(self, create: bool = False) -> tuple[lmdb.Environment, dict[str, Any]]:
        data = self.path / "data.mdb"
        size = max(INITIAL_MAP, data.stat().st_size if data.exists() else 0)
        env = lmdb.open(
            str(self.path),
            map_size=size,
            max_dbs=self.tables.max_dbs,
            readonly=self.env_readonly,
            subdir=True,
            mode=0o600,
        )
        try:
            dbs: dict[str, Any] = {
                name: env.open_db(name.encode(), create=create and not self.env_readonly) for name in self.tables.fixed
            }
            creatable = not self.env_readonly and (create or self._current(env, dbs))
            for name in self.tables.later:
                try:
                    dbs[name] = env.open_db(name.encode(), create=creatable)
                except lmdb.NotFoundError:
                    dbs[name] = None  # a read-only look at a store from before the table (or a refused one): empty
        except lmdb.Error:
            env.close()  # else this process could never open the directory again
            raise
        self.ident = file_ident(data)
        return env, dbs

    def _current(self, env: lmdb.Environment, dbs: dict[str, Any]) -> bool:
        """Whether the environment has the format ``tables.version`` names (no version: any)."""
        if self.tables.version is None:
            return True
        table, key, value = self.tables.version
        with env.begin(db=dbs[table]) as txn:
            raw = txn.get(key.encode())
        try:
            return raw is not None and json.loads(bytes(raw)) == value
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

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
        if file_ident(self.path / "data.mdb") == self.ident:
            return
        with self.lock.exclusive():
            if file_ident(self.path / "data.mdb") != self.ident:
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


def file_ident(path: Path) -> tuple[int, int]:
    """(device, inode) of a file: changes when compaction swaps a new file in."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (a directory: so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_copy(path: Path, map_size: int, max_dbs: int) -> None:
    """Make both meta pages of a compacted copy hold its data, with one no-op commit.

    A compacting copy keeps the data in meta page 1 (txnid 1) and leaves page 0 an empty
    database. Every process picks the current meta page by the parity of the txnid in
    ``lock.mdb``, and that file outlives the swap while another process (a reader) has
    the store open: with an even txnid there, the writer and readers would all see page
    0, an empty store, and the next commit would overwrite the real data. Rewriting one
    key with its own value, in the copy's own environment, commits txnid 2 into page 0
    with the same content, so either parity finds the data.
    """
    env = lmdb.open(str(path), map_size=map_size, max_dbs=max_dbs, subdir=True, mode=0o600)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True) as txn:
            value = txn.get(b"format", db=meta)
            if value is None:  # every store has it (create writes it first)
                raise StoreError(f"compacted copy in {path} has no format record")
            txn.put(b"format", value, db=meta)
    finally:
        env.close()


# realpath -> the shared environment of that directory in this process
_ENVS: dict[str, SharedEnv] = {}
_ENVS_LOCK = threading.Lock()  # guards _ENVS and every SharedEnv.count


def acquire(path: Path, tables: Tables, *, readonly: bool, create: bool = False) -> SharedEnv:
    """The process's shared environment of ``path``, opened on first use; pair with :func:`release`."""
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        shared = _ENVS.get(real)
        if shared is None:
            # Opened writable whenever the files allow it, so a reader opened first does not
            # stop a later writer in this process; the writer lock decides who writes.
            shared = SharedEnv(path, tables, readonly and not os.access(path / "data.mdb", os.W_OK), create)
            _ENVS[real] = shared
        shared.count += 1
        return shared


def release(shared: SharedEnv) -> None:
    """Drop one handle on ``shared``; the last one closes the environment."""
    with _ENVS_LOCK:
        shared.count -= 1
        last = shared.count <= 0
        if last:
            _ENVS.pop(os.path.realpath(shared.path), None)
    if last:
        shared.close()


def write(shared: SharedEnv, fn: Callable[[lmdb.Transaction], T], where: Path) -> T:
    """Run ``fn`` in one write transaction of ``shared``, growing the map and retrying if it is full.

    Args:
        shared: The environment.
        fn: Does every put/delete of one logical change; may run more than once.
        where: The store directory, named in errors.

    Raises:
        StoreFullError: If the disk is full; nothing of the change is written.
    """
    while True:
        try:
            with shared.lock.shared(), shared.env.begin(write=True) as txn:
                return fn(txn)
        except lmdb.MapFullError:
            new_size = shared.env.info()["map_size"] * 2
            log.info("map of %s full; growing to %d MiB", shared.path, new_size >> 20)
            shared.adopt_size(new_size)  # outside the transaction: no other may be open
        except lmdb.Error as exc:
            # LMDB reports a short write at commit as EIO; a size limit as EFBIG.
            if isinstance(exc, lmdb.DiskError) or any(m in str(exc) for m in _WRITE_FAILURES):
                raise StoreFullError(
                    f"store {where}: the write failed ({exc}): the disk is full, over quota or "
                    "failing; nothing of the change was written (the store is as before). Free space and retry"
                ) from exc
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreFullError(
                    f"store {where}: the write failed ({exc.strerror}); nothing of the change was written. "
                    "Free space and retry"
                ) from exc
            raise


@contextmanager
def read(shared: SharedEnv, follow: bool) -> Iterator[lmdb.Transaction]:
    """A short read transaction of ``shared``: one consistent snapshot.

    Args:
        shared: The environment.
        follow: Reopen first if another process's compaction swapped the file (a reader
            without the writer lock, outside any other read of this environment).
    """
    lock = shared.lock
    if follow and not lock.held_shared():
        # Not inside another read: following a swap there would end the outer snapshot.
        shared.follow_swap()
    for attempt in (1, 2):
        with lock.shared():
            try:
                txn = shared.env.begin()
            except lmdb.MapResizedError:
                if attempt == 2:
                    raise
            else:
                try:
                    yield txn
                finally:
                    txn.abort()
                return
        shared.adopt_size(0)  # adopt the size another process grew the map to


def compact(shared: SharedEnv, where: Path) -> tuple[int, int]:
    """Rewrite ``shared``'s data.mdb without its free pages, then atomically swap it in.

    LMDB frees pages on delete but does not scrub them, so deleted bytes stay in the file
    until it is rewritten; a compacting copy holds live pages only. The copy is fsync'd,
    renamed over ``data.mdb`` (atomic), and the directory fsync'd, so a crash leaves
    either the old file or the new one. The caller holds the writer lock.

    Returns:
        File size in bytes before and after.

    Raises:
        StoreFullError: If the copy cannot be written; the environment is unchanged.
    """
    # Alone on the environment from the copy to the reopen: no other thread of this process
    # may start a transaction on the old environment while it is closed and swapped.
    with shared.lock.exclusive():
        data, tmp = shared.path / "data.mdb", shared.path / _COMPACT_DIR
        before = data.stat().st_size
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        copied = tmp / "data.mdb"
        try:
            shared.env.copy(str(tmp), compact=True)
            seal_copy(tmp, shared.env.info()["map_size"], shared.tables.max_dbs)
            os.chmod(copied, 0o600)
            fsync_path(copied)
        except (lmdb.Error, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            # data.mdb is untouched; a pending deletion stays pending and `sisa resume` erases it later.
            raise StoreFullError(
                f"store {where}: compaction could not write its copy ({exc}); the store is unchanged. "
                f"Free space (the copy needs about the size of {data}) and run `sisa resume`"
            ) from exc
        shared.env.close()
        try:
            os.replace(copied, data)
            fsync_path(shared.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shared.reopen()
    after = data.stat().st_size
    log.info("compacted %s: %d -> %d bytes", data, before, after)
    return before, after


def drop_partial_copy(path: Path) -> None:
    """Remove what a compaction that crashed left behind in the environment directory ``path``."""
    shutil.rmtree(path / _COMPACT_DIR, ignore_errors=True)
