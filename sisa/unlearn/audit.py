"""The append-only, hash-chained audit log of applied deletion requests.

Each entry's MAC is an HMAC (per-store secret) over its sequence number, the previous
entry's MAC and the entry's canonical JSON; the head (count and last MAC) lives in the
store's metadata. Editing, reordering, removing or hand-appending an entry breaks the
chain, and without the secret nobody can recompute it. The entries are also the leaves of the
transparency log (:mod:`sisa.unlearn.tlog`): deletion certificates and "model published" entries,
under checkpoints signed with the operator's key, which outsiders can check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import lmdb

from sisa.receipt.entries import is_certificate
from sisa.store.database import Store
from sisa.store.digests import keyed_hash

__all__ = [
    "AUDIT_DB",
    "AuditReport",
    "append_entry",
    "certificates",
    "check_chain",
    "keyed_hash",
    "lookup_ids",
    "parse_record",
    "read_entries",
]

GENESIS = "0" * 64
AUDIT_DB = "audit"  # the store table holding the chain (what a tamper test or an auditor's tool opens)


def _mac(secret: bytes, seq: int, prev: str, entry: dict[str, Any]) -> str:
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, f"sisa-audit|{seq}|{prev}|{body}".encode(), hashlib.sha256).hexdigest()


def append_entry(store: Store, txn: lmdb.Transaction, secret: bytes, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry inside the caller's write transaction.

    Args:
        store: The store.
        txn: Open write transaction (the same one that marks the request applied).
        secret: The store's HMAC secret.
        entry: JSON-able certificate.

    Returns:
        The stored record: ``seq``, ``prev``, ``mac``, ``entry``.
    """
    head = store.meta_value(txn, "audit_head") or {"count": 0, "mac": GENESIS}
    seq = head["count"]
    record = {"seq": seq, "prev": head["mac"], "entry": entry, "mac": _mac(secret, seq, head["mac"], entry)}
    txn.put(struct.pack(">Q", seq), json.dumps(record, sort_keys=True).encode(), db=store.db(AUDIT_DB))
    store.put_meta(txn, audit_head={"count": seq + 1, "mac": record["mac"]})
    return record


def read_entries(store: Store, txn: lmdb.Transaction) -> list[dict[str, Any]]:
    """All audit records in key order (raw, unchecked)."""
    return [parse_record(bytes(key), bytes(value)) for key, value in txn.cursor(db=store.db(AUDIT_DB))]


def parse_record(key: bytes, value: bytes) -> dict[str, Any]:
    """One stored audit record as read, unchecked: ``corrupt`` when it is not JSON, ``_key`` its sequence key."""
    try:
        record = json.loads(bytes(value))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = {"seq": None, "corrupt": True}
    if not isinstance(record, dict):
        record = {"seq": None, "corrupt": True}
    record["_key"] = struct.unpack(">Q", bytes(key))[0] if len(key) == 8 else None
    return record


@dataclass
class AuditReport:
    """Result of checking the log: ``ok`` only if every check passed.

    ``entries`` counts the certificates; ``log_size`` every leaf (certificates and models published).
    """

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    log_size: int = 0  # leaves of the transparency log (every entry: certificates and models published)
    checkpoint: str | None = None  # the latest signed checkpoint (a C2SP signed note)


def check_chain(store: Store, secret: bytes) -> AuditReport:
    """Recompute the whole chain and compare it with the stored head.

    Args:
        store: The store.
        secret: The store's HMAC secret.

    Returns:
        The report; ``problems`` names each broken entry.
    """
    problems: list[str] = []
    with store.read() as txn:
        records = read_entries(store, txn)
        head = store.meta(txn).get("audit_head") or {"count": 0, "mac": GENESIS}
        applied = sum(1 for _ in _applied_requests(store, txn))
    certified = sum(1 for r in records if isinstance(r.get("entry"), dict) and is_certificate(r["entry"]))
    prev = GENESIS
    for i, rec in enumerate(records):
        if rec.get("corrupt"):
            problems.append(f"entry {i}: not valid JSON (edited)")
            continue
        if rec.get("seq") != i or rec.get("_key") != i:
            problems.append(f"entry {i}: sequence number {rec.get('seq')} out of place (removed or reordered)")
        if rec.get("prev") != prev:
            problems.append(f"entry {i}: does not chain to the previous entry (removed, reordered or inserted)")
        entry = rec.get("entry")
        if not isinstance(entry, dict) or not hmac.compare_digest(
            str(rec.get("mac")), _mac(secret, i, str(rec.get("prev")), entry)
        ):
            problems.append(f"entry {i}: MAC mismatch (edited or forged)")
        prev = str(rec.get("mac"))
    if head["count"] != len(records) or head["mac"] != prev:
        problems.append(
            f"head says {head['count']} entries ending in {head['mac'][:12]}, log has {len(records)} "
            f"ending in {prev[:12]} (entries removed or appended by hand)"
        )
    if applied != certified:
        problems.append(f"{applied} requests are marked applied but the log has {certified} certificates")
    return AuditReport(ok=not problems, entries=certified, problems=problems, log_size=len(records))


def _applied_requests(store: Store, txn: lmdb.Transaction) -> Any:
    for _, value in txn.cursor(db=store.db("requests")):
        if json.loads(bytes(value)).get("state") == "applied":
            yield value


def certificates(store: Store) -> list[dict[str, Any]]:
    """The certificates in the audit log, oldest first, each with its ``audit_seq`` (raw, unchecked).

    Args:
        store: The store.

    Returns:
        One certificate per applied request; run :func:`check_chain` to know they are untouched.
    """
    with store.read() as txn:
        records = read_entries(store, txn)
    return [
        {**rec["entry"], "audit_seq": rec.get("seq")}
        for rec in records
        if not rec.get("corrupt") and isinstance(rec.get("entry"), dict) and is_certificate(rec["entry"])
    ]


def lookup_ids(store: Store, secret: bytes, ids: list[int]) -> list[dict[str, Any]]:
    """Was each id deleted, when, and by which request?

    Each id is named by :func:`keyed_hash` under the store's secret and looked up in the store's
    record of deleted ids (keyed hash -> request id), never stored in the clear.

    Args:
        store: The store.
        secret: The store's HMAC secret.
        ids: Validated sample ids (see :func:`sisa.unlearn.ids.normalize_ids`).

    Returns:
        One dict per id: ``id``, ``id_hash``, ``deleted`` (bool); for a deleted id also
        ``request_id``, ``state`` (``applied`` or ``pending``), ``requested_at``, ``applied_at``
        (Unix seconds, ``None`` while pending) and ``audit_seq`` (the audit entry of its
        certificate, ``None`` while pending); for an id never deleted, ``in_store`` (whether the
        store holds a sample with that id) and a ``message`` saying so.
    """
    out: list[dict[str, Any]] = []
    with store.read() as txn:
        by_request = {
            rec["entry"].get("request_id"): rec
            for rec in read_entries(store, txn)
            if not rec.get("corrupt") and isinstance(rec.get("entry"), dict) and is_certificate(rec["entry"])
        }
        for sample_id in ids:
            digest = keyed_hash(secret, sample_id)
            value = txn.get(digest.encode(), db=store.db("deleted"))
            if value is None:
                held = store.has_sample(txn, sample_id)
                out.append(
                    {
                        "id": sample_id,
                        "id_hash": digest,
                        "deleted": False,
                        "in_store": held,
                        "message": f"id {sample_id} was never deleted"
                        + (" (the store holds it)" if held else " (and the store holds no sample with this id)"),
                    }
                )
                continue
            request_id = int(bytes(value))
            raw = txn.get(struct.pack(">Q", request_id), db=store.db("requests"))
            request = json.loads(bytes(raw)) if raw is not None else {}
            record = by_request.get(request_id)
            out.append(
                {
                    "id": sample_id,
                    "id_hash": digest,
                    "deleted": True,
                    "request_id": request_id,
                    "state": request.get("state", "unknown"),
                    "requested_at": request.get("requested_at"),
                    "applied_at": request.get("applied_at"),
                    "audit_seq": record["seq"] if record is not None else None,
                    "certificate_names_it": bool(record and digest in record["entry"].get("id_hashes", [])),
                }
            )
    return out
