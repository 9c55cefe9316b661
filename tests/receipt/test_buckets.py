"""Bucketed manifest commitments: each non-membership case verifies, and every forged proof is refused.

The manifests here are built by hand (crafted 32-byte commitments around one id's) so each case is
reached for sure: neighbours on both sides inside the id's bucket, the id before the bucket's first
leaf or after its last, and an empty bucket.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import pytest

from sisa.errors import IntegrityError, ProofError
from sisa.receipt.buckets import bucket_leaf, bucket_of, bucket_root, manifest_root, split, valid_buckets
from sisa.receipt.entries import MODEL_PUBLISHED, canonical, entry_leaf, sample_commitment
from sisa.receipt.keys import load_signer
from sisa.receipt.merkle import EMPTY_ROOT, Tree, hash_leaf
from sisa.receipt.notes import Checkpoint, format_checkpoint, sign_note
from sisa.receipt.verify import FORMAT, verify_receipt
from sisa.unlearn.commitcache import BUCKETS, ShardManifest
from sisa.unlearn.receipts import bucketed_non_membership, non_membership

SIGNER = load_signer()
KEY = SIGNER.verifier
OPENING = bytes(range(32))
TARGET = sample_commitment(7, OPENING)
B = bucket_of(TARGET, BUCKETS)
# Commitments in other buckets (every bucket but the id's gets some), and crafted ones in the id's bucket.
OTHERS = [
    c for c in (hashlib.sha256(b"other" + bytes([i, j])).digest() for i in range(8) for j in range(200)) if c[0] != B
]
BELOW = [bytes([B]) + bytes(30) + bytes([k]) for k in range(3)]
ABOVE = [bytes([B]) + b"\xff" * 30 + bytes([k]) for k in range(3)]


def manifest(commitments: list[bytes]) -> ShardManifest:
    buckets = split(sorted(commitments), BUCKETS)
    return ShardManifest([len(b) for b in buckets], [bucket_root(b) for b in buckets], dict(enumerate(buckets)))


def receipt(man: ShardManifest | Tree, absent: dict[str, Any], fmt: str = FORMAT) -> dict[str, Any]:
    """A signed receipt of id 7 whose shard 0 published ``man`` (a flat tree: an entry from before buckets)."""
    cert = {"request_id": 1, "state": "applied", "id_hashes": ["ab" * 32], "shards": {"0": {}}}
    published = {
        "kind": MODEL_PUBLISHED,
        "shard": 0,
        "weights": "w",
        "manifest_commitment": man.root().hex(),
        "manifest_size": man.size,
    }
    if isinstance(man, ShardManifest):
        published["manifest_buckets"] = BUCKETS
    log = Tree([entry_leaf(cert), entry_leaf(published)])
    note = sign_note(format_checkpoint(Checkpoint("sisa.log/test", 2, log.root())), SIGNER)
    body: dict[str, Any] = {
        "format": fmt,
        "id": 7,
        "id_hash": "ab" * 32,
        "opening": OPENING.hex(),
        "checkpoint": note,
        "certificate": {"index": 0, "entry": cert, "proof": [p.hex() for p in log.inclusion_proof(0)]},
        "shards": [
            {
                "shard": 0,
                "published": {"index": 1, "entry": published, "proof": [p.hex() for p in log.inclusion_proof(1)]},
                "absent": absent,
            }
        ],
    }
    body["signature"] = base64.b64encode(SIGNER.sign(fmt.encode() + b"\n" + canonical(body))).decode()
    return body


def proof(commitments: list[bytes]) -> tuple[ShardManifest, dict[str, Any]]:
    man = manifest(commitments)
    return man, bucketed_non_membership(man, man.buckets[B], TARGET)


def test_the_layout_is_the_documented_one() -> None:
    assert BELOW[-1] < TARGET < ABOVE[0] and valid_buckets(256) and valid_buckets(4096)
    assert not valid_buckets(0) and not valid_buckets(3) and not valid_buckets(1 << 17) and not valid_buckets(True)
    assert bucket_of(b"\xab\xcd" + bytes(30), 256) == 0xAB and bucket_of(b"\xab\xcd" + bytes(30), 4096) == 0xABC
    man = manifest(OTHERS + BELOW)
    # the root over the buckets' (size as 8 bytes big-endian, root) leaves, an empty bucket with the empty tree's hash
    assert man.sizes[B] == 3 and man.roots[B] == bucket_root(sorted(BELOW)) and man.roots[B ^ 1] != EMPTY_ROOT
    empty = manifest([c for c in OTHERS if c[0] != (B ^ 1)])
    assert empty.sizes[B ^ 1] == 0 and empty.roots[B ^ 1] == EMPTY_ROOT
    want = Tree([bucket_leaf(n, r) for n, r in zip(man.sizes, man.roots, strict=True)]).root()
    assert man.root() == manifest_root(man.sizes, man.roots) == want
    assert bucket_leaf(3, man.roots[B]) == hashlib.sha256(b"\x00" + (3).to_bytes(8, "big") + man.roots[B]).digest()


@pytest.mark.parametrize(
    ("inside", "left", "right"),
    [(BELOW + ABOVE, 2, 3), (ABOVE, None, 0), (BELOW, 2, None), ([], None, None)],
    ids=["between", "before-first", "after-last", "empty-bucket"],
)
def test_each_case_verifies(inside: list[bytes], left: int | None, right: int | None) -> None:
    man, absent = proof(OTHERS + inside)
    assert absent["bucket"] == B and absent["bucket_size"] == len(inside) and absent["size"] == len(OTHERS + inside)
    assert [x and x["index"] for x in (absent["left"], absent["right"])] == [left, right]
    assert verify_receipt(receipt(man, absent), KEY)[-1].endswith("trained without the id")


def edits(absent: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key in ("bucket", "bucket_size", "size", "buckets"):
        out.append((key, {**absent, key: absent[key] + 1}))
    flip = {**absent, "bucket_root": ("0" if absent["bucket_root"][0] != "0" else "1") + absent["bucket_root"][1:]}
    out.append(("bucket_root", flip))
    if absent["bucket_proof"]:
        out.append(("bucket_proof", {**absent, "bucket_proof": absent["bucket_proof"][1:]}))
    for side in ("left", "right"):
        if absent[side] is not None:
            out.append((side, {**absent, side: None}))
            bent = copy.deepcopy(absent)
            bent[side]["index"] += 1
            out.append((f"{side}.index", bent))
    return out


@pytest.mark.parametrize("inside", [BELOW + ABOVE, ABOVE, BELOW, []], ids=["between", "first", "last", "empty"])
def test_an_edited_proof_is_refused_even_when_signed(inside: list[bytes]) -> None:
    man, absent = proof(OTHERS + inside)
    for what, bent in edits(absent):
        with pytest.raises(ProofError):
            verify_receipt(receipt(man, bent), KEY)
        assert what  # (named for a failing case's traceback)


def test_an_empty_bucket_claimed_for_a_full_one_is_refused() -> None:
    man, absent = proof(OTHERS + BELOW + ABOVE)
    lie = {**absent, "bucket_size": 0, "bucket_root": EMPTY_ROOT.hex(), "left": None, "right": None}
    with pytest.raises(ProofError, match="bucket is not in the published manifest"):
        verify_receipt(receipt(man, lie), KEY)


def test_a_manifest_that_still_contains_the_id_is_refused() -> None:
    man = manifest([*OTHERS, *BELOW, TARGET, *ABOVE])
    with pytest.raises(IntegrityError, match="still contains this id"):
        bucketed_non_membership(man, man.buckets[B], TARGET)
    tree = Tree([hash_leaf(c) for c in man.buckets[B]])
    top = Tree([bucket_leaf(n, r) for n, r in zip(man.sizes, man.roots, strict=True)])

    def leaf(i: int) -> dict[str, Any]:
        return {"index": i, "commitment": man.buckets[B][i].hex(), "proof": [p.hex() for p in tree.inclusion_proof(i)]}

    def absent(left: int, right: int) -> dict[str, Any]:
        return {
            "commitment": TARGET.hex(),
            "size": man.size,
            "buckets": BUCKETS,
            "bucket": B,
            "bucket_size": tree.size,
            "bucket_root": tree.root().hex(),
            "bucket_proof": [p.hex() for p in top.inclusion_proof(B)],
            "left": leaf(left),
            "right": leaf(right),
        }

    with pytest.raises(ProofError, match="still contains the id"):
        verify_receipt(receipt(man, absent(2, 3)), KEY)  # the id's own leaf as a neighbour
    with pytest.raises(ProofError, match="not adjacent"):
        verify_receipt(receipt(man, absent(2, 4)), KEY)  # skipping the id's own leaf


def test_a_proof_for_another_id_or_bucket_is_refused() -> None:
    man = manifest(OTHERS + BELOW + ABOVE)
    elsewhere = bytes([B ^ 1]) + b"\x80" + bytes(30)  # absent too, in another bucket
    nearby = bytes([B]) + b"\x80" + bytes(30)  # absent too, in the id's bucket with the same neighbours
    for other in (elsewhere, nearby):
        absent = bucketed_non_membership(man, man.buckets[bucket_of(other, BUCKETS)], other)
        with pytest.raises(ProofError, match="for another commitment"):
            verify_receipt(receipt(man, absent), KEY)
    # the id's own commitment over another bucket's proof
    absent = bucketed_non_membership(man, man.buckets[B ^ 1], elsewhere)
    with pytest.raises(ProofError, match="another bucket"):
        verify_receipt(receipt(man, {**absent, "commitment": TARGET.hex()}), KEY)


def test_a_v1_receipt_of_a_bucketed_manifest_and_an_unknown_format_are_refused() -> None:
    man, absent = proof(OTHERS + BELOW + ABOVE)
    with pytest.raises(ProofError, match="bucket layout differs"):
        verify_receipt(receipt(man, absent, "sisa-receipt-v1"), KEY)
    with pytest.raises(ProofError, match="not a receipt of a known format"):
        verify_receipt(receipt(man, absent, "sisa-receipt-v3"), KEY)


def test_a_v1_receipt_of_a_flat_manifest_still_verifies_by_its_old_rule() -> None:
    commitments = sorted([*OTHERS, *BELOW, *ABOVE])
    flat = Tree([hash_leaf(c) for c in commitments])
    absent = non_membership(commitments, flat, TARGET)
    assert set(absent) == {"commitment", "size", "left", "right"}  # the v1 proof: two neighbours in one tree
    for fmt in ("sisa-receipt-v1", FORMAT):  # a v2 receipt of an entry published before buckets: the same rule
        assert verify_receipt(receipt(flat, absent, fmt), KEY)[-1].endswith("trained without the id")
    with pytest.raises(ProofError, match="right neighbour is not a leaf of the published manifest"):
        bent = copy.deepcopy(absent)
        bent["right"] = {**bent["right"], "index": bent["right"]["index"] + 1}
        verify_receipt(receipt(flat, bent, "sisa-receipt-v1"), KEY)
