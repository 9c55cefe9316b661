"""Per-shard cache of the bucketed manifest commitment, so a deletion rehashes only what it changed.

Table ``commits`` (a later table of the store), per shard ``s`` (4 bytes big-endian):

* ``s + b"h"``: the header: the bucket count, the SHA-256 of each slice's ids
  (:func:`~sisa.store.digests.slice_digest`), every bucket's size and root, the top tree's nodes, and a
  SHA-256 of all of that (a torn or edited header is seen);
* ``s + b"s" + slice``: that slice's ids (8 bytes big-endian each), to find what a change removed
  (a deletion takes its ids out of them in its journal transaction: :func:`follow`);
* ``s + b"b" + bucket``: the bucket's sorted commitments, 32 bytes each, then its root and a SHA-256 of both
  (absent when empty): a change checks the bucket it rewrites by that one hash and the root against the
  header's, rather than rehashing its tree twice.

A deletion's cost here grows with the shard only through the slices that held its ids:
:func:`follow` is told the deleted ids and their slices (nothing is read from the membership records
or sorted), rewrites those slices, their digests, the buckets the ids were in and the top tree's path
above those buckets. Publishing the retrained model (:func:`for_publication`) then compares the
cached slices' digests, folded by :func:`~sisa.store.digests.slices_digest`, with the one its trainer
recorded from the ids it trained on: no id is hashed again.

Everything in it derives from the store (the slices' ids and the secret), so it is only ever a
shortcut: a cache that does not name the model's training set (an ``add`` the cache did not follow, a
deferred deletion not yet retrained, a damaged slice, a model recorded before slice digests were) goes
the general way, :func:`shard_manifest`, which checks the store's slices against the model's manifest
digest, compares them with the cached ones slice by slice, recomputes only the buckets whose ids
changed, and checks each bucket it rewrites against its cached root first. A missing, stale or
inconsistent cache (a bad checksum, a slice whose cached ids do not match their digest, a bucket that
does not hash to its root or lacks an id to remove) falls back to computing the whole shard from
scratch, so it never yields a wrong root, only a slower one.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb
import numpy as np

from sisa.receipt.buckets import bucket_leaf, bucket_of, bucket_root, manifest_root, split
from sisa.receipt.merkle import EMPTY_ROOT, Tree, hash_children
from sisa.store.database import Store
from sisa.store.digests import manifest_digest, packed_ids, slice_digest, slices_digest
from sisa.unlearn.commitments import commitments_of

__all__ = [
    "BUCKETS",
    "COMMITS_DB",
    "Hashes",
    "ShardManifest",
    "bucket_leaves",
    "buckets_for",
    "drop_shard",
    "follow",
    "for_publication",
    "recompute",
    "shard_manifest",
]

COMMITS_DB = "commits"
# The fewest buckets a shard gets (and the count of an empty manifest). Measured at 375k commitments
# per shard (docs/benchmarks.md), one bucket's rehash plus a whole top tree took ~1.9 ms with 256
# buckets and ~8 ms with 4096; with the top tree's nodes cached (a path of log2 B hashes per touched
# bucket), more buckets only cost header bytes, so a shard gets about 256 commitments a bucket.
BUCKETS = 256
MAX_BUCKETS = 4096  # the header then holds 4096 x 104 bytes (~420 KB), read and written once a deletion
_PER_BUCKET = 256
_FEW = 64  # id counts sorted in Python by _distinct
_MAGIC = b"sisa-commits-v3|"  # v3: the slices digest replaced the manifest digest


class Hashes(Sequence[bytes]):
    """32-byte hashes kept end to end in one buffer, read and replaced by index.

    A cache header holds thousands of them (bucket roots, the top tree's nodes); one ``bytes`` object
    each would cost more to build than the rest of a deletion's commitment work.

    Args:
        data: The hashes, concatenated (a multiple of 32 bytes).
    """

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        self.data = bytearray(data)

    @classmethod
    def of(cls, hashes: Sequence[bytes]) -> Hashes:
        """The buffer of a list of hashes."""
        return cls(b"".join(hashes))

    def __len__(self) -> int:
        return len(self.data) // 32

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return bytes(self.data[32 * i : 32 * i + 32])

    def __setitem__(self, i: int, value: bytes) -> None:
        self.data[32 * i : 32 * i + 32] = value

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def buckets_for(size: int) -> int:
    """The bucket count of a shard of ``size`` commitments: a power of two, ~256 a bucket, in 256..4096."""
    want = max(1, -(-size // _PER_BUCKET))
    return min(MAX_BUCKETS, max(BUCKETS, 1 << (want - 1).bit_length()))


@dataclass
class ShardManifest:
    """One shard's bucketed manifest commitment.

    Attributes:
        sizes: Each bucket's number of commitments.
        roots: Each bucket's RFC 6962 root.
        buckets: The commitments of the buckets known in memory (all when computed from scratch).
        source: ``"cache"`` (updated from the cache) or ``"scratch"`` (computed whole).
        levels: The top tree over the buckets, level by level (leaves first), when known.
    """

    sizes: list[int]
    roots: Sequence[bytes]
    buckets: dict[int, list[bytes]] = field(default_factory=dict)
    source: str = "scratch"
    levels: list[Hashes] | None = None

    @property
    def size(self) -> int:
        """The number of commitments."""
        return sum(self.sizes)

    def root(self) -> bytes:
        """The manifest commitment."""
        if self.levels is not None:
            return self.levels[-1][0]
        return manifest_root(self.sizes, self.roots)


@dataclass
class _Header:
    """A parsed cache header (see the module docstring)."""

    digests: list[bytes]
    sizes: list[int]
    roots: Hashes
    levels: list[Hashes]


def _top(sizes: Sequence[int], roots: Sequence[bytes]) -> list[Hashes]:
    """The top tree's levels over a power-of-two bucket count (a perfect tree: :class:`Tree` stores every node)."""
    return [Hashes.of(level) for level in Tree([bucket_leaf(n, r) for n, r in zip(sizes, roots, strict=True)]).levels]


def _retop(levels: list[Hashes], sizes: Sequence[int], roots: Sequence[bytes], touched: Sequence[int]) -> None:
    """Rehash the top tree's paths above the ``touched`` buckets, in place (log2 B hashes each)."""
    changed = set(touched)
    for b in changed:
        levels[0][b] = bucket_leaf(sizes[b], roots[b])
    for depth in range(1, len(levels)):
        changed = {i // 2 for i in changed}
        below = levels[depth - 1]
        for i in changed:
            levels[depth][i] = hash_children(below[2 * i], below[2 * i + 1])


def _key(shard: int, kind: bytes, index: int | None = None) -> bytes:
    return struct.pack(">I", shard) + kind + (b"" if index is None else struct.pack(">I", index))


def _header(head: _Header) -> bytes:
    buckets = len(head.sizes)
    parts: list[bytes | bytearray] = [_MAGIC, struct.pack(">II", buckets, len(head.digests)), *head.digests]
    parts += [struct.pack(f">{buckets}Q", *head.sizes), head.roots.data, *(level.data for level in head.levels)]
    body = b"".join(parts)  # one copy of up to ~420 KB, not one per part
    return body + hashlib.sha256(body).digest()


def _parse(raw: bytes | None, checked: bool = False) -> _Header | None:
    """A header, or ``None`` when absent, of another layout or corrupt.

    Args:
        raw: The stored bytes.
        checked: The bytes are known to be a header this process built (their SHA-256 is not recomputed).
    """
    if raw is None or len(raw) < len(_MAGIC) + 8 + 32 or not raw.startswith(_MAGIC):
        return None
    body, check = memoryview(raw)[:-32], raw[-32:]
    if not checked and hashlib.sha256(body).digest() != check:
        return None
    at = len(_MAGIC)
    buckets, count = struct.unpack_from(">II", body, at)
    at += 8
    if not BUCKETS <= buckets <= MAX_BUCKETS or buckets & (buckets - 1):
        return None
    if len(body) != at + 32 * count + 40 * buckets + 32 * (2 * buckets - 1):
        return None
    digests = [bytes(body[at + 32 * i : at + 32 * i + 32]) for i in range(count)]
    at += 32 * count
    sizes = list(struct.unpack_from(f">{buckets}Q", body, at))
    at += 8 * buckets
    roots = Hashes(body[at : at + 32 * buckets])
    at += 32 * buckets
    levels, width = [], buckets
    while width:
        levels.append(Hashes(body[at : at + 32 * width]))
        at += 32 * width
        width //= 2
    return _Header(digests, sizes, roots, levels)


# The header bytes this process last wrote or parsed, by shard (as long as they fit MEMO_BYTES in all). A
# deletion writes a shard's header in its journal transaction (follow) and reads it in the certifying one
# (for_publication); the next deletion in that shard reads it again. Bytes equal to the remembered ones
# are a header whose check this process made: they are parsed without hashing them again (~110 us at
# 2,048 buckets). The bytes are the key, so another store's header, or one changed on disk, is never taken.
_headers: dict[int, bytes] = {}
_headers_lock = threading.Lock()  # a receipt issued in one thread reads headers while another deletes
MEMO_BYTES = 1 << 26


def _remember(shard: int, raw: bytes) -> None:
    with _headers_lock:
        _headers.pop(shard, None)
        while _headers and sum(map(len, _headers.values())) + len(raw) > MEMO_BYTES:
            del _headers[next(iter(_headers))]  # the oldest first
        if len(raw) <= MEMO_BYTES:
            _headers[shard] = raw


def _read_header(txn: lmdb.Transaction, db: Any, shard: int) -> _Header | None:
    got = txn.get(_key(shard, b"h"), db=db) if db is not None else None
    if got is None:
        return None
    raw = bytes(got)
    with _headers_lock:
        known = _headers.get(shard) == raw
    if known:
        return _parse(raw, checked=True)
    head = _parse(raw)
    if head is not None:
        _remember(shard, raw)
    return head


def _write_header(txn: lmdb.Transaction, db: Any, shard: int, head: _Header) -> None:
    raw = _header(head)
    txn.put(_key(shard, b"h"), raw, db=db)
    _remember(shard, raw)


def _words(ids: np.ndarray) -> bytes:
    return packed_ids(np.asarray(ids, dtype=np.int64))


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


def follow(store: Store, txn: lmdb.Transaction, secret: bytes, removed: Mapping[int, Mapping[int, np.ndarray]]) -> None:
    """Take a deletion's ids out of their shards' caches, in the deletion's journal transaction.

    The cache keeps each slice's ids in the clear, like the membership records; a deleted id must
    leave it in the same transaction that takes it out of those (the store names deleted ids by keyed
    hash only), not at the retrain, which a deferred deletion puts off. Only the slices that held the
    ids are read and rewritten, with their digests, and the buckets the ids were in, so publishing the
    retrained model finds nothing left to do. A cache that does not hold every id it is told to remove
    from a slice it covers (it missed an ``add``) is brought to the shard's slices the general way; one
    that cannot be read is dropped.

    Args:
        store: The store.
        txn: The journal's write transaction (after the ids left the membership records).
        secret: The store's secret.
        removed: Shard -> slice -> the ids deleted from that slice of the shard's training set (under a
            shard graph, every shard that reads the slice is named).
    """
    db = _db(store)
    if db is None:
        return
    for shard, by_slice in removed.items():
        header = _read_header(txn, db, shard)
        if header is None:
            drop_shard(store, txn, shard)
        elif not _remove(txn, db, secret, shard, header, {r: _distinct(ids) for r, ids in by_slice.items()}):
            slices = store.training_slices(txn, shard, len(header.digests))
            shard_manifest(store, txn, secret, shard, slices, write=True)


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids as big-endian words (``np.unique`` imports ``numpy.ma`` on first use: ~25 ms)."""
    if len(ids) <= _FEW:
        # A deletion names a few ids: Python's sort of a handful beats numpy's per-call overhead.
        return np.array(sorted(set(np.asarray(ids, dtype=np.int64).tolist())), dtype=">i8")
    out = np.sort(np.asarray(ids, dtype=np.int64))
    out = out[np.concatenate(([True], out[1:] != out[:-1]))] if len(out) else out
    return out.astype(">i8")


def _without(raw: bytes | memoryview, at: np.ndarray) -> bytes:
    """``raw`` (8-byte words) without the words at the sorted distinct positions ``at``, in one copy.

    A slice of a 3M-sample store is ~750 KB: ``np.delete`` then ``tobytes`` made two fresh copies of it
    (each a page-faulting allocation of that size) where joining the runs between the positions makes one.
    """
    view, runs, start = memoryview(raw), [], 0
    for i in at.tolist():
        runs.append(view[start : 8 * i])
        start = 8 * i + 8
    runs.append(view[start:])
    return b"".join(runs)


def _remove(
    txn: lmdb.Transaction, db: Any, secret: bytes, shard: int, head: _Header, by_slice: Mapping[int, np.ndarray]
) -> bool:
    """Remove ids (slice -> sorted distinct words) from a shard's cache, reading only their slices.

    Returns:
        ``False`` when it could not (the caller brings the cache to the store's slices).
    """
    changed: dict[int, bytes] = {}
    gone = []
    for r, ids in sorted(by_slice.items()):
        if r >= len(head.digests) or not len(ids):
            continue  # a slice the live model never trained on: its ids were never committed
        raw = txn.get(_key(shard, b"s", r), db=db)
        if raw is None:
            return False
        arr = np.frombuffer(raw, dtype=">i8")
        at = np.minimum(np.searchsorted(arr, ids), max(len(arr) - 1, 0))
        if not len(arr) or not bool(np.all(arr[at] == ids)):
            return False  # the cache never had an id the store had: it missed a change
        # Not checked against its digest first (a hash of the slice): the new digest is compared with
        # the retrained model's at publication, and a damaged slice fails that, or the buckets' check.
        changed[r] = _without(raw, at)
        gone.append(ids)
    if not changed:
        return True
    # Back to big-endian words after the concatenation (which gives native order): the bytes commitments hash.
    words_gone = np.concatenate(gone).astype(">i8").tobytes()
    rewritten = _update(txn, db, shard, head.sizes, head.roots, words_gone, b"", secret)
    if rewritten is None:
        return False
    for b, leaves in rewritten.items():
        head.sizes[b], head.roots[b] = len(leaves), bucket_root(leaves) if leaves else EMPTY_ROOT
    _retop(head.levels, head.sizes, head.roots, list(rewritten))
    for r, words in changed.items():
        head.digests[r] = slice_digest(words)
        txn.put(_key(shard, b"s", r), words, db=db)
    _put_buckets(txn, db, shard, rewritten, head.roots)
    _write_header(txn, db, shard, head)
    return True


def for_publication(
    store: Store, txn: lmdb.Transaction, secret: bytes, shard: int, record: Mapping[str, Any]
) -> ShardManifest | None:
    """The manifest commitment of a live model about to be published, from the cache where it is current.

    Args:
        store: The store.
        txn: The publishing write transaction.
        secret: The store's secret.
        shard: The shard.
        record: The live model's record: its ``stage`` (it trained on slices ``0..stage-1``), its
            ``manifest`` digest and, when its trainer recorded one, its ``slices`` digest.

    Returns:
        The commitment; ``None`` when the store's slices are no longer what the model trained on (a
        deferred deletion took ids out and the retrain is still to come: nothing can be committed now).
    """
    stage, slices_of_model = int(record["stage"]), record.get("slices")
    db = _db(store)
    head = _read_header(txn, db, shard)
    if head is not None and len(head.digests) == stage and slices_of_model == slices_digest(head.digests):
        # The cache holds exactly the ids the model trained on (their slices' digests say so): nothing to read.
        return ShardManifest(head.sizes, head.roots, {}, "cache", head.levels)
    slices = store.training_slices(txn, shard, stage)
    if manifest_digest(slices) != record["manifest"]:
        return None
    return shard_manifest(store, txn, secret, shard, slices, write=True)


def recompute(secret: bytes, slices: Sequence[np.ndarray]) -> ShardManifest:
    """The shard's manifest computed whole, from its slices alone (no cache read or written)."""
    return _scratch(secret, [_words(s) for s in slices])


def _scratch(secret: bytes, words: Sequence[bytes]) -> ShardManifest:
    everything = sorted(commitments_of(secret, b"".join(words)))
    buckets = split(everything, buckets_for(len(everything)))
    sizes, roots = [len(b) for b in buckets], Hashes.of([bucket_root(b) for b in buckets])
    return ShardManifest(sizes, roots, dict(enumerate(buckets)), "scratch", _top(sizes, roots))


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
            if raw is None or slice_digest(bytes(raw)) != old[r]:
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
    roots: Sequence[bytes],
    gone: bytes,
    new: bytes,
    secret: bytes,
) -> dict[int, list[bytes]] | None:
    """Rewrite the buckets the removed and added ids fall in; ``None`` when a bucket is not what its root says."""
    touched: dict[int, tuple[set[bytes], set[bytes]]] = {}
    for i, words in enumerate((gone, new)):
        for c in commitments_of(secret, words):
            touched.setdefault(bucket_of(c, len(sizes)), (set(), set()))[i].add(c)
    out = {}
    for b, (minus, plus) in touched.items():
        leaves = _read_bucket(txn, db, shard, b, sizes[b], roots[b])
        if leaves is None:
            return None
        have = set(leaves)
        if not minus <= have or plus & have:
            return None
        out[b] = sorted((have - minus) | plus)
    return out


def _read_bucket(txn: lmdb.Transaction, db: Any, shard: int, b: int, size: int, root: bytes) -> list[bytes] | None:
    """A cached bucket's sorted commitments if it is intact and has the ``root`` it should; else ``None``."""
    if not size:
        return [] if root == EMPTY_ROOT else None
    raw = txn.get(_key(shard, b"b", b), db=db)
    if raw is None or len(raw) != 32 * size + 64:
        return None
    raw = bytes(raw)
    body, check = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != check or body[-32:] != root:
        return None
    return [body[k : k + 32] for k in range(0, 32 * size, 32)]


def _put_buckets(
    txn: lmdb.Transaction, db: Any, shard: int, buckets: Mapping[int, list[bytes]], roots: Sequence[bytes]
) -> None:
    for b, leaves in buckets.items():
        if leaves:
            body = b"".join(leaves) + roots[b]
            txn.put(_key(shard, b"b", b), body + hashlib.sha256(body).digest(), db=db)
        else:
            txn.delete(_key(shard, b"b", b), db=db)


def shard_manifest(
    store: Store, txn: lmdb.Transaction, secret: bytes, shard: int, slices: Sequence[np.ndarray], *, write: bool
) -> ShardManifest:
    """The bucketed manifest commitment of the samples in ``slices``, from the cache where it can be.

    The general way: the slices are compared with the cache's slice by slice, so it serves any change
    (an ``add``, a deletion the cache did not follow). A deletion's own path is :func:`follow` then
    :func:`for_publication`, which do not read the slices.

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
    digests = [slice_digest(w) for w in words]
    db = _db(store)
    head = _read_header(txn, db, shard)
    man: ShardManifest | None = None
    if head is not None and db is not None:
        delta = _delta(txn, db, shard, head.digests, words, digests)
        if delta is not None:
            gone, new, changed = delta
            if not changed:
                return ShardManifest(head.sizes, head.roots, {}, "cache", head.levels)
            rewritten = _update(txn, db, shard, head.sizes, head.roots, gone.tobytes(), new.tobytes(), secret)
            if rewritten is not None:
                for b, leaves in rewritten.items():
                    head.sizes[b], head.roots[b] = len(leaves), bucket_root(leaves) if leaves else EMPTY_ROOT
                _retop(head.levels, head.sizes, head.roots, list(rewritten))
                man = ShardManifest(head.sizes, head.roots, rewritten, "cache", head.levels)
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
        assert man.levels is not None  # both ways above build the top tree
        _put_buckets(txn, db, shard, man.buckets, man.roots)
        roots = man.roots if isinstance(man.roots, Hashes) else Hashes.of(man.roots)
        _write_header(txn, db, shard, _Header(digests, man.sizes, roots, man.levels))
    return man


def bucket_leaves(
    store: Store, txn: lmdb.Transaction, man: ShardManifest, shard: int, bucket: int
) -> list[bytes] | None:
    """A bucket's sorted commitments: from memory, else the cache (``None`` if it is not there as the root says)."""
    if bucket in man.buckets:
        return man.buckets[bucket]
    db = _db(store)
    return None if db is None else _read_bucket(txn, db, shard, bucket, man.sizes[bucket], man.roots[bucket])
