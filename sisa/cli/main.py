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
from sisa.cli.exits import EXIT_TERMINATED, Terminated, terminate_raises
from sisa.cli.parser import parse

__all__ = ["main"]

# Commands whose every file and store is closed when they return (``evaluate`` keeps the normal exit).
_EXIT_NOW = frozenset({"train", "eval", "status", "delete", "pending", "apply", "verify", "audit", "add", "resume"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sisa`` command line.

    As the ``sisa`` command itself (``argv`` None): a small training command goes to the user's
    warm worker if one answers (:func:`sisa.cli.launch.run_in_worker`), else the process
    restarts once in the store's pinned determinism domain before torch loads; SIGTERM ends
    the command as Ctrl-C does (what was kept, exit 143); a worker is started *after* the
    command when none answered, so it never competes with the command for the cores; and
    the process ends as soon as its output is out (:func:`_exit_now`).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``). A caller that
            passes them (a test, a notebook) gets the exit code back and keeps its process.

    Returns:
        The exit code: 0 when the work is done, 1 for a failed check, 2 on a sisa error, 130 /
        143 after SIGINT / SIGTERM.
    """
    own = argv is None and launch.command_line()
    args = None
    try:
        # SIGTERM ends the command as Ctrl-C does, until it has returned (then the default again).
        with terminate_raises() if own else contextlib.nullcontext():
            if own:
                launch.run_in_worker()  # returns only when the command runs here
                launch.reexec_pinned()  # returns only when this process has its pins already
            args = parse(argv)
            code = run_command(args, own_process=own)
    except Terminated:  # before run_command took over: nothing had started
        print("terminated (SIGTERM) before the command started; nothing was changed", file=sys.stderr)
        return EXIT_TERMINATED
    if own and args is not None:
        for stream in (sys.stdout, sys.stderr):  # the command's output first; the worker's start after it
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        launch.start_worker_after(sys.argv[1:])
        _exit_now(code, args.command)
    return code


def _exit_now(code: int, command: str) -> None:
    """End the ``sisa`` process at once with ``code``, without the interpreter's slow teardown.

    A Python process that loaded torch and Ray takes about a second more to tear its modules
    down, and a graceful ``ray.shutdown()`` of a local instance it started takes over a second,
    neither of which a finished command needs to wait for. Everything that matters is done
    first: stdout and stderr flushed, logging shut down, the pinned child of local training
    ended, and a local Ray instance this process started killed with every process of it
    (:func:`sisa.train.orchestrator.abandon_local_instance`). A process joined to a cluster
    exits normally, so Ray disconnects its driver cleanly.
    """
    if command not in _EXIT_NOW:
        return
    ray = sys.modules.get("ray")
    orchestrator = sys.modules.get("sisa.train.orchestrator")
    if ray is not None and ray.is_initialized():
        if orchestrator is None or not orchestrator.started_local_instance():
            return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing more can reach it
            pass
    logging.shutdown()
    local_runner = sys.modules.get("sisa.train.local_runner")
    if local_runner is not None:
        local_runner.close_all()
    if orchestrator is not None:
        orchestrator.abandon_local_instance()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
