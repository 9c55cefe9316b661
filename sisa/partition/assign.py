"""Sample -> (shard, slice) assignment: uniform hashing, or distribution-aware (SISA's Algorithm 1).

``uniform`` places a sample by nothing but its own id and the seed. ``distribution-aware``
sorts samples by their prior probability of a deletion request and fills shards so each
expects about the same number of requests (Bourtoule et al., "Machine Unlearning", IEEE
S&P 2021). Either way a sample's place is decided once at ingest and persisted, so
deleting or adding samples never moves any other (invariant 1 of the design).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from sisa.errors import ConfigError, DataError

__all__ = [
    "distribution_aware_assignment",
    "greedy_shards",
    "hashed_keys",
    "hashed_slices",
    "ordered_slices",
    "shard_masses",
    "splitmix64",
    "uniform_assignment",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# A shard counts as full once its expected deletions are within this relative distance of
# the bound: priors written as decimals (0.1, 0.7, ...) that sum to C on paper can sum to
# C - 1 ulp in floating point, and must not drag one more sample into the shard for that.
_REL_TOL = 1e-9


def splitmix64(values: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser: a fast, well-mixed bijection on uint64.

    Args:
        values: Integer array.

    Returns:
        A uint64 array of the same shape.
    """
    # uint64 arithmetic wraps modulo 2**64, which is exactly what SplitMix64 wants.
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hashed_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """The per-sample random key: a bijective hash of (seed, id).

    Args:
        ids: Non-negative int64 sample ids.
        seed: Partition seed.

    Returns:
        uint64 keys; distinct ids always get distinct keys (every step is a bijection).
    """
    return splitmix64(np.asarray(seed, dtype=np.uint64) ^ splitmix64(np.asarray(ids, dtype=np.uint64)))


def hashed_slices(ids: np.ndarray, seed: int, slices: int) -> np.ndarray:
    """Each sample's slice: an independent hashed draw, uniform over ``[0, slices)``.

    Both strategies use this draw, so a sample's slice never depends on which other
    samples exist and slices stay i.i.d. inside every shard.

    Args:
        ids: Non-negative int64 sample ids.
        seed: Partition seed.
        slices: Number of slices R per shard.

    Returns:
        int64 slice indices.
    """
    # A second hash of the key, so the slice is independent of anything derived from the key itself.
    return (splitmix64(hashed_keys(ids, seed)) % np.uint64(slices)).astype(np.int64)


def uniform_assignment(ids: np.ndarray, seed: int, shards: int, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign each id to a shard and a slice, uniformly at random but reproducibly.

    Args:
        ids: Non-negative int64 sample ids.
        seed: Partition seed.
        shards: Number of shards S.
        slices: Number of slices R per shard.

    Returns:
        ``(shard, slice)`` int64 arrays, shard in ``[0, S)`` and slice in ``[0, R)``.
        Balance: each shard's count is binomial(n, 1/S), so at n = 60,000 and S = 8
        the spread is about 1% (one standard deviation).
    """
    shard = (hashed_keys(ids, seed) % np.uint64(shards)).astype(np.int64)
    return shard, hashed_slices(ids, seed, slices)


def _checked(ids: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids as int64 and probabilities as float64, same length, finite and non-negative."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(p) != len(ids):
        raise DataError(f"got {len(p)} deletion probabilities for {len(ids)} samples; give one per sample")
    if not np.isfinite(p).all() or (p < 0).any():
        raise DataError("deletion probabilities must be finite and >= 0; fix the deletion prior")
    return ids, p


def _order(ids: np.ndarray, p: np.ndarray, seed: int) -> np.ndarray:
    """Indices sorting samples by probability ascending, ties by the hashed key.

    Breaking ties by the key rather than by id (or input position) makes equal-probability
    data fill shards in a random order that is still a pure function of (seed, ids, p):
    with a uniform prior, Algorithm 1 then cuts a random, not an id-ordered, partition.
    """
    return np.lexsort((hashed_keys(ids, seed), p))


def distribution_aware_assignment(
    ids: np.ndarray,
    probabilities: np.ndarray,
    seed: int,
    shards: int,
    slices: int,
    bound: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 of SISA: fill shards in order of rising deletion probability up to a bound.

    Samples are sorted by their probability ``p`` of a deletion request, ascending (ties
    broken by the hash of (seed, id)). Shard 0 takes samples in that order until its
    expected number of deletions, the sum of its samples' ``p``, reaches ``bound`` (the
    sample that reaches it is included); then shard 1 is opened, and so on. Rarely deleted
    samples thus share a few large shards and often deleted ones many small shards, each
    shard expecting about ``bound`` requests, so a request tends to hit a small shard.

    Args:
        ids: Non-negative int64 sample ids (unique).
        probabilities: Each sample's deletion probability, ``>= 0``, aligned with ``ids``.
        seed: Partition seed (tie-breaking and slices).
        shards: Number of shards S.
        slices: Number of slices R per shard; slices are the same hashed draw as
            :func:`uniform_assignment`.
        bound: The bound C on a shard's expected deletions. ``None`` means total mass / S,
            and then shard S - 1 takes whatever remains, so rounding never opens shard S.

    Returns:
        ``(shard, slice)`` int64 arrays aligned with ``ids``. With the default bound a
        very concentrated prior can leave the last shards empty (Algorithm 1 never
        splits the mass of one sample); :meth:`~sisa.ensemble.Ensemble.fit` reports that.

    Raises:
        DataError: If the probabilities are not finite and non-negative, or sum to 0.
        ConfigError: If an explicit ``bound`` is not positive, or cuts the data into a
            number of shards other than ``shards``.
    """
    ids, p = _checked(ids, probabilities)
    total = math.fsum(p.tolist())
    if total <= 0:
        raise DataError(
            "the samples' deletion probabilities sum to 0, so no shard can be filled up to an expected "
            "number of deletions; give some samples a positive probability, or use partition.strategy: uniform"
        )
    if bound is not None and not bound > 0:
        raise ConfigError(f"partition.bound={bound} must be > 0")
    cap = total / shards if bound is None else float(bound)
    threshold = cap * (1.0 - _REL_TOL)
    order = _order(ids, p, seed)
    shard = np.empty(len(ids), dtype=np.int64)
    current, mass = 0, 0.0
    # A plain loop: the running mass restarts at 0 in each shard, which a global cumsum
    # would only approximate (its rounding error grows with n, not with one shard).
    for pos, (index, prob) in enumerate(zip(order.tolist(), p[order].tolist(), strict=True)):
        shard[index] = current
        mass += prob
        if mass >= threshold and pos + 1 < len(ids) and (bound is not None or current < shards - 1):
            current, mass = current + 1, 0.0
    used = current + 1
    if bound is not None and used != shards:
        raise ConfigError(
            f"partition.bound={bound:g} cuts these {len(ids)} samples (expected deletions {total:g}) into "
            f"{used} shard(s), but shards={shards}; set shards: {used}, or change partition.bound "
            f"(total / shards = {total / shards:g}), or leave it unset to use exactly {shards} shards"
        )
    return shard, hashed_slices(ids, seed, slices)


def ordered_slices(ids: np.ndarray, probabilities: np.ndarray, shard: np.ndarray, seed: int, slices: int) -> np.ndarray:
    """Each sample's slice when slices are cut by deletion probability inside each shard.

    Within every shard the samples are sorted by probability, ascending (ties broken by
    the hash of (seed, id), as in :func:`distribution_aware_assignment`), and cut into
    ``slices`` contiguous groups whose sizes differ by at most one. The most likely to be
    deleted land in the last slice, so deleting one retrains only the last stage, the
    cheapest (stage r trains on slices 1..r). A pure function of (seed, ids, p, shard):
    the input order does not matter.

    Args:
        ids: Non-negative int64 sample ids (unique).
        probabilities: Each sample's deletion probability, aligned with ``ids``.
        shard: Each sample's shard, aligned with ``ids``.
        seed: Partition seed (tie-breaking).
        slices: Number of slices R per shard.

    Returns:
        int64 slice indices in ``[0, slices)``.

    Raises:
        DataError: If the probabilities are not finite and non-negative.
    """
    ids, p = _checked(ids, probabilities)
    shard = np.asarray(shard, dtype=np.int64).reshape(-1)
    order = np.lexsort((hashed_keys(ids, seed), p, shard))  # shard, then p rising, then key
    in_order = shard[order]
    _, first, size = np.unique(in_order, return_index=True, return_counts=True)
    group = np.searchsorted(in_order[first], in_order)  # index of each sorted sample's shard group
    rank = np.arange(len(ids), dtype=np.int64) - first[group]
    out = np.empty(len(ids), dtype=np.int64)
    out[order] = rank * slices // size[group]
    return out


def shard_masses(shard: np.ndarray, probabilities: np.ndarray, shards: int) -> list[float]:
    """Expected deletions of each shard: the sum of its samples' probabilities.

    Args:
        shard: Each sample's shard.
        probabilities: Each sample's deletion probability.
        shards: Number of shards S.

    Returns:
        ``S`` floats.
    """
    sums = np.bincount(
        np.asarray(shard, dtype=np.int64), weights=np.asarray(probabilities, np.float64), minlength=shards
    )
    return [float(v) for v in sums]


def greedy_shards(
    ids: np.ndarray, probabilities: np.ndarray, seed: int, masses: Sequence[float]
) -> tuple[np.ndarray, list[float]]:
    """Place new samples into an existing partition: each into the shard expecting fewest deletions.

    Samples are visited in the same order as Algorithm 1 (probability ascending, ties by
    the hash of (seed, id)); each goes to the shard with the smallest current expected
    mass (ties: the lowest shard index), whose mass then grows by the sample's ``p``.
    Existing samples never move, which is what keeps their checkpoints valid.

    Args:
        ids: Non-negative int64 ids of the new samples.
        probabilities: Their deletion probabilities, ``>= 0``.
        seed: Partition seed.
        masses: Current expected deletions of each shard (length S).

    Returns:
        ``(shard, masses)``: int64 shards aligned with ``ids``, and the updated masses.

    Raises:
        DataError: If the probabilities are not finite and non-negative.
    """
    ids, p = _checked(ids, probabilities)
    heap = [(float(m), s) for s, m in enumerate(masses)]
    heapq.heapify(heap)  # (mass, shard): the tuple order is exactly "least mass, then lowest index"
    shard = np.empty(len(ids), dtype=np.int64)
    for index in _order(ids, p, seed).tolist():
        mass, s = heapq.heappop(heap)
        shard[index] = s
        heapq.heappush(heap, (mass + float(p[index]), s))
    out = [0.0] * len(masses)
    for mass, s in heap:
        out[s] = mass
    return shard, out
