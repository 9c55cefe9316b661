"""Deletion: durable journal, retrain from the last clean slice, erasure, certificates, verify.

A request is one fsync'd LMDB transaction that removes the samples, drops every
checkpoint whose manifest holds them and takes the affected shards out of service
(``exclude`` policy). Applying it is ``fit`` (which retrains exactly the stale stages),
compaction (which erases the freed pages), and a certificate appended to the audit
log. Each step is idempotent, so a crash anywhere is finished by the next ``apply``.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from sisa.data.arrays import check_id_values, parse_id_text, to_numpy
from sisa.errors import DataError, DomainUnavailableError
from sisa.store.database import Store, id_key, member_key, shard_key, stage_key
from sisa.train.domain import Domain, domain_id, unavailable_message
from sisa.unlearn.audit import append_entry, keyed_hash

if TYPE_CHECKING:
    from sisa.ensemble import Ensemble
    from sisa.train.trainer import ShardJob, StageResult

__all__ = [
    "apply",
    "delete",
    "deleted_ids",
    "deleting_requests",
    "normalize_ids",
    "parse_id",
    "pending",
    "read_ids_file",
    "verify",
]

log = logging.getLogger(__name__)


def normalize_ids(ids: Any) -> list[int]:
    """Validate a deletion request's ids.

    Args:
        ids: An int, or a sequence / array of ints.

    Returns:
        The distinct ids, in first-seen order.

    Raises:
        DataError: On an empty request, values that are not integers (bools, strings,
            fractional floats, floats too large for their type to hold exactly: the rule of
            :func:`sisa.data.arrays.check_id_values`) or ids outside ``[0, 2**63 - 2]``.
    """
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise DataError(f"ids must be a list of integers, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray) or hasattr(ids, "__array__"):
        ids = to_numpy(ids).reshape(-1)  # arrays and tensors keep their dtype: the rule for floats needs it
    else:
        ids = list(ids)
    if len(ids) == 0:
        raise DataError("the deletion request is empty: pass at least one id")
    # The same rule as at ingest (sisa.data.arrays.check_id_values): a deletion names exactly what was stored.
    return list(dict.fromkeys(check_id_values(ids).tolist()))


def parse_id(text: str) -> int:
    """One sample id written as text: the rule of :func:`sisa.data.arrays.parse_id_text`, as for CSV cells.

    Raises:
        ValueError: On anything but an ASCII decimal whole number (``17``, ``17.0``, ``1.7e1``),
            including ``17.5``, ``1_000``, ``+5``, ``0x10`` and non-ASCII digits.
    """
    return parse_id_text(text)


def read_ids_file(path: str | Path) -> list[int]:
    """Read an ids file: one integer per line; blank lines and ``#`` comments are skipped.

    Raises:
        DataError: If the file is missing or a line is not an integer (named by number).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ids file {p}: {exc}") from exc
    out: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            out.append(parse_id(item))
        except ValueError:
            raise DataError(f"{p} line {n}: {item[:40]!r} is not an integer id; put one integer id per line") from None
    return normalize_ids(out)


def deleted_ids(store: Store, ids: Iterable[int]) -> list[int]:
    """Which of ``ids`` were deleted by an earlier request (looked up by keyed hash)."""
    secret = store.secret()
    with store.read() as txn:
        return [int(i) for i in ids if txn.get(keyed_hash(secret, int(i)).encode(), db=store.db("deleted")) is not None]


def deleting_requests(store: Store, ids: Iterable[int]) -> dict[int, int]:
    """Which request deleted each of ``ids`` (looked up by keyed hash); ids never deleted are left out.

    Returns:
        Id -> the ``request_id`` of the request that deleted it.
    """
    secret = store.secret()
    out: dict[int, int] = {}
    with store.read() as txn:
        for i in ids:
            value = txn.get(keyed_hash(secret, int(i)).encode(), db=store.db("deleted"))
            if value is not None:
                out[int(i)] = int(bytes(value))
    return out


def _requests(store: Store, txn: lmdb.Transaction) -> list[dict[str, Any]]:
    return [json.loads(bytes(v)) for _, v in txn.cursor(db=store.db("requests"))]


def pending(store: Store) -> list[dict[str, Any]]:
    """Requests journaled but not yet applied, oldest first."""
    with store.read() as txn:
        return [r for r in _requests(store, txn) if r["state"] == "pending"]


def _journal(
    store: Store, txn: lmdb.Transaction, ids: Sequence[int], secret: bytes, meta: dict[str, Any]
) -> dict[str, Any]:
    """Tombstone ``ids`` and retire every checkpoint that saw them, in the caller's transaction."""
    dbs = {name: store.db(name) for name in ("samples", "assign", "members", "deleted", "ckpt", "stages", "live")}
    last = txn.cursor(db=store.db("requests"))
    request_id = struct.unpack(">Q", last.key())[0] + 1 if last.last() else 1
    first_slice: dict[int, int] = {}
    for sid in ids:
        shard, slice_ = struct.unpack(">II", bytes(txn.get(id_key(sid), db=dbs["assign"]) or b""))
        txn.delete(id_key(sid), db=dbs["samples"])
        txn.delete(id_key(sid), db=dbs["assign"])
        txn.delete(member_key(shard, slice_, sid), db=dbs["members"])
        txn.put(keyed_hash(secret, sid).encode(), str(request_id).encode(), db=dbs["deleted"])
        first_slice[shard] = min(first_slice.get(shard, slice_), slice_)
    shards: dict[str, Any] = {}
    for shard, slice_ in sorted(first_slice.items()):
        # Stage r trained on slices 1..r, so stages from slice_+1 on saw a deleted id;
        # stage slice_ (0 = the initial model) is the last clean checkpoint.
        live_raw = txn.get(shard_key(shard), db=dbs["live"])
        live = json.loads(bytes(live_raw)) if live_raw is not None else None
        keep_live = live is not None and meta["policy"] == "serve-stale"
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
        elif meta["policy"] == "serve-clean" and live is not None and clean is not None:
            # Only a shard that was in service keeps serving: one still in its first training
            # must not start serving a partial model because of a deletion.
            interim = clean["stage"]
            store.set_live(txn, shard, {**clean, "interim": True})
        else:
            store.set_live(txn, shard, None)  # also drops a stale model's bytes if the policy changed
        shards[str(shard)] = {
            "from_slice": slice_ + 1,
            "restart_stage": slice_,
            "removed_checkpoints": removed,
            "serving_stage": interim,
            # the domain the retrain continues in: if the live model comes from another, it was rebound
            "clean_domain": domain_id(clean),
        }
    request = {
        "request_id": request_id,
        "state": "pending",
        "requested_at": time.time(),
        "id_hashes": sorted(keyed_hash(secret, sid) for sid in ids),
        "deleted": len(ids),
        "shards": shards,
        **meta,
    }
    txn.put(struct.pack(">Q", request_id), json.dumps(request, sort_keys=True).encode(), db=store.db("requests"))
    return request


def delete(
    ens: Ensemble, ids: Any, *, defer: bool = False, progress: Callable[[StageResult], None] | None = None
) -> dict[str, Any]:
    """Delete samples: journal durably, then (unless deferred) retrain, erase and certify.

    Re-running a request is how a client retries (after a crash, a kill, a lost Ray
    connection): an id whose deleting request is still pending is not "already deleted";
    that request is finished here and its certificate returned. Only a request whose ids
    were all deleted by applied requests is a no-op.

    Besides this call's own request, applying finishes the pending requests that its ids
    name and every interrupted (not deferred) pending request; their certificates come
    back under ``also_applied``. Other deferred requests stay pending (see :func:`apply`).

    Args:
        ens: A writable ensemble.
        ids: The sample ids to forget.
        defer: Only journal (ids tombstoned, shards out of service); :func:`apply` later.
        progress: Called after each retrained stage is committed.

    Returns:
        The certificate (``state`` ``applied``; of this call's new request, else of the
        newest pending request its ids named), the pending request (``state`` ``pending``,
        with ``defer``), or, when every id was deleted by an already applied request, a
        no-op report (``state`` ``noop``); ``already_deleted`` counts ids deleted by
        earlier requests.

    Raises:
        DataError: On malformed ids or ids the store never held; nothing is changed.
        ClusterConnectionError: If the Ray cluster cannot be joined (unless ``defer``);
            checked before journaling, so nothing is changed.
    """
    wanted = normalize_ids(ids)
    store = ens.store
    secret = store.secret()
    with store.read() as txn:
        present = [i for i in wanted if store.has_sample(txn, i)]
    present_set = set(present)
    gone = deleting_requests(store, [i for i in wanted if i not in present_set])
    unknown = sorted(set(wanted) - present_set - set(gone))
    if unknown:
        raise DataError(
            f"{len(unknown)} id(s) are not in the store and were never deleted (first: {unknown[:5]}); "
            "the whole request was rejected and nothing changed: check the ids"
        )
    waiting = {r["request_id"]: r for r in pending(store)}
    named = sorted({rid for rid in gone.values() if rid in waiting})  # journaled, never applied: a retry
    if not present and not named:
        return {"state": "noop", "request_id": None, "deleted": 0, "already_deleted": len(gone), "retrained_shards": []}
    if not defer:
        # The retrain needs Ray: join the cluster before journaling, so a wrong address or a
        # missing token fails with nothing written (no request pending, no shard out of service).
        from sisa.train import orchestrator  # the one Ray import; deferred deletions stay Ray-free

        orchestrator.connect_unless_local(ens.address)
    own: int | None = None
    if present:
        meta = {"already_deleted": len(gone), "defer": defer, "policy": ens.config.unlearn.policy}
        request = store.write(lambda txn: _journal(store, txn, present, secret, meta))
        ens.forget_cached_models()
        own = request["request_id"]
        log.info("journaled request %d: %d ids, shards %s", own, len(present), list(request["shards"]))
        if defer:
            return {**request, "retrained_shards": [int(s) for s in request["shards"]]}
    elif defer:
        request = waiting[named[-1]]
        log.info("ids already journaled by pending request %d; it stays deferred", named[-1])
        return {**request, "retrained_shards": [int(s) for s in request["shards"]]}
    else:
        log.info("finishing pending request(s) %s named by a repeated deletion", named)
    interrupted = [rid for rid, r in waiting.items() if not r["defer"]]
    chosen = sorted({*named, *interrupted, *([own] if own is not None else [])})
    certificates = apply(ens, progress, requests=chosen)
    main_id = own if own is not None else named[-1]
    main = next(c for c in certificates if c["request_id"] == main_id)
    others = [c for c in certificates if c["request_id"] != main_id]
    return {**main, "also_applied": others} if others else main


def apply(
    ens: Ensemble, progress: Callable[[StageResult], None] | None = None, *, requests: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Apply pending requests as one batch: one retrain per affected shard.

    With ``requests`` (request ids), exactly those requests are applied and certified,
    and only the shards they touched are retrained. This is how an interrupted request is
    finished without applying deferred ones (:meth:`Ensemble.open`, a repeated
    :func:`delete`). A shard that a deferred request shares with a chosen one is
    retrained without the deferred request's ids too, since its journal entry already
    removed them; that deferred request stays pending, and the apply that later takes it
    finds its shards retrained (nothing to train) and certifies it. Shards touched only by
    requests left pending stay as their journal left them (out of service under
    ``exclude``). The compaction erases every freed page, so the bytes of every journaled
    id are gone from the file after any apply.

    Args:
        ens: A writable ensemble.
        progress: Called after each retrained stage is committed.
        requests: Ids of pending requests to apply; ``None`` applies every pending request
            (and trains every stale stage, as :meth:`Ensemble.fit` does).

    Returns:
        One certificate per applied request, oldest first.

    Raises:
        DataError: If a requested id is not a pending request (nothing is changed).
    """
    store = ens.store
    chosen = pending(store)
    if requests is not None:
        wanted = {int(r) for r in requests}
        chosen = [r for r in chosen if r["request_id"] in wanted]
        missing = sorted(wanted - {r["request_id"] for r in chosen})
        if missing:
            raise DataError(
                f"request(s) {missing} are not pending (unknown, or applied already); "
                "pending() lists the requests that can be applied"
            )
    if not chosen:
        return []
    started = time.time()
    shards = None if requests is None else sorted({int(s) for r in chosen for s in r["shards"]})
    try:
        report = ens.fit(progress, shards=shards)
    except DomainUnavailableError as exc:
        # resources.on_missing_domain: refuse. The requests stay journaled (their ids are gone and
        # their shards out of service); say so, and how they get applied.
        ids = ", ".join(str(r["request_id"]) for r in chosen)
        raise DomainUnavailableError(
            f"{exc}. Deletion request(s) {ids} stay pending: their samples are already removed and the shards "
            "that held them are out of service; `sisa apply` finishes them once such a node is available"
        ) from exc
    before, after = store.compact()
    secret = store.secret()

    def certify(txn: lmdb.Transaction) -> list[dict[str, Any]]:
        live = store.live(txn)
        certificates = []
        for request in chosen:
            shards = {}
            for key, info in request["shards"].items():
                shard = int(key)
                info = {**info, **_rebind(info, live.get(shard), report.rebound.get(shard))}
                new = [r for r in store.stage_records(txn, shard) if r["stage"] > info["restart_stage"]]
                rec = live.get(shard)
                shards[key] = {
                    **info,
                    "new_checkpoints": [r["sha256"] for r in new],
                    "live_checkpoint": rec["sha256"] if rec else None,
                    "live_weights": rec["weights"] if rec else None,
                    "manifest": rec["manifest"] if rec else None,
                    "samples": rec["n_samples"] if rec else 0,
                    "domain": rec.get("domain") if rec else None,
                }
            applied_at = time.time()
            certificate = {
                "request_id": request["request_id"],
                "state": "applied",
                "requested_at": request["requested_at"],
                "applied_at": applied_at,
                "seconds": applied_at - request["requested_at"],
                "apply_seconds": applied_at - started,
                "id_hashes": request["id_hashes"],
                "deleted": request["deleted"],
                "already_deleted": request["already_deleted"],
                "policy": request["policy"],
                "retrained_shards": sorted(int(s) for s in shards),
                "shards": shards,
                "batch": {"requests": len(chosen), "retrain_seconds": report.seconds, "file_bytes": [before, after]},
            }
            record = append_entry(store, txn, secret, certificate)
            certificate["audit_seq"] = record["seq"]
            updated = {**request, "state": "applied", "applied_at": applied_at}
            txn.put(
                struct.pack(">Q", request["request_id"]),
                json.dumps(updated, sort_keys=True).encode(),
                db=store.db("requests"),
            )
            certificates.append(certificate)
        return certificates

    certificates = store.write(certify)
    log.info("applied %d request(s); retrained %s", len(certificates), sorted(report.trained))
    return certificates


def _rebind(info: dict[str, Any], live: dict[str, Any] | None, rebound: dict[str, Any] | None) -> dict[str, Any]:
    """The certificate's word on whether a shard was retrained from scratch in another domain.

    Read from the live record, not only from this run's report: an apply that a crash cut
    short after the retrain is certified by the next one, whose fit retrained nothing.
    """
    before, now = info.get("clean_domain"), domain_id(live)
    if rebound is None and (before is None or now is None or before == now):
        return {"rebound": False}
    reason = (rebound or {}).get("reason") or f"no node here trained in its determinism domain {before}"
    return {"rebound": True, "from_slice": 1, "restart_stage": 0, "rebind_reason": reason}


def verify(
    ens: Ensemble, shards: Sequence[int] | None = None, progress: Callable[[StageResult], None] | None = None
) -> dict[str, Any]:
    """Retrain shards from scratch on their current samples and compare with the live models.

    Args:
        ens: The ensemble.
        shards: Shards to check (default: all).
        progress: Called after each replayed stage.

    Returns:
        ``{"ok": bool, "shards": {k: {...digests, "domain", "ok"}}}``; ``ok`` only when
        every checked shard's replay is bit-identical to its live model. A replay runs
        only in the live model's determinism domain: a shard whose domain no node offers
        is not replayed and not called a failure (``reason: "domain_unavailable"``, with
        ``needs`` and ``available``); when that is the only problem, the result's
        ``reason`` is ``domain_unavailable`` too.
    """
    from sisa.train import orchestrator

    store, cfg = ens.store, ens.config
    if shards is not None and (isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable)):
        raise DataError(f"shards must be a list of shard indices, got {type(shards).__name__}; e.g. shards=[0, 2]")
    chosen = list(range(cfg.shards)) if shards is None else list(shards)
    bad = [s for s in chosen if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < cfg.shards]
    if bad:
        raise DataError(f"shard {bad[0]!r} does not exist; shards are the integers 0..{cfg.shards - 1}")
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
        slice_counts = ens.slice_counts(txn)
        for shard in chosen:
            ids[shard] = [store.slice_ids(txn, shard, r) for r in range(slice_counts[shard])]
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
        jobs = ens.shard_jobs(plan, ids, snapshot=txn, domains=needs)
        orchestrator.execute(ens.address, jobs, keep, skip)
    for key, info in out.items():
        result = last.get(int(key))
        if info["samples"] == 0:
            info.update(ok=info["live_weights"] is None, reason="empty shard: no model")
        elif info["live_weights"] is None:
            info.update(ok=False, reason="no live model: pending deletion or never trained; run sisa apply")
        elif info["pending"]:
            why = f"serving a {info['pending']} model until a pending deletion is applied; run sisa apply"
            info.update(ok=False, reason=why)
        elif int(key) in unavailable:
            message, available = unavailable[int(key)]
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
    verdict: dict[str, Any] = {"ok": all(i["ok"] for i in out.values()), "shards": out}
    failed = [i for i in out.values() if not i["ok"]]
    if failed and all(i.get("reason") == "domain_unavailable" for i in failed):
        verdict["reason"] = "domain_unavailable"
    return verdict
