"""SISA's cost model: the retraining work (sample-epochs) a deletion request causes, drawn and expected.

Work is counted the way the planner retrains (``sisa.unlearn.journal.record_request`` then the planner's ``fit``): a
request retrains every shard holding one of its ids from the earliest slice that holds one;
stage j trains ``e'`` epochs (``TrainConfig.stage_epochs``) on slices 1..j, so restarting at
1-based slice r costs ``e' * sum_{j=r..R} |slices 1..j|`` sample-epochs, counted over the
samples the shard still holds. Expectations are over requests of K ids drawn uniformly from the
live samples (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021, section V).

A layout is an ``(S, R)`` array: ``counts[s, r]`` samples in 0-based slice r of shard s.

Under a shard graph (``partition.graph``, :mod:`sisa.partition.graph`) shard s trains on the slices
of its *group* (itself and its links), so its stage j covers the group's slices 1..j
(:func:`graph_layout`), and an id of shard t retrains every shard whose group holds t, each from
the id's slice. The expectations take the groups (``groups=``) and count exactly that: with
``ring:k`` on equal shards one id retrains k+1 shards, each on (k+1) N/S samples, so
(k+1)^2 times the work of the same S without a graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "avoid_probability",
    "binomial_pmf",
    "drawn_work",
    "equal_layout",
    "expected_shards_touched",
    "expected_work",
    "expected_work_closed_form",
    "expected_work_layout",
    "full_sisa_work",
    "graph_layout",
    "monolithic_work",
    "planned_work",
    "restart_work",
    "shard_work",
    "single_request_work",
]

# Elements per chunk of the (cells x draws) log-product in avoid_probability: bounds memory.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- work of one plan
def shard_work(sizes: Sequence[int], epochs: int) -> list[float]:
    """Work (sample-epochs) of retraining one shard from each 1-based slice r = 1..R.

    Stage j trains ``epochs`` epochs on slices 1..j, so restarting at slice r costs
    ``epochs * sum_{j=r..R} |slices 1..j|``.

    Args:
        sizes: Samples in each slice of the shard.
        epochs: Epochs per stage ``e'``.

    Returns:
        ``work[r - 1]`` for r = 1..R.
    """
    cum = np.cumsum(np.asarray(sizes, dtype=np.float64))
    tail = np.cumsum(cum[::-1])[::-1]  # tail[r-1] = sum_{j>=r} cum[j-1]
    return [float(epochs * t) for t in tail]


def restart_work(counts: np.ndarray, epochs: float) -> np.ndarray:
    """:func:`shard_work` for every shard of a layout at once.

    Args:
        counts: ``(S, R)`` samples per slice.
        epochs: Epochs per stage ``e'``.

    Returns:
        ``(S, R)`` float array: ``work[s, r]`` retrains shard s from 0-based slice r.
    """
    cum = np.cumsum(np.asarray(counts, dtype=np.float64), axis=1)
    return float(epochs) * np.cumsum(cum[:, ::-1], axis=1)[:, ::-1]


def planned_work(counts_after: np.ndarray, first_slice: np.ndarray, epochs: float) -> float:
    """Work the planner retrains for one request, given where its ids were.

    Args:
        counts_after: ``(S, R)`` layout after the request's ids are removed.
        first_slice: ``(S,)`` 0-based earliest slice holding a deleted id of each shard;
            any value ``>= R`` (or negative) marks a shard the request does not touch.
        epochs: Epochs per stage ``e'``.

    Returns:
        Sample-epochs: each touched shard retrained from its first touched slice.
    """
    counts_after = np.asarray(counts_after)
    slices = counts_after.shape[1]
    first = np.asarray(first_slice, dtype=np.int64)
    hit = np.flatnonzero((first >= 0) & (first < slices))
    if hit.size == 0:
        return 0.0
    return float(restart_work(counts_after[hit], epochs)[np.arange(hit.size), first[hit]].sum())


def drawn_work(sizes_after: Sequence[Sequence[int]], epochs: int, first_slice: Mapping[int, int]) -> float:
    """Work SISA must retrain for the ids actually drawn: each touched shard from its first touched slice.

    Args:
        sizes_after: Samples per slice of each shard after the deletion.
        epochs: Epochs per stage.
        first_slice: Shard -> first touched slice (1-based) of the drawn ids.

    Returns:
        Sample-epochs.
    """
    return sum(shard_work(sizes_after[s], epochs)[r - 1] for s, r in first_slice.items())


def full_sisa_work(counts: np.ndarray, epochs: float) -> float:
    """Work of training (or retraining) every shard of a layout from scratch."""
    return float(restart_work(counts, epochs)[:, 0].sum()) if np.asarray(counts).size else 0.0


def monolithic_work(n: float, epochs: int) -> float:
    """Work of retraining one model on all ``n`` samples for ``epochs`` epochs: ``e * n``."""
    return float(epochs) * float(n)


def graph_layout(counts: np.ndarray, groups: Sequence[Sequence[int]] | None) -> np.ndarray:
    """The layout each shard trains on under a shard graph: ``out[s, r]`` = slice r of every shard in s's group.

    Args:
        counts: ``(S, R)`` samples per slice, where they are stored.
        groups: For each shard s, the shards whose slices it trains on (s included; ``None``: no graph).

    Returns:
        ``(S, R)`` float array (``counts`` itself, as floats, without a graph).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if groups is None:
        return counts
    return np.stack([counts[list(group)].sum(axis=0) for group in groups]) if len(groups) else counts


# --------------------------------------------------------------------------- expectations
def binomial_pmf(k: int, p: float) -> np.ndarray:
    """``P(m)`` for m = 0..k of Binomial(k, p), computed in log space (stable for large k)."""
    m = np.arange(k + 1, dtype=np.float64)
    if p <= 0.0:
        return (m == 0).astype(np.float64)
    if p >= 1.0:
        return (m == k).astype(np.float64)
    log_comb = np.array([math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) for i in range(k + 1)])
    return np.exp(log_comb + m * math.log(p) + (k - m) * math.log1p(-p))


def _shard_terms(sizes: Sequence[Sequence[int]], epochs: int) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Per non-empty shard: its share ``p`` of the ids, its work from each slice, and ``q``.

    ``q[r-1]`` is the share of the shard's samples in slices r..R (``q[R] = 0``), so an id
    of the shard lands at or after slice r with probability ``q[r-1]``.
    """
    n = float(sum(sum(s) for s in sizes))
    for shard in sizes:
        size = float(sum(shard))
        if size == 0:
            continue
        q = np.append(np.cumsum(np.asarray(shard, dtype=np.float64)[::-1])[::-1] / size, 0.0)
        yield size / n, np.asarray(shard_work(shard, epochs)), q


def expected_work(sizes: Sequence[Sequence[int]], epochs: int, k: int) -> float:
    """Expected retraining work of one request of ``k`` uniformly drawn ids (sum over the binomial).

    Ids are drawn independently (with replacement) and the work is counted on the layout
    before the deletion; :func:`expected_work_layout` has the exact variants.

    Args:
        sizes: Samples per slice of each shard (the store's actual layout).
        epochs: Epochs per stage ``e'``.
        k: Ids in the request.

    Returns:
        Expected sample-epochs retrained: sum over shards, over m ~ Binomial(k, |shard|/n)
        ids landing there (m >= 1), over the first touched slice r with
        ``P(r_min >= r) = q_r^m``, of the work of retraining from r.
    """
    total = 0.0
    for p, work, q in _shard_terms(sizes, epochs):
        pmf = binomial_pmf(k, p)
        m = np.arange(1, k + 1, dtype=np.float64)[:, None]
        p_first = q[None, :-1] ** m - q[None, 1:] ** m  # P(r_min = r | m), rows m = 1..k
        total += float(pmf[1:] @ (p_first @ work))
    return total


def expected_work_closed_form(sizes: Sequence[Sequence[int]], epochs: int, k: int) -> float:
    """The same expectation via the binomial generating function ``E[q^m] = (1 - p + p q)^k`` (a check)."""
    total = 0.0
    for p, work, q in _shard_terms(sizes, epochs):
        tail = (1.0 - p + p * q) ** k - (1.0 - p) ** k  # P(m >= 1 and r_min >= r)
        total += float((tail[:-1] - tail[1:]) @ work)
    return total


def avoid_probability(a: np.ndarray, n: float, k: int, *, replacement: bool) -> np.ndarray:
    """Probability that ``k`` uniform draws from ``n`` samples all miss a given set of ``a`` samples.

    Args:
        a: Set sizes (any shape, ``0 <= a <= n``).
        n: Population size.
        k: Draws.
        replacement: ``True``: independent draws, ``(1 - a/n)^k``. ``False``: ``k``
            distinct samples, ``prod_{i<k} (n - a - i) / (n - i)`` (hypergeometric), summed
            in log space so it stays exact to rounding at ``n = 10^9``.

    Returns:
        Array shaped like ``a``.
    """
    a = np.asarray(a, dtype=np.float64)
    n = float(n)
    if n <= 0:
        return np.ones_like(a)
    if replacement:
        with np.errstate(divide="ignore"):
            return np.exp(k * np.log1p(-np.minimum(a / n, 1.0)))
    if k > n:
        raise ValueError(f"cannot draw k={k} distinct samples from n={n:g}")
    flat = a.reshape(-1)
    log = np.zeros_like(flat)
    step = max(1, _CHUNK_ELEMENTS // max(1, flat.size))
    with np.errstate(divide="ignore"):
        for start in range(0, k, step):
            rest = n - np.arange(start, min(k, start + step), dtype=np.float64)  # n - i
            log += np.log1p(-np.minimum(flat[:, None] / rest[None, :], 1.0)).sum(axis=1)
    return np.exp(log).reshape(a.shape)


def expected_work_layout(
    counts: np.ndarray,
    epochs: float,
    k: int,
    *,
    replacement: bool = True,
    exclude_deleted: bool = False,
    groups: Sequence[Sequence[int]] | None = None,
) -> float:
    """Expected retraining work of one request of ``k`` uniform ids, vectorised over a layout.

    With ``avoid[s, r]`` the probability that no id falls in slices ``< r`` of shard s,
    the first touched slice of shard s is r with probability ``avoid[s, r] - avoid[s, r+1]``
    (the shard is untouched with probability ``avoid[s, R]``), so
    ``E[work] = sum_{s,r} (avoid[s, r] - avoid[s, r+1]) * restart_work[s, r]``.
    ``replacement=True, exclude_deleted=False`` is :func:`expected_work_closed_form`.

    Args:
        counts: ``(S, R)`` samples per slice (floats allowed, e.g. :func:`equal_layout`).
        epochs: Epochs per stage ``e'``.
        k: Ids in the request.
        replacement: ``False`` draws ``k`` distinct ids (what a request is); ``True``
            independent draws (the binomial model). They differ by ``O(k^2 / n)``.
        exclude_deleted: Count the work over the samples left after the deletion, as the
            planner does: each deleted id in 0-based slice t would have been trained on in
            the ``R - t`` stages from t on (all retrained, since the restart is at or before
            t), so exactly ``e' * k * E[R - t]`` sample-epochs are subtracted; exact for
            distinct ids.
        groups: Under a shard graph, each shard's group (:func:`graph_layout`): shard s restarts at
            the first slice of its group that holds an id, so ``avoid`` and the work are taken over
            the group's layout, while ids are drawn from the ``n`` stored samples.

    Returns:
        Expected sample-epochs retrained by the request.
    """
    counts = np.asarray(counts, dtype=np.float64)
    shards, slices = counts.shape
    n = float(counts.sum())
    if n <= 0 or k <= 0:
        return 0.0
    trained = graph_layout(counts, groups)
    prefix = np.concatenate([np.zeros((shards, 1)), np.cumsum(trained, axis=1)], axis=1)  # (S, R + 1)
    avoid = avoid_probability(prefix, n, k, replacement=replacement)
    p_first = avoid[:, :-1] - avoid[:, 1:]
    total = float((p_first * restart_work(trained, epochs)).sum())
    if exclude_deleted:
        stages_seen = slices - np.arange(slices, dtype=np.float64)  # a sample of slice t is in stages t+1..R
        # each deleted id was in those stages of every shard that trains on its slice
        total -= float(epochs) * k * float((trained * stages_seen).sum()) / n
    return total


def expected_shards_touched(
    counts: np.ndarray, k: int, *, replacement: bool = True, groups: Sequence[Sequence[int]] | None = None
) -> float:
    """Expected number of shards a request of ``k`` uniform ids retrains (``groups``: under a shard graph)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = float(counts.sum())
    if n <= 0:
        return 0.0
    trained = graph_layout(counts, groups)
    return float((1.0 - avoid_probability(trained.sum(axis=1), n, k, replacement=replacement)).sum())


def equal_layout(n: float, shards: int, slices: int) -> np.ndarray:
    """The expected layout of the uniform partitioner: ``n / (S R)`` samples in every slice."""
    return np.full((shards, slices), float(n) / (shards * slices))


def single_request_work(n: float, shards: int, slices: int, epochs: float) -> float:
    """The paper's closed form for one id and equal shards: ``e' (n/S)/R (R+1)(2R+1)/6``."""
    return float(epochs) * (float(n) / shards) / slices * (slices + 1) * (2 * slices + 1) / 6
