"""``python -m sisa.cli.worker_process SOCKET LOCK KEY NICE``: the warm worker's own process (:mod:`sisa.cli.worker`).

Its own module so that the caller's side, which the command line's launcher imports, never
imports the commands: this one claims the worker's lock, checks that it is the worker its
caller asked for, loads the commands and serves.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from sisa.cli.exits import EXIT_ERROR
from sisa.cli.worker import idle_seconds
from sisa.cli.worker_identity import worker_key

__all__ = ["claim", "main", "run"]


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


def run(argv: list[str]) -> int | None:
    """Run one command line handed to the worker; its exit code, or None if the worker does not run it.

    Only argument parsing may end with ``SystemExit`` here (``--help``, a usage error); one
    raised by the command itself is not caught, and ends the worker.
    """
    from sisa.cli.dispatch import run_command
    from sisa.cli.launch import worker_may_run
    from sisa.cli.parser import parse

    try:
        args = parse(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_ERROR)
    if not worker_may_run(args):
        return None
    return run_command(args, own_process=False)


def _warm_up() -> None:
    """What every training process pays once: torch's first optimizer steps import ``torch._dynamo``."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.zeros(1)
    for optimizer in (torch.optim.Adam([weight]), torch.optim.SGD([weight], lr=0.1)):
        optimizer.step()


def main(argv: list[str]) -> int:
    """Claim the lock ``argv[1]``, take the niceness ``argv[3]``, check the key ``argv[2]``, serve on ``argv[0]``."""
    sock, lock, key, nice = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    if claim(lock) is None:
        return 0  # another worker of this key is up (or starting)
    # Its commands' niceness, before any thread starts (threads inherit it): they keep it, never lower it.
    with contextlib.suppress(PermissionError):  # started above it: the key check below refuses to serve
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    own = worker_key({}, nice=os.getpriority(os.PRIO_PROCESS, 0))
    if own != key:
        # Not the process the caller would be (its sisa, Python or libraries changed meanwhile, or
        # another sisa shadows this one): serving would run the caller's commands in another domain.
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} worker key {own} is not {key}; not serving", file=sys.stderr)
        return 0
    # `kill -USR1 PID` writes every thread's stack to the worker's log: the one way to see where a
    # worker that does not end is stuck, without a debugger on the machine.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    from sisa.cli.worker_server import Worker  # the heavy imports come with the first command's modules

    _warm_up()
    import sisa.cli.cmd_inspect  # noqa: F401 - what the commands import: loaded once, kept warm
    import sisa.cli.cmd_train  # noqa: F401
    import sisa.cli.cmd_unlearn  # noqa: F401

    return Worker(sock, key, idle_seconds(), run).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
