"""Deletion: journal a request, retrain the affected shards from their last clean slice, erase, certify.

Applying a request is the planner's ``fit`` (which retrains exactly the stale stages),
erasure (which destroys the keys of the deleted samples and retired checkpoints:
:mod:`sisa.store.erasure`) and a certificate appended to the audit log, in that order;
each step is idempotent, so a crash anywhere is finished by the next apply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import lmdb

from sisa.errors import CoreSetError, DataError, DomainUnavailableError
from sisa.store.erasure import erase
from sisa.store.tombstones import deleting_requests
from sisa.train.domain import domain_id
from sisa.train.planner import Planner, Progress
from sisa.unlearn.audit import append_entry
from sisa.unlearn.ids import normalize_ids
from sisa.unlearn.journal import mark_applied, pending, record_request

__all__ = ["apply", "delete", "finish_interrupted"]

log = logging.getLogger(__name__)


def delete(
    planner: Planner,
    ids: Any,
    *,
    defer: bool = False,
    progress: Progress | None = None,
    on_journal: Callable[[], None] | None = None,
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
        planner: The planner of a writable store.
        ids: The sample ids to forget.
        defer: Only journal (ids tombstoned, shards out of service); :func:`apply` later.
        progress: Called after each retrained stage is committed.
        on_journal: Called once the request is durable (the facade drops its cached models).

    Returns:
        The certificate (``state`` ``applied``; of this call's new request, else of the
        newest pending request its ids named), the pending request (``state`` ``pending``,
        with ``defer``), or, when every id was deleted by an already applied request, a
        no-op report (``state`` ``noop``); ``already_deleted`` counts ids deleted by
        earlier requests.

    Raises:
        DataError: On malformed ids or ids the store never held; nothing is changed.
        CoreSetError: If an id is in the core set (it trained the shared backbone); nothing is changed.
        ClusterConnectionError: If the Ray cluster cannot be joined (unless ``defer``);
            checked before journaling, so nothing is changed.
    """
    wanted = normalize_ids(ids)
    store = planner.store
    secret = store.secret()
    with store.read() as txn:
        present = [i for i in wanted if store.has_sample(txn, i)]
        core = store.core_members(txn, present)
        core_size = store.core_count(txn)
    if core:
        raise CoreSetError(
            f"{len(core)} id(s) are in the core set (first: {core[:5]}), the {core_size} samples declared at ingest "
            "that trained the shared backbone every shard runs on. A core sample cannot be forgotten by retraining "
            "shards: it would take training a new backbone without it and every shard from scratch, i.e. a new "
            "store ingested without these ids (and a core set that leaves them out). The whole request was "
            "rejected and nothing changed; delete only non-core ids"
        )
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
        # A named cluster: join it before journaling, so a wrong address or a missing token fails
        # with nothing written (no request pending, no shard out of service). Without an address
        # the plan decides later whether a local Ray instance is needed at all.
        from sisa.train import orchestrator  # the one Ray import; deferred deletions stay Ray-free

        orchestrator.connect_unless_local(planner.address)
    own: int | None = None
    if present:
        meta = {"already_deleted": len(gone), "defer": defer, "policy": planner.config.unlearn.policy}
        request = store.write(lambda txn: record_request(store, txn, present, secret, meta))
        if on_journal is not None:
            on_journal()
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
    certificates = apply(planner, progress, requests=chosen)
    main_id = own if own is not None else named[-1]
    main = next(c for c in certificates if c["request_id"] == main_id)
    others = [c for c in certificates if c["request_id"] != main_id]
    return {**main, "also_applied": others} if others else main


def apply(
    planner: Planner, progress: Progress | None = None, *, requests: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Apply pending requests as one batch: one retrain per affected shard.

    With ``requests`` (request ids), exactly those requests are applied and certified,
    and only the shards they touched are retrained. This is how an interrupted request is
    finished without applying deferred ones (``Ensemble.open``, a repeated
    :func:`delete`). A shard that a deferred request shares with a chosen one is
    retrained without the deferred request's ids too, since its journal entry already
    removed them; that deferred request stays pending, and the apply that later takes it
    finds its shards retrained (nothing to train) and certifies it. Shards touched only by
    requests left pending stay as their journal left them (out of service under
    ``exclude``). The erasure re-keys the runs of every pending request, deferred ones
    too, so the bytes of every journaled id are unrecoverable after any apply.

    Args:
        planner: The planner of a writable store.
        progress: Called after each retrained stage is committed.
        requests: Ids of pending requests to apply; ``None`` applies every pending request
            (and trains every stale stage, as :meth:`~sisa.train.planner.Planner.fit` does).

    Returns:
        One certificate per applied request, oldest first. Each retrained shard's entry
        holds the work its new stages took: ``sample_epochs`` (sum of ``n_samples x
        epochs``) and ``compute_seconds`` (sum of the stages' training seconds).

    Raises:
        DataError: If a requested id is not a pending request (nothing is changed).
    """
    store = planner.store
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
        report = planner.fit(progress, shards=shards, refresh_backbone=False)
    except DomainUnavailableError as exc:
        # resources.on_missing_domain: refuse. The requests stay journaled (their ids are gone and
        # their shards out of service); say so, and how they get applied.
        ids = ", ".join(str(r["request_id"]) for r in chosen)
        raise DomainUnavailableError(
            f"{exc}. Deletion request(s) {ids} stay pending: their samples are already removed and the shards "
            "that held them are out of service; `sisa apply` finishes them once such a node is available"
        ) from exc
    # Every pending request, deferred ones too: their samples are already out of the records, and
    # after any apply none of the journaled ids' bytes may be recoverable.
    erasure = erase(store, pending(store))
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
                    # the retrain's work: what a benchmark or an auditor sums, without opening the store
                    "sample_epochs": sum(int(r["n_samples"]) * int(r["epochs"]) for r in new),
                    "compute_seconds": round(sum(float(r["seconds"]) for r in new), 4),
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
                "batch": {"requests": len(chosen), "retrain_seconds": report.seconds, "erasure": erasure.to_dict()},
                # where the retrain ran: "local" (this machine, no Ray), "ray", or None (nothing to train)
                "runner": report.runner,
            }
            record = append_entry(store, txn, secret, certificate)
            certificate["audit_seq"] = record["seq"]
            mark_applied(store, txn, request, applied_at)
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


def finish_interrupted(planner: Planner) -> list[dict[str, Any]]:
    """Apply exactly the requests a crash interrupted (pending, not deferred); what opening a store does.

    Returns:
        Their certificates (none when nothing was interrupted).
    """
    interrupted = [r["request_id"] for r in pending(planner.store) if not r["defer"]]
    if not interrupted:
        return []
    log.info("finishing interrupted deletion request(s) %s in %s", interrupted, planner.store.path)
    return apply(planner, requests=interrupted)
