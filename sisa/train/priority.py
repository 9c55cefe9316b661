"""CPU priority of the processes that train, so that a retrain on a node that also serves yields to serving.

A deletion's retrain is batch work; on a node that also answers predictions (``sisa serve``
replicas, Ray Serve's proxy) it competes with them for the same cores, and on a small node its
CPU time lands in the responses' tail latency. The training child processes of the ``local``
and ``parallel`` runners (:mod:`sisa.train.local_runner`) can therefore run *niced*: at niceness
``N`` (0-19; the niceness of the process that starts them if that is higher already). Niceness only
matters when the cores are contended: on an idle machine a niced retrain runs exactly as fast,
and what it trains is the same bytes (priority is not part of the determinism domain).

Set it per process: ``SISA_TRAIN_NICE=N`` in the environment, :func:`set_training_nice` from
Python, or ``--nice N`` on ``sisa train``, ``add``, ``delete``, ``apply``, ``resume`` and
``verify`` (the command, which usually trains in place, nices itself too; so does a warm worker
running it). In a library caller it applies to the runners' child processes only: training *in
place* (a process that started pinned, or a ``native`` config) runs at the caller's priority, and
Ray tasks at their workers' (Ray reuses a worker process for later tasks and actors, a serving replica
among them, and an unprivileged process cannot lower a niceness again; on a cluster, keep
training and serving apart with Ray resources instead). Unset, it is 0, except on a node where a
replica of the sisa Ray Serve application runs: there it is 10 (:mod:`sisa.train.serving_node`), so
a ``sisa delete`` beside ``sisa serve`` yields the cores to the replicas without being told.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sisa.errors import ConfigError

__all__ = [
    "DEFAULT_NICE",
    "ENV",
    "MAX_NICE",
    "apply_here",
    "check_nice",
    "default_nice",
    "niceness",
    "renice",
    "set_training_nice",
    "target_niceness",
    "training_nice",
    "training_nice_as",
]

log = logging.getLogger(__name__)

ENV = "SISA_TRAIN_NICE"
MAX_NICE = 19  # the lowest priority POSIX niceness allows
# The default is 0, the priority of any other process: niceness is a policy of the node, and a library that
# lowered its own training by default would hand most of the cores to whatever else runs there (another
# tenant's batch job included) in the common case, a fit or a deletion on a machine that serves nothing. A
# node that runs a sisa replica has stated its policy, serving first: there the default is
# serving_node.SERVING_NICE (default_nice; docs/benchmarks.md measures both).
DEFAULT_NICE = 0

_override: int | None = None
_last_default = DEFAULT_NICE  # what default_nice last returned, so a change is logged once


def check_nice(value: object, source: str = "nice") -> int:
    """``value`` as a niceness in ``[0, 19]``.

    Args:
        value: An int, or a string holding one (an environment variable, a CLI argument).
        source: What the value came from, for the error message.

    Raises:
        ConfigError: If it is not a whole number from 0 to 19.
    """
    try:
        nice = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        nice = -1
    if isinstance(value, bool) or not 0 <= nice <= MAX_NICE:
        raise ConfigError(
            f"{source} must be a whole number from 0 (the caller's priority) to {MAX_NICE} (the lowest), got {value!r}"
        )
    return nice


def training_nice() -> int:
    """The niceness training child processes get now (at least; never below this process's own).

    :func:`set_training_nice`'s, else ``$SISA_TRAIN_NICE``'s, else :func:`default_nice`'s (10 on a node
    that serves sisa predictions, 0 elsewhere).

    Raises:
        ConfigError: If ``$SISA_TRAIN_NICE`` is set to something else than 0..19.
    """
    if _override is not None:
        return _override
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return default_nice()
    return check_nice(raw, f"${ENV}")


def default_nice() -> int:
    """The niceness when nothing sets one: :data:`SERVING_NICE` on a node that serves sisa predictions, else 0.

    A node runs a sisa replica (:mod:`sisa.train.serving_node`) only where serving was chosen, so
    its training yields to the replicas there; anywhere else :data:`DEFAULT_NICE`.
    """
    from sisa.train import serving_node  # psutil: only when no niceness was set

    global _last_default
    serving = serving_node.serving_processes()
    nice = serving_node.SERVING_NICE if serving else DEFAULT_NICE
    if nice != _last_default:  # said once per change, not at every training job
        _last_default = nice
        if serving:
            log.info(
                "this node serves sisa predictions (pid %s): training at niceness %d (SISA_TRAIN_NICE=0 or --nice 0 "
                "keeps the caller's priority)",
                ", ".join(str(p.get("pid")) for p in serving),
                nice,
            )
    return nice


def set_training_nice(nice: int | None) -> None:
    """Set the niceness of this process's training child processes (None: back to the environment's).

    Runners already started are reniced before their next job.

    Raises:
        ConfigError: If ``nice`` is not a whole number from 0 to 19.
    """
    global _override
    _override = None if nice is None else check_nice(nice)


@contextlib.contextmanager
def training_nice_as(nice: int | None) -> Iterator[None]:
    """:func:`set_training_nice` for the duration of a block (None: leave the current setting); restored after.

    Raises:
        ConfigError: If ``nice`` is not a whole number from 0 to 19.
    """
    global _override
    before = _override
    if nice is not None:
        set_training_nice(nice)
    try:
        yield
    finally:
        _override = before


def niceness(pid: int = 0) -> int:
    """The niceness of process ``pid`` (0: this one)."""
    return os.getpriority(os.PRIO_PROCESS, pid)


def target_niceness(nice: int) -> int:
    """The niceness the setting ``nice`` means here: ``nice``, or this process's own if that is higher.

    A process that runs niced already (started under ``nice``, or a ``sisa`` command that niced
    itself with :func:`apply_here`) never gets children at a higher priority than its own: they
    inherit its niceness, and an unprivileged process could not lower theirs anyway.
    """
    return min(MAX_NICE, max(niceness(), nice))


def apply_here(nice: int) -> bool:
    """Run this whole process (every thread) at :func:`target_niceness` of ``nice``: for a ``sisa`` command.

    The command *is* the training job (it trains in place when it started pinned), so ``--nice``
    lowers its own priority; a library caller's process is never reniced.

    Returns:
        True if the process runs at ``nice`` now; False if it runs at a higher niceness already (a
        warm worker that an earlier command niced: no process may lower it without privilege).
    """
    renice(os.getpid(), nice)
    return niceness() == min(MAX_NICE, nice)


def renice(pid: int, nice: int) -> bool:
    """Give process ``pid`` (every thread of it) the niceness :func:`target_niceness` of ``nice``.

    On Linux a niceness belongs to a thread, and threads inherit their creator's, so every
    thread the process has now is set (those it starts later inherit it).

    Returns:
        True if the process runs at that niceness now; False if it would have to be lowered, which
        an unprivileged process may not do (the caller then starts a fresh process instead).
    """
    target = target_niceness(nice)
    tasks = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    except FileNotFoundError:  # it ended: nothing to set (its runner finds out on its next job)
        return True
    try:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                if os.getpriority(os.PRIO_PROCESS, tid) != target:
                    os.setpriority(os.PRIO_PROCESS, tid, target)
    except PermissionError:
        log.info("cannot lower the niceness of training process %d to %d without privilege", pid, target)
        return False
    return True
