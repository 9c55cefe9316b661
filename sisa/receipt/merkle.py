"""RFC 6962 / RFC 9162 Merkle tree hashing: tree heads, inclusion and consistency proofs, and their checks.

One small module, standard library only, so the receipt verifier carries it without the store. Leaves are
hashed ``SHA-256(0x00 || data)`` and interior nodes ``SHA-256(0x01 || left || right)``; the tree over ``n``
leaves splits at the largest power of two below ``n`` (RFC 9162 section 2.1.1). The tests check it against
the Certificate Transparency reference vectors.

Why not ``pymerkle``: the verifier must run where only ``cryptography`` and the standard library are
installed, so it needs the RFC's proof checks in its own code whatever the log side uses; one
implementation, checked against the published vectors, serves both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "Tree",
    "hash_children",
    "hash_leaf",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}), the head of an empty tree


def hash_leaf(data: bytes) -> bytes:
    """The leaf hash of one entry: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """An interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class Tree:
    """A Merkle tree over a fixed list of leaf hashes, kept level by level for cheap proofs.

    Level 0 holds the leaf hashes; each next level pairs its neighbours, and a last node with no
    partner is carried up unchanged. That gives exactly the RFC's tree (the split at the largest
    power of two below ``n`` leaves the ragged right edge to be promoted), and every aligned
    power-of-two block of leaves has its hash stored, so a proof costs O(log n) hashes.

    Args:
        leaves: The leaf hashes (:func:`hash_leaf` of each entry), 32 bytes each.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        level = list(leaves)
        if any(len(h) != 32 for h in level):
            raise ValueError("every leaf hash must be 32 bytes (SHA-256)")
        self.levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [hash_children(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            self.levels.append(nxt)
            level = nxt

    @property
    def size(self) -> int:
        """The number of leaves."""
        return len(self.levels[0])

    def root(self, size: int | None = None) -> bytes:
        """The tree head of the first ``size`` leaves (default all): MTH(D[0:size])."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")
        return EMPTY_ROOT if size == 0 else self._range(0, size)

    def _range(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range the RFC recursion visits (``start`` aligned to the split)."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:  # a full aligned block: stored
            return self.levels[n.bit_length() - 1][start // n]
        k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
        return hash_children(self._range(start, start + k), self._range(start + k, end))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of the first ``size`` leaves (RFC 6962 2.1.1)."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
        return self._path(index, 0, size)

    def _path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = 1 << ((n - 1).bit_length() - 1)
        if m < k:
            return [*self._path(m, start, start + k), self._range(start + k, end)]
        return [*self._path(m - k, start + k, end), self._range(start, start + k)]

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """The proof that the tree of ``second`` leaves extends the tree of ``first`` (RFC 6962 2.1.2)."""
        second = self.size if second is None else second
        if not 0 <= first <= second <= self.size:
            raise ValueError(f"no consistency proof from size {first} to size {second} (log has {self.size})")
        if first in (0, second):
            return []
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, start: int, end: int, whole: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if whole else [self._range(start, end)]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return [*self._subproof(m, start, start + k, whole), self._range(start + k, end)]
        return [*self._subproof(m - k, start + k, end, False), self._range(start, start + k)]


class Frontier:
    """The right edge of an append-only RFC 6962 tree: its head after each append in O(log n) hashes.

    A tree of ``n`` leaves is, from the left, one perfect subtree per set bit of ``n`` (largest first:
    the RFC's split at the largest power of two below ``n``, repeated on the rest), so the roots of
    those subtrees are all that an append or the head needs. This is what lets the log sign a checkpoint
    after each deletion without rehashing its whole history.

    Args:
        size: The number of leaves the ``nodes`` stand for.
        nodes: The roots of its perfect subtrees, largest first (one per set bit of ``size``).

    Raises:
        ValueError: If ``nodes`` does not have one 32-byte hash per set bit of ``size``.
    """

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(nodes) != bin(size).count("1") or any(len(h) != 32 for h in nodes):
            raise ValueError(f"a frontier of {size} leaves has {bin(max(size, 0)).count('1')} 32-byte nodes")
        self.size = size
        self.nodes = list(nodes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash at the right."""
        if len(leaf) != 32:
            raise ValueError("a leaf hash is 32 bytes (SHA-256)")
        self.nodes.append(leaf)
        self.size += 1
        # Two subtrees of equal size merge, as the binary carry of size + 1 does.
        carry = self.size
        while not carry & 1:
            right = self.nodes.pop()
            self.nodes[-1] = hash_children(self.nodes[-1], right)
            carry >>= 1

    def root(self) -> bytes:
        """The tree head: the subtrees folded from the right, MTH(D[0:size])."""
        if not self.nodes:
            return EMPTY_ROOT
        head = self.nodes[-1]
        for node in reversed(self.nodes[:-1]):
            head = hash_children(node, head)
        return head


def root_of(leaves: Sequence[bytes]) -> bytes:
    """The tree head over ``leaves`` (leaf hashes)."""
    return Tree(leaves).root()


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree of ``size`` leaves with head ``root``.

    The algorithm of RFC 9162 section 2.1.3.2.
    """
    if not 0 <= index < size or any(len(p) != 32 for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hash_children(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows the tree (``second``, ``second_root``) extends (``first``, ``first_root``).

    The algorithm of RFC 9162 section 2.1.4.2; equal sizes need an empty proof and equal roots, and
    the empty tree is a prefix of every tree.
    """
    if not 0 <= first <= second or any(len(p) != 32 for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old head is itself a node of the new tree
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = hash_children(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
