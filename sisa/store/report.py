"""What a store holds, for a reader: the status report (shards, slices, counts, live checkpoints) and where ids live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sisa.config.settings import SisaConfig
from sisa.errors import DataError
from sisa.store.database import Store
from sisa.store.digests import Basis

__all__ = ["locate", "status"]


def status(store: Store, config: SisaConfig) -> dict[str, Any]:
    """Shards, slices, sample counts per shard and slice, and live checkpoint digests, from one snapshot.

    Args:
        store: The store (read-only is enough).
        config: Its config.

    Returns:
        A JSON-able dict.
    """
    with store.read() as txn:
        live = store.live(txn)
        slice_counts = store.slice_counts(txn, config.shards, config.slices)
        meta = store.meta(txn)
        masses = meta.get("shard_mass")
        groups, _ = store.shard_graph(txn)  # the stored graph: fixed at creation, whatever the config says now
        shards = []
        for shard in range(config.shards):
            counts = [int(len(store.slice_ids(txn, shard, r))) for r in range(slice_counts[shard])]
            rec = live.get(shard)
            shards.append(
                {
                    "shard": shard,
                    "samples": sum(counts),
                    "slice_samples": counts,
                    "stages_done": len(store.stage_records(txn, shard)),
                    "live": rec is not None,
                    "stale": bool(rec and rec.get("stale")),
                    # serve-clean: serving the last clean stage until a pending deletion is applied
                    "interim": bool(rec and rec.get("interim")),
                    "live_stage": rec["stage"] if rec else None,
                    "live_checkpoint": rec["sha256"] if rec else None,
                    "live_weights": rec["weights"] if rec else None,
                    "live_manifest": rec["manifest"] if rec else None,
                    # where the live model was trained: a replay must run there to be bit-identical
                    "domain": rec.get("domain") if rec else None,
                    # distribution-aware only: prior mass placed here at ingest (deletions keep it)
                    "expected_deletions": masses[shard] if masses else None,
                    # partition.graph: the other shards whose slices this one trains on (a deletion there retrains it)
                    "trains_on": list(groups[shard][1:]) if shard < len(groups) else [],
                }
            )
        n = store.count_samples(txn)
        record = meta.get("backbone")
        core = store.core_count(txn)
        recipe = store.recipe_digest(txn, config)
        aggregate = _aggregate(store, txn, config, live, meta)
    backbone: dict[str, Any] | None = None
    if config.backbone.enabled:
        # Every checkpoint key covers the stored backbone's digest (none before the first fit).
        stored = {k: record[k] for k in ("digest", "bytes", "seconds") if k in record} if record else None
        backbone = {"source": config.backbone.source, "name": config.backbone.name, "adapter": config.model.adapter}
        backbone.update(stored=stored, core_samples=core)
    return {
        "store": str(store.path),
        "shards": config.shards,
        "slices": config.slices,
        # slices per shard now: R, plus one per add() that touched the shard
        "shard_slices": slice_counts,
        "samples": n,
        "feature_shape": list(meta.get("feature_shape") or []),
        "num_classes": config.data.num_classes,
        "model": config.model.name,
        "graph": str(((meta.get("config") or {}).get("partition") or {}).get("graph", "none")),
        "recipe": recipe,
        "backbone": backbone,
        "aggregate": aggregate,
        "trained_shards": len(live),
        "per_shard": shards,
        # survivors an erasure could not re-encrypt (damaged bytes): dropped from the store, named here
        "quarantined": list(meta.get("quarantined", [])),
        # a key was dropped but keys/data.mdb not compacted yet (the next writable open compacts it)
        "key_compaction_pending": bool(meta.get("keys_compaction_pending")),
    }


def _aggregate(
    store: Store, txn: Any, config: SisaConfig, live: dict[int, dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """The configured aggregation; under ``combiner``, the stored combiner and whether it is the live models'.

    A combiner is current when its basis names exactly the live checkpoints and the core set
    (:class:`sisa.store.digests.Basis`); otherwise predictions fit one in memory until a fit stores it.
    """
    out: dict[str, Any] = {"method": config.aggregate.method}
    if config.aggregate.method != "combiner":
        return out
    record = meta.get("combiner")
    basis = Basis({s: r["key"] for s, r in live.items()}, store.core_ids(txn))
    out["combiner"] = {
        "key": record["key"] if record else None,
        "current": bool(record and live and record.get("basis") == basis.digest),
        "domain": record.get("domain") if record else None,
    }
    return out


def locate(store: Store, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Where each id lives now: id -> (shard, slice), both counted from 0, from one snapshot.

    Args:
        store: The store.
        ids: Validated ids (:func:`sisa.unlearn.ids.normalize_ids`).

    Raises:
        DataError: If an id is not in the store (deleted, or never ingested); it names the first few.
    """
    with store.read() as txn:
        found = store.locate(txn, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(f"{len(missing)} id(s) are not in the store (first: {missing[:5]}); check the ids")
    return found
