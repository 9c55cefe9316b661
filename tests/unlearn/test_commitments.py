"""Manifest commitments: the bulk computation gives each id's documented commitment, sorted."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from sisa.receipt.entries import sample_commitment
from sisa.unlearn.commitments import manifest_commitments, opening


def test_bulk_commitments_are_each_ids_documented_commitment_sorted() -> None:
    secret = bytes(range(32))
    slices = [np.array([3, 17, 2**40], dtype=np.int64), np.array([], dtype=np.int64), np.array([0, 99])]
    ids = [3, 17, 2**40, 0, 99]
    # the README's opening: HMAC-SHA256(secret, b"sisa-opening|" + id as 8 bytes big-endian), and not the keyed
    # id hash certificates publish (b"sisa-id|"), which would let a receipt's neighbours be tested against ids
    assert opening(secret, 17) == hmac.new(secret, b"sisa-opening|" + (17).to_bytes(8, "big"), hashlib.sha256).digest()
    assert opening(secret, 17) != hmac.new(secret, b"sisa-id|" + (17).to_bytes(8, "big"), hashlib.sha256).digest()
    want = sorted(
        hashlib.sha256(b"sisa-sample-commitment-v1" + i.to_bytes(8, "big") + opening(secret, i)).digest() for i in ids
    )
    assert [sample_commitment(i, opening(secret, i)) for i in ids] != want  # unsorted as given
    assert sorted(sample_commitment(i, opening(secret, i)) for i in ids) == want
    assert manifest_commitments(secret, slices) == want
    assert manifest_commitments(secret, []) == []
