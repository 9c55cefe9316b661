"""Verify: retrain shards from scratch on their current samples and compare with the live models, bit for bit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sisa.errors import DataError
from sisa.train.combiner import check_live
from sisa.train.domain import Domain, domain_id, unavailable_message
from sisa.train.jobs import ShardJob, StageResult
from sisa.train.planner import Planner, Progress

__all__ = ["verify"]


def verify(planner: Planner, shards: Sequence[int] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Retrain shards from scratch on their current samples and compare with the live models.

    Args:
        planner: The planner of the store (a read-only store is enough).
        shards: Shards to check (default: all).
        progress: Called after each replayed stage.

    Returns:
        ``{"ok": bool, "shards": {k: {...digests, "domain", "ok"}}}``; ``ok`` only when
        every checked shard's replay is bit-identical to its live model. A replay runs
        only in the live model's determinism domain: a shard whose domain no node offers
        is not replayed and not called a failure (``reason: "domain_unavailable"``, with
        ``needs`` and ``available``); when that is the only problem, the result's
        ``reason`` is ``domain_unavailable`` too. Under ``aggregate.method: combiner`` the result also
        holds ``combiner`` (:func:`sisa.train.combiner.check_live`): the stored combiner refitted from
        the live models must match byte for byte, or ``ok`` is False.
    """
    from sisa.train import orchestrator  # the one Ray import

    store, cfg = planner.store, planner.config
    chosen = _chosen(shards, cfg.shards)
    out: dict[str, Any] = {}
    plan: list[tuple[int, int]] = []
    ids: dict[int, list[np.ndarray]] = {}
    last: dict[int, StageResult] = {}
    needs: dict[int, str] = {}
    unavailable: dict[int, tuple[str, list[Domain]]] = {}

    def skip(job: ShardJob, available: list[Domain]) -> None:
        # Never a replay elsewhere (it would differ without anything being wrong), never a rebind.
        message = unavailable_message(
            job.shard, (live.get(job.shard) or {}).get("domain"), job.domain or "?", available
        )
        unavailable[job.shard] = (message, available)

    def keep(result: StageResult) -> None:
        last[result.shard] = result
        if progress is not None:
            progress(result)

    # One snapshot for the plan, the samples and the live records compared against: a
    # writer in another process (verify needs no lock) cannot mix two states of a shard.
    with store.read() as txn:
        live = store.live(txn)
        for shard in chosen:
            ids[shard] = planner.shard_slices(txn, shard)  # under a shard graph, its links' slices too
            size = sum(len(part) for part in ids[shard])
            rec = live.get(shard) or {}
            # serve-stale / serve-clean: until a pending deletion is applied the shard serves another model
            serving = "stale" if rec.get("stale") else "clean interim" if rec.get("interim") else None
            out[str(shard)] = {
                "samples": size,
                "live_weights": rec.get("weights"),
                "replay_weights": None,
                "pending": serving,
                "domain": rec.get("domain"),
            }
            if size and rec and not serving:  # a shard serving a pending model cannot pass: no replay
                plan.append((shard, 0))
                if domain_id(rec) is not None:
                    needs[shard] = str(domain_id(rec))
        jobs = planner.shard_jobs(plan, ids, snapshot=txn, domains=needs)
        runner, processes = None, None
        if plan:
            seconds = planner.predicted_seconds(plan, ids, txn)
            choice = orchestrator.plan_runner(planner.address, len(plan), seconds, cfg.resources)
            runner, processes = choice.runner, choice.processes
        orchestrator.execute(planner.address, jobs, keep, skip, runner=runner, processes=processes)
    for key, info in out.items():
        _judge(info, last.get(int(key)), unavailable.get(int(key)))
    verdict: dict[str, Any] = {"ok": all(i["ok"] for i in out.values()), "shards": out, "runner": runner}
    if cfg.aggregate.method == "combiner":
        # Refitted from the live models, whose weights the replays above checked, and compared byte for byte.
        verdict["combiner"] = check_live(store, cfg)
        verdict["ok"] = verdict["ok"] and verdict["combiner"]["ok"]
    failed = [i for i in [*out.values(), verdict.get("combiner", {"ok": True})] if not i["ok"]]
    if failed and all(i.get("reason") == "domain_unavailable" for i in failed):
        verdict["reason"] = "domain_unavailable"
    return verdict


def _chosen(shards: Sequence[int] | None, count: int) -> list[int]:
    """The shards to verify: ``shards`` checked against the store's ``count``, or all of them.

    Raises:
        DataError: On something other than a list of shard indices, or a shard that does not exist.
    """
    if shards is not None and (isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable)):
        raise DataError(f"shards must be a list of shard indices, got {type(shards).__name__}; e.g. shards=[0, 2]")
    chosen = list(range(count)) if shards is None else list(shards)
    bad = [s for s in chosen if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < count]
    if bad:
        raise DataError(f"shard {bad[0]!r} does not exist; shards are the integers 0..{count - 1}")
    return chosen


def _judge(info: dict[str, Any], result: StageResult | None, unavailable: tuple[str, list[Domain]] | None) -> None:
    """Fill in one shard's verdict (``ok`` and why not) from its replay, or from why it had none."""
    if info["samples"] == 0:
        info.update(ok=info["live_weights"] is None, reason="empty shard: no model")
    elif info["live_weights"] is None:
        info.update(ok=False, reason="no live model: pending deletion or never trained; run sisa apply")
    elif info["pending"]:
        why = f"serving a {info['pending']} model until a pending deletion is applied; run sisa apply"
        info.update(ok=False, reason=why)
    elif unavailable is not None:
        message, available = unavailable
        info.update(
            ok=False,
            reason="domain_unavailable",
            message=message,
            needs=info["domain"],
            available=[d.to_dict() for d in available],
        )
    elif result is not None:
        info.update(replay_weights=result.weights, replay_manifest=result.manifest, replay_domain=result.domain)
        info["ok"] = result.weights == info["live_weights"]
    else:  # planned but neither replayed nor refused: never silently "ok"
        info.update(ok=False, reason="no replay came back for this shard")
