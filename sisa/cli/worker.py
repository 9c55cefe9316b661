"""A warm ``sisa`` worker: one pinned process that keeps torch loaded between small commands.

A new process that trains pays for importing torch (about 1.2 s here) and for the import of
``torch._dynamo`` that torch's optimizer makes at its first step (about 1 s), however small
the job: a one-id deletion that retrains one shard for a second costs three. So the ``sisa``
command hands its training commands that name no cluster (``delete``, ``apply``, ``add``,
``resume``, ``verify``) to a worker process of the same user, code, Python and kernel pins,
started on first use and ended after :data:`IDLE_ENV` seconds without a command (default
300). The command's output, progress bars included, streams back as it is written, and its
exit code is the command's. Ctrl-C in the calling terminal interrupts the command in the
worker as it would in place (what was kept, and the ``sisa resume`` that finishes it).

The worker runs one command at a time, in the caller's working directory and environment,
through the same :func:`sisa.cli.main.run` as a command run in place, and trains in the same
pinned determinism domain, so its bytes are the same (tested). A caller that finds the worker
busy, or none answering, runs the command itself (and starts a worker for the next one).
``SISA_WORKER=0`` turns the worker off. Its socket lives in ``$TMPDIR/sisa-<uid>/`` (mode
0700, this user's only); its log in ``worker-<key>.log`` there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["ENABLE_ENV", "IDLE_ENV", "claim", "delegate", "idle_seconds", "serve", "worker_key", "worker_paths"]

ENABLE_ENV = "SISA_WORKER"  # 0: never hand a command to a worker
IDLE_ENV = "SISA_WORKER_IDLE"  # seconds a worker waits for its next command before it ends
DEFAULT_IDLE = 300.0
# Environment read once when a process starts (kernel pins, thread pools, devices, the code on
# the path): a worker started under other values would not be the process the caller would be.
_START_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
)
_FRAME = struct.Struct(">cI")  # kind, length; kinds: o(ut), e(rr), x(exit code), b(usy)


def _send(conn: socket.socket, kind: bytes, payload: bytes) -> None:
    conn.sendall(_FRAME.pack(kind, len(payload)) + payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = conn.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _frames(conn: socket.socket) -> Iterator[tuple[bytes, bytes]]:
    while True:
        head = _recv_exact(conn, _FRAME.size)
        if head is None:
            return
        kind, length = _FRAME.unpack(head)
        body = _recv_exact(conn, length) if length else b""
        if body is None:
            return
        yield kind, body


def worker_key(pins: Mapping[str, str]) -> str:
    """What a worker must share with its caller, as a short hex key.

    The Python, the sisa code (every file's size and mtime: an upgrade or an edit starts a new
    worker), and the environment a process reads once at start, with the store's pins applied.
    """
    # The interpreter and its environment, however it was named (`python`, `python3`, a console script).
    h = hashlib.sha256(f"{os.path.realpath(sys.executable)}\n{sys.prefix}\n".encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    env = {**os.environ, **pins}
    for name in _START_ENV:
        h.update(f"{name}={env.get(name, '')}\n".encode())
    return h.hexdigest()[:16]


def worker_paths(key: str) -> tuple[Path, Path, Path] | None:
    """Socket, lock and log of the worker ``key``, in ``$TMPDIR/sisa-<uid>/``.

    None when that folder is not this user's own, mode 0700: a worker's socket must not be
    reachable by anyone else.
    """
    folder = Path(tempfile.gettempdir()) / f"sisa-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return folder / f"worker-{key}.sock", folder / f"worker-{key}.lock", folder / f"worker-{key}.log"


def _start_worker(key: str, pins: Mapping[str, str]) -> None:
    """Start a worker for ``key`` in the background (it ends by itself when idle)."""
    paths = worker_paths(key)
    if paths is None:
        return
    sock, lock, log = paths
    env = {k: v for k, v in os.environ.items() if k != ENABLE_ENV}
    env.update(pins)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "sisa.cli.worker_process", str(sock), str(lock)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,  # not in the caller's process group: its Ctrl-C is not the worker's
            close_fds=True,
        )


def _tty(stream: IO[Any]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def delegate(argv: list[str], pins: Mapping[str, str]) -> int | None:
    """Run the command ``argv`` in this user's warm worker; its exit code, or None to run it here.

    None when workers are off (``SISA_WORKER=0``), no worker answers (one is then started for
    the next command), or the worker is busy with another command.
    """
    if os.environ.get(ENABLE_ENV, "1").strip() == "0":
        return None
    key = worker_key(pins)
    paths = worker_paths(key)
    if paths is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(paths[0]))
    except OSError:
        conn.close()
        _start_worker(key, pins)
        return None
    relay = _Relay(conn)
    with conn:
        request = {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "tty": [_tty(sys.stdout), _tty(sys.stderr)],
        }
        try:
            _send(conn, b"r", json.dumps(request).encode())
            code = relay.run()
            if code is None and relay.silent and not relay.busy:
                # The worker ended before it said anything: every training command is safe to
                # run again (a journaled deletion is finished, a staged ingest taken back).
                print("note: the sisa worker ended; running the command in this process", file=sys.stderr)
            return code
        except KeyboardInterrupt:
            # Closing our end tells the worker to interrupt the command; it then reports what was
            # kept (and how to finish it), which we still relay.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            try:
                code = relay.run()
            except KeyboardInterrupt:
                code = None
            return 130 if code is None else code
        except OSError:
            return None if relay.silent else 1


class _Relay:
    """Copies a worker's frames to this process's stdout and stderr until its exit code."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.silent = True  # nothing came back yet: the command may still be run here
        self.busy = False  # the worker said it is busy with another command

    def run(self) -> int | None:
        for kind, body in _frames(self.conn):
            if kind == b"b":  # busy with another command: run this one here
                self.busy = True
                return None
            self.silent = False
            if kind == b"x":
                return int(body)
            stream = sys.stdout if kind == b"o" else sys.stderr
            stream.write(body.decode("utf-8", "replace"))
            stream.flush()
        if self.silent:
            return None
        print(
            "error: the sisa worker ended before the command did; run the command again "
            f"(a deletion resumes where it stopped), or with {ENABLE_ENV}=0 to run it in this process",
            file=sys.stderr,
        )
        return 1


class _Out:
    """A text stream that sends what is written to the caller, as frames of one kind."""

    def __init__(self, conn: socket.socket, kind: bytes, tty: bool, fd: int) -> None:
        self._conn, self._kind, self._tty, self._fd = conn, kind, tty, fd
        self.alive = True
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        if self.alive and text:
            try:
                _send(self._conn, self._kind, text.encode("utf-8", "replace"))
            except OSError:  # the caller went away: the command still finishes its work
                self.alive = False
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def isatty(self) -> bool:
        return self._tty

    def fileno(self) -> int:
        """The worker's own log: what writes below Python (C libraries, Ray's setup) reach."""
        return self._fd


def _watch(conn: socket.socket, running: threading.Event) -> None:
    """Interrupt the command (as Ctrl-C would) when the caller closes its end while it runs."""
    import _thread

    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    if running.is_set():
        _thread.interrupt_main()


def _handle(conn: socket.socket, run: Any) -> None:
    frames = _frames(conn)
    first = next(frames, None)
    if first is None or first[0] != b"r":
        return
    request = json.loads(first[1])
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_streams = sys.stdout, sys.stderr
    log_fd = saved_streams[1].fileno()
    out, err = (_Out(conn, kind, tty, log_fd) for kind, tty in zip((b"o", b"e"), request["tty"], strict=True))
    started = time.perf_counter()
    running = threading.Event()
    running.set()
    threading.Thread(target=_watch, args=(conn, running), daemon=True).start()
    code = 1
    try:
        # The caller's environment, but the pins this process started with (they cannot change now).
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update({k: saved_env[k] for k in _START_ENV if k in saved_env})
        os.chdir(request["cwd"])
        sys.stdout, sys.stderr = out, err
        logging.root.handlers.clear()  # the command configures logging for its own stderr
        try:
            code = run(request["argv"])
        except SystemExit as done:  # argparse's --help and usage errors
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
        except KeyboardInterrupt:
            code = 130
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, the worker stays up
            err.write(f"error: the sisa worker failed: {type(exc).__name__}: {exc}\n")
            code = 1
    finally:
        running.clear()
        logging.root.handlers.clear()
        sys.stdout, sys.stderr = saved_streams
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    # One line per command in the worker's log: what ran, how it ended, how long it took.
    print(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} ran {request['argv']} in "
        f"{request['cwd']}: exit {code} in {time.perf_counter() - started:.2f}s",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(OSError):
        _send(conn, b"x", str(code).encode())
    # As a command run in place kills the local Ray instance it started when it ends, the worker
    # stops one a command started (after the caller has its exit code: nobody waits for this).
    orchestrator = sys.modules.get("sisa.train.orchestrator")
    if orchestrator is not None and orchestrator.started_local_instance():
        orchestrator.shutdown()


def _warm_up() -> None:
    """What every training process pays once: torch's first optimizer steps import ``torch._dynamo``."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.zeros(1)
    for optimizer in (torch.optim.Adam([weight]), torch.optim.SGD([weight], lr=0.1)):
        optimizer.step()


def claim(lock_path: Path) -> int | None:
    """Become the one worker of a key: an exclusive lock on ``lock_path`` held for life, else None.

    Cheap, and taken before the heavy imports, so a second worker started by a race ends at once.
    """
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None  # another worker of this key is up (or starting)
    return lock


def serve(sock_path: Path, idle: float, run: Callable[[list[str]], int]) -> int:
    """Serve commands on ``sock_path`` until ``idle`` seconds pass without one (after :func:`claim`).

    Commands run one at a time in the main thread (where Ctrl-C's stand-in, an interrupt of
    the main thread, lands); a caller arriving meanwhile is told the worker is busy at once.

    Args:
        sock_path: The unix socket to listen on.
        idle: Seconds to wait for a command before ending.
        run: Runs one command (its arguments) and returns its exit code:
            :func:`sisa.cli.main.run`, passed in by :mod:`sisa.cli.worker_process`.
    """
    # SIGTERM ends the worker as idleness does: the interpreter's exit stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _warm_up()
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()  # a socket a dead worker left
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(sock_path))
    finally:
        os.umask(old)
    listener.listen(8)
    waiting: queue.Queue[socket.socket] = queue.Queue()
    busy = threading.Event()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: the worker is ending
                return
            if busy.is_set() or not waiting.empty():
                with conn, contextlib.suppress(OSError):
                    _send(conn, b"b", b"")
            else:
                busy.set()
                waiting.put(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        while True:
            try:
                conn = waiting.get(timeout=idle)
            except queue.Empty:
                break
            with conn:
                try:
                    _handle(conn, run)
                finally:
                    busy.clear()
    finally:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        listener.close()
    return 0


def idle_seconds() -> float:
    """How long a worker waits for its next command: ``$SISA_WORKER_IDLE``, default 300, at least 1."""
    try:
        return max(1.0, float(os.environ.get(IDLE_ENV, DEFAULT_IDLE)))
    except ValueError:
        return DEFAULT_IDLE
