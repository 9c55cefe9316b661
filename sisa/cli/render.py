"""How the ``sisa`` commands print their results as text (``--json`` prints the same results as JSON)."""

from __future__ import annotations

import datetime
import sys
from typing import Any

from sisa.cli.format import table
from sisa.train.domain import DOMAIN_FIX, missing_reason

__all__ = [
    "print_audit",
    "print_certificate",
    "print_eval",
    "print_lookup",
    "print_pending",
    "print_status",
    "print_verify",
    "utc",
]


def print_eval(result: dict[str, Any]) -> None:
    """Each shard's test accuracy, then the ensemble's."""
    rows = [[f"shard {k}", f"{v:.4f}"] for k, v in result["per_shard_accuracy"].items()]
    by_method = result.get("accuracy_by_method") or {result["method"]: result["accuracy"]}
    rows.extend([f"ensemble ({method})", f"{accuracy:.4f}"] for method, accuracy in by_method.items())
    print(table(["model", "test accuracy"], rows))


def print_status(result: dict[str, Any]) -> None:
    """The store in a line, its backbone, then one row per shard."""
    low, high = min(result["shard_slices"]), max(result["shard_slices"])
    slices = f"{low}" if low == high else f"{low}-{high}"  # add() gives touched shards one more slice each
    print(
        f"store {result['store']}: {result['samples']} samples, {result['shards']} shards x "
        f"{slices} slices, model {result['model']}, {result['trained_shards']} shards live"
    )
    if result["backbone"]:
        b = result["backbone"]
        stored = b["stored"]
        held = f"digest {stored['digest'][:16]}, {stored['bytes']} bytes" if stored else "not stored yet (fit)"
        core = f", core set of {b['core_samples']} samples (not deletable)" if b["source"] == "core" else ""
        print(f"shared backbone: {b['source']} {b['name']}, {held}; per-shard {b['adapter']}{core}")
    combiner = (result.get("aggregate") or {}).get("combiner")
    if combiner is not None:
        held = (
            f"stored {combiner['key'][:25]}..., fitted on the live models"
            if combiner["current"]
            else "none stored for the live models: predictions fit one in memory; `sisa train` stores it"
        )
        print(f"aggregation: combiner (fitted on the core set), {held}")
    if result.get("graph", "none") != "none":
        print(
            f"shard graph {result['graph']}: each shard also trains on the slices of the shards in its 'trains on' "
            "column, and a deletion retrains every shard that trained on the id"
        )
    linked = result.get("graph", "none") != "none"
    rows = [
        [
            s["shard"],
            s["samples"],
            " ".join(map(str, s["slice_samples"])),
            s["stages_done"],
            (s["live_checkpoint"] or "-")[:16],
            (s["domain"] or {}).get("id", "-"),
            _serving(s),
            *([" ".join(map(str, s.get("trains_on", []))) or "-"] if linked else []),
        ]
        for s in result["per_shard"]
    ]
    # "checkpoint key": the content address of the live stage (recipe, ids, domain), not the digest of
    # its weights, which `sisa verify` shows as "weights digest".
    head = ["shard", "samples", "per slice", "stages", "live checkpoint key", "domain", "serving"]
    print(table([*head, *(["trains on"] if linked else [])], rows))
    for q in result.get("quarantined", []):
        print(f"quarantined sample {q['id']} (shard {q['shard']} slice {q['slice']} run {q['run']}): {q['reason']}")
    if result.get("key_compaction_pending"):
        print("an erasure was cut short: the next writable open compacts the key file")


def _serving(shard: dict[str, Any]) -> str:
    """What a shard serves, in a word or two, for the status table."""
    if not shard["live"]:
        return "out of service" if shard["stages_done"] else "-"
    if shard["interim"]:
        return f"stage {shard['live_stage']} (clean, deletion pending)"
    if shard["stale"]:
        return "stale (deletion pending)"
    return f"stage {shard['live_stage']}"


def print_certificate(cert: dict[str, Any]) -> None:
    """A deletion's certificate: what was deleted, each retrained shard, and how long it took."""
    if cert["state"] == "noop":
        print(f"nothing to do: {cert['already_deleted']} id(s) were already deleted")
        return
    what = "erased, retrain deferred (run `sisa apply`)" if cert["state"] == "pending" else "applied"
    print(
        f"request {cert['request_id']} {what}: {cert['deleted']} sample(s) deleted, "
        f"{cert['already_deleted']} already deleted before"
    )
    erasure = cert.get("erasure") or cert.get("batch", {}).get("erasure") or {}
    for q in erasure.get("quarantined", []):
        print(
            f"quarantined a sample that failed to decrypt (id hash {q['id_hash'][:16]}, shard {q['shard']} "
            f"slice {q['slice']}): {q['reason']}; `sisa status` names it"
        )
    rows = [
        [
            k,
            f"{v['from_slice']} (rebound)" if v.get("rebound") else v["from_slice"],
            len(v["removed_checkpoints"]),
            len(v.get("new_checkpoints", [])),
            (v.get("live_checkpoint") or "-")[:16],
        ]
        for k, v in cert["shards"].items()
    ]
    print(table(["shard", "from slice", "removed ckpts", "new ckpts", "new live checkpoint key"], rows))
    for k, v in cert["shards"].items():
        if v.get("rebound"):
            print(f"shard {k} was retrained from scratch (rebound): {v['rebind_reason']}")
    if "seconds" in cert:
        applied = f"applied in {cert['apply_seconds']:.2f}s, " if "apply_seconds" in cert else ""
        print(f"done: {applied}{cert['seconds']:.2f}s since the request was journaled; audit entry {cert['audit_seq']}")
    for other in cert.get("also_applied", []):
        print(f"also finished pending request {other['request_id']}:")
        print_certificate(other)


def print_pending(requests: list[dict[str, Any]]) -> None:
    """The requests accepted but not yet applied."""
    print(f"{len(requests)} pending request(s)")
    for r in requests:
        print(f"  request {r['request_id']}: {r['deleted']} id(s), shards {', '.join(r['shards'])}")


def print_verify(result: dict[str, Any]) -> None:
    """One row per shard (live and replayed weights digests), then the verdict."""
    rows = [
        [
            k,
            v["samples"],
            (v["domain"] or {}).get("id", "-"),
            (v["live_weights"] or "-")[:16],
            (v["replay_weights"] or "-")[:16],
            "ok" if v["ok"] else "NOT CHECKED" if v.get("reason") == "domain_unavailable" else "FAIL",
            "no node of its domain" if v.get("reason") == "domain_unavailable" else v.get("reason", "") or "-",
        ]
        for k, v in result["shards"].items()
    ]
    headers = ["shard", "samples", "domain", "live weights digest", "replay weights digest", "result", "reason"]
    print(table(headers, rows))
    missing = {k: v for k, v in result["shards"].items() if v.get("reason") == "domain_unavailable"}
    for k, v in missing.items():
        print(f"shard {k}: {missing_reason(v['needs'], '?', v['available'])}", file=sys.stderr)
    if missing:
        print(DOMAIN_FIX, file=sys.stderr)
    combiner = result.get("combiner")
    if combiner is not None:  # aggregate.method: combiner: its bytes against its refit on the live models
        verdict = "ok" if combiner["ok"] else "NOT CHECKED" if combiner["reason"] == "domain_unavailable" else "FAIL"
        why = combiner.get("message") or combiner.get("reason") or "bytes identical to its refit on the live models"
        print(f"combiner {(combiner.get('key') or '-')[:25]}: {verdict}, {why}")
    if result["ok"]:
        print("verify: OK, every live model is bit-identical to a retrain from scratch in its domain")
    elif result.get("reason") == "domain_unavailable":
        print("verify: INCOMPLETE, no tampering found, but some shards could not be replayed (see above)")
    else:
        print("verify: FAILED")


def utc(seconds: float | None) -> str:
    """Unix seconds as an ISO 8601 UTC time, or ``-``."""
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def print_lookup(found: dict[str, Any]) -> None:
    """Whether one looked-up id was deleted, when and by which request."""
    if not found["deleted"]:
        print(f"{found['message']}; keyed hash {found['id_hash']}")
    elif found["state"] == "applied":
        print(
            f"id {found['id']}: deleted by request {found['request_id']}, requested {utc(found['requested_at'])}, "
            f"applied {utc(found['applied_at'])}, certificate in audit entry {found['audit_seq']}; "
            f"keyed hash {found['id_hash']}"
        )
    else:
        print(
            f"id {found['id']}: deletion requested by request {found['request_id']} at "
            f"{utc(found['requested_at'])}, still {found['state']} (no certificate yet; `sisa apply` or "
            f"`sisa resume` finishes it); keyed hash {found['id_hash']}"
        )


def print_audit(result: dict[str, Any]) -> None:
    """The certificates (``--show``), the looked-up ids (``--id``), then the chain's verdict."""
    for cert in result.get("certificates") or []:
        print(
            f"audit entry {cert['audit_seq']}: request {cert['request_id']}, requested "
            f"{utc(cert.get('requested_at'))}, applied {utc(cert.get('applied_at'))}, "
            f"{len(cert.get('id_hashes', []))} id hash(es), policy {cert.get('policy')}"
        )
        print_certificate(cert)
        print()
    for found in result.get("lookups") or []:
        print_lookup(found)
    if "log_size" in result:
        signed = "signed checkpoint" if result.get("checkpoint") else "no signed checkpoint"
        print(f"transparency log: {result['log_size']} leaves (certificates and models published), {signed}")
    # ``entries`` counts deletion certificates (a request of many ids is one); the log's leaves are above.
    state = "log and chain OK" if result["ok"] else "CHAIN BROKEN"
    print(f"audit: {result['entries']} deletion certificate(s), {state}")
    for problem in result["problems"]:
        print(f"  {problem}")
