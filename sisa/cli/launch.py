"""Start the ``sisa`` command in its store's determinism domain, before torch loads.

torch, MKL and oneDNN read their kernel-level pins once per process (see
:mod:`sisa.train.domain`), so a command that trains without Ray (a deletion that
retrains one shard, ``--address local``) can train in its own process only when that
process *started* with the pins of the store's ``resources.cpu_isa``; otherwise the
local runner starts a pinned child process, which pays a second torch import (1-2 s).
:func:`reexec_pinned` avoids that: run before the heavy imports of :mod:`sisa.cli.main`,
it reads the store's ``cpu_isa`` (LMDB and JSON only) and, when the pins are missing,
replaces the process with the same command line plus the pins (``os.execve``). Only
the ``sisa`` command itself does this (its console script or ``python -m sisa.cli``),
never a library caller or a test that imports the CLI; and only for commands that may
train without Ray: a named cluster trains in pinned Ray workers, and ``SISA_RUNNER=ray``
forces Ray.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

__all__ = ["REEXEC_ENV", "command_line", "reexec_pinned", "run_in_worker", "store_cpu_isa", "training_command"]

# Set in the environment of the re-executed process: never re-execute twice.
REEXEC_ENV = "SISA_PINNED_EXEC"

# Commands that may train: what they train may be small enough for the local runner.
_TRAINING = ("delete", "apply", "add", "resume", "verify", "train")


def command_line() -> bool:
    """Whether this process is the ``sisa`` command (console script or ``python -m sisa.cli``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) == "sisa.cli.__main__":
        return True
    return os.path.basename(str(getattr(main, "__file__", "") or "")) == "sisa"


def _option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def training_command(argv: Sequence[str]) -> str | None:
    """The store of a command that may train without Ray, or None.

    Args:
        argv: The arguments after the program name.

    Returns:
        The ``--store`` of a training command (``delete`` without ``--defer``, ``apply``,
        ``add``, ``resume``, ``verify``, ``train`` of an existing store) that names no
        cluster (``--address`` / ``RAY_ADDRESS`` unset or ``local``) and is not forced onto
        Ray (``SISA_RUNNER=ray``); None otherwise.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in _TRAINING or "--defer" in argv or "-h" in argv or "--help" in argv:
        return None
    address = _option(argv, "--address") or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local"):
        return None
    if address is None and (os.environ.get("SISA_RUNNER") or "").strip().lower() == "ray":
        return None
    return _option(argv, "--store")


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


def _store_pins(argv: Sequence[str], commands: Sequence[str]) -> tuple[str, dict[str, str]] | None:
    """The store's ``cpu_isa`` and its pins, for a command this process should act on, else None.

    That is: this process is the ``sisa`` command (not yet re-executed), running one of
    ``commands`` that would train without Ray (:func:`training_command`) on a readable store.
    """
    if os.environ.get(REEXEC_ENV) or not command_line():
        return None
    command = next((a for a in argv if not a.startswith("-")), None)
    store = training_command(argv) if command in commands else None
    cpu_isa = store_cpu_isa(store) if store is not None else None
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
    found = _store_pins(sys.argv[1:] if argv is None else argv, _TRAINING)
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


# What a warm worker takes (:mod:`sisa.cli.worker`): the small jobs; ``train`` creates stores and
# trains every shard, where a few seconds of start-up do not matter.
_WORKER_COMMANDS = ("delete", "apply", "add", "resume", "verify")


def run_in_worker() -> None:
    """Hand this ``sisa`` command to the user's warm worker, if it would train without Ray.

    Returns when the command is to run in this process (not the ``sisa`` command, a command
    the worker does not take, workers off, none answering or the worker busy); otherwise the
    worker ran it and this process exits with its code, without ever importing torch.
    """
    argv = sys.argv[1:]
    if any(a == "-" or a.startswith(("/dev/", "/proc/self/")) for a in argv):
        return  # this process's stdin or descriptors (`--ids-file /dev/stdin`, `<(...)`): not the worker's
    found = _store_pins(argv, _WORKER_COMMANDS)
    if found is None:
        return
    from sisa.cli import worker

    code = worker.delegate(argv, found[1])
    if code is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
