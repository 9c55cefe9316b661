"""A warm ``sisa`` worker, the caller's side: hand a small command to it, relay its output and exit code.

A new process that trains pays for importing torch and for the import of ``torch._dynamo``
that torch's optimizer makes at its first step, however small the job: a one-id deletion that
retrains one shard for a second costs several (measured: docs/benchmarks.md, "Start-up costs the
command line is shaped around"). So the ``sisa``
command hands its training commands that name no cluster (``delete``, ``apply``, ``add``,
``resume``, ``verify``) to a worker process of the same user and identity
(:mod:`sisa.cli.worker_identity`), started after the first such command finishes and ended
after :data:`IDLE_ENV` seconds without a command (default 300). The command's output,
progress bars included, streams back as it is written, and its exit code is the command's.
Ctrl-C or SIGTERM in the calling process interrupts the command in the worker as it would in
place (what was kept, the ``sisa resume`` that finishes it; exit 130 or 143).

The worker (:mod:`sisa.cli.worker_server`) runs one command at a time, in the caller's working
directory and environment, through the same :func:`sisa.cli.dispatch.run_command` as a command
run in place, and trains in the same pinned determinism domain, so its bytes are the same
(tested). A caller that finds the worker busy, or none answering, runs the command itself.
``SISA_WORKER=0`` turns the worker off. Messages travel as ``multiprocessing.connection``
messages over a unix socket in ``$TMPDIR/sisa-<uid>/`` (mode 0700, this user's only); the
worker also checks the peer's user id (``SO_PEERCRED``). No ``authkey``: a secret would have to
live in the same folder, where only this user (who could read it) reaches the socket anyway, and
``Listener`` runs its challenge inside ``accept``, where a caller that sends nothing would stall
every caller after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import IO, Any

from sisa.cli.exits import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated
from sisa.cli.worker_identity import REEXEC_ENV, worker_key, worker_paths
from sisa.train import priority

__all__ = ["ENABLE_ENV", "IDLE_ENV", "Kind", "delegate", "enabled", "ensure_started", "idle_seconds"]

ENABLE_ENV = "SISA_WORKER"  # 0: never hand a command to a worker
IDLE_ENV = "SISA_WORKER_IDLE"  # seconds a worker waits for its next command before it ends
DEFAULT_IDLE = 300.0


class Kind:
    """The first byte of every message; the rest is its payload."""

    REQUEST = b"r"  # caller -> worker: JSON {argv, cwd, env, tty, key}
    OUT = b"o"  # worker -> caller: text for stdout
    ERR = b"e"  # worker -> caller: text for stderr
    EXIT = b"x"  # worker -> caller: the command's exit code; nothing follows
    BUSY = b"b"  # worker -> caller: running another command; run this one yourself
    REFUSED = b"n"  # worker -> caller: not a command this worker runs (the reason follows); run it yourself
    SIGINT = b"i"  # caller -> worker: Ctrl-C arrived here; interrupt the command
    SIGTERM = b"t"  # caller -> worker: SIGTERM arrived here; end the command as SIGTERM would


def enabled() -> bool:
    """Whether commands may go to a worker (``SISA_WORKER`` is not ``0``)."""
    return os.environ.get(ENABLE_ENV, "1").strip() != "0"


def idle_seconds() -> float:
    """How long a worker waits for its next command: ``$SISA_WORKER_IDLE``, default 300, at least 1."""
    try:
        return max(1.0, float(os.environ.get(IDLE_ENV, DEFAULT_IDLE)))
    except ValueError:
        return DEFAULT_IDLE


def _lock_free(lock: Path) -> bool:
    """Whether no worker holds (or is starting and took) the lock ``lock``."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock at once: the worker takes it for life
    return True


def ensure_started(pins: Mapping[str, str], env: Mapping[str, str] | None = None, nice: int = 0) -> bool:
    """Start the worker of the key of ``env`` with ``pins`` in the background, unless one runs.

    The worker starts in its socket's folder (never the caller's directory, where a ``sisa/``
    folder could shadow the package) without the script directory on its path (``-P``), logs to
    ``worker-<key>.log`` (mode 0600), and ends by itself when idle. A worker that loses a start
    race ends at once; it is reaped here while this process lives (and by init after).

    Args:
        pins: The store's kernel pins.
        env: The environment the worker starts with (default: this process's), pins applied.
        nice: The niceness it runs at (part of its identity); none is started from a process niced above it.

    Returns:
        Whether a worker process was started.
    """
    env = dict(os.environ if env is None else env)
    key = worker_key(pins, env, nice)
    paths = worker_paths(key)
    if paths is None or priority.niceness() > nice:
        return False  # a niced process cannot start a worker at a lower niceness than its own
    sock, lock, log = paths
    if not _lock_free(lock):
        return False
    env = {k: v for k, v in env.items() if k not in (ENABLE_ENV, REEXEC_ENV)}
    env.update(pins)
    isolated = ["-P"] if sys.version_info >= (3, 11) else []  # 3.10 has no -P; the cwd below is safe anyway
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # a log an older sisa made 0644
    try:
        proc = subprocess.Popen(
            [sys.executable, *isolated, "-m", "sisa.cli.worker_process", str(sock), str(lock), key, str(nice)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd=str(sock.parent),
            env=env,
            start_new_session=True,  # not in the caller's process group: its Ctrl-C is not the worker's
            close_fds=True,
        )
    finally:
        os.close(fd)
    threading.Thread(target=proc.wait, daemon=True).start()  # no zombie while this process lives
    return True


def _tty(stream: IO[Any]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def delegate(argv: Sequence[str], pins: Mapping[str, str], store: str, nice: int = 0) -> int | None:
    """Run the command ``argv`` in this user's warm worker; its exit code, or None to run it here.

    None when workers are off (``SISA_WORKER=0``), no worker answers, the worker is busy with
    another command, or it refuses this one (another identity, a command it does not run).

    Args:
        argv: The command line after the program name.
        pins: The store's kernel pins (part of the worker's identity).
        store: The command's store, named in what an interruption prints.
        nice: The niceness the command runs at: only a worker at that niceness takes it.
    """
    if not enabled():
        return None
    key = worker_key(pins, nice=nice)
    paths = worker_paths(key)
    if paths is None:
        return None
    try:
        conn = Client(str(paths[0]), family="AF_UNIX")
    except OSError:
        return None
    request = {
        "argv": list(argv),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "tty": [_tty(sys.stdout), _tty(sys.stderr)],
        "key": key,
    }
    relay = _Relay(conn, store)
    with conn:
        try:
            conn.send_bytes(Kind.REQUEST + json.dumps(request).encode())
            return relay.run()
        except (KeyboardInterrupt, Terminated) as interrupt:
            return relay.interrupt(interrupt)
        except OSError:
            return None if relay.silent else relay.lost()


class _Relay:
    """Copies a worker's messages to this process's stdout and stderr until its exit code."""

    def __init__(self, conn: Connection, store: str) -> None:
        self.conn = conn
        self.store = store
        self.silent = True  # nothing came back yet: the command may still be run here

    def run(self, interrupted: bool = False) -> int | None:
        """Relay until the exit code; None when the worker handed the command back (busy, refused, gone).

        Args:
            interrupted: A signal already reached this process: a worker that ends silently now
                leaves a command nobody will run here.
        """
        while True:
            try:
                message = self.conn.recv_bytes()
            except EOFError:
                break
            kind, body = message[:1], message[1:]
            if kind in (Kind.BUSY, Kind.REFUSED):
                return None
            self.silent = False
            if kind == Kind.EXIT:
                return int(body)
            stream = sys.stdout if kind == Kind.OUT else sys.stderr
            stream.write(body.decode("utf-8", "replace"))
            stream.flush()
        if self.silent and not interrupted:
            # The worker ended before it said anything: every training command is safe to run again
            # (a journaled deletion is finished, a staged ingest taken back).
            print("note: the sisa worker ended; running the command in this process", file=sys.stderr)
            return None
        code = self.lost()
        return None if interrupted else code  # interrupted: the signal's own code

    def interrupt(self, interrupt: BaseException) -> int:
        """Pass a signal that reached this process on to the command, and relay what it then says."""
        terminated = isinstance(interrupt, Terminated)
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        with contextlib.suppress(OSError):
            self.conn.send_bytes(Kind.SIGTERM if terminated else Kind.SIGINT)
        try:
            relayed = self.run(interrupted=True)
        except (KeyboardInterrupt, Terminated, OSError):
            relayed = None  # a second signal: stop waiting
        # The command's own code when it came back: 130 or 143, or 0 if it had finished before the
        # signal reached it (its work is then done: success is the truth).
        return code if relayed is None else relayed

    def lost(self) -> int:
        """The worker ended mid-command: say so, and what finishes the command."""
        print(
            f"error: the sisa worker ended before the command did; a journaled deletion stays pending "
            f"(`sisa pending --store {self.store}` lists it) and `sisa resume --store {self.store}`, or the same "
            f"command again, finishes it ({ENABLE_ENV}=0 runs commands in their own process)",
            file=sys.stderr,
        )
        return 1
