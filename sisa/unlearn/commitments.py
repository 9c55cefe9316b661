"""Manifest commitments: the sorted commitments of the samples a model trained on, and a sample's opening.

A sample's opening is its keyed hash under the store's secret (the value certificates already name it
by); its commitment is :func:`sisa.receipt.entries.sample_commitment` of the id and the opening. Only
the store can compute an opening, so the published commitments reveal no ids, and a data subject
given their id's opening in a receipt recomputes their own commitment.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

from sisa.receipt.entries import COMMIT_LABEL
from sisa.store.digests import ID_LABEL, keyed_hash

__all__ = ["manifest_commitments", "opening"]


def opening(secret: bytes, sample_id: int) -> bytes:
    """The opening of ``sample_id``'s commitment: its keyed hash under the store's secret (32 bytes)."""
    return bytes.fromhex(keyed_hash(secret, sample_id))


def manifest_commitments(secret: bytes, slice_ids: Sequence[np.ndarray]) -> list[bytes]:
    """The sorted commitments of every id in ``slice_ids`` (the slices a model trained on).

    The same values as :func:`opening` and :func:`~sisa.receipt.entries.sample_commitment` id by id
    (a test checks it), computed on the ids packed once as 8-byte big-endian words and with the
    one-call ``hmac.digest``: this runs over a whole shard at every fit and apply.
    """
    if not len(slice_ids):
        return []
    packed = np.concatenate([np.asarray(s, dtype=np.int64) for s in slice_ids]).astype(">u8").tobytes()
    digest, sha256 = hmac.digest, hashlib.sha256
    out = []
    for k in range(0, len(packed), 8):
        word = packed[k : k + 8]
        out.append(sha256(COMMIT_LABEL + word + digest(secret, ID_LABEL + word, "sha256")).digest())
    out.sort()
    return out
