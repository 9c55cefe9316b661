"""The audit log as an RFC 6962 transparency log: leaves, "model published" entries, signed checkpoints, proofs.

Every record of the ``audit`` table (the HMAC chain of :mod:`sisa.unlearn.audit`, kept as it was) is a
leaf: its entry's canonical JSON, hashed as RFC 6962 says. So the entries written before the log had a
tree become its first leaves unchanged, and nothing is lost. Besides the deletion certificates, a
"model published" entry is appended whenever a fit or an apply changes a shard's live model: the shard,
its live checkpoint and weights digest, the manifest digest and the manifest commitment (a Merkle root
over the sorted commitments of the samples it trained on, split in ``manifest_buckets`` buckets by prefix:
:mod:`sisa.receipt.buckets`, cached per shard by :mod:`sisa.unlearn.commitcache`), the recipe
digest and the determinism domain. After each change, the driver signs a C2SP checkpoint (origin, tree
size, root) with the operator's key (:mod:`sisa.receipt.keys`, never in the store, never in a Ray task)
and keeps the signed note in the store's metadata; a store whose log has no checkpoint yet (one written
before this) gets its first at its next writable open.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import lmdb

from sisa.errors import ConfigError, ProofError
from sisa.receipt.entries import MODEL_PUBLISHED, entry_leaf
from sisa.receipt.keys import load_signer
from sisa.receipt.merkle import Frontier, Tree, hash_leaf
from sisa.receipt.notes import Checkpoint, Signer, Verifier, format_checkpoint, parse_checkpoint, sign_note
from sisa.store.database import Store
from sisa.train.planner import Planner
from sisa.unlearn.audit import AUDIT_DB, append_entry, parse_record, read_entries
from sisa.unlearn.commitcache import BUCKETS, ShardManifest, drop_shard, for_publication

__all__ = [
    "LogIndex",
    "LogState",
    "check_log",
    "consistency",
    "latest_published",
    "log_index",
    "log_state",
    "publish",
    "publish_models",
    "sign_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass
class LogState:
    """The log as stored: its entries (raw), their Merkle tree, and the latest signed checkpoint."""

    entries: list[dict[str, Any]]
    tree: Tree
    checkpoint: str | None
    origin: str | None


def _leaf(record: dict[str, Any]) -> bytes:
    entry = record.get("entry")
    # A record edited into invalid JSON still takes a place in the tree, so the root no longer matches.
    return entry_leaf(entry) if isinstance(entry, dict) and not record.get("corrupt") else hash_leaf(b"corrupt")


INDEX_KEY = "log_index"  # metadata key of the LogIndex


@dataclass
class LogIndex:
    """What appending and signing need of the log, kept in the store's metadata: O(log n) per deletion.

    Signing a checkpoint needs the tree head, and publishing needs each shard's last "model published"
    entry; both used to re-read and rehash every entry, so a deletion's cost grew with the log's whole
    history. The index keeps the tree's right edge (:class:`~sisa.receipt.merkle.Frontier`) and that
    map, with the log size they stand for; :func:`log_index` reads in only the entries appended after it.
    It is a shortcut, never the authority: ``sisa audit`` recomputes the whole tree from the entries and
    checks it against the signed checkpoint.

    Attributes:
        frontier: The tree's right edge (its ``size`` is the number of entries indexed).
        published: Shard -> (entry index, live checkpoint key or ``None``) of its latest "model published" entry.
    """

    frontier: Frontier
    published: dict[int, tuple[int, str | None]]

    def to_json(self) -> dict[str, Any]:
        """The metadata value."""
        return {
            "size": self.frontier.size,
            "frontier": [h.hex() for h in self.frontier.nodes],
            "published": {str(s): [i, key] for s, (i, key) in sorted(self.published.items())},
        }


def _stored_index(raw: Any, entries: int) -> LogIndex:
    """The index kept in the metadata, or an empty one when absent, unreadable or longer than the log."""
    try:
        frontier = Frontier(int(raw["size"]), [bytes.fromhex(h) for h in raw["frontier"]])
        published = {int(s): (int(v[0]), None if v[1] is None else str(v[1])) for s, v in raw["published"].items()}
    except (TypeError, KeyError, ValueError, IndexError, AttributeError):
        return LogIndex(Frontier(), {})
    if frontier.size > entries or any(i >= frontier.size for i, _ in published.values()):
        return LogIndex(Frontier(), {})  # entries removed since (``sisa audit`` names that): index them again
    return LogIndex(frontier, published)


def log_index(store: Store, txn: lmdb.Transaction, since: LogIndex | None = None) -> LogIndex:
    """The log's index, brought up to the last entry (reads only the entries after the stored index).

    A store written before the index (or whose index is unreadable) is indexed from its first entry,
    once; a write transaction then keeps the result (:func:`sign_checkpoint`).

    Args:
        store: The store.
        txn: A transaction.
        since: An index read earlier in this same transaction: it is brought up to date in place
            instead of the stored one being read and parsed again (a deletion publishes, certifies,
            then signs, in one transaction).
    """
    db = store.db(AUDIT_DB)
    if since is None:
        index = _stored_index(store.meta_value(txn, INDEX_KEY), int(txn.stat(db)["entries"]))
    else:
        index = since
    cursor = txn.cursor(db=db)
    if cursor.set_range(struct.pack(">Q", index.frontier.size)):
        for key, value in cursor:
            record = parse_record(bytes(key), bytes(value))
            at = index.frontier.size
            index.frontier.append(_leaf(record))
            found = _published(record)
            if found is not None:
                index.published[found[0]] = (at, found[1].get("checkpoint"))
    return index


def _published(record: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(shard, entry) of a "model published" record; ``None`` for any other (or unreadable) record.

    The one rule both the log index and :func:`latest_published` read the log by.
    """
    entry = record.get("entry")
    if not isinstance(entry, dict) or record.get("corrupt") or entry.get("kind") != MODEL_PUBLISHED:
        return None
    try:
        return int(entry["shard"]), entry
    except (KeyError, TypeError, ValueError):
        return None


def log_state(store: Store, txn: lmdb.Transaction) -> LogState:
    """The log's entries, tree and latest signed checkpoint, read in ``txn``."""
    records = read_entries(store, txn)
    meta = store.meta(txn)
    return LogState(records, Tree([_leaf(r) for r in records]), meta.get("log_checkpoint"), meta.get("log_origin"))


def sign_checkpoint(store: Store, txn: lmdb.Transaction, signer: Signer, index: LogIndex | None = None) -> str:
    """Sign a checkpoint of the whole log as it stands in ``txn`` and keep it in the store's metadata.

    Args:
        store: The store.
        txn: The write transaction.
        signer: The operator's signer.
        index: The log index read earlier in ``txn`` (:func:`log_index`'s ``since``), if any.

    Returns:
        The signed note.
    """
    index = log_index(store, txn, index)
    stored_origin = store.meta_value(txn, "log_origin")
    origin = stored_origin or f"sisa.log/{uuid.uuid4().hex}"  # one log, one origin, for life
    note = sign_note(format_checkpoint(Checkpoint(origin, index.frontier.size, index.frontier.root())), signer)
    first = {} if stored_origin else {"log_origin": origin}  # written once: every deletion signs
    store.put_meta(txn, log_checkpoint=note, log_key=signer.verifier.encode(), **{INDEX_KEY: index.to_json()}, **first)
    return note


def latest_published(records: list[dict[str, Any]], size: int | None = None) -> dict[int, tuple[int, dict[str, Any]]]:
    """Each shard's newest "model published" entry among the first ``size`` records: shard -> (index, entry)."""
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, rec in enumerate(records[:size]):
        found = _published(rec)
        if found is not None:
            out[found[0]] = (i, found[1])
    return out


def publish_models(
    store: Store,
    txn: lmdb.Transaction,
    secret: bytes,
    recipe: str,
    index: LogIndex | None = None,
    live: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Append a "model published" entry for every shard whose live model changed since it was last published.

    A shard that lost its live model (emptied, or out of service) is published with no checkpoint and
    the empty manifest, so the log never claims a model that no longer serves.

    Args:
        store: The store.
        txn: The write transaction that also signs the checkpoint.
        secret: The store's HMAC secret (the samples' openings derive from it).
        recipe: The recipe digest the live models were trained under.
        index: The log index read earlier in ``txn`` (:func:`log_index`'s ``since``), if any.
        live: ``store.live(txn)``, where the caller read it in ``txn`` already (publishing changes no
            live record).

    Returns:
        The entries appended.
    """
    live = store.live(txn) if live is None else live
    published = log_index(store, txn, index).published
    appended = []
    for shard in sorted(set(live) | set(published)):
        rec = live.get(shard)
        if shard in published and (rec["key"] if rec else None) == published[shard][1]:
            continue
        entry: dict[str, Any] = {"kind": MODEL_PUBLISHED, "shard": shard, "published_at": time.time()}
        if rec is None:
            entry.update(checkpoint=None, weights=None, manifest=None, recipe=recipe, domain=None)
            empty = ShardManifest([0] * BUCKETS, [Tree([]).root()] * BUCKETS)
            entry.update(manifest_commitment=empty.root().hex(), manifest_size=0, manifest_buckets=BUCKETS)
            drop_shard(store, txn, shard)
        else:
            # From the shard's cache: a deletion rehashed only the buckets its ids fell in (commitcache.follow).
            man = for_publication(store, txn, secret, shard, rec)
            if man is None:
                # A deferred deletion took samples out of this shard and the model is not retrained yet:
                # its manifest is no longer the store's, so nothing can be committed for it now.
                log.info("shard %d: live model awaits a retrain; not published", shard)
                continue
            entry.update(
                checkpoint=rec["key"],
                weights=rec["weights"],
                manifest=rec["manifest"],
                manifest_commitment=man.root().hex(),
                manifest_size=man.size,
                manifest_buckets=len(man.sizes),
                recipe=recipe,
                domain=rec.get("domain"),
            )
        append_entry(store, txn, secret, entry)
        appended.append(entry)
    return appended


def consistency(state: LogState, old_note: str, verifier: Verifier) -> dict[str, Any]:
    """Prove that the log grew from a checkpoint someone kept to the latest signed one.

    Args:
        state: The log now (:func:`log_state`).
        old_note: The kept signed checkpoint.
        verifier: The operator's verifier key.

    Returns:
        ``old`` and ``new`` (size and hex root), ``checkpoint`` (the latest signed note), ``proof`` (hex
        hashes) and ``ok``: whether the proof verifies against both roots.

    Raises:
        ProofError: If either checkpoint does not verify under the key, is of another log, or the old one is larger.
    """
    from sisa.receipt.merkle import verify_consistency

    if state.checkpoint is None:
        raise ProofError("the log has no signed checkpoint yet (open the store writable once to sign one)")
    old = parse_checkpoint(old_note, verifier)
    new = parse_checkpoint(state.checkpoint, verifier)
    if old.origin != new.origin:
        raise ProofError(f"the kept checkpoint is of log {old.origin!r}, this store's log is {new.origin!r}")
    if old.size > new.size:
        raise ProofError(f"the kept checkpoint has {old.size} entries, more than the log's {new.size}: entries removed")
    proof = state.tree.consistency_proof(old.size, new.size)
    ok = new.root == state.tree.root(new.size) and verify_consistency(old.size, new.size, old.root, new.root, proof)
    return {
        "ok": ok,
        "old": {"size": old.size, "root": old.root.hex()},
        "new": {"size": new.size, "root": new.root.hex()},
        "checkpoint": state.checkpoint,
        "proof": [p.hex() for p in proof],
    }


def publish(planner: Planner, signer: Signer | None = None) -> list[dict[str, Any]]:
    """Publish every changed live model and sign a checkpoint, if the log changed or is not signed yet.

    What a fit and a writable open do (an apply does it inside its certifying transaction). On a store
    whose log was written before it had a tree, this is the migration: its entries become the first
    leaves under the first signed checkpoint.

    Returns:
        The "model published" entries appended.
    """
    store = planner.store
    try:
        secret = store.secret()
    except ConfigError as exc:
        # A secret kept outside and not named now: training and prediction work without it, so this
        # does not stop them; the next fit or open that has it publishes what changed meanwhile.
        log.warning("live models not published in the transparency log: %s", exc)
        return []
    signer = signer or load_signer(store_root=store.path)
    with store.read() as txn:
        index = log_index(store, txn)
        checkpoint = store.meta_value(txn, "log_checkpoint")
        live = {shard: rec["key"] for shard, rec in store.live(txn).items()}
    published = index.published
    stale = any(s not in published or published[s][1] != key for s, key in live.items()) or any(
        key is not None and s not in live for s, (_, key) in published.items()
    )
    if not stale and (index.frontier.size == 0 or _covers(checkpoint, index.frontier, signer.verifier)):
        # Nothing to publish or sign (an empty log waits for its first entry): no write transaction at all.
        return []

    def change(txn: lmdb.Transaction) -> list[dict[str, Any]]:
        index = log_index(store, txn)
        appended = publish_models(store, txn, secret, store.recipe_digest(txn, planner.config), index)
        frontier = log_index(store, txn, index).frontier
        signed = _covers(store.meta_value(txn, "log_checkpoint"), frontier, signer.verifier)
        if appended or not signed:
            sign_checkpoint(store, txn, signer, index)
        return appended

    appended = store.write(change)
    if appended:
        log.info("published %d live model(s) in the transparency log", len(appended))
    return appended


def _covers(checkpoint: str | None, frontier: Frontier, verifier: Verifier) -> bool:
    """Whether the stored checkpoint is this key's and covers the whole log (whose right edge is ``frontier``)."""
    try:
        cp = parse_checkpoint(checkpoint or "", verifier)
    except ProofError:
        return False
    return cp.size == frontier.size and cp.root == frontier.root()


def check_log(store: Store, verifier: Verifier) -> tuple[list[str], dict[str, Any]]:
    """Check the tree against the latest signed checkpoint, and that checkpoint's signature.

    Returns:
        The problems found (none: the log is intact and signed) and ``log_size`` / ``checkpoint``.
    """
    with store.read() as txn:
        state = log_state(store, txn)
    size, problems = state.tree.size, []
    info = {"log_size": size, "checkpoint": state.checkpoint}
    if state.checkpoint is None:
        if size:
            problems.append(
                f"the log's {size} entries are under no signed checkpoint (written before the log was signed): "
                "open the store writable once (`sisa resume`) to sign its first checkpoint"
            )
        return problems, info
    try:
        cp = parse_checkpoint(state.checkpoint, verifier)
    except ProofError as exc:
        return [f"latest checkpoint: {exc}"], info
    if cp.origin != state.origin:
        problems.append(f"latest checkpoint is of log {cp.origin!r}, the store's log is {state.origin!r}")
    if cp.size > size:
        problems.append(f"the signed checkpoint covers {cp.size} entries, the log has only {size} (entries removed)")
    elif cp.root != state.tree.root(cp.size):
        problems.append(
            f"the Merkle root of the log's first {cp.size} entries differs from the signed checkpoint's "
            "(an entry was edited, removed, inserted or reordered)"
        )
    elif cp.size < size:
        problems.append(f"{size - cp.size} entries were appended after the last signed checkpoint (unsigned)")
    return problems, info
