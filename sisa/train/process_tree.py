"""Ending whole process trees (a Ray instance, the children a command left) with psutil.

Light on purpose (psutil and the standard library, no Ray): the ``sisa`` command's own exit path
uses it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import psutil

__all__ = ["kill_trees"]


def kill_trees(roots: Iterable[int], wait: float = 0.0) -> int:
    """SIGKILL every process in the trees rooted at ``roots`` (psutil walks them); how many.

    The trees are frozen (SIGSTOP) and walked again until no new process appears before any is
    killed: a parent killed first would orphan its children out of reach (re-parented to init),
    and a live raylet would start new workers while its old ones die.

    Args:
        roots: Pids whose whole trees end (the caller's own pid is never touched).
        wait: Seconds to wait for the killed processes to be gone (0: do not wait).
    """
    found: dict[int, psutil.Process] = {}

    def freeze(proc: psutil.Process) -> None:
        if proc.pid not in found and proc.pid != os.getpid():  # never stop the caller itself
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):  # already gone: nothing to stop
                proc.suspend()

    for pid in roots:
        with contextlib.suppress(psutil.Error):  # gone already
            freeze(psutil.Process(pid))
    for _ in range(8):  # a frozen tree cannot grow: this ends after a round or two
        before = len(found)
        for proc in list(found.values()):
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                freeze(child)
        if len(found) == before:
            break
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if wait > 0:
        psutil.wait_procs(list(found.values()), timeout=wait)
    return len(found)
