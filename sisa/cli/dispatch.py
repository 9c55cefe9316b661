"""Run one parsed ``sisa`` command in this process and turn how it ended into an exit code.

Shared by the command run in place (:mod:`sisa.cli.main`) and the warm worker
(:mod:`sisa.cli.worker`): the same code path, so the same output, bytes and exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from sisa.cli.exits import EXIT_BROKEN_PIPE, EXIT_ERROR, Terminated, exit_code_of

__all__ = ["interrupted_message", "run_command"]

log = logging.getLogger(__name__)

# Each command's module and function, imported only when that command runs: `sisa status` never
# loads what `sisa train` needs.
_HANDLERS = {
    "train": ("sisa.cli.cmd_train", "cmd_train"),
    "add": ("sisa.cli.cmd_train", "cmd_add"),
    "eval": ("sisa.cli.cmd_inspect", "cmd_eval"),
    "status": ("sisa.cli.cmd_inspect", "cmd_status"),
    "pending": ("sisa.cli.cmd_inspect", "cmd_pending"),
    "audit": ("sisa.cli.cmd_inspect", "cmd_audit"),
    "receipt": ("sisa.cli.cmd_receipt", "cmd_receipt"),
    "keys": ("sisa.cli.cmd_receipt", "cmd_keys"),
    "domains": ("sisa.cli.cmd_inspect", "cmd_domains"),
    "compact": ("sisa.cli.cmd_inspect", "cmd_compact"),
    "migrate": ("sisa.cli.cmd_inspect", "cmd_migrate"),
    "delete": ("sisa.cli.cmd_unlearn", "cmd_delete"),
    "apply": ("sisa.cli.cmd_unlearn", "cmd_apply"),
    "resume": ("sisa.cli.cmd_unlearn", "cmd_resume"),
    "verify": ("sisa.cli.cmd_unlearn", "cmd_verify"),
    "evaluate": ("sisa.cli.evaluate", "cmd_evaluate"),
    "serve": ("sisa.cli.cmd_serve", "cmd_serve"),
}
# Commands that change a store: what an interruption leaves, and how to finish it, is theirs to say.
_WRITERS = ("train", "delete", "apply", "add", "resume")


def interrupted_message(args: argparse.Namespace, interrupt: BaseException) -> str:
    """What an interrupted command (Ctrl-C, SIGTERM) left behind, and the command that finishes it."""
    signal_name = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
    store = getattr(args, "store", None)
    if store is None or args.command not in _WRITERS:
        return signal_name
    again = " (or the same `sisa train` command)" if args.command == "train" else ""
    pending = ""
    if args.command in ("delete", "apply", "resume"):
        pending = (
            f"; `sisa pending --store {store}` lists the deletions still pending (their shards may be out of "
            "service until they finish)"
        )
    return (
        f"{signal_name}: every stage committed so far is kept in {store}, and a journaled deletion stays pending"
        f"{pending}; `sisa resume --store {store}`{again} finishes the training and any interrupted deletion"
    )


def _command(args: argparse.Namespace) -> Any:
    module, name = _HANDLERS[args.command]
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _niced(args: argparse.Namespace) -> Iterator[None]:
    """A command that may train (``--nice``) runs at its niceness, this process and its training children alike.

    The command is the training job (it usually trains in place), so it lowers its own priority
    (never raises it: a process may not lower its niceness without privilege); per command, since a
    warm worker runs many.
    """
    from sisa.train import priority

    if not hasattr(args, "nice"):  # a command that never trains
        yield
        return
    nice = priority.training_nice() if args.nice is None else args.nice
    if not priority.apply_here(nice):
        # Started under `nice`, or a warm worker that an earlier --nice command started niced: loud only when asked.
        (log.warning if args.nice is not None else log.info)(
            "this process runs at niceness %d, above the %d asked for, and may not lower it (it started niced, or it "
            "is a warm worker that an earlier --nice command started)",
            priority.niceness(),
            nice,
        )
    log.info("this command runs at niceness %d (--nice %d)", priority.niceness(), nice)
    with priority.training_nice_as(nice):
        yield


def run_command(args: argparse.Namespace, *, own_process: bool) -> int:
    """Run the parsed command ``args`` and return its exit code (printing its result or its error).

    Args:
        args: From :func:`sisa.cli.parser.parse`.
        own_process: This process is the ``sisa`` command itself (not a test, a notebook or the
            worker calling in): only then is stdout pointed at /dev/null after its reader left.

    Returns:
        0 when the command's work is done; 1 when verify or audit ran and found a problem; 2 on a
        sisa error; 130 / 143 when SIGINT / SIGTERM ended it; 141 when stdout's reader went away.
    """
    from sisa.cli.cmd_inspect import CheckFailed  # the command modules import the library: not at import
    from sisa.cli.ray_log import RayLog
    from sisa.errors import SisaError

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ray_log: RayLog | None = None
    ray_logged = False
    try:
        try:
            ray_log = RayLog.start(args.command, args.verbose)
            with _niced(args):
                result = _command(args)(args)
        finally:
            ray_logged = ray_log is not None and ray_log.stop()
    except (KeyboardInterrupt, Terminated) as interrupt:
        print(interrupted_message(args, interrupt), file=sys.stderr)
        return exit_code_of(interrupt)
    except BrokenPipeError:
        # The reader of stdout went away (`sisa ... | head`): whatever the command did is done;
        # point stdout at /dev/null so the interpreter's final flush does not fail again, and
        # exit as a process killed by SIGPIPE would (128 + 13), as git and coreutils do.
        if own_process:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except CheckFailed as failed:
        if args.json:
            print(json.dumps(failed.result, sort_keys=True))
        return failed.exit_code
    except SisaError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        if ray_log is not None and ray_logged:
            print(f"(Ray's own log lines of this run: {ray_log.path}; -v prints them here)", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
