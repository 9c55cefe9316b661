"""Shard graphs: which other shards' slices each shard trains on (``partition.graph``), and who must retrain.

With ``ring:k`` shard s is linked to shards s+1..s+k (mod S); with ``random:k`` to k other shards
drawn by a partial Fisher-Yates shuffle of the S-1 others whose i-th swap is decided by
``SHA-256("sisa-graph-v1|seed|S|k|s|i")`` (:func:`_drawn`): a pure function of (seed, S, k) that
no library release can change, and O(k) hashes per shard. Shard s then trains at stage r on
slice r of itself and of every linked shard (its *group*), so a deletion from shard t retrains
t and every shard linked to t (t's *readers*), each from its own last stage that never saw the id.
docs/sharding.md ("Shard graphs") explains why this stays exact.
"""

from __future__ import annotations

import functools
import hashlib

from sisa.config.settings import graph_form

__all__ = ["groups", "links", "readers"]


@functools.lru_cache(maxsize=64)
def links(spec: str, seed: int, shards: int) -> tuple[tuple[int, ...], ...]:
    """For each shard, the other shards whose slices it also trains on (sorted; empty under ``none``).

    Args:
        spec: ``partition.graph`` (``none``, ``ring:k`` or ``random:k``), already validated.
        seed: The config's seed (``random:k`` draws from it).
        shards: S.
    """
    kind, k = graph_form(spec)
    if kind == "none":
        return tuple(() for _ in range(shards))
    if kind == "ring":
        return tuple(tuple(sorted({(s + i) % shards for i in range(1, k + 1)})) for s in range(shards))
    return tuple(tuple(sorted(_drawn(seed, shards, k, s))) for s in range(shards))


def _drawn(seed: int, shards: int, k: int, shard: int) -> list[int]:
    """The k other shards of ``shard`` under ``random:k``.

    The others, in order, are ``0..S-1`` without ``shard``. Step i = 0..k-1 swaps position i with
    position ``i + h_i mod (S - 1 - i)``, where ``h_i`` is the first 8 bytes (big-endian) of
    ``SHA-256("sisa-graph-v1|{seed}|{S}|{k}|{shard}|{i}")``; the links are the first k positions.
    Only the positions touched are held (a dict), so it costs O(k), not O(S).
    """
    moved: dict[int, int] = {}  # position -> the other shard there, where a swap changed it

    def at(position: int) -> int:
        default = position if position < shard else position + 1  # skip the shard itself
        return moved.get(position, default)

    out = []
    for i in range(k):
        digest = hashlib.sha256(f"sisa-graph-v1|{seed}|{shards}|{k}|{shard}|{i}".encode()).digest()
        j = i + int.from_bytes(digest[:8], "big") % (shards - 1 - i)
        chosen, here = at(j), at(i)
        moved[j], moved[i] = here, chosen
        out.append(chosen)
    return out


def groups(spec: str, seed: int, shards: int) -> tuple[tuple[int, ...], ...]:
    """For each shard s, the shards whose slices s trains on: s itself first, then its links."""
    return tuple((s, *linked) for s, linked in enumerate(links(spec, seed, shards)))


@functools.lru_cache(maxsize=64)
def readers(spec: str, seed: int, shards: int) -> tuple[tuple[int, ...], ...]:
    """For each shard t, the shards that train on t's slices (t itself and every shard linked to t), sorted."""
    out: list[set[int]] = [{t} for t in range(shards)]
    for s, linked in enumerate(links(spec, seed, shards)):
        for t in linked:
            out[t].add(s)
    return tuple(tuple(sorted(r)) for r in out)
