"""The one Ray module: fan shard jobs out as Ray tasks and stream stage checkpoints back.

Each shard is one streaming-generator task that yields a checkpoint per stage, so the
driver commits every finished stage as it arrives and a crash loses at most the stage
in progress. Data and checkpoints travel through Ray's object store; no worker
touches the store directory, so no shared filesystem is assumed between nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from sisa.errors import SisaError, TrainingError
from sisa.trainer import ShardJob, StageResult, train_shard

__all__ = ["connect", "run_jobs", "shutdown"]

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join a Ray cluster, or start a local instance, unless Ray is already up.

    Args:
        address: Ray address (``auto``, ``ray://host:10001``, ``host:6379``); falls
            back to ``RAY_ADDRESS`` and then to a new local instance.
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


def shutdown() -> None:
    """Stop the Ray instance this process started or joined."""
    if ray.is_initialized():
        ray.shutdown()


@ray.remote
def _shard_task(job: ShardJob) -> Iterator[StageResult]:
    # A plain generator: Ray streams each yield back as its own object, and on a
    # retry it replays the generator, which yields the same bytes (determinism).
    yield from train_shard(job)


def run_jobs(
    jobs: Sequence[ShardJob],
    on_stage: Callable[[StageResult], None],
) -> None:
    """Train every job as its own Ray task, calling ``on_stage`` as stages finish.

    Args:
        jobs: One job per shard to (re)train.
        on_stage: Called in the driver for each finished stage, in completion
            order across shards and stage order within a shard. It commits the
            stage; if it raises, the remaining tasks are cancelled.

    Raises:
        TrainingError: If a task fails after its retries.
        SisaError: Whatever ``on_stage`` raised, or a sisa error from a task.
    """
    if not jobs:
        return
    pending: list[Any] = []
    owner: dict[int, int] = {}
    for job in jobs:
        res = job.config.resources
        gen: Any = _shard_task.options(
            num_cpus=res.cpus_per_shard,
            num_gpus=res.gpus_per_shard,
            max_retries=res.max_retries,
            retry_exceptions=False,  # a bug in training is not fixed by running it again
            name=f"sisa-shard-{job.shard}",
        ).remote(job)
        owner[id(gen)] = job.shard
        pending.append(gen)
    try:
        while pending:
            # ray.wait on streaming generators: ready when their next item (or end) is available.
            ready, pending = ray.wait(pending, num_returns=1)
            for gen in ready:
                try:
                    ref = next(gen)
                except StopIteration:
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
                        f"shard {owner[id(gen)]} failed after {jobs[0].config.resources.max_retries} retries: {exc}"
                    ) from exc
                on_stage(result)
                pending.append(gen)
    finally:
        for gen in pending:
            ray.cancel(gen, force=True)
