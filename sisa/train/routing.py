"""Which Ray nodes train in which determinism domain, and how a shard task asks for one.

Nothing has to be set up on the nodes: the driver probes every alive node that can run a
shard task with a tiny task pinned exactly as the shard tasks are (same ``runtime_env``,
same GPU share), which reports the domain a worker there trains in. A shard that must
run in a domain then asks for those nodes through Ray's built-in ``ray.io/node-id`` label
(``label_selector``), so Ray still balances it across every node of its domain. Probes
are cached per node for the life of the driver process; nodes that join later are probed
when a job next needs a domain.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sisa.config.settings import ResourcesConfig
from sisa.train import domain as domains

__all__ = ["DomainNodes", "probe_cluster", "task_options"]

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
# A probe starts one worker process per node (torch import included); a node that cannot
# start one in this long is left out of the map rather than holding up the whole job.
PROBE_TIMEOUT_S = 120.0

# (node id, cpu_isa, threads, device) -> the domain its pinned workers train in.
_probed: dict[tuple[str, str, int, str], domains.Domain] = {}


@dataclasses.dataclass(frozen=True)
class DomainNodes:
    """One determinism domain and the nodes whose shard workers train in it.

    Attributes:
        domain: The domain.
        nodes: Ray node ids (hex).
    """

    domain: domains.Domain
    nodes: tuple[str, ...]


@ray.remote(max_retries=0)
def _probe(threads: int, device: str) -> domains.Domain:
    return domains.current(threads, device)


# A GPU probe gets a fresh worker, as a GPU shard task does (ray_runner._gpu_shard_task): a
# reused worker would report the GPU it first saw, and a probe that initialised CUDA must not
# hand its worker on to a shard of another GPU.
@ray.remote(max_retries=0, max_calls=1)
def _gpu_probe(threads: int, device: str) -> domains.Domain:
    return domains.current(threads, device)


def task_options(res: ResourcesConfig, domain: DomainNodes | None = None) -> dict[str, Any]:
    """Ray options that pin a shard task's worker and, given a domain, keep it on that domain's nodes.

    Args:
        res: The resources section (``cpu_isa`` chooses the pins).
        domain: The domain the task must run in; None: any node.

    Returns:
        Keyword arguments for ``.options()`` (``runtime_env`` and maybe ``label_selector``).
    """
    options: dict[str, Any] = {"runtime_env": {"env_vars": domains.pin_env(res.cpu_isa, res.device)}}
    if domain is not None:
        options["label_selector"] = {NODE_ID_LABEL: f"in({','.join(domain.nodes)})"}
    return options


def _can_run_shards(node: Mapping[str, Any], res: ResourcesConfig) -> bool:
    have = node.get("Resources", {})
    need = {"CPU": res.cpus_per_shard, "GPU": res.gpus_per_shard, **res.custom}
    return all(have.get(name, 0.0) >= amount for name, amount in need.items() if amount > 0)


def probe_cluster(res: ResourcesConfig) -> dict[str, DomainNodes]:
    """The domains of every alive node that can run a shard task, probed once per node.

    Args:
        res: The resources section: the shard task's shape and pins.

    Returns:
        Domain id -> the domain and its nodes. Empty when no node can run a shard.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive") and _can_run_shards(n, res)]
    device = res.device
    todo = {}
    for node in nodes:
        key = (node["NodeID"], res.cpu_isa, res.threads_per_shard, device)
        if key not in _probed:
            todo[key] = (
                (_gpu_probe if device == "cuda" else _probe)
                .options(
                    num_cpus=0,
                    num_gpus=res.gpus_per_shard,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                    **task_options(res),
                )
                .remote(res.threads_per_shard, device)
            )
    if todo:
        log.info("probing the determinism domain of %d node(s)", len(todo))
        refs = list(todo.values())
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        for key, ref in todo.items():
            if ref in ready:
                try:
                    _probed[key] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.warning(
                        "node %s could not be probed (%s); no shard that needs a domain goes there", key[0], exc
                    )
            else:
                ray.cancel(ref, force=True)
                log.warning("node %s did not answer the domain probe in %.0fs; left out", key[0], PROBE_TIMEOUT_S)
    grouped: dict[str, list[str]] = {}
    found: dict[str, domains.Domain] = {}
    for node in nodes:
        key = (node["NodeID"], res.cpu_isa, res.threads_per_shard, device)
        if key in _probed:
            d = _probed[key]
            found[d.id] = d
            grouped.setdefault(d.id, []).append(node["NodeID"])
    return {i: DomainNodes(found[i], tuple(ids)) for i, ids in grouped.items()}
