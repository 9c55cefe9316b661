"""The one Ray module: fan shard jobs out as Ray tasks and stream stage checkpoints back.

Each shard is one streaming-generator task that yields a checkpoint per stage, so the
driver commits every finished stage as it arrives and a crash loses at most the stage
in progress. Data and checkpoints travel through Ray's object store; no worker
touches the store directory, so no shared filesystem is assumed between nodes.

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

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from sisa.config.settings import ResourcesConfig
from sisa.errors import (
    ClusterConnectionError,
    ConfigError,
    DomainUnavailableError,
    GpuMemoryError,
    SisaError,
    TrainingError,
)
from sisa.train import gpu, local_runner, parallel_runner, routing, runner_choice
from sisa.train.domain import Domain, pinned_from_start, unavailable_message
from sisa.train.process_tree import kill_trees
from sisa.train.trainer import LazySlices, ShardJob, SliceData, StageResult, train_shard

__all__ = [
    "LOCAL",
    "PARALLEL",
    "RemoteSlices",
    "Retry",
    "Unavailable",
    "RUNNER_ENV",
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

# Called for a job whose determinism domain no node offers, with the domains that exist: returns
# the job to run instead (a rebind from scratch), None to skip it, or raises.
Unavailable = Callable[[ShardJob, list[Domain]], "ShardJob | None"]

# The address that trains in the calling process, one shard after another, without Ray.
LOCAL = "local"

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

# Set when this process started a local Ray instance itself (not when it joined a cluster).
_started_local = False

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


# Seconds to wait for the cluster's port to answer before giving up (a wrong host or port).
CONNECT_TIMEOUT = 10.0

_TOKEN_ADVICE = (
    "if the cluster uses token authentication (Ray 2.60 clusters do by default), set RAY_AUTH_MODE=token "
    "and give the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
    "(a token alone is not used for an explicit address)"
)


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a Ray address (``host:port``, ``ray://host[:port]``), or None if it names none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:  # ray://host: the Ray Client's default port
        return (rest, 10001) if address.startswith("ray://") and rest else None
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float) -> None:
    """Raise ClusterConnectionError unless ``address``'s port accepts a connection within ``timeout`` s.

    ``ray.init`` itself retries an address that does not answer for many minutes; this
    pre-check bounds that to ``timeout``.
    """
    if address == "auto":
        from ray._private import services

        try:
            address = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise ClusterConnectionError(
                f"--address auto found no running Ray cluster on this machine ({exc}); start one with "
                "`ray start --head`, or give its address (host:6379, printed by `ray start`)"
            ) from None
    where = _host_port(address)
    if where is None:
        return  # let ray.init judge the form
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise ClusterConnectionError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}, waited up to {timeout:g}s): check the "
            "address (the GCS address host:6379 that `ray start --head` prints, or ray://host:10001 for Ray Client; "
            "not the dashboard's http://host:8265) and that the cluster is running"
        ) from None


def connect(address: str | None = None, *, num_cpus: int | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Join a Ray cluster, or start a new local instance, unless Ray is already up.

    Without an address (nor ``RAY_ADDRESS``) this always starts a new local instance,
    also when a cluster was started on this machine with ``ray start`` (which a plain
    ``ray.init()`` would join): a cluster is joined only when it is named.

    Args:
        address: Ray address (``auto``, ``ray://host:10001``, ``host:6379``); falls
            back to ``RAY_ADDRESS`` and then to a new local instance. (``local``, no
            Ray at all, is handled by :func:`execute`.)
        num_cpus: CPUs of a new local instance (default: all cores).
        timeout: Seconds to wait for the cluster's port to answer.

    Raises:
        ClusterConnectionError: If the cluster does not answer within ``timeout`` seconds,
            or refuses to be joined (a missing auth token, say); the message names the
            address and the token settings.
    """
    global _started_local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        log.info("starting a local Ray instance")
        # Ray's own "local": a new instance, never a cluster `ray start` left on this machine.
        try:
            with _keeping_sigterm_handler():
                ray.init(address="local", num_cpus=num_cpus, **kwargs)
        # Ray raises a bare Exception when its node does not come up in time ("timed out during
        # startup ... GCS has become overloaded"): seen on a 2-core machine under load.
        except Exception as exc:
            raise ClusterConnectionError(
                f"could not start a local Ray instance ({exc}). The machine may be overloaded or short of "
                "shared memory (/dev/shm): retry when it is quieter, or train without Ray (--address local). "
                "Work already committed, and a deletion already journaled, are kept: the same command finishes them"
            ) from exc
        _started_local = True
        return
    _check_reachable(address, timeout)
    log.info("joining the Ray cluster at %s", address)
    try:
        with _keeping_sigterm_handler():
            ray.init(address=address, **kwargs)
    # ray.exceptions.RayError covers AuthenticationError: token mode without a token anywhere.
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, ray.exceptions.RayError) as exc:
        raise ClusterConnectionError(f"could not join the Ray cluster at {address} ({exc}); {_TOKEN_ADVICE}") from exc


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Keep the application's own SIGTERM handler in force through ``ray.init`` or ``ray.shutdown``.

    ``ray.init`` installs a SIGTERM handler that calls ``sys.exit(15)`` in the driver, and the
    local node it starts one that kills Ray's processes and calls ``sys.exit(1)``. Where the
    application has its own (the ``sisa`` command and its worker end a command with exit 143
    and say what was kept), Ray's would end the process silently in the middle of a deletion;
    worse, a SIGTERM landing while ``ray.init`` runs raises its ``SystemExit`` wherever the
    interpreter is, also inside a finaliser, where Python prints it as "ignored" and goes on:
    the signal was lost, and a worker told to end served on (seen under load). So, while the
    call runs, Ray's installer is turned into a no-op and the application's handler stays the
    one that runs. ``ray.shutdown`` resets SIGTERM to its default action below Python (Python
    still reports the old handler): the handler is installed again afterwards. A process
    without a handler of its own keeps Ray's.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    if not callable(before):
        yield
        return
    utils = ray._private.utils
    installer = getattr(utils, "set_sigterm_handler", None)
    if installer is not None:
        utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            # A Ray that installs its handler some other way turned SIGTERM into sys.exit(15):
            # deliver it to the application's handler instead, which raises what it expects.
            signal.signal(signal.SIGTERM, before)
            before(signal.SIGTERM, None)
        raise
    finally:
        if installer is not None:
            utils.set_sigterm_handler = installer
        signal.signal(signal.SIGTERM, before)


def _named(address: str | None) -> str | None:
    """The address in force: ``address``, else ``RAY_ADDRESS``, else None (nothing named)."""
    return address or os.environ.get("RAY_ADDRESS") or None


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
    named = _named(address)
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


def connect_unless_local(address: str | None) -> None:
    """Join the cluster ``address`` (or ``RAY_ADDRESS``) names, unless it names ``local`` or nothing.

    Called before a change that will need the cluster (a deletion is journaled only once
    its retrain can start), so a wrong address or a missing token fails before anything is
    written. Without an address nothing is started here: the plan decides later whether it
    needs a local Ray instance at all (:func:`choose_runner`), and starting one cannot fail
    for a wrong address.

    Raises:
        ClusterConnectionError: As :func:`connect`.
    """
    named = _named(address)
    if named is not None and named != LOCAL:
        connect(address)


def started_local_instance() -> bool:
    """Whether this process started a local Ray instance (not joined a cluster) that is still up."""
    return _started_local and ray.is_initialized()


def abandon_local_instance() -> bool:
    """Kill the local Ray instance this process started, at once, without waiting for it to stop.

    For a command-line process about to exit (``os._exit``): ``ray.shutdown()`` stops the
    instance gracefully and waits (about 1.4 s), which a finished command need not. Every
    process of the node (raylet, GCS, agents) and every descendant of theirs (workers, and
    whatever a task started) gets SIGKILL, so none is left running. Not for a library caller
    that goes on using Ray.

    Returns:
        Whether there was such an instance.
    """
    global _started_local
    if not started_local_instance():
        return False
    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public handle on the node
    if node is None:
        return False
    kill_trees({p.process.pid for procs in node.all_processes.values() for p in procs})
    _started_local = False
    return True


def _refuse(job: ShardJob, available: list[Domain]) -> ShardJob | None:
    raise DomainUnavailableError(unavailable_message(job.shard, None, job.domain or "?", available))


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
    unavailable = unavailable or _refuse
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:
        return []  # nothing to train: no Ray start-up (or child process) either
    if runner == PARALLEL:
        res = first.config.resources
        slots = processes or _setting(res).slots
        parallel_runner.run(itertools.chain([first], jobs), on_stage, unavailable, slots)
        return []
    if runner == LOCAL or (runner is None and _named(address) == LOCAL):
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


def shutdown() -> None:
    """Stop the Ray instance this process started or joined.

    Also forgets that this process started one, so a cluster joined later is never taken for
    a local instance of its own (which :func:`abandon_local_instance` would kill).
    """
    global _started_local
    if ray.is_initialized():
        with _keeping_sigterm_handler():
            ray.shutdown()
    _started_local = False


class RemoteSlices(LazySlices):
    """A shard's slices as object refs, fetched in the task one slice at a time.

    Indexing slice r gets it from the object store (pulled to this node if it lives
    elsewhere) and starts fetching slice r+1 in the background, so the transfer of the
    next slice overlaps the training of this stage. Only the refs are pickled.

    Args:
        refs: One object ref per slice, each holding a :class:`~sisa.train.trainer.SliceData`.
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
    res = first.config.resources
    _warn_missing_resources(res.custom)
    limit = res.max_shards_in_flight or None
    queue = itertools.chain([first], queue)
    pending: list[Any] = []
    # Every task submitted and not yet finished or cancelled, by id of its generator. ray.wait
    # takes a ready generator out of ``pending`` while its stage is committed; if the commit
    # raises, this is what still knows the task, so the cleanup below cancels it too.
    started: dict[int, Any] = {}
    owner: dict[int, int] = {}
    # Per running shard: its (lazy) job and the last stage received, to resume from.
    running: dict[int, ShardJob] = {}
    received: dict[int, StageResult] = {}
    retries: list[Retry] = []
    domain_map: dict[str, routing.DomainNodes] | None = None
    refuse_or = unavailable or _refuse
    backbones: dict[str, Any] = {}  # the shared backbone, put into the object store once for every task
    # Shards that ran out of GPU memory: the others finish their work (and commit it) first.
    out_of_memory: list[GpuMemoryError] = []

    def route(job: ShardJob) -> tuple[ShardJob | None, routing.DomainNodes | None]:
        nonlocal domain_map
        if job.domain is None:
            return job, None
        if domain_map is None or job.domain not in domain_map:
            domain_map = routing.probe_cluster(res)  # only nodes not probed before cost a task
        where = domain_map.get(job.domain)
        if where is not None:
            return job, where
        replacement = refuse_or(job, [d.domain for d in domain_map.values()])
        if replacement is None or replacement.domain == job.domain:
            return None, None
        return route(replacement)

    def submit(job: ShardJob) -> bool:
        routed, where = route(job)
        if routed is None:
            return False  # the hook skipped it
        task = _gpu_shard_task if res.device == "cuda" else _shard_task
        gen: Any = task.options(
            num_cpus=res.cpus_per_shard,
            num_gpus=res.gpus_per_shard,
            resources=dict(res.custom),  # e.g. {"sisa_worker": 1}: only nodes that offer it run shards
            max_retries=0,  # resubmitted here instead, from the last stage received (see above)
            retry_exceptions=False,  # a bug in training is not fixed by running it again
            name=f"sisa-shard-{routed.shard}",
            **routing.task_options(res, where),  # pinned worker; only its domain's nodes
        ).remote(ship(routed, backbones))
        running[routed.shard] = routed
        owner[id(gen)] = routed.shard
        started[id(gen)] = gen
        pending.append(gen)
        return True

    def submit_more() -> None:
        while not out_of_memory and (limit is None or len(pending) < limit):
            job = next(queue, None)
            if job is None:
                return
            submit(job)

    def resubmit(shard: int, exc: BaseException) -> None:
        attempt = 1 + sum(r.shard == shard for r in retries)
        if attempt > res.max_retries:
            raise TrainingError(
                f"shard {shard} lost its worker {attempt} times (resources.max_retries={res.max_retries}); last: {exc}"
            ) from exc
        job, last = running[shard], received.get(shard)
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
        retries.append(retry)
        submit(job)

    try:
        if res.device == "cuda":
            _require_gpu_nodes(res)
            # Probe every GPU node before a shard holds a share: a probe asks for the shard's
            # share too, and on a card packed by running shards it would wait for one.
            domain_map = routing.probe_cluster(res)
        submit_more()
        while pending:
            # ray.wait on streaming generators: ready when their next item (or end) is available.
            ready: list[Any]
            ready, pending = ray.wait(pending, num_returns=1)
            for gen in ready:
                shard = owner.pop(id(gen))
                try:
                    ref = next(gen)
                except StopIteration:
                    started.pop(id(gen), None)
                    running.pop(shard, None)
                    received.pop(shard, None)
                    submit_more()  # a slot is free
                    continue
                try:
                    result: StageResult = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, GpuMemoryError):
                        # Not the other shards' fault: let the running ones finish and commit,
                        # submit nothing more, and say what to change once they are done.
                        log.error("%s", cause)
                        out_of_memory.append(cause)
                        started.pop(id(gen), None)
                        running.pop(shard, None)
                        continue
                    if isinstance(cause, SisaError):
                        raise cause from exc
                    raise TrainingError(f"shard {shard} failed: {cause}") from exc
                except _LOST as exc:
                    ray.cancel(gen, force=True)  # whatever is left of it
                    started.pop(id(gen), None)
                    resubmit(shard, exc)
                    continue
                except ray.exceptions.RayError as exc:
                    raise TrainingError(f"shard {shard} failed: {exc}") from exc
                on_stage(result)
                received[shard] = result
                owner[id(gen)] = shard
                pending.append(gen)
    finally:
        # Normally empty here; after an error (a commit that raised, a failed task) it holds the
        # tasks still running, including the one whose stage was being committed.
        for gen in started.values():
            ray.cancel(gen, force=True)
    if out_of_memory:
        more = f" ({len(out_of_memory)} shards ran out; the first is shown)" if len(out_of_memory) > 1 else ""
        raise GpuMemoryError(f"{out_of_memory[0]}{more}") from out_of_memory[0]
    return retries
