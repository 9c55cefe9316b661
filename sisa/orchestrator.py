"""The one Ray module: fan shard jobs out as Ray tasks and stream stage checkpoints back.

Each shard is one streaming-generator task that yields a checkpoint per stage, so the
driver commits every finished stage as it arrives and a crash loses at most the stage
in progress. Data and checkpoints travel through Ray's object store; no worker
touches the store directory, so no shared filesystem is assumed between nodes.

Jobs are pulled from their iterator only when they are submitted (at most
``resources.max_shards_in_flight`` at a time), and with ``resources.stream_slices``
each slice travels as its own object that the task fetches when its stage starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from sisa.errors import SisaError, TrainingError
from sisa.trainer import LazySlices, ShardJob, SliceData, StageResult, train_shard

__all__ = ["LOCAL", "RemoteSlices", "connect", "execute", "run_jobs", "ship", "shutdown"]

# The address that trains in the calling process, one shard after another, without Ray.
LOCAL = "local"

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join a Ray cluster, or start a local instance, unless Ray is already up.

    Args:
        address: Ray address (``auto``, ``ray://host:10001``, ``host:6379``); falls
            back to ``RAY_ADDRESS`` and then to a new local instance. (``local``, no
            Ray at all, is handled by :func:`execute`.)
        num_cpus: CPUs of a new local instance (default: all cores).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        kwargs["num_cpus"] = num_cpus
    log.info("starting Ray (%s)", address or "local instance")
    ray.init(address=address, **kwargs)


def execute(address: str | None, jobs: Iterable[ShardJob], on_stage: Callable[[StageResult], None]) -> None:
    """Train ``jobs`` on Ray at ``address``, or in this process when ``address`` is ``local``.

    The local mode runs the very same :func:`~sisa.trainer.train_shard`, so its
    checkpoints are bit-identical to Ray's (tested); it suits debugging, notebooks and
    tiny data, and it starts in no time because no Ray instance or worker is needed.

    Args:
        address: Ray address (see :func:`connect`), ``local``, or None.
        jobs: One job per shard; may be a lazy iterator (pulled one job at a time).
        on_stage: Called for each finished stage (it commits the stage).
    """
    if (address or os.environ.get("RAY_ADDRESS")) == LOCAL:
        for job in jobs:
            for result in train_shard(job):
                on_stage(result)
        return
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:
        return  # nothing to train: no Ray start-up either
    connect(address)
    run_jobs(itertools.chain([first], jobs), on_stage)


def shutdown() -> None:
    """Stop the Ray instance this process started or joined."""
    if ray.is_initialized():
        ray.shutdown()


class RemoteSlices(LazySlices):
    """A shard's slices as object refs, fetched in the task one slice at a time.

    Indexing slice r gets it from the object store (pulled to this node if it lives
    elsewhere) and starts fetching slice r+1 in the background, so the transfer of the
    next slice overlaps the training of this stage. Only the refs are pickled.

    Args:
        refs: One object ref per slice, each holding a :class:`~sisa.trainer.SliceData`.
    """

    def __init__(self, refs: Sequence[Any]) -> None:
        self.refs = tuple(refs)
        self._ahead: tuple[int, Future[SliceData]] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, index: int) -> SliceData:
        """Get slice ``index`` (prefetched if it was next) and start fetching the one after."""
        if self._ahead is not None and self._ahead[0] == index:
            part = self._ahead[1].result()
        else:
            part = ray.get(self.refs[index])
        self._ahead = None
        if index + 1 < len(self.refs):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sisa-prefetch")
            self._ahead = (index + 1, self._pool.submit(ray.get, self.refs[index + 1]))
        elif self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        return part

    def __getstate__(self) -> dict[str, Any]:
        return {"refs": self.refs}  # never the prefetch thread or its pending result

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["refs"])  # type: ignore[misc]


def ship(job: ShardJob) -> ShardJob:
    """The job as it travels to a task: its slices loaded, or put one by one as refs.

    With ``resources.stream_slices`` each slice is read and put into the object store
    on its own, so the driver holds one slice at a time and the task fetches slice r
    when stage r starts; otherwise the whole shard goes as one argument.

    Args:
        job: A job whose slices may be lazy (read from the store on indexing).

    Returns:
        A picklable job with the same content.
    """
    if job.config.resources.stream_slices:
        refs = [ray.put(job.slices[r]) for r in range(len(job.slices))]
        return dataclasses.replace(job, slices=RemoteSlices(refs), slice_sizes=job.sizes())
    return dataclasses.replace(job, slices=tuple(job.slices[r] for r in range(len(job.slices))))


@ray.remote
def _shard_task(job: ShardJob) -> Iterator[StageResult]:
    # A plain generator: Ray streams each yield back as its own object, and on a
    # retry it replays the generator, which yields the same bytes (determinism).
    yield from train_shard(job)


def _warn_missing_resources(custom: dict[str, float]) -> None:
    # Not an error: an autoscaler (KubeRay) may add a node that offers it; until then the tasks wait.
    have = ray.cluster_resources()
    for name, amount in custom.items():
        if have.get(name, 0) < amount:
            log.warning(
                "no node of this Ray cluster offers resources.custom.%s=%s yet; shard tasks wait until one joins "
                "(start nodes with ray start --resources='{\"%s\": N}')",
                name,
                amount,
                name,
            )


def run_jobs(
    jobs: Iterable[ShardJob],
    on_stage: Callable[[StageResult], None],
) -> None:
    """Train every job as its own Ray task, calling ``on_stage`` as stages finish.

    Jobs are pulled from ``jobs`` and shipped (:func:`ship`) only when they are
    submitted: all at once, or ``resources.max_shards_in_flight`` at a time, the next
    as soon as a task finishes. So the driver loads one shard's data at a time.

    Args:
        jobs: One job per shard to (re)train; may be a lazy iterator. All share one config.
        on_stage: Called in the driver for each finished stage, in completion
            order across shards and stage order within a shard. It commits the
            stage; if it raises, the remaining tasks are cancelled.

    Raises:
        TrainingError: If a task fails after its retries.
        SisaError: Whatever ``on_stage`` raised, or a sisa error from a task.
    """
    queue = iter(jobs)
    first = next(queue, None)
    if first is None:
        return
    res = first.config.resources
    _warn_missing_resources(res.custom)
    limit = res.max_shards_in_flight or None
    queue = itertools.chain([first], queue)
    pending: list[Any] = []
    owner: dict[int, int] = {}

    def submit_more() -> None:
        while limit is None or len(pending) < limit:
            job = next(queue, None)
            if job is None:
                return
            gen: Any = _shard_task.options(
                num_cpus=res.cpus_per_shard,
                num_gpus=res.gpus_per_shard,
                resources=dict(res.custom),  # e.g. {"sisa_worker": 1}: only nodes that offer it run shards
                max_retries=res.max_retries,
                retry_exceptions=False,  # a bug in training is not fixed by running it again
                name=f"sisa-shard-{job.shard}",
            ).remote(ship(job))
            owner[id(gen)] = job.shard
            pending.append(gen)

    try:
        submit_more()
        while pending:
            # ray.wait on streaming generators: ready when their next item (or end) is available.
            ready: list[Any]
            ready, pending = ray.wait(pending, num_returns=1)
            for gen in ready:
                try:
                    ref = next(gen)
                except StopIteration:
                    submit_more()  # a slot is free
                    continue
                try:
                    result: StageResult = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, SisaError):
                        raise cause from exc
                    raise TrainingError(f"shard {owner[id(gen)]} failed: {cause}") from exc
                except ray.exceptions.RayError as exc:
                    raise TrainingError(
                        f"shard {owner[id(gen)]} failed after {res.max_retries} retries: {exc}"
                    ) from exc
                on_stage(result)
                pending.append(gen)
    finally:
        for gen in pending:
            ray.cancel(gen, force=True)
