"""Per-shard cache of the bucketed manifest commitment, so a deletion rehashes only what it changed.

Table ``commits`` (a later table of the store), per shard ``s`` (4 bytes big-endian):

* ``s + b"h"``: the header: bucket count, the SHA-256 of each slice's ids the cache was computed
  for, every bucket's size and root, and a SHA-256 of all of that (a torn or edited header is seen);
* ``s + b"s" + slice``: that slice's ids (8 bytes big-endian each), to find what a change removed
  (a deletion takes its ids out of them in its journal transaction: :func:`follow`);
* ``s + b"b" + bucket``: the bucket's sorted commitments, 32 bytes each (absent when empty).

Everything in it derives from the store (the slices' ids and the secret), so it is only ever a
shortcut: :func:`shard_manifest` compares the slices' digests with the header's, recomputes only
the buckets whose ids changed, and checks each bucket it rewrites against its cached root first.
A missing, stale or inconsistent cache (a bad checksum, a slice whose cached ids do not match their
digest, a bucket that does not hash to its root or lacks an id to remove) falls back to computing
the whole shard from scratch, so it never yields a wrong root, only a slower one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb
import numpy as np

from sisa.receipt.buckets import bucket_of, bucket_root, manifest_root, split
from sisa.receipt.merkle import EMPTY_ROOT
from sisa.store.database import Store
from sisa.unlearn.commitments import commitments_of

__all__ = [
    "BUCKETS",
    "COMMITS_DB",
    "ShardManifest",
    "bucket_leaves",
    "drop_shard",
    "follow",
    "recompute",
    "shard_manifest",
]

COMMITS_DB = "commits"
# 256 buckets (a commitment's first byte): measured at 375k commitments per shard, one bucket's
# rehash plus the top tree takes ~1.9 ms with 256, ~1.6 ms with 1024, ~8 ms with 4096 (the top tree
# dominates) and ~5.5 ms with 64; 256 keeps the header (36 bytes a bucket) small too.
BUCKETS = 256
_MAGIC = b"sisa-commits-v1|"


@dataclass
class ShardManifest:
    """One shard's bucketed manifest commitment.

    Attributes:
        sizes: Each bucket's number of commitments.
        roots: Each bucket's RFC 6962 root.
        buckets: The commitments of the buckets known in memory (all when computed from scratch).
        source: ``"cache"`` (updated from the cache) or ``"scratch"`` (computed whole).
    """

    sizes: list[int]
    roots: list[bytes]
    buckets: dict[int, list[bytes]] = field(default_factory=dict)
    source: str = "scratch"

    @property
    def size(self) -> int:
        """The number of commitments."""
        return sum(self.sizes)

    def root(self) -> bytes:
        """The manifest commitment."""
        return manifest_root(self.sizes, self.roots)


def _key(shard: int, kind: bytes, index: int | None = None) -> bytes:
    return struct.pack(">I", shard) + kind + (b"" if index is None else struct.pack(">I", index))


def _header(buckets: int, digests: Sequence[bytes], sizes: Sequence[int], roots: Sequence[bytes]) -> bytes:
    body = _MAGIC + struct.pack(">II", buckets, len(digests)) + b"".join(digests)
    body += struct.pack(f">{buckets}Q", *sizes) + b"".join(roots)
    return body + hashlib.sha256(body).digest()


def _parse(raw: bytes | None) -> tuple[list[bytes], list[int], list[bytes]] | None:
    """(slice digests, sizes, roots) of a header, or ``None`` when absent, of another layout or corrupt."""
    if raw is None or len(raw) < len(_MAGIC) + 8 + 32 or not raw.startswith(_MAGIC):
        return None
    body, check = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != check:
        return None
    at = len(_MAGIC)
    buckets, count = struct.unpack_from(">II", body, at)
    at += 8
    if buckets != BUCKETS or len(body) != at + 32 * count + 40 * buckets:
        return None
    digests = [body[at + 32 * i : at + 32 * i + 32] for i in range(count)]
    at += 32 * count
    sizes = list(struct.unpack_from(f">{buckets}Q", body, at))
    at += 8 * buckets
    roots = [body[at + 32 * i : at + 32 * i + 32] for i in range(buckets)]
    return digests, sizes, roots


def _words(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).astype(">u8")).tobytes()


def _db(store: Store) -> Any:
    try:
        return store.db(COMMITS_DB)
    except KeyError:
        return None


def drop_shard(store: Store, txn: lmdb.Transaction, shard: int) -> None:
    """Remove a shard's cache (its model left service: nothing is committed for it)."""
    db = _db(store)
    if db is None:
        return
    prefix = struct.pack(">I", shard)
    cursor = txn.cursor(db=db)
    keys = []
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not bytes(key).startswith(prefix):
                break
            keys.append(bytes(key))
    for key in keys:
        txn.delete(key, db=db)


def follow(store: Store, txn: lmdb.Transaction, secret: bytes, shards: Sequence[int]) -> None:
    """Bring the caches of ``shards`` to their slices' ids now, in a deletion's journal transaction.

    The cache keeps each slice's ids in the clear, like the membership records; a deleted id must
    leave it in the same transaction that takes it out of those (the store names deleted ids by keyed
    hash only), not at the retrain, which a deferred deletion puts off. The shard's buckets follow
    (only the touched ones), so the later publication finds nothing left to change. A cache that
    cannot be read is dropped whole.
    """
    db = _db(store)
    if db is None:
        return
    for shard in shards:
        raw = txn.get(_key(shard, b"h"), db=db)
        header = _parse(bytes(raw) if raw is not None else None)
        if header is None:
            drop_shard(store, txn, shard)
            continue
        slices = [store.slice_ids(txn, shard, r) for r in range(len(header[0]))]
        shard_manifest(store, txn, secret, shard, slices, write=True)


def recompute(secret: bytes, slices: Sequence[np.ndarray]) -> ShardManifest:
    """The shard's manifest computed whole, from its slices alone (no cache read or written)."""
    return _scratch(secret, [_words(s) for s in slices])


def _scratch(secret: bytes, words: Sequence[bytes]) -> ShardManifest:
    everything = sorted(commitments_of(secret, b"".join(words)))
    buckets = split(everything, BUCKETS)
    return ShardManifest(
        [len(b) for b in buckets], [bucket_root(b) for b in buckets], dict(enumerate(buckets)), "scratch"
    )


def _delta(
    txn: lmdb.Transaction, db: Any, shard: int, old: list[bytes], words: list[bytes], digests: list[bytes]
) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """The ids removed and added since the cache was computed, and the slices that changed (``None``: unreadable)."""
    removed, added, changed = [], [], []
    for r in range(max(len(old), len(words))):
        if r < len(old) and r < len(words) and old[r] == digests[r]:
            continue
        changed.append(r)
        before = np.zeros(0, dtype=">u8")
        if r < len(old):
            raw = txn.get(_key(shard, b"s", r), db=db)
            if raw is None or hashlib.sha256(bytes(raw)).digest() != old[r]:
                return None
            before = np.frombuffer(bytes(raw), dtype=">u8")
        after = np.frombuffer(words[r], dtype=">u8") if r < len(words) else np.zeros(0, dtype=">u8")
        before, after = before.astype(np.uint64), after.astype(np.uint64)
        gone = _minus(before, after)
        removed.append(gone)
        # Distinct ids: |after| = |before| - |gone| + |new|, so a deletion (no new id) skips the second search.
        added.append(_minus(after, before) if len(after) - len(before) + len(gone) else after[:0])
    out, into = (np.concatenate(x) if x else np.zeros(0, dtype=np.uint64) for x in (removed, added))
    # An id that moved between slices is in both: it stays in the manifest. Back to big-endian words,
    # the byte order commitments hash ids in.
    return _minus(out, into).astype(">u8"), _minus(into, out).astype(">u8"), changed


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The values of ``a`` not in ``b`` (native uint64 arrays of distinct values).

    A binary search of ``b`` (sorted here unless it already is: a slice's ids are) rather than
    ``np.setdiff1d``, which sorts or hashes both sides: a deletion compares a slice of 10^5 ids with
    itself less a few, and this is several times faster (``setdiff1d`` also imports ``numpy.ma`` on first use).
    """
    if not len(a) or not len(b):
        return a.copy()
    if len(b) > 1 and not bool(np.all(b[1:] > b[:-1])):
        b = np.sort(b)
    elif len(b) < len(a) <= len(b) + 4 and bool(np.all(a[1:] > a[:-1])):
        # ``b`` is maybe ``a`` less a few ids, both sorted (a deletion): each removed id is the first place
        # they differ, one O(n) comparison per id instead of a binary search per element.
        rest, out = a, []
        while len(rest) > len(b):
            differ = rest[: len(b)] != b
            i = int(np.argmax(differ)) if bool(differ.any()) else len(b)
            out.append(rest[i])
            rest = np.delete(rest, i)
        if bool(np.array_equal(rest, b)):
            return np.asarray(out, dtype=a.dtype)
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[at] != a]


def _update(
    txn: lmdb.Transaction,
    db: Any,
    shard: int,
    sizes: list[int],
    roots: list[bytes],
    gone: bytes,
    new: bytes,
    secret: bytes,
) -> dict[int, list[bytes]] | None:
    """Rewrite the buckets the removed and added ids fall in; ``None`` when a bucket is not what its root says."""
    touched: dict[int, tuple[set[bytes], set[bytes]]] = {}
    for i, words in enumerate((gone, new)):
        for c in commitments_of(secret, words):
            touched.setdefault(bucket_of(c, BUCKETS), (set(), set()))[i].add(c)
    out = {}
    for b, (minus, plus) in touched.items():
        raw = txn.get(_key(shard, b"b", b), db=db) if sizes[b] else b""
        if raw is None or len(raw) != 32 * sizes[b]:
            return None
        raw = bytes(raw)
        leaves = [raw[k : k + 32] for k in range(0, len(raw), 32)]
        if (bucket_root(leaves) if leaves else EMPTY_ROOT) != roots[b]:
            return None
        have = set(leaves)
        if not minus <= have or plus & have:
            return None
        out[b] = sorted((have - minus) | plus)
    return out


def shard_manifest(
    store: Store, txn: lmdb.Transaction, secret: bytes, shard: int, slices: Sequence[np.ndarray], *, write: bool
) -> ShardManifest:
    """The bucketed manifest commitment of the samples in ``slices``, from the cache where it can be.

    Args:
        store: The store.
        txn: A transaction; a write transaction when ``write``.
        secret: The store's secret (the samples' openings derive from it).
        shard: The shard.
        slices: The slices the shard's live model trained on (sorted int64 ids each).
        write: Whether to bring the cache up to date in ``txn``.

    Returns:
        The manifest: every bucket's size and root, and the commitments of the buckets it rewrote
        (all of them when computed from scratch).
    """
    words = [_words(s) for s in slices]
    digests = [hashlib.sha256(w).digest() for w in words]
    db = _db(store)
    header = _parse(bytes(raw) if db is not None and (raw := txn.get(_key(shard, b"h"), db=db)) is not None else None)
    man: ShardManifest | None = None
    if header is not None and db is not None:
        old, sizes, roots = header
        delta = _delta(txn, db, shard, old, words, digests)
        if delta is not None:
            gone, new, changed = delta
            if not changed:
                return ShardManifest(sizes, roots, {}, "cache")
            rewritten = _update(txn, db, shard, sizes, roots, gone.tobytes(), new.tobytes(), secret)
            if rewritten is not None:
                for b, leaves in rewritten.items():
                    sizes[b], roots[b] = len(leaves), bucket_root(leaves) if leaves else EMPTY_ROOT
                man = ShardManifest(sizes, roots, rewritten, "cache")
                if write:
                    for r in changed:
                        if r < len(words):
                            txn.put(_key(shard, b"s", r), words[r], db=db)
                        else:
                            txn.delete(_key(shard, b"s", r), db=db)
    if man is None:
        man = _scratch(secret, words)
        if write and db is not None:
            drop_shard(store, txn, shard)
            for r, w in enumerate(words):
                txn.put(_key(shard, b"s", r), w, db=db)
    if write and db is not None:
        for b, leaves in man.buckets.items():
            if leaves:
                txn.put(_key(shard, b"b", b), b"".join(leaves), db=db)
            else:
                txn.delete(_key(shard, b"b", b), db=db)
        txn.put(_key(shard, b"h"), _header(BUCKETS, digests, man.sizes, man.roots), db=db)
    return man


def bucket_leaves(
    store: Store, txn: lmdb.Transaction, man: ShardManifest, shard: int, bucket: int
) -> list[bytes] | None:
    """A bucket's sorted commitments: from memory, else the cache (``None`` if it is not there as the root says)."""
    if bucket in man.buckets:
        return man.buckets[bucket]
    if not man.sizes[bucket]:
        return []
    db = _db(store)
    raw = txn.get(_key(shard, b"b", bucket), db=db) if db is not None else None
    if raw is None:
        return None
    raw = bytes(raw)
    leaves = [raw[k : k + 32] for k in range(0, len(raw), 32)]
    return leaves if len(leaves) == man.sizes[bucket] and bucket_root(leaves) == man.roots[bucket] else None
