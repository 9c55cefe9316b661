"""Probability-ordered slices: the pure function, placement with either strategy, and a cheaper deletion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.partition.assign import hashed_slices, ordered_slices, uniform_assignment
from sisa.partition.prior import write_prior
from tests.conftest import blobs, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(900, d=10)
IDS = np.arange(900, dtype=np.int64)
# 30 "hot" samples (1 in 30 ids) hold most of the deletion mass, rising slightly with the id; the
# rest share a little. The last hot id is the likeliest of all, so also of its shard.
HOT = IDS[IDS % 30 == 7]
P = np.where(IDS % 30 == 7, 0.02 + IDS * 1e-6, 0.0005)


def where(ens: Ensemble, sample_id: int) -> tuple[int, int]:
    return ens.locate([sample_id])[sample_id]


# --------------------------------------------------------------------------- the pure function
def test_slices_are_equal_cuts_of_rising_probability_within_each_shard() -> None:
    rng = np.random.default_rng(3)
    ids = rng.choice(10**9, size=2000, replace=False)
    p = rng.choice([0.0, 0.001, 0.01, 0.2], size=ids.size) * rng.random(ids.size)
    shard, _ = uniform_assignment(ids, 5, 7, 4)
    slice_ = ordered_slices(ids, p, shard, seed=5, slices=4)
    for s in range(7):
        mine = shard == s
        sizes = np.bincount(slice_[mine], minlength=4)
        assert sizes.sum() == mine.sum() and sizes.max() - sizes.min() <= 1
        # Every sample of slice j is at most as likely to be deleted as every sample of slice j+1.
        for j in range(3):
            assert p[mine & (slice_ == j)].max() <= p[mine & (slice_ == j + 1)].min()
    # A pure function of (seed, ids, p, shard): the input order does not matter.
    perm = rng.permutation(ids.size)
    assert np.array_equal(ordered_slices(ids[perm], p[perm], shard[perm], seed=5, slices=4), slice_[perm])


def test_ties_are_broken_by_the_seeded_hash_not_by_id() -> None:
    ids = np.arange(400)
    slice_ = ordered_slices(ids, np.full(400, 0.1), np.zeros(400, dtype=np.int64), seed=0, slices=4)
    assert np.bincount(slice_).tolist() == [100] * 4
    assert not np.array_equal(slice_, np.repeat(np.arange(4), 100))  # not id order
    other = ordered_slices(ids, np.full(400, 0.1), np.zeros(400, dtype=np.int64), seed=1, slices=4)
    assert not np.array_equal(slice_, other)


def test_small_shards_and_bad_probabilities() -> None:
    # Fewer samples than slices: the samples spread out, the most likely one last.
    slice_ = ordered_slices(np.array([5, 6]), np.array([0.9, 0.1]), np.array([0, 0]), seed=0, slices=4)
    assert slice_.tolist() == [2, 0]
    with pytest.raises(DataError, match="finite and >= 0"):
        ordered_slices(np.arange(3), np.array([0.1, -1.0, 0.2]), np.zeros(3, dtype=np.int64), 0, 2)


# --------------------------------------------------------------------------- config and placement
def test_config_key_and_its_rules() -> None:
    assert load_config(None).partition.slice_order == "hashed"
    cfg = load_config(None, ["partition.slice_order=probability", "partition.probabilities=p.npz"])
    assert (cfg.partition.strategy, cfg.partition.slice_order, cfg.partition.uses_prior) == (
        "uniform",
        "probability",
        True,
    )
    with pytest.raises(
        ConfigError, match="partition.slice_order='by-id' is not allowed; choose one of hashed, probability"
    ):
        load_config(None, ["partition.slice_order=by-id"])


def test_uniform_shards_with_ordered_slices_keep_the_shards_and_order_the_slices(tmp_path: Path) -> None:
    prior = write_prior(tmp_path / "prior.npz", IDS, P)
    hashed = small_config()
    ordered = small_config("partition.slice_order=probability", f"partition.probabilities={prior}")
    with Ensemble.create(tmp_path / "h", hashed) as h, Ensemble.create(tmp_path / "o", ordered) as o:
        h.ingest(X, Y)
        o.ingest(X, Y)  # the prior comes from the file
        got_h = [where(h, i) for i in IDS.tolist()]
        got_o = [where(o, i) for i in IDS.tolist()]
        assert "shard_mass" not in o.store.meta()  # uniform shards: no expected deletions to keep
    assert [s for s, _ in got_h] == [s for s, _ in got_o]  # same shards: only the slices change
    assert [r for _, r in got_h] == hashed_slices(IDS, 0, 3).tolist()
    assert {got_o[i][1] for i in HOT.tolist()} == {2}  # every hot sample in its shard's last slice


def test_ordered_slices_need_a_prior_and_a_refused_ingest_writes_nothing(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "st", small_config("partition.slice_order=probability")) as ens:
        digest = store_digest(ens.path)
        with pytest.raises(DataError, match="partition.slice_order is probability but no deletion prior was given"):
            ens.ingest(X, Y)
        assert store_digest(ens.path) == digest
        ens.ingest(X, Y, probabilities=P)
        with pytest.raises(ConfigError, match="partition.*cannot change"):
            ens.reconfigure(small_config())
    with Ensemble.create(tmp_path / "plain", small_config()) as ens:
        with pytest.raises(DataError, match="partition.slice_order: probability"):
            ens.ingest(X, Y, probabilities=P)


@pytest.mark.parametrize("strategy", ["uniform", "distribution-aware"])
def test_deleting_a_likely_sample_retrains_only_the_last_stage(tmp_path: Path, strategy: str) -> None:
    cfg = small_config(f"partition.strategy={strategy}", "partition.slice_order=probability")
    with Ensemble.create(tmp_path / "st", cfg) as ens:
        ens.ingest(X, Y, probabilities=P)
        ens.fit()
        victim = int(HOT[-1])
        shard, slice_ = where(ens, victim)
        assert slice_ == cfg.slices - 1
        cert = ens.delete([victim])
        info = cert["shards"][str(shard)]
        assert cert["retrained_shards"] == [shard]
        assert info["from_slice"] == cfg.slices and len(info["new_checkpoints"]) == 1
        assert ens.verify([shard])["ok"] is True
