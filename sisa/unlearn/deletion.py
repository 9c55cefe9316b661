"""Deletion: journal a request, erase it at once, retrain the affected shards later, certify.

Accepting a request is two steps before :func:`delete` returns, deferred or not: the
journal entry (samples out of the records, checkpoints that saw them retired), then the
erasure (the runs that held them re-keyed, their old keys destroyed and the key file
compacted: :mod:`sisa.store.erasure`), recorded in the journal as ``erased_at``. From
then on the deleted data is unrecoverable from the store. Applying a request is the
planner's ``fit`` (which retrains exactly the stale stages), a sweep of the keys of the
checkpoints the retrain retired, and one transaction that appends a "model published" entry
per retrained model and the certificates to the audit log and signs the transparency log's
checkpoint (:mod:`sisa.unlearn.tlog`), in that order. Each step is idempotent, so a crash
anywhere is finished by the next writable open (:func:`recover_erasure`, then
:func:`finish_interrupted`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import lmdb
import numpy as np

from sisa.errors import CoreSetError, DataError, DomainUnavailableError
from sisa.receipt.keys import load_signer
from sisa.store.database import Store
from sisa.store.digests import keyed_hash
from sisa.store.erasure import ErasureReport, erase, finish_erasure
from sisa.store.tombstones import deleting_requests
from sisa.train.domain import domain_id
from sisa.train.planner import FitReport, Planner, Progress
from sisa.unlearn import commitcache
from sisa.unlearn.audit import append_entry
from sisa.unlearn.ids import normalize_ids
from sisa.unlearn.journal import mark_applied, mark_erased, pending, record_request, unerased
from sisa.unlearn.tlog import log_index, publish_models, sign_checkpoint

__all__ = ["apply", "delete", "erase_pending", "finish_interrupted", "recover_erasure"]

log = logging.getLogger(__name__)


def delete(
    planner: Planner,
    ids: Any,
    *,
    defer: bool = False,
    progress: Progress | None = None,
    on_journal: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Delete samples: journal and erase durably, then (unless deferred) retrain and certify.

    When this returns, deferred or not, the deleted samples are unrecoverable from the store:
    the runs that held them were re-keyed, their old keys destroyed and the key file
    compacted. Only the retrain (and with it the models) waits for :func:`apply`. If the
    erasure fails (a full disk, say), the request stays journaled and the next writable
    open erases it.

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
        defer: Journal and erase only (ids tombstoned and erased, shards out of service);
            the retrain waits for :func:`apply`.
        progress: Called after each retrained stage is committed.
        on_journal: Called once the request is durable (the facade drops its cached models).

    Returns:
        The certificate (``state`` ``applied``; of this call's new request, else of the
        newest pending request its ids named), the pending request (``state`` ``pending``,
        with ``defer``; its ``erased_at`` and ``erasure`` say when and how it was erased),
        or, when every id was deleted by an already applied request, a
        no-op report (``state`` ``noop``); ``already_deleted`` counts ids deleted by
        earlier requests.

    Raises:
        DataError: On malformed ids or ids the store never held; nothing is changed.
        CoreSetError: If an id is in the core set (it trained the shared backbone); nothing is changed.
        ClusterConnectionError: If the Ray cluster cannot be joined (unless ``defer``);
            checked before journaling, so nothing is changed.
        StoreFullError: If the erasure cannot write (the request stays journaled, and the
            next writable open erases it).
    """
    wanted = normalize_ids(ids)
    store = planner.store
    secret = store.secret()
    present, gone = _held_and_gone(store, wanted)
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

        def journal(txn: lmdb.Transaction) -> dict[str, Any]:
            of_shard: dict[int, dict[int, list[int]]] = {}
            _, readers = store.shard_graph(txn)
            for sid in present:
                place = store.place(txn, sid)
                if place is not None:
                    # A shard's cache holds the ids its manifest covers: under a shard graph its links' too,
                    # in the same slice (slice r of its training set is slice r of every shard it reads).
                    for reader in readers[place[0]]:
                        of_shard.setdefault(reader, {}).setdefault(place[1], []).append(sid)
            out = record_request(store, txn, present, secret, meta)
            # The ids leave the commitment cache with their membership records (no deleted id in the clear).
            removed = {s: {r: np.asarray(ids) for r, ids in by.items()} for s, by in of_shard.items()}
            commitcache.follow(store, txn, secret, removed)
            return out

        request = store.write(journal)
        if on_journal is not None:
            on_journal()
        own = request["request_id"]
        log.info("journaled request %d: %d ids, shards %s", own, len(present), list(request["shards"]))
    # Erased now, deferred or not: the retrain may wait, the erasure does not. This also erases a
    # pending request whose erasure a crash cut short (a retried deletion names it).
    erase_pending(store)
    if defer:
        rid = own if own is not None else named[-1]
        if own is None:
            log.info("ids already journaled by pending request %d; it stays deferred", rid)
        request = next(r for r in pending(store) if r["request_id"] == rid)
        return {**request, "retrained_shards": [int(s) for s in request["shards"]]}
    if own is None:
        log.info("finishing pending request(s) %s named by a repeated deletion", named)
    interrupted = [rid for rid, r in waiting.items() if not r["defer"]]
    chosen = sorted({*named, *interrupted, *([own] if own is not None else [])})
    certificates = apply(planner, progress, requests=chosen)
    main_id = own if own is not None else named[-1]
    main = next(c for c in certificates if c["request_id"] == main_id)
    others = [c for c in certificates if c["request_id"] != main_id]
    return {**main, "also_applied": others} if others else main


def _held_and_gone(store: Store, wanted: list[int]) -> tuple[list[int], dict[int, int]]:
    """The ids of a request the store holds, and those already deleted (id -> the deleting request).

    Raises:
        CoreSetError: If an id is in the core set.
        DataError: If an id is neither held nor ever deleted.
    """
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
    return present, gone


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
    ``exclude``). Every pending request was erased when it was accepted (a request whose
    erasure a crash cut short is erased first, before any retrain); after the retrain,
    the keys of the checkpoints it retired are destroyed and the key file compacted.

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
    chosen = _chosen_requests(store, requests)
    if not chosen:
        return []
    signer = load_signer(store_root=store.path)  # before any work: a missing or misplaced key fails first
    started = time.time()
    erase_pending(store)  # a request whose erasure a crash cut short: erased before anything waits on Ray
    report = _retrain(planner, progress, chosen, every=requests is None)
    # The retrain retired checkpoints (a stale or interim model's, say): destroy their keys. The runs of
    # every pending request were re-keyed when it was accepted; erase() finds them done and skips them.
    sweep = erase(store, pending(store))
    secret = store.secret()
    journal = {r["request_id"]: r for r in pending(store)}  # with the erasure each one recorded
    erasure = _batch_erasure([journal.get(r["request_id"], r) for r in chosen], sweep, secret)

    def certify(txn: lmdb.Transaction) -> list[dict[str, Any]]:
        # The retrained models first: their "model published" entries bind the new weights to manifest
        # commitments without the deleted ids, and the certificates below then name those weights.
        index = log_index(store, txn)  # read once: publishing and signing bring it up to date in place
        live = store.live(txn)  # read once too: publishing reads it and changes no live record
        publish_models(store, txn, secret, store.recipe_digest(txn, planner.config), index, live)
        certificates = []
        for request in chosen:
            shards = {key: _shard_entry(store, txn, key, info, live, report) for key, info in request["shards"].items()}
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
                # when this request's samples became unrecoverable from the store (its erasure, at acceptance)
                "erased_at": journal.get(request["request_id"], request).get("erased_at"),
                "batch": {"requests": len(chosen), "retrain_seconds": report.seconds, "erasure": erasure},
                # where the retrain ran: "local" (this machine, no Ray), "ray", or None (nothing to train)
                "runner": report.runner,
            }
            record = append_entry(store, txn, secret, certificate)
            certificate["audit_seq"] = record["seq"]
            mark_applied(store, txn, request, applied_at)
            certificates.append(certificate)
        sign_checkpoint(store, txn, signer, index)  # one signed checkpoint over the whole batch
        return certificates

    certificates = store.write(certify)
    log.info("applied %d request(s); retrained %s", len(certificates), sorted(report.trained))
    return certificates


def _chosen_requests(store: Store, requests: Sequence[int] | None) -> list[dict[str, Any]]:
    """The pending requests an apply takes: those named (all of them must be pending), or every one.

    Raises:
        DataError: If a named request is not pending.
    """
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
    return chosen


def _retrain(planner: Planner, progress: Progress | None, chosen: list[dict[str, Any]], *, every: bool) -> FitReport:
    """Retrain the shards of the ``chosen`` requests (``every``: every stale stage, as a fit does).

    Raises:
        DomainUnavailableError: Under ``resources.on_missing_domain: refuse``, saying that the
            requests stay pending (erased, not retrained) and how they get applied.
    """
    shards = None if every else sorted({int(s) for r in chosen for s in r["shards"]})
    try:
        return planner.fit(progress, shards=shards, refresh_backbone=False)
    except DomainUnavailableError as exc:
        # resources.on_missing_domain: refuse. The requests stay journaled (their samples erased, their
        # shards' models not retrained yet); say so, and how they get applied.
        ids = ", ".join(str(r["request_id"]) for r in chosen)
        raise DomainUnavailableError(
            f"{exc}. Deletion request(s) {ids} stay pending: their samples are erased from the store (runs "
            "re-keyed, old keys destroyed), but the shards that held them are not retrained yet (out of service, "
            "or serving per unlearn.policy); `sisa apply` finishes them once such a node is available"
        ) from exc


def _shard_entry(
    store: Store,
    txn: lmdb.Transaction,
    key: str,
    info: dict[str, Any],
    live: dict[int, dict[str, Any]],
    report: FitReport,
) -> dict[str, Any]:
    """A certificate's entry for one shard: its journal entry, the new checkpoints and the work they took."""
    shard = int(key)
    info = {**info, **_rebind(info, live.get(shard), report.rebound.get(shard))}
    new = [r for r in store.stage_records(txn, shard) if r["stage"] > info["restart_stage"]]
    rec = live.get(shard)
    return {
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


def erase_pending(store: Store) -> ErasureReport | None:
    """Erase every pending request whose erasure has not finished, and record it in the journal.

    Runs already re-keyed for a request are skipped (:func:`~sisa.store.erasure.erase` is
    idempotent), so this finishes whatever a crash left.

    Returns:
        The erasure's report, or None when every pending request was erased already.
    """
    todo = unerased(store)
    if not todo:
        return None
    secret = store.secret()
    ids = [r["request_id"] for r in todo]

    def record(txn: lmdb.Transaction, report: ErasureReport) -> None:
        mark_erased(store, txn, ids, time.time(), _public(report, secret))

    report = erase(store, todo, done=record)
    log.info("erased request(s) %s: their samples are unrecoverable from %s", ids, store.path)
    return report


def recover_erasure(store: Store) -> None:
    """Finish what a crash cut short of an erasure: what every writable open does, before anything else.

    Compacts the key file if a key was dropped but the file not compacted, and erases every
    pending request (deferred ones too) whose erasure did not finish. No retrain: that is
    :func:`finish_interrupted`'s.
    """
    finish_erasure(store)
    erase_pending(store)


def _public(report: ErasureReport, secret: bytes) -> dict[str, Any]:
    """An erasure's report as a certificate or the journal holds it: quarantined samples by keyed hash."""
    out = report.to_dict()
    out["quarantined"] = [
        {"id_hash": keyed_hash(secret, q["id"]), **{k: q[k] for k in ("shard", "slice", "run", "reason")}}
        for q in report.quarantined
    ]
    return out


def _batch_erasure(requests: Sequence[dict[str, Any]], sweep: ErasureReport, secret: bytes) -> dict[str, Any]:
    """What a batch's certificate says its erasure did: the requests' erasures at acceptance, plus the sweep.

    One erasure can cover several requests (a crash recovered), so each distinct report counts once.
    """
    total = _public(sweep, secret)
    seen: set[str] = set()
    for request in requests:
        part = request.get("erasure")
        key = json.dumps(part, sort_keys=True)
        if not part or key in seen:
            continue
        seen.add(key)
        pairs = {tuple(p) for p in [*total["rotated_slices"], *part["rotated_slices"]]}
        total["rotated_slices"] = [list(p) for p in sorted(pairs)]
        for name in ("rotated_runs", "reencrypted", "checkpoint_keys"):
            total[name] += part[name]
        total["seconds"] = round(total["seconds"] + part["seconds"], 4)
        total["quarantined"] = [*part["quarantined"], *total["quarantined"]]
    return total


def finish_interrupted(planner: Planner) -> list[dict[str, Any]]:
    """Apply exactly the requests a crash interrupted (pending, not deferred); what opening a store does.

    First finishes any erasure a crash cut short (:func:`recover_erasure`), deferred
    requests' too, so no journaled id stays decryptable while a retrain waits.

    Returns:
        Their certificates (none when nothing was interrupted).
    """
    recover_erasure(planner.store)
    interrupted = [r["request_id"] for r in pending(planner.store) if not r["defer"]]
    if not interrupted:
        return []
    log.info("finishing interrupted deletion request(s) %s in %s", interrupted, planner.store.path)
    return apply(planner, requests=interrupted)
