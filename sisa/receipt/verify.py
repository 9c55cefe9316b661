"""Check a deletion receipt with the operator's public key alone: no store, no torch, no Ray.

The checks, in order; the first that fails is named:

1. the checkpoint is a signed note by the key, and the receipt's own signature is the key's;
2. the certificate is a leaf of the log under that checkpoint (inclusion proof) and names the id's
   keyed hash (which the signed receipt binds to the id) among its id hashes;
3. for every shard the certificate names: the shard's "model published" entry is a leaf under the
   checkpoint, and the id's commitment (recomputed from the id and its opening) is not in that entry's
   manifest commitment, so the manifest the published weights were trained on does not contain the id.
   A bucketed manifest (the entry names ``manifest_buckets``: :mod:`sisa.receipt.buckets`): the
   bucket the commitment falls in is proven at its index in the top tree with its size and root, and
   within it the commitment lies strictly between two adjacent leaves (each proven by its inclusion
   proof), or before the first / after the last, or the bucket is empty. A flat manifest (entries
   published before buckets, the only kind a ``sisa-receipt-v1`` receipt names): the same between
   two adjacent leaves of the one tree;
4. with a later consistency proof (``sisa audit --consistency`` of the receipt's checkpoint), that the
   log only grew since the receipt was issued.

Standard library and ``cryptography`` only.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

from sisa.errors import ProofError
from sisa.receipt.buckets import bucket_leaf, bucket_of, valid_buckets
from sisa.receipt.entries import MODEL_PUBLISHED, canonical, entry_leaf, is_certificate, sample_commitment
from sisa.receipt.merkle import EMPTY_ROOT, hash_leaf, verify_consistency, verify_inclusion
from sisa.receipt.notes import Checkpoint, Verifier, parse_checkpoint

__all__ = ["FORMAT", "FORMATS", "SIGNATURE_LABEL", "verify_receipt"]

# v2: bucketed manifest commitments. A v1 receipt (flat manifests only) still verifies by its own rule:
# its proofs are the same checks on the one tree, and its entries stay in the log unchanged.
FORMAT = "sisa-receipt-v2"
FORMATS = ("sisa-receipt-v1", FORMAT)
SIGNATURE_LABEL = b"sisa-receipt-v2\n"  # what the receipt signature signs, before the receipt's canonical JSON


def _hex(value: Any, what: str, size: int = 32) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ProofError(f"{what} is not {size} bytes of hex")
    return raw


def _proof(values: Any, what: str) -> list[bytes]:
    if not isinstance(values, list):
        raise ProofError(f"{what} is not a list of hashes")
    return [_hex(v, what) for v in values]


def _leaf_under(item: Any, cp: Checkpoint, what: str) -> dict[str, Any]:
    """Check a log entry's inclusion proof under the checkpoint; returns the entry."""
    if not isinstance(item, dict) or not isinstance(item.get("entry"), dict) or not isinstance(item.get("index"), int):
        raise ProofError(f"{what}: malformed (index, entry, proof)")
    entry = item["entry"]
    if not verify_inclusion(entry_leaf(entry), item["index"], cp.size, _proof(item.get("proof"), what), cp.root):
        raise ProofError(f"{what}: not in the log under the signed checkpoint (inclusion proof fails)")
    return entry


def _absent(shard: int, absent: Any, entry: dict[str, Any], target: bytes, bucketed: bool) -> None:
    """Check the non-membership proof of ``target`` in the published manifest commitment of ``entry``.

    ``bucketed``: whether the receipt's format knows bucketed manifests (a v1 receipt does not).
    """
    where = f"shard {shard}"
    if not isinstance(absent, dict):
        raise ProofError(f"{where}: no non-membership proof")
    if absent.get("commitment") != target.hex():
        raise ProofError(f"{where}: the non-membership proof is for another commitment (another id)")
    root, size = _hex(entry.get("manifest_commitment"), f"{where}: manifest commitment"), entry.get("manifest_size")
    if not isinstance(size, int) or absent.get("size") != size:
        raise ProofError(f"{where}: the proof's manifest size differs from the published one")
    buckets = entry.get("manifest_buckets")
    if buckets is None:  # a flat manifest (published before buckets): the layout is the entry's, not the receipt's
        _between(where, target, root, size, absent.get("left"), absent.get("right"))
        return
    if not bucketed or not valid_buckets(buckets) or absent.get("buckets") != buckets:
        raise ProofError(f"{where}: the proof's bucket layout differs from the published manifest's")
    index, count = bucket_of(target, buckets), absent.get("bucket_size")
    if absent.get("bucket") != index:
        raise ProofError(f"{where}: the proof is for another bucket than the id's commitment falls in")
    broot = _hex(absent.get("bucket_root"), f"{where}: bucket root")
    if not isinstance(count, int) or not 0 <= count <= size:
        raise ProofError(f"{where}: the bucket size is not a count")
    proof = _proof(absent.get("bucket_proof"), f"{where}: bucket proof")
    if not verify_inclusion(bucket_leaf(count, broot), index, buckets, proof, root):
        raise ProofError(f"{where}: the bucket is not in the published manifest commitment")
    where = f"{where} bucket {index}"
    _between(where, target, broot, count, absent.get("left"), absent.get("right"))


def _between(where: str, target: bytes, root: bytes, size: int, left: Any, right: Any) -> None:
    """Check that ``target`` lies between two adjacent leaves (or past an edge) of the tree (``size``, ``root``)."""
    if size == 0:
        if root != EMPTY_ROOT or left is not None or right is not None:
            raise ProofError(f"{where}: an empty manifest must have the empty root and no neighbours")
        return
    bounds: list[tuple[int, bytes] | None] = []
    for side, leaf in (("left", left), ("right", right)):
        if leaf is None:
            bounds.append(None)
            continue
        value = _hex(leaf.get("commitment") if isinstance(leaf, dict) else None, f"{where}: {side} neighbour")
        index = leaf.get("index")
        if not isinstance(index, int) or not verify_inclusion(
            hash_leaf(value), index, size, _proof(leaf.get("proof"), f"{where}: {side} proof"), root
        ):
            raise ProofError(f"{where}: the {side} neighbour is not a leaf of the published manifest")
        if value == target:
            raise ProofError(f"{where}: the published manifest still contains the id")
        bounds.append((index, value))
    lo, hi = bounds
    if lo is None and hi is None:
        raise ProofError(f"{where}: a non-membership proof in a non-empty manifest needs a neighbour")
    if lo is None and hi is not None and hi[0] != 0:
        raise ProofError(f"{where}: with no left neighbour, the right one must be the first leaf")
    if hi is None and lo is not None and lo[0] != size - 1:
        raise ProofError(f"{where}: with no right neighbour, the left one must be the last leaf")
    if lo is not None and hi is not None and hi[0] != lo[0] + 1:
        raise ProofError(f"{where}: the two neighbours are not adjacent leaves")
    if (lo is not None and not lo[1] < target) or (hi is not None and not target < hi[1]):
        raise ProofError(f"{where}: the id's commitment does not lie between the two neighbours")


def verify_receipt(receipt: Any, verifier: Verifier, consistency: dict[str, Any] | None = None) -> list[str]:
    """Check every signature and proof of a receipt.

    Args:
        receipt: The parsed receipt JSON.
        verifier: The operator's verifier key.
        consistency: Optionally, the JSON of ``sisa audit --consistency`` run later on the receipt's checkpoint.

    Returns:
        What was checked, one line each.

    Raises:
        ProofError: Naming the first check that fails.
    """
    if not isinstance(receipt, dict) or receipt.get("format") not in FORMATS:
        raise ProofError(f"not a receipt of a known format ({', '.join(FORMATS)})")
    version = str(receipt["format"])
    cp = parse_checkpoint(str(receipt.get("checkpoint", "")), verifier)
    done = [f"checkpoint of {cp.origin} at size {cp.size} is signed by {verifier.name}"]
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        signature = base64.b64decode(str(receipt.get("signature", "")), validate=True)
    except binascii.Error:
        signature = b""
    if not verifier.verify(version.encode() + b"\n" + canonical(body), signature):
        raise ProofError("receipt signature: the receipt was changed after it was signed (or signed by another key)")
    done.append("receipt signature checks")
    sample_id, opening = receipt.get("id"), _hex(receipt.get("opening"), "the opening")
    if not isinstance(sample_id, int) or not 0 <= sample_id < 2**63:
        raise ProofError("the receipt's id is not a sample id")
    cert = _leaf_under(receipt.get("certificate"), cp, "certificate")
    if not is_certificate(cert) or cert.get("state") != "applied":
        raise ProofError("certificate: the entry is not an applied deletion certificate")
    # The certificate names ids by keyed hash only; the receipt's signature binds this id to its hash.
    if not isinstance(receipt.get("id_hash"), str) or receipt["id_hash"] not in cert.get("id_hashes", []):
        raise ProofError("certificate: does not name this id's keyed hash among its id hashes")
    done.append(f"certificate of request {cert.get('request_id')} is in the log and names the id")
    target = sample_commitment(sample_id, opening)
    wanted = sorted(int(s) for s in cert.get("shards", {}))
    raw = receipt.get("shards")
    shards = [s for s in raw if isinstance(s, dict)] if isinstance(raw, list) else []
    named = [s.get("shard") for s in shards]
    if len(shards) != len(wanted) or sorted(s for s in named if isinstance(s, int)) != wanted:
        raise ProofError(f"the receipt must prove every shard the certificate names: {wanted}")
    for item in shards:
        shard = item["shard"]
        entry = _leaf_under(item.get("published"), cp, f"shard {shard}: model published")
        if entry.get("kind") != MODEL_PUBLISHED or entry.get("shard") != shard:
            raise ProofError(f"shard {shard}: the entry is not this shard's model-published entry")
        _absent(shard, item.get("absent"), entry, target, bucketed=version != "sisa-receipt-v1")
        done.append(f"shard {shard}: published model {str(entry.get('weights'))[:12]} trained without the id")
    if consistency is not None:
        done.append(_consistent(cp, consistency, verifier))
    return done


def _consistent(cp: Checkpoint, doc: dict[str, Any], verifier: Verifier) -> str:
    """Check that the log under a later checkpoint extends the receipt's."""
    new = parse_checkpoint(str(doc.get("checkpoint", "")), verifier)
    if new.origin != cp.origin:
        raise ProofError(f"consistency: the later checkpoint is of another log ({new.origin})")
    proof: Sequence[bytes] = _proof(doc.get("proof"), "consistency proof")
    if not verify_consistency(cp.size, new.size, cp.root, new.root, proof):
        raise ProofError(
            f"consistency: the log at size {new.size} does not extend the receipt's at size {cp.size} "
            "(the log was rewritten after the receipt was issued)"
        )
    return f"the log grew from {cp.size} to {new.size} entries without rewriting"
