"""Deletion receipts: what a data subject keeps to check, with a public key alone, that their id was forgotten.

A receipt holds the id and its opening, the certificate that deleted it with its inclusion proof, the
latest signed checkpoint, and for every shard the certificate names, the shard's newest "model
published" entry (with its inclusion proof) and a non-membership proof of the id's commitment in that
entry's manifest commitment: the two adjacent leaves around it, each with its inclusion proof, within
the bucket it falls in (proven in the top tree) when the manifest is bucketed. The
operator signs the whole receipt too, so no field can be edited. A receipt is personal data (it names
the id): it is returned to the caller and never logged or stored.
"""

from __future__ import annotations

import base64
import bisect
import time
from dataclasses import dataclass
from typing import Any

import lmdb
import numpy as np

from sisa.errors import DataError, IntegrityError
from sisa.receipt.buckets import bucket_leaf, bucket_of
from sisa.receipt.entries import canonical, is_certificate, sample_commitment
from sisa.receipt.merkle import Tree, hash_leaf
from sisa.receipt.notes import Signer
from sisa.receipt.verify import FORMAT, SIGNATURE_LABEL
from sisa.store.database import Store
from sisa.store.digests import keyed_hash
from sisa.unlearn.commitcache import BUCKETS, ShardManifest, bucket_leaves, recompute, shard_manifest
from sisa.unlearn.commitments import manifest_commitments, opening
from sisa.unlearn.tlog import LogState, latest_published, log_state

__all__ = ["bucketed_non_membership", "issue_receipt", "non_membership"]


def non_membership(commitments: list[bytes], tree: Tree, target: bytes) -> dict[str, Any]:
    """The proof that ``target`` is not among the sorted ``commitments`` (the leaves of ``tree``).

    Raises:
        IntegrityError: If it is among them (the manifest still holds the id).
    """
    at = bisect.bisect_left(commitments, target)
    if at < len(commitments) and commitments[at] == target:
        raise IntegrityError("the live manifest still contains this id: no non-membership proof exists")

    def neighbour(i: int) -> dict[str, Any] | None:
        if not 0 <= i < len(commitments):
            return None
        return {"index": i, "commitment": commitments[i].hex(), "proof": [p.hex() for p in tree.inclusion_proof(i)]}

    return {"commitment": target.hex(), "size": tree.size, "left": neighbour(at - 1), "right": neighbour(at)}


def bucketed_non_membership(man: ShardManifest, leaves: list[bytes], target: bytes) -> dict[str, Any]:
    """The proof that ``target`` is not in the bucketed manifest ``man``, whose bucket of ``target`` is ``leaves``.

    Raises:
        IntegrityError: If it is among them, or ``leaves`` is not the bucket the manifest commits to.
    """
    buckets = len(man.sizes)
    b = bucket_of(target, buckets)
    tree = Tree([hash_leaf(c) for c in leaves])
    if tree.size != man.sizes[b] or tree.root() != man.roots[b]:
        raise IntegrityError(f"bucket {b}'s commitments do not hash to the manifest's bucket root")
    top = Tree([bucket_leaf(n, r) for n, r in zip(man.sizes, man.roots, strict=True)])
    inner = non_membership(leaves, tree, target)
    return {
        **inner,
        "size": man.size,
        "buckets": buckets,
        "bucket": b,
        "bucket_size": tree.size,
        "bucket_root": tree.root().hex(),
        "bucket_proof": [p.hex() for p in top.inclusion_proof(b)],
    }


def _included(state: LogState, index: int, size: int) -> dict[str, Any]:
    proof = state.tree.inclusion_proof(index, size)
    return {"index": index, "entry": state.entries[index]["entry"], "proof": [p.hex() for p in proof]}


def _flat(secret: bytes, slices: list[Any], entry: dict[str, Any], shard: int, target: bytes) -> dict[str, Any]:
    """The non-membership proof in a flat manifest (a "model published" entry from before buckets)."""
    commitments = manifest_commitments(secret, slices)
    tree = Tree([hash_leaf(c) for c in commitments])
    if tree.root().hex() != entry["manifest_commitment"]:
        raise IntegrityError(f"shard {shard}: the live model is not the one last published in the log")
    return non_membership(commitments, tree, target)


def issue_receipt(store: Store, signer: Signer, sample_id: int) -> dict[str, Any]:
    """Build and sign the receipt of a deleted id.

    Args:
        store: The store (read only).
        signer: The operator's signer (the key the log's checkpoints are signed with).
        sample_id: A validated sample id.

    Returns:
        The receipt (JSON-able), ending in its ``signature``.

    Raises:
        DataError: If the id was never deleted, its request is not applied yet, or a shard it names
            has no live model now (a pending deletion took it out of service).
        IntegrityError: If the log has no checkpoint covering the certificate, or a live manifest
            disagrees with its published commitment or still holds the id.
    """
    secret = store.secret()
    digest = keyed_hash(secret, sample_id)
    target = sample_commitment(sample_id, opening(secret, sample_id))
    with store.read() as txn:
        value = txn.get(digest.encode(), db=store.db("deleted"))
        if value is None:
            raise DataError(f"id {sample_id} was never deleted: there is no receipt to give")
        request_id = int(bytes(value))
        state = log_state(store, txn)
        view = _live_view(store, txn, secret, target)
    at, size = _certificate_at(state, sample_id, request_id)
    published = latest_published(state.entries, size)
    shards = []
    for shard in sorted(int(s) for s in state.entries[at]["entry"]["shards"]):
        if shard not in published:
            raise IntegrityError(f"shard {shard} has no model published in the log")
        index, entry = published[shard]
        absent = _absent(view, shard, entry, secret, sample_id, target)
        shards.append({"shard": shard, "published": _included(state, index, size), "absent": absent})
    receipt: dict[str, Any] = {
        "format": FORMAT,
        "id": sample_id,
        "id_hash": digest,  # the certificate's name for the id; this signed receipt binds the two
        "opening": opening(secret, sample_id).hex(),
        "issued_at": time.time(),
        "checkpoint": state.checkpoint,
        "certificate": _included(state, at, size),
        "shards": shards,
    }
    receipt["signature"] = base64.b64encode(signer.sign(SIGNATURE_LABEL + canonical(receipt))).decode()
    return receipt


@dataclass
class _LiveView:
    """The live models as a receipt reads them: records, slices, bucketed manifests and the id's bucket in each."""

    live: dict[int, dict[str, Any]]
    slices: dict[int, list[np.ndarray]]
    manifests: dict[int, ShardManifest]
    leaves: dict[int, list[bytes] | None]


def _live_view(store: Store, txn: lmdb.Transaction, secret: bytes, target: bytes) -> _LiveView:
    """Each live shard's bucketed manifest, from its cache (no write: a read transaction), and the id's bucket."""
    live = store.live(txn)
    # What each live model trained on: under a shard graph, its links' slices too.
    slices = {s: store.training_slices(txn, s, int(rec["stage"])) for s, rec in live.items()}
    manifests = {s: shard_manifest(store, txn, secret, s, ids, write=False) for s, ids in slices.items()}
    # Each shard has its own bucket count (it grows with the shard): the id's bucket in each.
    leaves = {s: bucket_leaves(store, txn, m, s, bucket_of(target, len(m.sizes))) for s, m in manifests.items()}
    for s, inside in leaves.items():
        if inside is None:  # the cached bucket is missing or damaged: the whole shard again, in memory
            manifests[s] = recompute(secret, slices[s])
            leaves[s] = manifests[s].buckets[bucket_of(target, len(manifests[s].sizes))]
    return _LiveView(live, slices, manifests, leaves)


def _certificate_at(state: LogState, sample_id: int, request_id: int) -> tuple[int, int]:
    """The log index of the request's certificate and the size of the signed checkpoint that covers it."""
    found = [
        i
        for i, rec in enumerate(state.entries)
        if isinstance(rec.get("entry"), dict)
        and is_certificate(rec["entry"])
        and rec["entry"].get("request_id") == request_id
    ]
    if not found:
        raise DataError(f"id {sample_id}'s deletion (request {request_id}) is not applied yet: `sisa apply` first")
    if state.checkpoint is None:
        raise IntegrityError("the log has no signed checkpoint: open the store writable once to sign one")
    size = int(state.checkpoint.split("\n")[1])
    if found[0] >= size:
        raise IntegrityError("the certificate is not under the latest signed checkpoint yet")
    return found[0], size


def _absent(
    view: _LiveView, shard: int, entry: dict[str, Any], secret: bytes, sample_id: int, target: bytes
) -> dict[str, Any]:
    """The proof that the id is not in ``shard``'s live manifest, which ``entry`` (its last published) commits to."""
    if shard not in view.slices and entry["checkpoint"] is not None:
        raise DataError(
            f"shard {shard} has no live model now (a pending deletion took it out of service): its receipt "
            "proves non-membership in the live model, so it can be issued once `sisa apply` retrains the shard"
        )
    if view.live.get(shard, {}).get("key") != entry["checkpoint"]:
        raise IntegrityError(f"shard {shard}: the live model is not the one last published in the log")
    if any(bool(np.any(ids == sample_id)) for ids in view.slices.get(shard, [])):
        # Checked on the store's slices themselves, whatever a cache says.
        raise IntegrityError("the live manifest still contains this id: no non-membership proof exists")
    if entry.get("manifest_buckets") is None:
        return _flat(
            secret, view.slices.get(shard, []) if entry["checkpoint"] is not None else [], entry, shard, target
        )
    man = view.manifests.get(shard, ShardManifest([0] * BUCKETS, [Tree([]).root()] * BUCKETS))
    inside = view.leaves.get(shard, [])
    if (
        entry["manifest_buckets"] != len(man.sizes)
        or man.root().hex() != entry["manifest_commitment"]
        or inside is None
    ):
        raise IntegrityError(f"shard {shard}: the live model is not the one last published in the log")
    return bucketed_non_membership(man, inside, target)
