"""Ray's runner: each shard job a streaming Ray task, its stage checkpoints streamed back, lost workers retried.

Each shard is one streaming-generator task that yields a checkpoint per stage, so the
driver commits every finished stage as it arrives and a crash loses at most the stage
in progress. Data and checkpoints travel through Ray's object store (:func:`ship`); no
worker touches the store directory, so no shared filesystem is assumed between nodes.

Jobs are pulled from their iterator only when they are submitted (at most
``resources.max_shards_in_flight`` at a time), and with ``resources.stream_slices``
each slice travels as its own object that the task fetches when its stage starts.
When a task's worker or node dies, the driver resubmits the shard from the last stage
it received (it holds that checkpoint), so a death costs at most the stage in progress.

Every task's worker is pinned to ``resources.cpu_isa`` before torch loads, and a job
that continues a checkpoint (or replays a live model) runs only on nodes of that
checkpoint's determinism domain (:mod:`sisa.train.routing`); when there is none, the caller's
``unavailable`` hook decides (rebind from scratch, skip, or refuse).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from sisa.config.settings import ResourcesConfig
from sisa.errors import DomainUnavailableError, GpuMemoryError, SisaError, TrainingError
from sisa.train import gpu, routing
from sisa.train.domain import Domain, unavailable_message
from sisa.train.jobs import LazySlices, ShardJob, SliceData, StageResult
from sisa.train.trainer import train_shard

__all__ = ["RemoteSlices", "Retry", "Unavailable", "gpu_assignment_problem", "refuse", "run_jobs", "ship"]

# Called for a job whose determinism domain no node offers, with the domains that exist: returns
# the job to run instead (a rebind from scratch), None to skip it, or raises.
Unavailable = Callable[[ShardJob, list[Domain]], "ShardJob | None"]

log = logging.getLogger(__name__)

# Failures of the machinery, not of training: the worker process or its node died, or a stage
# result died with it. Retrying those on a live node can succeed; an exception raised by the
# training code (RayTaskError) would only repeat, and LocalRayletDiedError means this driver's own
# node is gone.
_LOST = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
)


@dataclasses.dataclass(frozen=True)
class Retry:
    """A shard task that lost its worker and was resubmitted.

    Attributes:
        shard: The shard.
        after_stage: The last stage the driver had received; the new task starts after it
            (from that stage's checkpoint), so only later stages are trained again.
        attempt: 1 for the first resubmission of this shard, and so on.
        error: The Ray error's class name (``WorkerCrashedError``, ``NodeDiedError``, ...).
    """

    shard: int
    after_stage: int
    attempt: int
    error: str


def refuse(job: ShardJob, available: list[Domain]) -> ShardJob | None:
    """The default :data:`Unavailable` hook: a job whose domain no node offers is an error.

    Raises:
        DomainUnavailableError: Naming the shard, the domain it needs and the ones there are.
    """
    raise DomainUnavailableError(unavailable_message(job.shard, None, job.domain or "?", available))


class RemoteSlices(LazySlices):
    """A shard's slices as object refs, fetched in the task one slice at a time.

    Indexing slice r gets it from the object store (pulled to this node if it lives
    elsewhere) and starts fetching slice r+1 in the background, so the transfer of the
    next slice overlaps the training of this stage. Only the refs are pickled.

    Args:
        refs: One object ref per slice, each holding a :class:`~sisa.train.jobs.SliceData`.
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


def ship(job: ShardJob, backbones: dict[str, Any] | None = None) -> ShardJob:
    """The job as it travels to a task: its slices loaded, or put one by one as refs.

    With ``resources.stream_slices`` each slice is read and put into the object store
    on its own, so the driver holds one slice at a time and the task fetches slice r
    when stage r starts; otherwise the whole shard goes as one argument. A shared
    backbone goes as a ref to one copy in the object store, which every task fetches.

    Args:
        job: A job whose slices may be lazy (read from the store on indexing).
        backbones: Digest -> ref of the backbones already put by the caller's run (filled
            here), so its S tasks and their retries share one copy instead of each carrying
            the weights in its argument.

    Returns:
        A picklable job with the same content.
    """
    if job.backbone is not None:
        held = {} if backbones is None else backbones
        ref = held.get(job.backbone.digest)
        if ref is None:
            ref = held[job.backbone.digest] = ray.put(job.backbone)
        job = dataclasses.replace(job, backbone=None, backbone_ref=ref)
    if job.config.resources.stream_slices:
        refs = [ray.put(job.slices[r]) for r in range(len(job.slices))]
        return dataclasses.replace(job, slices=RemoteSlices(refs), slice_sizes=job.sizes())
    return dataclasses.replace(job, slices=tuple(job.slices[r] for r in range(len(job.slices))))


def _train_in_task(job: ShardJob) -> Iterator[StageResult]:
    # A plain generator: Ray streams each yield back as its own object. Ray itself never
    # retries it (max_retries=0): run_jobs resubmits from the last stage it received.
    if job.backbone_ref is not None:
        job = dataclasses.replace(job, backbone=ray.get(job.backbone_ref), backbone_ref=None)
    yield from train_shard(job)


@ray.remote
def _shard_task(job: ShardJob) -> Iterator[StageResult]:
    yield from _train_in_task(job)


# A GPU shard gets a fresh worker (max_calls=1, which .options() cannot set): a reused worker
# keeps the CUDA context of the GPU it first saw and ignores the next task's CUDA_VISIBLE_DEVICES.
@ray.remote(max_calls=1)
def _gpu_shard_task(job: ShardJob) -> Iterator[StageResult]:
    import torch

    problem = gpu_assignment_problem(
        [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_initialized()
    )
    if problem is not None:
        raise TrainingError(f"shard {job.shard}: {problem}; it refused to train")
    try:
        yield from _train_in_task(job)
    finally:
        gpu.release_cached_memory()


def gpu_assignment_problem(assigned: Sequence[str], visible: str | None, cuda_started: bool) -> str | None:
    """Why a GPU task's worker might train on another GPU than Ray gave it, or None when it cannot.

    Args:
        assigned: ``ray.get_gpu_ids()`` of the task, as strings.
        visible: ``CUDA_VISIBLE_DEVICES`` in the worker (Ray sets it to the assigned ids).
        cuda_started: Whether CUDA was already initialised in the worker before the task ran.

    Returns:
        The problem in words, or None.
    """
    if not assigned:
        return "Ray assigned this GPU task no GPU"
    if cuda_started:
        return "its worker had CUDA initialised by an earlier task (a reused worker may be on another GPU)"
    if visible is None or visible.split(",") != list(assigned):
        return f"CUDA_VISIBLE_DEVICES={visible!r} in its worker, but Ray assigned GPU(s) {','.join(assigned)}"
    return None


def _require_gpu_nodes(res: ResourcesConfig) -> None:
    """Refuse GPU shard tasks on a cluster where no node has a GPU: they would wait forever.

    Raises:
        TrainingError: Naming the share and the ways out.
    """
    need = min(res.gpus_per_shard, 1.0)
    if any(n.get("Alive") and n.get("Resources", {}).get("GPU", 0.0) >= need for n in ray.nodes()):
        return
    raise TrainingError(
        f"this store trains on GPUs (resources.gpus_per_shard={res.gpus_per_shard}), but no node of the Ray "
        "cluster offers a GPU, so its shard tasks would wait forever. Join a cluster with GPU nodes (--address; "
        "with an autoscaler, keep at least one GPU node up), or, for a store trained on the CPU, create a new "
        "store with resources.gpus_per_shard=0 (the device is part of the recipe)"
    )


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


class _Step(enum.Enum):
    """What a ready shard task had for the driver: the states of :func:`run_jobs`'s loop."""

    STAGE = "stage"  # a stage checkpoint: commit it, then wait for the task's next one
    FINISHED = "finished"  # the task ended: a slot is free for the next job
    OUT_OF_MEMORY = "out_of_memory"  # its GPU ran out: the others finish and commit first, nothing more starts
    LOST = "lost"  # its worker or node died: resubmit the shard from the last stage received


def run_jobs(
    jobs: Iterable[ShardJob],
    on_stage: Callable[[StageResult], None],
    unavailable: Unavailable | None = None,
) -> list[Retry]:
    """Train every job as its own Ray task, calling ``on_stage`` as stages finish.

    Jobs are pulled from ``jobs`` and shipped (:func:`ship`) only when they are
    submitted: all at once, or ``resources.max_shards_in_flight`` at a time, the next
    as soon as a task finishes. So the driver loads one shard's data at a time.

    When a task's worker or node dies (or a stage result is lost with it), the shard is
    resubmitted, up to ``resources.max_retries`` times, as a job that resumes from the
    last stage this function handed to ``on_stage``: the driver holds that checkpoint,
    and training from it yields the same bytes as an uninterrupted run (determinism),
    so a death costs only the stage in progress, not the shard. The resumed job must
    run in the domain of that stage, like any job with a ``domain``: such jobs go only
    to nodes of their domain (:func:`sisa.train.routing.probe_cluster`), and one whose domain
    has no node goes to ``unavailable``.

    Args:
        jobs: One job per shard to (re)train; may be a lazy iterator. All share one config.
        on_stage: Called in the driver for each finished stage, in completion
            order across shards and stage order within a shard, each stage once. It
            commits the stage; if it raises, the remaining tasks are cancelled.
        unavailable: For a job whose domain no node offers (default: raise
            :class:`~sisa.errors.DomainUnavailableError`).

    Returns:
        The resubmissions, in order (empty when no worker was lost).

    Raises:
        TrainingError: If a task fails in training, or loses its worker more than
            ``resources.max_retries`` times.
        SisaError: Whatever ``on_stage`` raised, or a sisa error from a task.
    """
    queue = iter(jobs)
    first = next(queue, None)
    if first is None:
        return []
    return _Scheduler(itertools.chain([first], queue), first.config.resources, on_stage, unavailable or refuse).run()


class _Scheduler:
    """One :func:`run_jobs` call: its tasks in flight, what each shard received, and the retries made."""

    def __init__(
        self,
        queue: Iterator[ShardJob],
        res: ResourcesConfig,
        on_stage: Callable[[StageResult], None],
        unavailable: Unavailable,
    ) -> None:
        self.queue = queue
        self.res = res
        self.on_stage = on_stage
        self.unavailable = unavailable
        self.limit = res.max_shards_in_flight or None
        self.pending: list[Any] = []  # the generators ray.wait watches
        # Every task submitted and not yet finished or cancelled, by id of its generator. ray.wait
        # takes a ready generator out of ``pending`` while its stage is committed; if the commit
        # raises, this is what still knows the task, so the cleanup in run() cancels it too.
        self.started: dict[int, Any] = {}
        self.owner: dict[int, int] = {}  # generator id -> shard
        # Per running shard: its (lazy) job and the last stage received, to resume from.
        self.running: dict[int, ShardJob] = {}
        self.received: dict[int, StageResult] = {}
        self.retries: list[Retry] = []
        self.domain_map: dict[str, routing.DomainNodes] | None = None
        self.backbones: dict[str, Any] = {}  # the shared backbone, put into the object store once for every task
        # Shards that ran out of GPU memory: the others finish their work (and commit it) first.
        self.out_of_memory: list[GpuMemoryError] = []

    def run(self) -> list[Retry]:
        """Submit, wait, commit and resubmit until every task has ended; the retries made."""
        _warn_missing_resources(self.res.custom)
        try:
            if self.res.device == "cuda":
                _require_gpu_nodes(self.res)
                # Probe every GPU node before a shard holds a share: a probe asks for the shard's
                # share too, and on a card packed by running shards it would wait for one.
                self.domain_map = routing.probe_cluster(self.res)
            self.submit_more()
            while self.pending:
                # ray.wait on streaming generators: ready when their next item (or end) is available.
                ready: list[Any]
                ready, self.pending = ray.wait(self.pending, num_returns=1)
                for gen in ready:
                    self.advance(gen)
        finally:
            # Normally empty here; after an error (a commit that raised, a failed task) it holds the
            # tasks still running, including the one whose stage was being committed.
            for gen in self.started.values():
                ray.cancel(gen, force=True)
        if self.out_of_memory:
            first, n = self.out_of_memory[0], len(self.out_of_memory)
            more = f" ({n} shards ran out; the first is shown)" if n > 1 else ""
            raise GpuMemoryError(f"{first}{more}") from first
        return self.retries

    def advance(self, gen: Any) -> None:
        """Act on what the ready task ``gen`` has: the loop's one transition."""
        shard = self.owner.pop(id(gen))
        step, value = _next_step(gen, shard)
        if step is _Step.STAGE:
            result = typing.cast(StageResult, value)
            self.on_stage(result)
            self.received[shard] = result
            self.owner[id(gen)] = shard
            self.pending.append(gen)
        elif step is _Step.FINISHED:
            self.started.pop(id(gen), None)
            self.running.pop(shard, None)
            self.received.pop(shard, None)
            self.submit_more()  # a slot is free
        elif step is _Step.OUT_OF_MEMORY:
            # Not the other shards' fault: let the running ones finish and commit,
            # submit nothing more, and say what to change once they are done.
            error = typing.cast(GpuMemoryError, value)
            log.error("%s", error)
            self.out_of_memory.append(error)
            self.started.pop(id(gen), None)
            self.running.pop(shard, None)
        else:
            ray.cancel(gen, force=True)  # whatever is left of it
            self.started.pop(id(gen), None)
            self.resubmit(shard, typing.cast(BaseException, value))

    def route(self, job: ShardJob) -> tuple[ShardJob | None, routing.DomainNodes | None]:
        """Where ``job`` may run: any node (no domain), its domain's nodes, or what ``unavailable`` says."""
        if job.domain is None:
            return job, None
        if self.domain_map is None or job.domain not in self.domain_map:
            self.domain_map = routing.probe_cluster(self.res)  # only nodes not probed before cost a task
        where = self.domain_map.get(job.domain)
        if where is not None:
            return job, where
        replacement = self.unavailable(job, [d.domain for d in self.domain_map.values()])
        if replacement is None or replacement.domain == job.domain:
            return None, None
        return self.route(replacement)

    def submit(self, job: ShardJob) -> bool:
        """Start ``job``'s task; False when the ``unavailable`` hook skipped it."""
        routed, where = self.route(job)
        if routed is None:
            return False  # the hook skipped it
        res = self.res
        task = _gpu_shard_task if res.device == "cuda" else _shard_task
        gen: Any = task.options(
            num_cpus=res.cpus_per_shard,
            num_gpus=res.gpus_per_shard,
            resources=dict(res.custom),  # e.g. {"sisa_worker": 1}: only nodes that offer it run shards
            max_retries=0,  # resubmitted here instead, from the last stage received (see run_jobs)
            retry_exceptions=False,  # a bug in training is not fixed by running it again
            name=f"sisa-shard-{routed.shard}",
            **routing.task_options(res, where),  # pinned worker; only its domain's nodes
        ).remote(ship(routed, self.backbones))
        self.running[routed.shard] = routed
        self.owner[id(gen)] = routed.shard
        self.started[id(gen)] = gen
        self.pending.append(gen)
        return True

    def submit_more(self) -> None:
        """Submit queued jobs while a slot is free and no shard has run out of GPU memory."""
        while not self.out_of_memory and (self.limit is None or len(self.pending) < self.limit):
            job = next(self.queue, None)
            if job is None:
                return
            self.submit(job)

    def resubmit(self, shard: int, exc: BaseException) -> None:
        """Submit ``shard`` again after its worker was lost, from the last stage received.

        Raises:
            TrainingError: When the shard has used up ``resources.max_retries``.
        """
        res = self.res
        attempt = 1 + sum(r.shard == shard for r in self.retries)
        if attempt > res.max_retries:
            raise TrainingError(
                f"shard {shard} lost its worker {attempt} times (resources.max_retries={res.max_retries}); last: {exc}"
            ) from exc
        job, last = self.running[shard], self.received.get(shard)
        if last is not None:
            job = dataclasses.replace(
                job,
                start_stage=last.stage,
                parent=last.checkpoint,
                parent_key=last.key,
                domain=last.domain.get("id"),  # continue in the domain that trained it
            )
        retry = Retry(shard=shard, after_stage=job.start_stage, attempt=attempt, error=type(exc).__name__)
        log.warning(
            "shard %d lost its worker (%s); resubmitting from stage %d, retry %d of %d",
            shard,
            retry.error,
            retry.after_stage,
            attempt,
            res.max_retries,
        )
        self.retries.append(retry)
        self.submit(job)


def _next_step(gen: Any, shard: int) -> tuple[_Step, StageResult | BaseException | None]:
    """The next item of a ready task's generator, as a step of the loop and its value.

    Raises:
        SisaError: A sisa error the task raised (other than running out of GPU memory).
        TrainingError: Any other failure of the task's training, or a Ray error that is not a lost worker.
    """
    try:
        ref = next(gen)
    except StopIteration:
        return _Step.FINISHED, None
    try:
        result: StageResult = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, GpuMemoryError):
            return _Step.OUT_OF_MEMORY, cause
        if isinstance(cause, SisaError):
            raise cause from exc
        raise TrainingError(f"shard {shard} failed: {cause}") from exc
    except _LOST as exc:
        return _Step.LOST, exc
    except ray.exceptions.RayError as exc:
        raise TrainingError(f"shard {shard} failed: {exc}") from exc
    return _Step.STAGE, result
