"""Shard graphs: which other shards' slices each shard trains on (``partition.graph``), and who must retrain.

With ``ring:k`` shard s is linked to shards s+1..s+k (mod S); with ``random:k`` to the k other
shards t with the smallest ``SHA-256("sisa-graph-v1|seed|S|k|s|t")`` (big-endian), a pure
function of (seed, S, k) that no library release can change. Shard s then trains at stage r on
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
    """The k other shards of ``shard`` under ``random:k``: the smallest hashes of (seed, S, k, shard, other)."""

    def rank(other: int) -> bytes:
        return hashlib.sha256(f"sisa-graph-v1|{seed}|{shards}|{k}|{shard}|{other}".encode()).digest()

    return sorted((t for t in range(shards) if t != shard), key=rank)[:k]


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
