"""The ``sisa`` console script: hand the command to the warm worker, or run it here, then exit at once.

Importing this module does nothing but define :func:`main` (the parser and the launcher are
standard library only); the library, torch and Ray load when a command needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from sisa.cli import launch
from sisa.cli.dispatch import run_command
from sisa.cli.exits import (
    EXIT_TERMINATED,
    Terminated,
    kill_descendants,
    redeliver_swallowed_interrupts,
    terminate_raises,
)
from sisa.cli.parser import parse

__all__ = ["main"]

# Commands whose every file and store is closed when they return, so the process may end with os._exit;
# the others (``evaluate``, ``serve``, ``domains``, ``compact``, ``migrate``) keep the interpreter's normal exit.
_EXIT_NOW = frozenset(
    {"train", "eval", "status", "delete", "pending", "apply", "verify", "audit", "add", "resume", "receipt", "keys"}
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sisa`` command line.

    As the ``sisa`` command itself (``argv`` None): a small training command goes to the user's
    warm worker if one answers (:func:`sisa.cli.launch.run_in_worker`), else the process
    restarts once in the store's pinned determinism domain before torch loads; SIGTERM ends
    the command as Ctrl-C does (what was kept, exit 143); a worker is started *after* the
    command when none answered, so it never competes with the command for the cores; and
    the process ends as soon as its output is out (:func:`_may_exit_now`).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``). A caller that
            passes them (a test, a notebook) gets the exit code back and keeps its process.

    Returns:
        The exit code: 0 when the work is done, 1 for a failed check, 2 on a sisa error, 130 /
        143 after SIGINT / SIGTERM.
    """
    own = argv is None and launch.command_line()
    # As this process started: a command may change its own environment (thread pools, Ray's
    # variables), and the worker started after it must be the process the next caller would be.
    start_env = dict(os.environ)
    args = None
    try:
        # SIGTERM ends the command as Ctrl-C does, until it has returned (then the default again).
        with terminate_raises() if own else contextlib.nullcontext(), redeliver_swallowed_interrupts():
            if own:
                launch.run_in_worker()  # returns only when the command runs here
                launch.reexec_pinned()  # returns only when this process has its pins already
            args = parse(argv)
            code = run_command(args, own_process=own)
    except Terminated:  # before run_command took over: nothing had started
        print("terminated (SIGTERM) before the command started; nothing was changed", file=sys.stderr)
        return EXIT_TERMINATED
    if own and args is not None:
        quick = _may_exit_now(args.command)
        if quick:
            _tear_down()
        for stream in (sys.stdout, sys.stderr):  # the command's output first; the worker's start after it
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        launch.start_worker_after(sys.argv[1:], start_env)
        if quick:
            os._exit(code)
    return code


def _may_exit_now(command: str) -> bool:
    """Whether the ``sisa`` process may end at once with ``os._exit``, without the interpreter's teardown.

    A Python process that loaded torch and Ray takes a while to tear its modules down, and a
    graceful ``ray.shutdown()`` of a local instance it started longer (docs/benchmarks.md,
    "Start-up costs the command line is shaped around"); a finished command need wait for neither.
    Only for the commands of ``_EXIT_NOW`` (not ``evaluate``, ``serve``, ``domains``, ``compact``,
    ``migrate``), and not for a process joined to a cluster: that one exits normally, so Ray
    disconnects its driver cleanly.
    """
    if command not in _EXIT_NOW:
        return False
    ray = sys.modules.get("ray")
    orchestrator = sys.modules.get("sisa.train.orchestrator")
    if ray is not None and ray.is_initialized():
        return orchestrator is not None and bool(orchestrator.started_local_instance())
    return True


def _tear_down() -> None:
    """What must happen before ``os._exit``: output flushed, logging shut down, every child process ended.

    The pinned child of local training and the local Ray instance this process started (with
    every process of it: :func:`sisa.train.orchestrator.abandon_local_instance`) end first;
    then whatever this process started and is still running (a Ray instance whose start a
    signal cut short, say) is killed, so nothing outlives the command.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away: nothing more can reach it
            stream.flush()
    logging.shutdown()
    local_runner = sys.modules.get("sisa.train.local_runner")
    if local_runner is not None:
        local_runner.close_all()
    orchestrator = sys.modules.get("sisa.train.orchestrator")
    if orchestrator is not None:
        orchestrator.abandon_local_instance()
    kill_descendants()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
