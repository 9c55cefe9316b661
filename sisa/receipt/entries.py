"""The byte formats a log entry and a sample commitment are hashed in, shared by the store and the verifier.

A log entry (a deletion certificate, a "model published" record) is a JSON object; its leaf in the
transparency log is the RFC 6962 leaf hash of its canonical JSON (sorted keys, no spaces). A sample
is committed to as ``SHA-256("sisa-sample-commitment-v1" || id as 8 bytes big-endian || opening)``,
where the opening is a keyed hash of the id under the store's secret (:mod:`sisa.unlearn.commitments`):
without the opening the commitment reveals nothing about the id, and whoever holds both recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from sisa.receipt.merkle import hash_leaf

__all__ = ["COMMIT_LABEL", "MODEL_PUBLISHED", "canonical", "entry_leaf", "is_certificate", "sample_commitment"]

MODEL_PUBLISHED = "model_published"  # the ``kind`` of a "model published" entry (certificates carry no kind)
COMMIT_LABEL = b"sisa-sample-commitment-v1"


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_leaf(entry: dict[str, Any]) -> bytes:
    """The transparency-log leaf hash of an entry."""
    return hash_leaf(canonical(entry))


def is_certificate(entry: dict[str, Any]) -> bool:
    """Whether a log entry is a deletion certificate (the entries before the log had kinds all are)."""
    return entry.get("kind", "certificate") == "certificate"


def sample_commitment(sample_id: int, opening: bytes) -> bytes:
    """The commitment to one sample id under its opening (32 bytes).

    Raises:
        ValueError: If the id is not a non-negative 64-bit integer or the opening is not 32 bytes.
    """
    if not 0 <= sample_id < 2**63 or len(opening) != 32:
        raise ValueError("a sample commitment takes an id in [0, 2**63) and a 32-byte opening")
    return hashlib.sha256(COMMIT_LABEL + struct.pack(">Q", sample_id) + opening).digest()
