"""Start the ``sisa`` command in its store's determinism domain, before torch loads.

torch, MKL and oneDNN read their kernel-level pins once per process (see
:mod:`sisa.train.domain`), so a command that trains without Ray (a deletion that
retrains one shard, ``--address local``) can train in its own process only when that
process *started* with the pins of the store's ``resources.cpu_isa``; otherwise the
local runner starts a pinned child process, which pays a second torch import.
:func:`reexec_pinned` avoids that: run before the heavy imports of :mod:`sisa.cli.main`,
it reads the store's ``cpu_isa`` (LMDB and JSON only) and, when the pins are missing,
replaces the process with the same command line plus the pins (``os.execve``). Only
the ``sisa`` command itself does this (its console script or ``python -m sisa.cli``),
never a library caller or a test that imports the CLI; and only for commands that may
train without Ray: a named cluster trains in pinned Ray workers, and ``SISA_RUNNER=ray``
forces Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Mapping, Sequence

from sisa.cli.parser import WORKER_COMMANDS, try_parse
from sisa.cli.worker_identity import REEXEC_ENV

__all__ = [
    "REEXEC_ENV",
    "command_line",
    "command_nice",
    "reexec_pinned",
    "run_in_worker",
    "start_worker_after",
    "store_cpu_isa",
    "training_command",
    "worker_job",
    "worker_may_run",
]


# Commands that may train: what they train may be small enough for the local runner.
_TRAINING = ("delete", "apply", "add", "resume", "verify", "train")
# Options that name a file the command reads: the worker reads them too, in the caller's directory.
_FILE_OPTIONS = ("ids_file", "input", "labels", "core_ids")


def command_line() -> bool:
    """Whether this process is the ``sisa`` command (console script or ``python -m sisa.cli``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) == "sisa.cli.__main__":
        return True
    return os.path.basename(str(getattr(main, "__file__", "") or "")) == "sisa"


def _trains_without_ray(args: argparse.Namespace) -> bool:
    """Whether the parsed command may train on this machine without Ray.

    That is a training command (``delete`` without ``--defer``, ``apply``, ``add``,
    ``resume``, ``verify``, ``train``) that names no cluster (``--address`` / ``RAY_ADDRESS``
    unset or ``local``) and is not forced onto Ray (``SISA_RUNNER=ray``).
    """
    if args.command not in _TRAINING or getattr(args, "defer", False):
        return False
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local"):
        return False
    return not (address is None and (os.environ.get("SISA_RUNNER") or "").strip().lower() == "ray")


def training_command(argv: Sequence[str]) -> str | None:
    """The store of a command that may train without Ray, or None.

    Args:
        argv: The arguments after the program name, read by the command's own parser (so
            ``--addr`` is no ``--address``, and ``--store=S`` is ``--store S``).

    Returns:
        The ``--store`` of a command :func:`_trains_without_ray` accepts; None otherwise, and
        for a command line the parser refuses (the command then reports it).
    """
    args = try_parse(argv)
    return args.store if args is not None and _trains_without_ray(args) else None


def store_cpu_isa(store: str) -> str | None:
    """``resources.cpu_isa`` of the store at ``store``, or None when it cannot be read.

    Reads the stored config from the store's ``meta`` table in a read-only LMDB
    transaction; anything unexpected (no store, a locked or damaged file) gives None,
    and the command then runs as it would have without this shortcut.
    """
    if not os.path.exists(os.path.join(store, "data.mdb")):
        return None
    try:
        import lmdb

        env = lmdb.open(store, readonly=True, subdir=True, max_dbs=16, create=False)
        try:
            with env.begin() as txn:
                raw = txn.get(b"config", db=env.open_db(b"meta", txn=txn, create=False))
        finally:
            env.close()
        if raw is None:
            return None
        config = json.loads(bytes(raw))
        resources = config.get("resources") or {}
        isa = resources.get("cpu_isa", "avx2")
        return isa if isinstance(isa, str) else None
    except Exception:  # noqa: BLE001 - a shortcut only: any failure means "run as before"
        return None


def _store_pins(args: argparse.Namespace | None, commands: Sequence[str]) -> tuple[str, dict[str, str]] | None:
    """The store's ``cpu_isa`` and its pins, for a command this process should act on, else None.

    That is: this process is the ``sisa`` command, running one of ``commands`` that would train
    without Ray (:func:`_trains_without_ray`) on a readable store.
    """
    if not command_line() or args is None:
        return None
    if args.command not in commands or not _trains_without_ray(args):
        return None
    cpu_isa = store_cpu_isa(args.store)
    if cpu_isa is None:
        return None
    from sisa.train import domain  # light: the config module and the standard library

    try:
        return cpu_isa, dict(domain.pin_env(cpu_isa))
    except ValueError:
        return None


def reexec_pinned(argv: Sequence[str] | None = None) -> None:
    """Restart this ``sisa`` process with its store's pins, if it may train locally and lacks them.

    Returns only when nothing is to be done (not the command line, a command that does not
    train locally, the pins already there, a store that cannot be read); otherwise the
    process is replaced by the same command line with the pins in its environment.
    """
    if os.environ.get(REEXEC_ENV):
        return
    found = _store_pins(try_parse(sys.argv[1:] if argv is None else argv), _TRAINING)
    if found is None:
        return
    cpu_isa, pins = found
    from sisa.train import domain  # light: the config module and the standard library

    if not pins or domain.pinned_from_start(cpu_isa):
        return
    args = list(getattr(sys, "orig_argv", []))[1:] or [sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], {**os.environ, **pins, REEXEC_ENV: "1"})


def _reads_only_files(args: argparse.Namespace) -> bool:
    """Whether every file the command reads is a regular file another process can open too.

    ``--ids-file -``, ``/dev/stdin``, ``<(...)`` (a pipe in ``/dev/fd``) are this process's own
    descriptors: the worker would read its own instead.
    """
    for option in _FILE_OPTIONS:
        path = getattr(args, option, None)
        if path is None:
            continue
        try:
            if path == "-" or not stat.S_ISREG(os.stat(path).st_mode):
                return False
        except OSError:
            continue  # missing: the command reports it, wherever it runs
    return True


def worker_may_run(args: argparse.Namespace) -> bool:
    """Whether the warm worker may run the parsed command, in the current directory and environment.

    One of :data:`~sisa.cli.parser.WORKER_COMMANDS` that would train without Ray and reads only
    regular files. The caller asks before it sends a command, and the worker again before it
    runs one (with the caller's directory and environment), so neither takes anything else.
    """
    return args.command in WORKER_COMMANDS and _trains_without_ray(args) and _reads_only_files(args)


def worker_job(argv: Sequence[str]) -> tuple[argparse.Namespace, Mapping[str, str]] | None:
    """The parsed command and its store's pins, if the warm worker may run ``argv``; else None.

    The worker takes :data:`~sisa.cli.parser.WORKER_COMMANDS` that would train without Ray,
    read only regular files, and whose store can be read; the worker applies the same rule to
    what it is sent (it never runs any other command).
    """
    args = try_parse(argv)
    if args is None or not worker_may_run(args):
        return None
    found = _store_pins(args, WORKER_COMMANDS)
    return None if found is None else (args, found[1])


def command_nice(args: argparse.Namespace) -> int | None:
    """The niceness the parsed command will run at (what :func:`sisa.cli.dispatch` applies); None if unknown.

    ``--nice``, else ``$SISA_TRAIN_NICE``, else the node's default (10 where a sisa replica serves):
    part of the worker's identity, since a worker niced once cannot serve a command at a lower
    niceness. None when the variable is malformed: the command runs in place and says so.
    """
    from sisa.errors import ConfigError
    from sisa.train import priority

    if getattr(args, "nice", None) is not None:
        return int(args.nice)
    try:
        return priority.training_nice()
    except ConfigError:
        return None


def run_in_worker() -> None:
    """Hand this ``sisa`` command to the user's warm worker, if it would train without Ray.

    Returns when the command is to run in this process (not the ``sisa`` command, a command
    the worker does not take, workers off, none answering or the worker busy); otherwise the
    worker ran it and this process exits with its code, without ever importing torch.
    """
    if os.environ.get(REEXEC_ENV):
        return  # restarted with the pins: this process already chose to run the command itself
    job = worker_job(sys.argv[1:])
    if job is None:
        return
    from sisa.cli import worker

    nice = command_nice(job[0])
    if nice is None:
        return
    code = worker.delegate(sys.argv[1:], job[1], job[0].store, nice)
    if code is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_worker_after(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Start the warm worker for the next command, once this one has finished in place.

    Called by the ``sisa`` command after its own command's output is out: a worker started
    beside the command would compete with it for the cores (measured: docs/benchmarks.md,
    "Start-up costs the command line is shaped around"), while one started after it is warm by
    the next command. Nothing is started
    for a command the worker does not take, with workers off, or when one answers already.

    Args:
        argv: The command line after the program name.
        env: This process's environment as it started, before the command changed any of it:
            the worker gets it, so that its key is the one the next caller computes.
    """
    from sisa.cli import worker

    if not worker.enabled():
        return
    job = worker_job(argv)
    nice = None if job is None else command_nice(job[0])
    if job is not None and nice is not None:
        worker.ensure_started(job[1], env, nice)
