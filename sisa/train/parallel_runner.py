"""Train shard jobs side by side in pinned local child processes, without Ray.

Each slot is a :class:`~sisa.train.local_runner.LocalRunner` that always trains in its own child
process started with the config's pins, so every shard trains the very same
:func:`~sisa.train.trainer.train_shard` in the same determinism domain as on Ray (bit-identical,
tested). One thread per slot feeds its child and forwards each finished stage; the calling
thread alone reads the store (it loads a job's slices when a slot is free) and commits stages,
in the order they arrive. The children are kept for the life of the process
(:func:`sisa.train.local_runner.pool`), so a warm worker pays for starting them once.

A child that dies (killed, out of memory) fails the run with a
:class:`~sisa.errors.TrainingError`; the other children are ended, the stages already committed
stay, and a deletion's request stays pending until a retry finishes it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sisa.train import local_runner
from sisa.train.domain import Domain
from sisa.train.jobs import ShardJob, StageResult

__all__ = ["run"]

log = logging.getLogger(__name__)

Unavailable = Callable[[ShardJob, list[Domain]], "ShardJob | None"]


def _slot(runner: local_runner.LocalRunner, inbox: queue.Queue[ShardJob | None], out: queue.Queue[Any]) -> None:
    """One slot's thread: train each job it is handed in its child; report stages, the end, or the error."""
    while True:
        job = inbox.get()
        if job is None:
            return
        try:
            for result in runner.train(job):
                out.put(("stage", result))
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the calling thread, which raises it
            out.put(("error", exc))
            return
        out.put(("done", runner))


def _routed(jobs: Iterator[ShardJob], here: Domain, unavailable: Unavailable) -> Iterator[ShardJob]:
    """The jobs that can run in ``here`` (a job bound to another domain goes to ``unavailable``)."""
    for job in jobs:
        routed: ShardJob | None = job
        if job.domain is not None and job.domain != here.id:
            routed = unavailable(job, [here])
        if routed is not None:
            yield routed


def run(
    jobs: Iterable[ShardJob],
    on_stage: Callable[[StageResult], None],
    unavailable: Unavailable,
    processes: int,
) -> None:
    """Train ``jobs`` in up to ``processes`` pinned child processes, calling ``on_stage`` in this thread.

    Args:
        jobs: One job per shard; may be lazy (pulled, and its slices loaded, only when a slot is free).
        on_stage: Called for each finished stage, in arrival order (stage order within a shard).
        unavailable: For a job whose ``domain`` is not the children's.
        processes: Slots (at least 1).

    Raises:
        TrainingError: If a child fails or dies; the other children are ended first.
        SisaError: Whatever ``on_stage`` or ``unavailable`` raised, or a sisa error from training.
    """
    pending = iter(jobs)
    first = next(pending, None)
    if first is None:
        return
    res = first.config.resources
    runners = local_runner.pool(res.cpu_isa, res.threads_per_shard, res.device, max(1, processes))
    for runner in runners:
        runner.start()  # every child imports torch at once, not one after another
    todo = _routed(itertools.chain([first], pending), runners[0].domain, unavailable)
    out: queue.Queue[Any] = queue.Queue()
    inboxes: dict[int, queue.Queue[ShardJob | None]] = {id(r): queue.Queue() for r in runners}
    threads = [
        threading.Thread(target=_slot, args=(r, inboxes[id(r)], out), name=f"sisa-slot-{i}", daemon=True)
        for i, r in enumerate(runners)
    ]
    for thread in threads:
        thread.start()
    free, busy, ok = list(runners), 0, False
    log.info("training in %d pinned local processes", len(runners))
    try:
        while True:
            while free:  # hand a job to every free slot; its slices are read here, in the store's thread
                job = next(todo, None)
                if job is None:
                    break
                inboxes[id(free.pop())].put(local_runner.materialise(job))
                busy += 1
            if not busy:
                break
            kind, payload = out.get()
            if kind == "stage":
                on_stage(payload)
            elif kind == "done":
                busy -= 1
                free.append(payload)
            else:
                raise payload
        ok = True
    finally:
        if not ok:
            # A failure or an interrupt: end the children still training (their threads then see
            # EOF and stop), so nothing trains on after the caller gave up.
            for runner in runners:
                runner.close(kill=True)
        for runner in runners:
            inboxes[id(runner)].put(None)
        for thread in threads:
            thread.join()
