"""Exit codes of the ``sisa`` command, and the signals that end a command early.

A command ends with 0 only when its work is done. A signal ends it with the code a shell
reports for that signal (130 for SIGINT, 143 for SIGTERM), after it has said what was kept
and the command that finishes the rest; the warm worker relays the same codes.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_FAILED_CHECK",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "Terminated",
    "exit_code_of",
    "kill_descendants",
    "redeliver_swallowed_interrupts",
    "terminate_raises",
]

EXIT_FAILED_CHECK = 1  # verify or audit ran and found a problem
EXIT_ERROR = 2  # a sisa error: bad input, a store that cannot do this, a cluster that cannot be reached
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as a shell reports it: 128 + 2
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader, as after SIGPIPE: 128 + 13
EXIT_TERMINATED = 143  # SIGTERM, as a shell reports it: 128 + 15


class Terminated(BaseException):
    """SIGTERM arrived while a command ran: it unwinds like Ctrl-C's ``KeyboardInterrupt``.

    A ``BaseException`` for the same reason ``KeyboardInterrupt`` is one: ``except Exception``
    in library code must not swallow it.
    """


def exit_code_of(interrupt: BaseException) -> int:
    """The exit code for a command that ``interrupt`` (``KeyboardInterrupt`` or :class:`Terminated`) ended."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def terminate_raises() -> Iterator[None]:
    """Within this block, SIGTERM raises :class:`Terminated` in the main thread (else nothing changes).

    Python's default for SIGTERM ends the process at once, without ``finally`` blocks: a
    command would print nothing, and its caller could not tell what was kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: Callable[[int, FrameType | None], Any] | int | None = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def kill_descendants() -> int:
    """Kill every process this one started that is still running (children and theirs); how many.

    For a command that ends (the ``sisa`` process before ``os._exit``, the worker after an
    interrupted command): a child left behind, such as a Ray instance whose start a signal cut
    short, would outlive it and hold cores and files.
    """
    import psutil  # only at the end of a command that did work

    from sisa.train.process_tree import kill_trees

    try:
        children = [c.pid for c in psutil.Process().children()]
    except psutil.Error:
        return 0
    return kill_trees(children, wait=5.0)


@contextmanager
def redeliver_swallowed_interrupts() -> Iterator[None]:
    """Within this block, a Ctrl-C or SIGTERM that Python swallowed is raised again at the next chance.

    A signal handler runs between any two bytecodes of the main thread, also inside a
    finaliser (``__del__``, a weakref or GC callback), where Python prints the exception as
    "ignored" and goes on: the command would then run to its end as if never interrupted.
    ``sys.unraisablehook`` sees such an exception; the signal is then delivered again, outside
    the finaliser.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            # From another thread: called here, in the main thread, the handler would raise inside
            # this hook, and Python would swallow it once more. From a thread it is only marked
            # pending, and the main thread raises it once the finaliser has returned.
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            returned = threading.Event()

            def deliver() -> None:
                returned.wait(1.0)  # until this hook has returned
                _thread.interrupt_main(signum)

            threading.Thread(target=deliver, daemon=True).start()
            try:
                previous(unraisable)
            finally:
                returned.set()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
