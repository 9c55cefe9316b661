"""A warm ``sisa`` worker, its own side: serve one command at a time on a unix socket until idle.

Commands run in the main thread, where signals land. A SIGINT or SIGTERM sent to the worker
itself ends the running command as it would in place (exit 130 or 143, relayed to the
caller), and then the worker; one that arrives while idle ends the worker at once. A caller's
Ctrl-C or SIGTERM arrives as a message and ends only the command; a caller that disappears
(SIGKILL) ends it as SIGTERM would, so its deletion stays pending and a retry finishes it.
Nothing that a caller sends, or fails to send, ends the worker: malformed requests are
refused, a silent caller is dropped after :data:`REQUEST_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from types import FrameType
from typing import Any

from sisa.cli.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    exit_code_of,
    kill_descendants,
    redeliver_swallowed_interrupts,
)
from sisa.cli.worker import Kind
from sisa.cli.worker_identity import command_env
from sisa.train import priority

__all__ = ["REQUEST_TIMEOUT", "Worker"]

REQUEST_TIMEOUT = 5.0  # seconds a caller has, once connected, to send its whole request
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Stop(BaseException):
    """A signal reached the idle worker from outside: end it."""


class _State:
    """What the main thread (commands, signal handlers) and the watcher threads share.

    Plain attributes, never a lock: a signal handler runs in the main thread, which may hold
    any lock at that instant.
    """

    def __init__(self) -> None:
        self.running: int | None = None  # the number of the command running now
        self.caller_signal: int | None = None  # a signal a watcher is about to raise on a caller's behalf
        self.stop: int | None = None  # a signal from outside: the worker ends after this command


class _Channel:
    """One caller's connection; sends from any thread, one message at a time (never interleaved)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.alive = True
        self._lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if not self.alive:
            return
        with self._lock:
            try:
                self.conn.send_bytes(kind + payload)
            except OSError:  # the caller went away: the command still ends as its watcher decides
                self.alive = False


class _Out:
    """A text stream that sends what is written to the caller, as messages of one kind."""

    def __init__(self, channel: _Channel, kind: bytes, tty: bool, fd: int) -> None:
        self._channel, self._kind, self._tty, self._fd = channel, kind, tty, fd
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        if text:
            self._channel.send(self._kind, text.encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def isatty(self) -> bool:
        return self._tty

    def fileno(self) -> int:
        """The worker's own log: what writes below Python (C libraries, Ray's setup) reach."""
        return self._fd


def _socket_of(conn: Connection) -> socket.socket:
    """A duplicate of the connection's socket, for its options (closing it leaves ``conn`` open)."""
    return socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)


def _same_user(conn: Connection) -> bool:
    """Whether the peer runs as this process's user (``SO_PEERCRED``; True where the OS has no such check)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    with _socket_of(conn) as sock:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid == os.getuid()


def _receive_timeout(conn: Connection, seconds: float) -> None:
    """Make a blocked read on ``conn`` fail after ``seconds`` (0: wait forever)."""
    whole = int(seconds)
    with _socket_of(conn) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _read_request(conn: Connection) -> dict[str, Any] | str:
    """The caller's request, or why it is refused."""
    try:
        if not _same_user(conn):
            return "another user"
        _receive_timeout(conn, REQUEST_TIMEOUT)
        if not conn.poll(REQUEST_TIMEOUT):
            return "no request"
        message = conn.recv_bytes()
        _receive_timeout(conn, 0)
    except (OSError, EOFError):
        return "no request"
    if message[:1] != Kind.REQUEST:
        return "not a request"
    try:
        request = json.loads(message[1:])
        fields = (request["argv"], request["cwd"], request["env"], request["tty"], request["key"])
    except (ValueError, KeyError, TypeError):
        return "a malformed request"
    argv, cwd, env, tty, key = fields
    ok = (
        isinstance(argv, list)
        and all(isinstance(a, str) for a in argv)
        and isinstance(cwd, str)
        and isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        and isinstance(tty, list)
        and len(tty) == 2
        and isinstance(key, str)
    )
    return request if ok else "a malformed request"


class Worker:
    """The worker of one key: its socket, its signal handling, and the loop that runs commands."""

    def __init__(self, sock_path: Path, key: str, idle: float, run: Callable[[list[str]], int | None]) -> None:
        """Set up (nothing listens until :meth:`serve`).

        Args:
            sock_path: The unix socket to listen on.
            key: This worker's identity (:func:`~sisa.cli.worker_identity.worker_key`): a caller
                with another key is refused.
            idle: Seconds to wait for a command before ending.
            run: Runs one command line, already checked, and returns its exit code, or None
                when the command is not one the worker runs (:func:`sisa.cli.worker_process.run`).
        """
        self.sock_path, self.key, self.idle, self.run = sock_path, key, idle, run
        self.log_fd = 2  # the worker's log: the stderr it was started with
        self.state = _State()
        self.commands = 0
        # A command may nice this process (--nice, or a node that serves); nothing unprivileged un-nices it,
        # so a worker whose niceness rose ends after that command and the next one starts a fresh worker.
        self.niceness = priority.niceness()
        # Set while a caller is being served; cleared as its last message goes out, so that a caller
        # who sends the next command at once is queued, not told the worker is busy.
        self.busy = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT / SIGTERM: end the running command as that signal would; from outside, the worker too."""
        state = self.state
        from_caller = state.caller_signal == signum
        state.caller_signal = None
        if not from_caller:
            state.stop = signum
            # One line in the worker's log, written straight to its descriptor: a handler may run
            # while the main thread is inside a buffered write to the same stream.
            with contextlib.suppress(OSError):
                os.write(
                    self.log_fd,
                    f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} got signal {signum} from outside "
                    f"({'during command ' + str(state.running) if state.running else 'idle'}): ending\n".encode(),
                )
        if state.running is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(f"signal {signum}")
        if not from_caller:
            raise _Stop  # idle: a caller's signal that came after its command ended is dropped

    def _watch(self, channel: _Channel, number: int) -> None:
        """Turn the caller's signal messages, or its disappearance, into a signal for command ``number``."""
        import _thread

        signum = signal.SIGTERM  # a caller that went away without a word was killed
        try:
            while True:
                kind = channel.conn.recv_bytes()[:1]
                if kind in (Kind.SIGINT, Kind.SIGTERM):
                    signum = signal.SIGINT if kind == Kind.SIGINT else signal.SIGTERM
                    break
        except (EOFError, OSError):
            pass
        if self.state.running == number:
            self.state.caller_signal = signum
            _thread.interrupt_main(signum)

    # About 60 lines on purpose: one caller's whole turn (refuse, take over the streams, environment and
    # directory, run, put every one of them back); split, each save would sit apart from its restore.
    def _handle(self, conn: Connection) -> None:
        """Run one caller's command, with its output and exit code sent back."""
        channel = _Channel(conn)
        request = _read_request(conn)
        if isinstance(request, str):
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} refused a caller: {request}", file=sys.stderr, flush=True)
            self._last(channel, Kind.REFUSED, request.encode())
            return
        if request["key"] != self.key:
            self._last(channel, Kind.REFUSED, b"another sisa, Python or environment")
            return
        self.commands += 1
        number = self.commands
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        saved_streams = sys.stdout, sys.stderr
        log_fd = saved_streams[1].fileno()
        out, err = (
            _Out(channel, kind, bool(tty), log_fd)
            for kind, tty in zip((Kind.OUT, Kind.ERR), request["tty"], strict=True)
        )
        started = time.perf_counter()
        code: int | None = EXIT_ERROR
        command = "?"
        watcher: threading.Thread | None = None
        try:
            os.environ.clear()
            os.environ.update(command_env(request["env"], saved_env))
            os.chdir(request["cwd"])
            sys.stdout, sys.stderr = out, err
            logging.root.handlers.clear()  # the command configures logging for its own stderr
            command = str(request["argv"][0]) if request["argv"] else "?"
            self.state.running = number
            watcher = threading.Thread(target=self._watch, args=(channel, number), daemon=True)
            watcher.start()
            try:
                with redeliver_swallowed_interrupts():
                    code = self.run(request["argv"])
            finally:
                self.state.running = None
        except (KeyboardInterrupt, Terminated) as interrupt:  # between the command's own handlers and here
            code = exit_code_of(interrupt)
        except OSError as exc:  # the caller's directory is gone, say
            err.write(f"error: the sisa worker could not run the command: {exc}\n")
            code = EXIT_ERROR
        finally:
            logging.root.handlers.clear()
            sys.stdout, sys.stderr = saved_streams
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        if code is None:
            self._last(channel, Kind.REFUSED, b"not a command the worker runs")
            _hang_up(conn, watcher)
            return
        # One line per command in the worker's log: which command, how it ended, how long it took;
        # never its arguments (the ids a deletion names are personal data).
        print(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} ran {command}: exit {code} in "
            f"{time.perf_counter() - started:.2f}s",
            file=sys.stderr,
            flush=True,
        )
        self._last(channel, Kind.EXIT, str(code).encode())
        _hang_up(conn, watcher)
        _after_command(code)

    def _niced(self) -> bool:
        """Whether the last command left this worker niced above its start (then it ends: see ``niceness``)."""
        now = priority.niceness()
        if now <= self.niceness:
            return False
        print(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} ends: a command left it at niceness {now} "
            f"(started at {self.niceness}); the next command starts a fresh worker at its caller's priority",
            file=sys.stderr,
            flush=True,
        )
        return True

    def _last(self, channel: _Channel, kind: bytes, payload: bytes) -> None:
        """Send a caller its last message; from then on the next caller is queued, not turned away."""
        self.busy.clear()
        channel.send(kind, payload)

    def serve(self) -> int:
        """Serve commands until idle for :attr:`idle` seconds or a signal from outside; the exit code."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        old = os.umask(0o177)  # the socket: this user only (its folder is 0700 too)
        try:
            listener = Listener(str(self.sock_path), family="AF_UNIX", backlog=8)
        finally:
            os.umask(old)
        waiting: queue.Queue[Connection] = queue.Queue()
        busy = self.busy

        def accept() -> None:
            while True:
                try:
                    conn = listener.accept()
                except OSError:  # the listener was closed: the worker is ending
                    return
                if busy.is_set() or not waiting.empty():
                    with conn, contextlib.suppress(OSError):
                        conn.send_bytes(Kind.BUSY)
                else:
                    busy.set()
                    waiting.put(conn)

        threading.Thread(target=accept, daemon=True).start()
        try:
            while self.state.stop is None:
                try:
                    conn = waiting.get(timeout=self.idle)
                except queue.Empty:
                    break
                with conn:
                    try:
                        self._handle(conn)  # clears `busy` as it sends the caller's last message
                    except BaseException:
                        busy.clear()
                        raise
                if self._niced():
                    break
        except _Stop:
            pass
        finally:
            listener.close()  # also removes the socket file
        stop = self.state.stop
        return 0 if stop is None else 128 + stop


def _hang_up(conn: Connection, watcher: threading.Thread | None) -> None:
    """End the caller's connection, and the watcher blocked reading it, before the next caller comes.

    Closing the descriptor alone would leave the watcher's read pending (the caller would see no
    end of the stream), and a later read of the same descriptor number could take the next
    caller's bytes; shutting the socket down ends the read at once.
    """
    with contextlib.suppress(OSError), _socket_of(conn) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    if watcher is not None:
        watcher.join(timeout=5)


def _after_command(code: int) -> None:
    """Leave whatever Ray the command started or joined; after an interrupted one, every process it left.

    A command's local Ray instance is stopped as a command in place would stop it, and a
    cluster the command joined (``RAY_ADDRESS`` in its environment) is left, so a later command
    without an address never trains there. A command a signal ended may have left anything
    half-started (a Ray instance cut short in ``ray.init``, a training child mid-job): its
    pinned training children are closed and any other process it started is killed. After a
    command that finished, the pinned children stay: they are what keeps the next one warm.
    The caller already has its exit code.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        orchestrator = sys.modules.get("sisa.train.orchestrator")
        if orchestrator is not None:
            orchestrator.shutdown()
        else:
            ray.shutdown()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        local_runner = sys.modules.get("sisa.train.local_runner")
        if local_runner is not None:
            local_runner.close_all()
        kill_descendants()
