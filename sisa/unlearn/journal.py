"""The deletion journal: requests, durably recorded before anything else happens.

A request is one fsync'd LMDB transaction that removes the samples, tombstones their
keyed hashes, drops every checkpoint whose manifest holds them and takes the affected
shards out of service (per ``unlearn.policy``). Its erasure (the touched runs re-keyed,
the old keys destroyed) follows at once and is recorded as ``erased_at``; the retrain
may wait. Everything after the journal entry is idempotent, so a crash anywhere is
finished by the next writable open.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from typing import Any

import lmdb

from sisa.errors import StoreError
from sisa.store.database import Store
from sisa.store.digests import keyed_hash
from sisa.store.layout import id_key, shard_key, stage_key
from sisa.train.domain import domain_id

__all__ = ["mark_applied", "mark_erased", "pending", "record_request", "requests", "unerased"]


def requests(store: Store, txn: lmdb.Transaction) -> list[dict[str, Any]]:
    """Every journaled request (pending and applied), oldest first, as read in ``txn``."""
    return [json.loads(bytes(v)) for _, v in txn.cursor(db=store.db("requests"))]


def pending(store: Store) -> list[dict[str, Any]]:
    """Requests journaled but not yet applied, oldest first."""
    with store.read() as txn:
        return [r for r in requests(store, txn) if r["state"] == "pending"]


def unerased(store: Store) -> list[dict[str, Any]]:
    """Pending requests whose erasure has not finished (a crash cut it short), oldest first."""
    return [r for r in pending(store) if not r.get("erased_at")]


def record_request(
    store: Store, txn: lmdb.Transaction, ids: Sequence[int], secret: bytes, meta: dict[str, Any]
) -> dict[str, Any]:
    """Tombstone ``ids`` and retire every checkpoint that saw them, in the caller's transaction.

    The durable first step of a deletion: once this transaction commits, the samples are
    gone from the store's records, every stage that trained on them is dropped, and their
    shards are out of service (or serve per ``meta["policy"]``) until the request is applied.
    Under a shard graph (``partition.graph``) "their shards" are every shard that trained on
    one of them: the holder and each shard linked to it, each from the slice that held the id;
    only the holder has runs for erasure to re-key.

    Args:
        store: A writable store.
        txn: The caller's write transaction.
        ids: Stored sample ids, distinct.
        secret: The store's HMAC secret (ids are named by keyed hash only).
        meta: Fields copied into the request (``already_deleted``, ``defer``, ``policy``).

    Returns:
        The pending request as journaled.
    """
    dbs = {name: store.db(name) for name in ("samples", "deleted", "ckpt", "stages", "live")}
    last = txn.cursor(db=store.db("requests"))
    request_id = struct.unpack(">Q", last.key())[0] + 1 if last.last() else 1
    first_slice: dict[int, int] = {}
    touched: dict[int, set[tuple[int, int]]] = {}  # shard -> (slice, run) of each deleted id: erasure re-keys them
    _, readers = store.shard_graph(txn)  # under a shard graph, every shard that trained on a slice of the holder
    for sid in ids:
        place = store.remove_member(txn, sid)
        if place is None:  # the caller passes stored ids only
            raise StoreError(f"sample {sid} has no assignment in store {store.path}")
        shard, slice_, run = place
        txn.delete(id_key(sid), db=dbs["samples"])
        txn.put(keyed_hash(secret, sid).encode(), str(request_id).encode(), db=dbs["deleted"])
        for reader in readers[shard]:
            # Stage slice_+1 of each reader added this slice of the holder: its stages from there on saw the id.
            first_slice[reader] = min(first_slice.get(reader, slice_), slice_)
        touched.setdefault(shard, set()).add((slice_, run))
    shards = {
        str(shard): _retire(store, txn, shard, slice_, touched.get(shard, set()), meta["policy"], dbs)
        for shard, slice_ in sorted(first_slice.items())
    }
    request = {
        "request_id": request_id,
        "state": "pending",
        "requested_at": time.time(),
        "id_hashes": sorted(keyed_hash(secret, sid) for sid in ids),
        "deleted": len(ids),
        "shards": shards,
        "erased_at": None,  # set once the runs are re-keyed and the old keys gone from every file
        **meta,
    }
    txn.put(struct.pack(">Q", request_id), json.dumps(request, sort_keys=True).encode(), db=store.db("requests"))
    return request


def _retire(
    store: Store,
    txn: lmdb.Transaction,
    shard: int,
    slice_: int,
    touched: set[tuple[int, int]],
    policy: str,
    dbs: dict[str, Any],
) -> dict[str, Any]:
    """Drop every stage of ``shard`` that saw a deleted id (from slice ``slice_`` on) and set what it serves.

    Returns:
        The shard's entry in the request: where its retrain starts, the runs erasure re-keys, the
        checkpoints removed, the stage it serves meanwhile, and the domain of its clean checkpoint.
    """
    # Stage r trained on slices 1..r, so stages from slice_+1 on saw a deleted id;
    # stage slice_ (0 = the initial model) is the last clean checkpoint.
    live_raw = txn.get(shard_key(shard), db=dbs["live"])
    live = json.loads(bytes(live_raw)) if live_raw is not None else None
    keep_live = live is not None and policy == "serve-stale"
    removed = []
    clean: dict[str, Any] | None = None  # the last stage that survives: it never saw a deleted id
    for record in store.stage_records(txn, shard):
        if record["stage"] > slice_:
            if not (keep_live and live is not None and record["key"] == live["key"]):
                txn.delete(record["key"].encode(), db=dbs["ckpt"])
            txn.delete(stage_key(shard, record["stage"]), db=dbs["stages"])
            removed.append(record["sha256"])
        else:
            clean = record
    interim = None
    if keep_live and live is not None:
        store.set_live(txn, shard, {**live, "stale": True})
    elif policy == "serve-clean" and live is not None and clean is not None:
        # Only a shard that was in service keeps serving: one still in its first training
        # must not start serving a partial model because of a deletion.
        interim = clean["stage"]
        store.set_live(txn, shard, {**clean, "interim": True})
    else:
        store.set_live(txn, shard, None)  # also drops a stale model's bytes if the policy changed
    return {
        "from_slice": slice_ + 1,
        "restart_stage": slice_,
        "runs": [list(pair) for pair in sorted(touched)],  # (slice, run): what erasure re-keys
        "removed_checkpoints": removed,
        "serving_stage": interim,
        # the domain the retrain continues in: if the live model comes from another, it was rebound
        "clean_domain": domain_id(clean),
    }


def mark_applied(store: Store, txn: lmdb.Transaction, request: dict[str, Any], applied_at: float) -> None:
    """Record in the journal that ``request`` was applied (in the caller's write transaction).

    The stored request is read again in ``txn``: its erasure may have been recorded after
    the caller listed it.
    """
    raw = txn.get(struct.pack(">Q", request["request_id"]), db=store.db("requests"))
    stored = json.loads(bytes(raw)) if raw is not None else request
    updated = {**stored, "state": "applied", "applied_at": applied_at}
    value = json.dumps(updated, sort_keys=True).encode()
    txn.put(struct.pack(">Q", request["request_id"]), value, db=store.db("requests"))


def mark_erased(
    store: Store, txn: lmdb.Transaction, request_ids: Sequence[int], erased_at: float, erasure: dict[str, Any]
) -> None:
    """Record that the requests' erasure finished (in the caller's write transaction).

    Each request is read again in ``txn``, so a field written since it was listed is kept.

    Args:
        store: A writable store.
        txn: The write transaction that clears the key file's compaction marker.
        request_ids: The requests the erasure covered.
        erased_at: When the key file was compacted (their old keys gone from every file).
        erasure: The erasure's report, as certificates hold it (no raw id).
    """
    for request_id in request_ids:
        key = struct.pack(">Q", request_id)
        raw = txn.get(key, db=store.db("requests"))
        if raw is None:
            continue
        request = json.loads(bytes(raw))
        if request.get("erased_at"):
            continue
        request.update(erased_at=erased_at, erasure=erasure)
        txn.put(key, json.dumps(request, sort_keys=True).encode(), db=store.db("requests"))
