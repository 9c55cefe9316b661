"""Whether this node serves sisa predictions, so that training here yields to serving unless told otherwise.

A deletion's retrain (and its journal and erasure) is batch work. On a node that also answers
predictions it takes cores from the replicas and lands in their tail latency: docs/benchmarks.md
("Serving") measures the p99 during a deletion's swap against the steady p99 with the deleting
process at the replicas' priority (above 2x in every run) and at niceness 10. Niceness is a
policy of the node (:mod:`sisa.train.priority`), and a node that runs a sisa replica has chosen
one: serving first. So every replica of the sisa Ray Serve application (``sisa serve``, ``serve
run``, ``serve deploy`` alike) marks its node while it lives, and :func:`sisa.train.priority.training_nice`
then defaults to :data:`SERVING_NICE` on that node. ``SISA_TRAIN_NICE``, ``--nice`` and
:func:`~sisa.train.priority.set_training_nice` still decide when given (``--nice 0`` trains at the
caller's priority).

The marks are files in this user's private folder on this node (:func:`marks_dir`), one per live
replica process, named by its pid and start time; a mark whose process ended (a killed replica
leaves its file behind) is seen by that pair and removed by the next reader. Nothing is shared
between nodes or users: a replica on another node never slows training here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from sisa.user_folder import private_folder

__all__ = ["SERVING_NICE", "marks_dir", "register", "serving_processes", "unregister"]

log = logging.getLogger(__name__)

SERVING_NICE = 10  # what `nice` itself applies; the niceness docs/benchmarks.md measured against 0


def marks_dir(*, create: bool = False) -> Path | None:
    """This user's folder of serving marks on this node (``serving/`` in :func:`~sisa.user_folder.private_folder`).

    None when that private folder is missing (``create`` False) or not this user's only.
    """
    folder = private_folder(create=create)
    if folder is None:
        return None
    marks = folder / "serving"
    if create:
        marks.mkdir(mode=0o700, exist_ok=True)
    return marks


def _start_ms(pid: int) -> int | None:
    """The process's start time in ms (with the pid, what names one process for its whole life); None if gone."""
    import psutil  # ~25 ms: only where a mark exists (every `sisa` command asks whether this node serves)

    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except psutil.Error:
        return None


def register(role: str, store: str | None = None) -> Path | None:
    """Mark this node as serving for as long as this process lives (a replica calls it when it starts).

    Args:
        role: What serves, for the logs (``"replica"``).
        store: The store it serves, if known.

    Returns:
        The mark's path (for :func:`unregister`), or ``None`` when it could not be written: serving
        goes on without it, and training on this node keeps the caller's priority.
    """
    pid = os.getpid()
    started = _start_ms(pid)
    try:
        folder = marks_dir(create=True)
        if started is None or folder is None:
            log.warning("could not mark this node as serving (no private folder): training here keeps its priority")
            return None
        mark = folder / f"{pid}-{started}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mark-")
        with os.fdopen(fd, "w") as out:
            json.dump({"pid": pid, "started_ms": started, "role": role, "store": store}, out)
        os.replace(tmp, mark)  # whole or absent: a reader never sees half a mark
    except OSError as exc:
        log.warning("could not mark this node as serving (%s): training here keeps its priority", exc)
        return None
    log.info("this node serves sisa predictions (%s pid %d): training here runs niced by default", role, pid)
    return mark


def unregister(mark: Path | None) -> None:
    """Remove a mark :func:`register` wrote (a replica shutting down); one already gone is fine."""
    if mark is not None:
        with contextlib.suppress(OSError):
            mark.unlink()


def serving_processes() -> list[dict[str, object]]:
    """The live processes that serve on this node: each mark's contents; marks of ended processes are removed."""
    folder = marks_dir()
    if folder is None or not folder.is_dir():
        return []
    live = []
    for mark in folder.iterdir():
        pid_text, _, started_text = mark.name.partition("-")
        if not (pid_text.isdigit() and started_text.isdigit()):
            continue  # a mark being written (".mark-..."), or not ours
        if _start_ms(int(pid_text)) != int(started_text):
            with contextlib.suppress(OSError):
                mark.unlink()  # its process ended (or the pid was reused by another): stale
            continue
        try:
            live.append(json.loads(mark.read_text()))
        except (OSError, ValueError):
            continue  # removed meanwhile by its replica
    return live
