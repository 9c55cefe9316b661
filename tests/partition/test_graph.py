"""Shard graphs as pure functions (links, groups, readers) and the cost model that knows them."""

import hashlib
import itertools

import numpy as np
import pytest

from sisa.partition import cost_model as cm
from sisa.partition.graph import groups, links, readers


def test_ring_links_the_next_k_shards() -> None:
    assert links("ring:1", 0, 4) == ((1,), (2,), (3,), (0,))
    assert links("ring:2", 7, 5) == ((1, 2), (2, 3), (3, 4), (0, 4), (0, 1))
    assert readers("ring:1", 0, 4) == ((0, 3), (0, 1), (1, 2), (2, 3))
    assert links("none", 0, 3) == ((), (), ()) and readers("none", 0, 3) == ((0,), (1,), (2,))


@pytest.mark.parametrize(("shards", "k"), [(4, 1), (8, 3), (16, 15), (32, 5)])
def test_random_links_are_k_distinct_other_shards_and_a_pure_function_of_seed_s_k(shards: int, k: int) -> None:
    drawn = links(f"random:{k}", 11, shards)
    assert all(len(set(ts)) == k and s not in ts and all(0 <= t < shards for t in ts) for s, ts in enumerate(drawn))
    links.cache_clear()
    assert links(f"random:{k}", 11, shards) == drawn  # recomputed, same
    if k < shards - 1:
        assert links(f"random:{k}", 12, shards) != drawn  # another seed, another graph
    # readers is the inverse of groups
    for t, rs in enumerate(readers(f"random:{k}", 11, shards)):
        assert rs == tuple(s for s, g in enumerate(groups(f"random:{k}", 11, shards)) if t in g)


@pytest.mark.parametrize("graph", ["none", "ring:1", "ring:2", "random:2"])
def test_expected_work_under_a_graph_is_the_mean_over_every_possible_request(graph: str) -> None:
    # A tiny uneven layout; every request of k distinct ids is enumerated and planned as the journal plans it:
    # each shard whose group holds an id restarts at the earliest such slice, on its group's slices.
    counts = np.array([[2, 1, 1], [1, 2, 0], [1, 1, 2], [2, 0, 1]])
    shards, slices = counts.shape
    g, r = groups(graph, 3, shards), readers(graph, 3, shards)
    cells = [(s, j) for s in range(shards) for j in range(slices) for _ in range(counts[s, j])]
    for k in (1, 2):
        total = 0.0
        requests = list(itertools.combinations(range(len(cells)), k))
        for req in requests:
            after = counts.copy()
            first = np.full(shards, slices)
            for i in req:
                t, j = cells[i]
                after[t, j] -= 1
                for s in r[t]:
                    first[s] = min(first[s], j)
            total += cm.planned_work(cm.graph_layout(after, g), first, 2)
        expected = cm.expected_work_layout(counts, 2, k, replacement=False, exclude_deleted=True, groups=g)
        assert expected == pytest.approx(total / len(requests), rel=1e-12)


def test_ring_k_costs_k_plus_1_squared_on_equal_shards() -> None:
    # k+1 shards retrain per id, each on k+1 shards' slices.
    equal = cm.equal_layout(1e6, 8, 4)
    plain = cm.expected_work_layout(equal, 1, 1)
    for k in (1, 3):
        g = groups(f"ring:{k}", 0, 8)
        assert cm.expected_work_layout(equal, 1, 1, groups=g) == pytest.approx((k + 1) ** 2 * plain)
        assert cm.expected_shards_touched(equal, 1, groups=g) == pytest.approx(k + 1)


def test_random_links_follow_the_documented_rule() -> None:
    # docs/sharding.md: a partial Fisher-Yates shuffle of the other shards, step i decided by a SHA-256.
    def documented(seed: int, shards: int, k: int, s: int) -> tuple[int, ...]:
        others = [t for t in range(shards) if t != s]
        for i in range(k):
            h = hashlib.sha256(f"sisa-graph-v1|{seed}|{shards}|{k}|{s}|{i}".encode()).digest()
            j = i + int.from_bytes(h[:8], "big") % (shards - 1 - i)
            others[i], others[j] = others[j], others[i]
        return tuple(sorted(others[:k]))

    for seed, shards, k in [(0, 4, 2), (5, 16, 3), (9, 33, 32), (2**62, 100, 7)]:
        assert links(f"random:{k}", seed, shards) == tuple(documented(seed, shards, k, s) for s in range(shards))
