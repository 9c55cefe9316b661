"""Which runner trains a plan without a named address: the one its predicted wall time is lowest on.

Three runners train the same :func:`~sisa.train.trainer.train_shard` in the same pinned domain,
so the choice changes the time, never the bytes (tested):

* ``local``: one process, one shard after another (in place when the caller started with the
  pins, else in one pinned child kept for the life of the process: :mod:`sisa.train.local_runner`);
* ``parallel``: up to ``cores // threads_per_shard`` pinned child processes side by side
  (:mod:`sisa.train.parallel_runner`), also kept for the life of the process;
* ``ray``: a new local Ray instance, one task per shard.

The rule, with ``c`` the predicted compute seconds of each planned shard and ``P`` the slots::

    local    = sum(c)                       + CHILD_START_SECONDS  unless it trains in place or its child is up
    parallel = longest-first makespan(c, P) + CHILD_START_SECONDS  unless P children are up already
    ray      = longest-first makespan(c, P) + RAY_START_SECONDS

and the smallest wins (ties go to the simpler runner, in that order). ``c`` comes from what the
store measured: its stage records hold each stage's compute seconds and sample-epochs, so their
ratio times the work the cost model counts for a restart (:func:`sisa.partition.cost_model.shard_work`)
predicts a retrain (:func:`predict_seconds`). A store with no trained stage yet (a first fit)
has no such measure; then a plan of one shard stays local and a bigger one starts Ray, as
before. A GPU job never runs ``parallel`` (the children would share one device unmanaged).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sisa.partition.cost_model import shard_work

__all__ = [
    "CHILD_START_SECONDS",
    "RAY_START_SECONDS",
    "Choice",
    "Setting",
    "choose",
    "makespan",
    "predict_seconds",
    "seconds_per_sample_epoch",
    "usable_cores",
]

# Wall seconds, measured on the project's 2-core machine (torch 2.13 CPU, Ray 2.x), that a runner
# pays before its first stage trains:
# - a pinned child process: Python + torch import and the answer to its domain probe, 1.1 s;
#   with the first optimizer steps' imports, about 1.5 s.
# - a new local Ray instance: ray.init 3.9 s, the first pinned worker (a torch import) 1.6 s, and
#   the other shard workers starting beside it, about 1.5 s more: 7 s (its teardown is not waited for).
CHILD_START_SECONDS = 1.5
RAY_START_SECONDS = 7.0

_ORDER = ("local", "parallel", "ray")  # ties go to the simpler runner


@dataclass(frozen=True)
class Setting:
    """What the choice knows besides the plan's predicted seconds.

    Attributes:
        cores: CPU cores this process may use (:func:`usable_cores`).
        threads_per_shard: ``resources.threads_per_shard``: one shard's process uses this many.
        device: ``cpu`` or ``cuda``.
        in_place: The sequential runner trains in this process (it started with the pins).
        warm_children: Pinned child processes of this process already up (sequential and
            parallel ones): they cost no start.
        ray_start: Seconds a new local Ray instance costs (:data:`RAY_START_SECONDS`).
        child_start: Seconds a new pinned child costs (:data:`CHILD_START_SECONDS`).
    """

    cores: int
    threads_per_shard: int = 1
    device: str = "cpu"
    in_place: bool = False
    warm_children: int = 0
    ray_start: float = RAY_START_SECONDS
    child_start: float = CHILD_START_SECONDS

    @property
    def slots(self) -> int:
        """Shards that can train side by side without sharing a core."""
        return max(1, self.cores // max(1, self.threads_per_shard))


@dataclass(frozen=True)
class Choice:
    """The runner chosen and why.

    Attributes:
        runner: ``local``, ``parallel`` or ``ray``.
        processes: Processes the plan trains in (1 for ``local``).
        predicted: Runner -> predicted wall seconds (the runners considered).
    """

    runner: str
    processes: int
    predicted: dict[str, float] = field(default_factory=dict)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def makespan(seconds: Sequence[float], slots: int) -> float:
    """Wall time of ``seconds`` on ``slots`` workers, each job to the least loaded, longest first.

    Longest-processing-time-first is how a pool that takes the next job when a slot frees behaves
    when jobs arrive sorted; it is within 4/3 of the best split.
    """
    loads = [0.0] * max(1, min(slots, len(seconds)))
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads, default=0.0)


def choose(seconds: Sequence[float], setting: Setting) -> Choice:
    """The runner with the lowest predicted wall time for shards predicted to take ``seconds`` each.

    A pure function of its arguments (the module docstring states the rule).

    Args:
        seconds: Predicted compute seconds of each planned shard.
        setting: Cores, threads, device and what is already warm.

    Returns:
        The choice, with every runner's prediction.
    """
    slots = min(setting.slots, len(seconds)) if seconds else 1
    local = sum(seconds) + (0.0 if setting.in_place or setting.warm_children >= 1 else setting.child_start)
    predicted = {"local": local}
    if slots > 1:
        span = makespan(seconds, slots)
        if setting.device == "cpu":
            predicted["parallel"] = span + (0.0 if setting.warm_children >= slots else setting.child_start)
        predicted["ray"] = span + setting.ray_start
    best = min(predicted, key=lambda r: (predicted[r], _ORDER.index(r)))
    return Choice(best, slots if best != "local" else 1, predicted)


def seconds_per_sample_epoch(records: Iterable[Mapping[str, object]]) -> float | None:
    """Measured compute seconds per sample-epoch over stage records (``seconds``, ``n_samples``, ``epochs``).

    Returns:
        The ratio of their sums, or None when they hold no work (nothing trained yet).
    """
    seconds = work = 0.0
    for r in records:
        seconds += float(r.get("seconds") or 0.0)  # type: ignore[arg-type]
        work += float(r.get("n_samples") or 0) * float(r.get("epochs") or 0)  # type: ignore[arg-type]
    return seconds / work if work > 0 and seconds > 0 else None


def predict_seconds(
    plan: Sequence[tuple[int, int]],
    slice_sizes: Mapping[int, Sequence[int]],
    epochs: int | Mapping[int, int],
    rate: float,
) -> list[float]:
    """Predicted compute seconds of each ``(shard, start_stage)`` of a plan.

    Args:
        plan: Shards and the stages already done (training starts at ``start_stage + 1``).
        slice_sizes: Shard -> samples in each of its slices now.
        epochs: Epochs per stage (per shard when a mapping).
        rate: Seconds per sample-epoch (:func:`seconds_per_sample_epoch`).

    Returns:
        One number per plan entry: the cost model's work for that restart times ``rate``.
    """
    out = []
    for shard, start in plan:
        work = shard_work(list(slice_sizes[shard]), epochs if isinstance(epochs, int) else epochs[shard])
        out.append(rate * work[start] if start < len(work) else 0.0)
    return out
