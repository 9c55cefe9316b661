import numpy as np

from sisa.partition.assign import uniform_assignment


def test_pure_function_of_seed_and_id() -> None:
    ids = np.arange(10_000)
    a = uniform_assignment(ids, seed=7, shards=8, slices=4)
    b = uniform_assignment(ids[::-1].copy(), seed=7, shards=8, slices=4)
    assert np.array_equal(a[0], b[0][::-1]) and np.array_equal(a[1], b[1][::-1])
    c = uniform_assignment(ids, seed=8, shards=8, slices=4)
    assert not np.array_equal(a[0], c[0])


def test_removing_a_sample_moves_no_other() -> None:
    ids = np.arange(5_000) * 13 + 5
    shard, slice_ = uniform_assignment(ids, 0, 8, 4)
    for drop in (0, 1234, 4999):
        kept = np.delete(ids, drop)
        s2, r2 = uniform_assignment(kept, 0, 8, 4)
        assert np.array_equal(s2, np.delete(shard, drop))
        assert np.array_equal(r2, np.delete(slice_, drop))


def test_balanced_within_a_few_percent() -> None:
    shard, slice_ = uniform_assignment(np.arange(60_000), 0, 8, 4)
    counts = np.bincount(shard, minlength=8)
    assert np.abs(counts / 7_500 - 1).max() < 0.03
    for s in range(8):
        per_slice = np.bincount(slice_[shard == s], minlength=4)
        assert np.abs(per_slice / per_slice.mean() - 1).max() < 0.06


def test_ranges() -> None:
    shard, slice_ = uniform_assignment(np.arange(1000), 3, 5, 7)
    assert shard.min() >= 0 and shard.max() == 4
    assert slice_.min() >= 0 and slice_.max() == 6
