"""Where shard jobs train, and training them there: in this process, in pinned local processes, or on Ray.

:func:`plan_runner` picks the runner of a plan (a named address decides; else ``SISA_RUNNER``,
else the plan's predicted costs), and :func:`execute` runs the jobs on it. The Ray session
(joining, starting and ending Ray) is :mod:`sisa.train.ray_session`, and the Ray runner (ship,
schedule, retry) :mod:`sisa.train.ray_runner`; both are re-exported here, so callers use one
module for "train these jobs" and Ray is imported only by those that train.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import ray

from sisa.config.settings import ResourcesConfig
from sisa.errors import ConfigError
from sisa.train import local_runner, parallel_runner, routing, runner_choice
from sisa.train.domain import pinned_from_start
from sisa.train.jobs import ShardJob, StageResult
from sisa.train.ray_runner import RemoteSlices, Retry, Unavailable, gpu_assignment_problem, refuse, run_jobs, ship
from sisa.train.ray_session import (
    LOCAL,
    abandon_local_instance,
    connect,
    connect_unless_local,
    named_address,
    shutdown,
    started_local_instance,
)

__all__ = [
    "LOCAL",
    "PARALLEL",
    "RUNNER_ENV",
    "RemoteSlices",
    "Retry",
    "Unavailable",
    "abandon_local_instance",
    "available_domains",
    "choose_runner",
    "connect",
    "connect_unless_local",
    "execute",
    "gpu_assignment_problem",
    "plan_runner",
    "run_jobs",
    "runner_override",
    "ship",
    "shutdown",
    "started_local_instance",
]

# The runner that trains shards side by side in pinned local processes (:mod:`sisa.train.parallel_runner`).
PARALLEL = "parallel"

# Overrides the runner chosen when no address is given: ``ray`` (always a local Ray instance),
# ``local`` (always one local process, one shard after another), ``parallel`` (always pinned local
# processes side by side) or ``auto`` (the default: from the plan's costs, :func:`plan_runner`).
RUNNER_ENV = "SISA_RUNNER"
_RUNNERS = ("auto", "ray", LOCAL, PARALLEL)

# Without an address nor measured costs (a first fit), plans that train at most this many shards
# run without Ray: Ray could only run them one after another too, so it would add its start-up.
LOCAL_MAX_SHARDS = 1

log = logging.getLogger(__name__)


def runner_override() -> str:
    """``SISA_RUNNER`` (``auto`` when unset).

    Raises:
        ConfigError: On a value other than ``auto``, ``ray`` or ``local``.
    """
    value = (os.environ.get(RUNNER_ENV) or "auto").strip().lower()
    if value not in _RUNNERS:
        raise ConfigError(f"{RUNNER_ENV}={value!r} must be one of {', '.join(_RUNNERS)} (unset: auto)")
    return value


def plan_runner(
    address: str | None,
    planned: int,
    seconds: Sequence[float] | None = None,
    res: ResourcesConfig | None = None,
) -> runner_choice.Choice:
    """Where a plan of ``planned`` shard jobs trains: ``ray``, ``local`` or ``parallel``, and in how many processes.

    A named address decides (``local``: one local process; any other: that cluster). Without
    one (no ``address``, no ``RAY_ADDRESS``): ``SISA_RUNNER=ray|local|parallel`` forces a runner;
    else a process that already has Ray up keeps using it (no start-up to save); else the plan's
    predicted costs do (:func:`sisa.train.runner_choice.choose`: one process one shard after
    another, pinned processes side by side, or a new local Ray instance, whichever is predicted
    to finish first). Without measured costs (a store that never trained) a plan of at most
    :data:`LOCAL_MAX_SHARDS` shard runs locally and a bigger one starts Ray. Every runner trains the
    same :func:`~sisa.train.trainer.train_shard` in the same pinned domain, so the bytes do not
    depend on this choice (tested).

    Args:
        address: The caller's address (see :func:`connect`), or None.
        planned: Number of shard jobs the plan holds.
        seconds: Predicted compute seconds of each planned shard
            (:func:`sisa.train.runner_choice.predict_seconds`), or None when unknown.
        res: The config's resources (threads per shard, device, pins); needed with ``seconds``.

    Returns:
        The choice.

    Raises:
        ConfigError: On a bad ``SISA_RUNNER``.
    """
    named = named_address(address)
    if named is not None:
        return runner_choice.Choice(LOCAL if named == LOCAL else "ray", 1)
    forced = runner_override()
    setting = _setting(res) if res is not None else runner_choice.Setting(cores=runner_choice.usable_cores())
    if forced == PARALLEL:
        return runner_choice.Choice(PARALLEL, max(1, min(setting.slots, planned)))
    if forced != "auto":
        return runner_choice.Choice(forced, 1)
    if ray.is_initialized():
        return runner_choice.Choice("ray", planned)
    if res is not None and res.device == "cuda" and not _has_cuda():
        # A GPU store driven from a machine without CUDA (a laptop, a CPU head node): its shards
        # can only train on the cluster's GPU nodes, never here.
        log.info("no CUDA device in this process: the GPU store's %d shard job(s) go to Ray", planned)
        return runner_choice.Choice("ray", planned)
    if seconds is None or res is None:
        return runner_choice.Choice(LOCAL if planned <= LOCAL_MAX_SHARDS else "ray", 1)
    choice = runner_choice.choose(seconds, setting)
    log.info(
        "runner %s (%d process(es)); predicted seconds %s",
        choice.runner,
        choice.processes,
        {k: round(v, 2) for k, v in choice.predicted.items()},
    )
    return choice


def _has_cuda() -> bool:
    """Whether this process can train on CUDA (asks the driver; creates no CUDA context)."""
    import torch

    return bool(torch.cuda.is_available())


def _setting(res: ResourcesConfig) -> runner_choice.Setting:
    """This process's cores and what of the local runners is already warm, for ``res``'s jobs."""
    in_place, warm = local_runner.warm_children(res.cpu_isa, res.threads_per_shard, res.device)
    return runner_choice.Setting(
        cores=runner_choice.usable_cores(),
        threads_per_shard=res.threads_per_shard,
        device=res.device,
        in_place=in_place or pinned_from_start(res.cpu_isa, res.device),
        warm_children=warm,
    )


def choose_runner(
    address: str | None, planned: int, seconds: Sequence[float] | None = None, res: ResourcesConfig | None = None
) -> str:
    """The runner of :func:`plan_runner`: ``ray``, ``local`` or ``parallel``."""
    return plan_runner(address, planned, seconds, res).runner


def execute(
    address: str | None,
    jobs: Iterable[ShardJob],
    on_stage: Callable[[StageResult], None],
    unavailable: Unavailable | None = None,
    *,
    runner: str | None = None,
    processes: int | None = None,
) -> list[Retry]:
    """Train ``jobs`` on Ray at ``address``, or without Ray when ``address`` (or ``runner``) is ``local``.

    The local mode runs the very same :func:`~sisa.train.trainer.train_shard` (in this
    process when it started with the config's pins, else in one pinned child process:
    :mod:`sisa.train.local_runner`), so its checkpoints are bit-identical to Ray's in the same
    domain (tested); it suits debugging, notebooks and tiny data.

    Args:
        address: Ray address (see :func:`connect`), ``local``, or None.
        jobs: One job per shard; may be a lazy iterator (pulled one job at a time).
        on_stage: Called for each finished stage (it commits the stage).
        unavailable: For a job whose ``domain`` no node offers (default: raise
            :class:`~sisa.errors.DomainUnavailableError`).
        runner: ``local``, ``parallel`` or ``ray``, as :func:`plan_runner` chose from the plan;
            None: ``local`` only when the address names it.
        processes: Processes of the ``parallel`` runner (default: one per free core).

    Returns:
        The resubmissions after lost workers (:func:`run_jobs`); none in local mode.
    """
    unavailable = unavailable or refuse
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:
        return []  # nothing to train: no Ray start-up (or child process) either
    if runner == PARALLEL:
        res = first.config.resources
        slots = processes or _setting(res).slots
        parallel_runner.run(itertools.chain([first], jobs), on_stage, unavailable, slots)
        return []
    if runner == LOCAL or (runner is None and named_address(address) == LOCAL):
        res = first.config.resources
        here = local_runner.shared(res.cpu_isa, res.threads_per_shard, res.device)
        for job in itertools.chain([first], jobs):
            routed: ShardJob | None = job
            if job.domain is not None and job.domain != here.domain.id:
                routed = unavailable(job, [here.domain])
            if routed is None:
                continue
            for result in here.train(routed):
                on_stage(result)
        return []
    connect(address)
    return run_jobs(itertools.chain([first], jobs), on_stage, unavailable)


def available_domains(address: str | None, res: ResourcesConfig) -> list[routing.DomainNodes]:
    """The determinism domains shard tasks can train in at ``address``, with their nodes.

    Args:
        address: Ray address, ``local`` (this machine without Ray) or None.
        res: The resources section (pins, threads, device, task shape).

    Returns:
        One entry per domain; in local mode the one domain local training uses (node ``local``).
    """
    if (address or os.environ.get("RAY_ADDRESS")) == LOCAL:
        runner = local_runner.shared(res.cpu_isa, res.threads_per_shard, res.device)
        return [routing.DomainNodes(runner.domain, (LOCAL,))]
    connect(address)
    return list(routing.probe_cluster(res).values())
