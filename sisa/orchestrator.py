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

__all__ = ["LOCAL", "connect", "execute", "run_jobs", "shutdown"]

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


def execute(address: str | None, jobs: Sequence[ShardJob], on_stage: Callable[[StageResult], None]) -> None:
    """Train ``jobs`` on Ray at ``address``, or in this process when ``address`` is ``local``.

    The local mode runs the very same :func:`~sisa.trainer.train_shard`, so its
    checkpoints are bit-identical to Ray's (tested); it suits debugging, notebooks and
    tiny data, and it starts in no time because no Ray instance or worker is needed.

    Args:
        address: Ray address (see :func:`connect`), ``local``, or None.
        jobs: One job per shard.
        on_stage: Called for each finished stage (it commits the stage).
    """
    if not jobs:
        return
    if (address or os.environ.get("RAY_ADDRESS")) == LOCAL:
        for job in jobs:
            for result in train_shard(job):
                on_stage(result)
        return
    connect(address)
    run_jobs(jobs, on_stage)


def shutdown() -> None:
    """Stop the Ray instance this process started or joined."""
    if ray.is_initialized():
        ray.shutdown()


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
    _warn_missing_resources(jobs[0].config.resources.custom)
    pending: list[Any] = []
    owner: dict[int, int] = {}
    for job in jobs:
        res = job.config.resources
        gen: Any = _shard_task.options(
            num_cpus=res.cpus_per_shard,
            num_gpus=res.gpus_per_shard,
            resources=dict(res.custom),  # e.g. {"sisa_worker": 1}: only nodes that offer it run shards
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
