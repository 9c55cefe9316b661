"""The bucketed manifest commitment: a shard's sorted sample commitments split by prefix, one tree per bucket.

A manifest commitment with ``B`` buckets (a power of two, at most 2**16) puts each sample commitment
in bucket ``first 16 bits * B >> 16`` (its first ``log2 B`` bits), builds an RFC 6962 tree over each
bucket's sorted commitments (leaf data: the 32-byte commitment), and publishes the RFC 6962 root over
the ``B`` buckets, bucket ``b``'s leaf data being its size (8 bytes big-endian) then its root (the
empty tree's hash when empty). Binding the size makes a bucket's "last leaf" checkable from one proof.

Why buckets: one tree over all sorted commitments cannot be updated in place (a removed leaf shifts
every leaf right of it), so a deletion would rehash a whole shard; with buckets it rehashes only the
buckets its ids fall in, and the top tree. Standard library only (the verifier carries it).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from sisa.receipt.merkle import Tree, hash_leaf

__all__ = ["bucket_leaf", "bucket_of", "bucket_root", "manifest_root", "split", "valid_buckets"]


def valid_buckets(buckets: object) -> bool:
    """Whether ``buckets`` is a bucket count this format allows: a power of two in 1..2**16."""
    return (
        isinstance(buckets, int)
        and not isinstance(buckets, bool)
        and 0 < buckets <= 1 << 16
        and not buckets & (buckets - 1)
    )


def bucket_of(commitment: bytes, buckets: int) -> int:
    """The bucket of a commitment: its first ``log2(buckets)`` bits."""
    return int.from_bytes(commitment[:2], "big") * buckets >> 16


def bucket_root(commitments: Sequence[bytes]) -> bytes:
    """The RFC 6962 root over one bucket's sorted commitments."""
    return Tree([hash_leaf(c) for c in commitments]).root()


def bucket_leaf(size: int, root: bytes) -> bytes:
    """The top tree's leaf hash of a bucket of ``size`` commitments with tree root ``root``."""
    return hash_leaf(struct.pack(">Q", size) + root)


def manifest_root(sizes: Sequence[int], roots: Sequence[bytes]) -> bytes:
    """The manifest commitment: the RFC 6962 root over every bucket's (size, root)."""
    return Tree([bucket_leaf(n, r) for n, r in zip(sizes, roots, strict=True)]).root()


def split(commitments: Sequence[bytes], buckets: int) -> list[list[bytes]]:
    """Sorted commitments into their buckets (each stays sorted: a bucket is a contiguous run)."""
    out: list[list[bytes]] = [[] for _ in range(buckets)]
    for c in commitments:
        out[bucket_of(c, buckets)].append(c)
    return out
