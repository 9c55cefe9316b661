"""Manifest commitments: the sorted commitments of the samples a model trained on, and a sample's opening.

A sample's opening is ``HMAC-SHA256(store secret, "sisa-opening|" || id as 8 bytes big-endian)``; its
commitment is :func:`sisa.receipt.entries.sample_commitment` of the id and the opening. Only the store
can compute an opening, so the published commitments reveal no ids, and a data subject given their id's
opening in a receipt recomputes their own commitment. The opening is deliberately not the keyed id hash
that certificates publish: a commitment seen as a neighbour in someone's receipt, together with a later
certificate's id hash, would otherwise let anyone test candidate ids against it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

import numpy as np

from sisa.receipt.entries import COMMIT_LABEL

__all__ = ["OPENING_LABEL", "commitments_of", "manifest_commitments", "opening"]


OPENING_LABEL = b"sisa-opening|"


def opening(secret: bytes, sample_id: int) -> bytes:
    """The opening of ``sample_id``'s commitment (32 bytes; only the store's secret computes it)."""
    return hmac.digest(secret, OPENING_LABEL + struct.pack(">Q", sample_id), "sha256")


def manifest_commitments(secret: bytes, slice_ids: Sequence[np.ndarray]) -> list[bytes]:
    """The sorted commitments of every id in ``slice_ids`` (the slices a model trained on).

    The same values as :func:`opening` and :func:`~sisa.receipt.entries.sample_commitment` id by id
    (a test checks it), computed on the ids packed once as 8-byte big-endian words and with the
    one-call ``hmac.digest``: this runs over a whole shard at every fit and apply.
    """
    if not len(slice_ids):
        return []
    packed = np.concatenate([np.asarray(s, dtype=np.int64) for s in slice_ids]).astype(">u8").tobytes()
    return sorted(commitments_of(secret, packed))


def commitments_of(secret: bytes, packed: bytes) -> list[bytes]:
    """The commitments of the ids in ``packed`` (8-byte big-endian words), in their order."""
    digest, sha256 = hmac.digest, hashlib.sha256
    out = []
    for k in range(0, len(packed), 8):
        word = packed[k : k + 8]
        out.append(sha256(COMMIT_LABEL + word + digest(secret, OPENING_LABEL + word, "sha256")).digest())
    return out
