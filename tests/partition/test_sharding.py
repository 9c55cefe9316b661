"""Distribution-aware sharding (SISA's Algorithm 1): the pure functions, the prior file, the store."""

import math
from pathlib import Path

import numpy as np
import pytest

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.partition.assign import distribution_aware_assignment, greedy_shards, hashed_slices, shard_masses
from sisa.partition.prior import load_prior, read_prior, write_prior
from tests.conftest import blobs, small_config, store_digest

# A hand-checkable prior: sorted ascending it is 105 .02, 101 .05, 106 .08, 103 .10, 107 .11,
# 104 .15, 102 .20, 100 .29 (total 1.00, all distinct so no tie-breaking is involved).
HAND_IDS = np.array([100, 101, 102, 103, 104, 105, 106, 107])
HAND_P = np.array([0.29, 0.05, 0.20, 0.10, 0.15, 0.02, 0.08, 0.11])


def shards_of(ids: np.ndarray, shard: np.ndarray) -> list[list[int]]:
    return [sorted(ids[shard == s].tolist()) for s in range(int(shard.max()) + 1)]


# --------------------------------------------------------------------------- Algorithm 1
def test_algorithm1_default_bound_hand_example() -> None:
    # C = 1/3: shard 0 reaches .36 at id 107, shard 1 reaches .35 at id 102, shard 2 takes the rest.
    shard, slice_ = distribution_aware_assignment(HAND_IDS, HAND_P, seed=0, shards=3, slices=2)
    assert shards_of(HAND_IDS, shard) == [[101, 103, 105, 106, 107], [102, 104], [100]]
    assert np.allclose(shard_masses(shard, HAND_P, 3), [0.36, 0.35, 0.29])
    assert np.array_equal(slice_, hashed_slices(HAND_IDS, 0, 2))  # slices: the uniform strategy's hashed draw


def test_algorithm1_explicit_bound_hand_example() -> None:
    # C = .25: .02+.05+.08+.10 = .25 closes shard 0 exactly (rounding tolerated), .11+.15 closes shard 1.
    shard, _ = distribution_aware_assignment(HAND_IDS, HAND_P, seed=0, shards=3, slices=2, bound=0.25)
    assert shards_of(HAND_IDS, shard) == [[101, 103, 105, 106], [104, 107], [100, 102]]


@pytest.mark.parametrize(("bound", "yields"), [(0.1, 6), (0.5, 2)])
def test_explicit_bound_that_needs_another_shard_count_says_so(bound: float, yields: int) -> None:
    with pytest.raises(ConfigError, match=rf"into {yields} shard\(s\), but shards=3; set shards: {yields}"):
        distribution_aware_assignment(HAND_IDS, HAND_P, seed=0, shards=3, slices=2, bound=bound)


def test_default_bound_gives_exactly_s_shards() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        shards = int(rng.integers(1, 17))
        n = int(rng.integers(100, 200)) * shards
        p = rng.choice([0.1, 0.01, 0.3, 1 / 3, 0.7], size=n) * (rng.random(n) < 0.9)  # some zeros, many ties
        shard, _ = distribution_aware_assignment(np.arange(n), p, seed=trial, shards=shards, slices=4)
        assert shard.min() == 0 and shard.max() == shards - 1  # never shard S (and none left empty here)
    # Decimal masses that add up to C on paper but not in floating point: ten 0.1s sum to
    # 0.9999999999999999 < C = 1.0, yet each shard must close after exactly ten samples.
    shard, _ = distribution_aware_assignment(np.arange(80), np.full(80, 0.1), seed=1, shards=8, slices=2)
    assert np.bincount(shard).tolist() == [10] * 8


def test_equal_probabilities_fill_shards_in_a_seeded_random_order() -> None:
    ids = np.arange(1000) * 7 + 3
    p = np.full(len(ids), 0.01)
    shard, slice_ = distribution_aware_assignment(ids, p, seed=5, shards=4, slices=3)
    assert np.bincount(shard).tolist() == [250] * 4
    assert not np.array_equal(shard, np.sort(shard))  # not cut in id order
    perm = np.random.default_rng(1).permutation(len(ids))
    s2, r2 = distribution_aware_assignment(ids[perm], p[perm], seed=5, shards=4, slices=3)
    assert np.array_equal(s2, shard[perm]) and np.array_equal(r2, slice_[perm])  # input order is irrelevant
    s3, _ = distribution_aware_assignment(ids, p, seed=6, shards=4, slices=3)
    assert not np.array_equal(s3, shard)  # the seed decides the order


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(DataError, match="sum to 0"):
        distribution_aware_assignment(HAND_IDS, np.zeros(8), seed=0, shards=2, slices=2)
    with pytest.raises(DataError, match="finite and >= 0"):
        distribution_aware_assignment(HAND_IDS, -HAND_P, seed=0, shards=2, slices=2)
    with pytest.raises(DataError, match="7 deletion probabilities for 8 samples"):
        distribution_aware_assignment(HAND_IDS, HAND_P[:7], seed=0, shards=2, slices=2)


def test_greedy_placement_hand_example() -> None:
    # Masses .5 .2 .2. In p order: 50 (.05) -> shard 1 (tie with 2: lower index), masses .5 .25 .2;
    # 52 (.10) -> shard 2, .5 .25 .3; 51 (.30) -> shard 1, .5 .55 .3.
    shard, masses = greedy_shards(np.array([50, 51, 52]), np.array([0.05, 0.30, 0.10]), seed=0, masses=[0.5, 0.2, 0.2])
    assert shard.tolist() == [1, 1, 2]
    assert np.allclose(masses, [0.5, 0.55, 0.3])


# --------------------------------------------------------------------------- prior file
def test_prior_csv_and_npz_align_to_the_asked_ids(tmp_path: Path) -> None:
    ids, p = np.array([5, 3, 9, 1]), np.array([0.5, 0.25, 0.0, 1.0])
    for name in ("prior.csv", "prior.npz"):
        path = write_prior(tmp_path / name, ids, p)
        got_ids, got_p = read_prior(path)
        assert got_ids.tolist() == ids.tolist() and got_p.tolist() == p.tolist()
        assert load_prior(path, np.array([9, 1, 5])).tolist() == [0.0, 1.0, 0.5]  # extra ids in the file are fine


# --------------------------------------------------------------------------- config
def test_config_keys() -> None:
    cfg = load_config(None, ["partition.strategy=distribution-aware", "partition.probabilities=p.csv"])
    assert (cfg.partition.strategy, cfg.partition.probabilities, cfg.partition.bound) == (
        "distribution-aware",
        "p.csv",
        None,
    )
    assert load_config(None).partition.strategy == "uniform"
    with_bound = ["partition.strategy=distribution-aware", "partition.probabilities=p.npz", "partition.bound=2"]
    assert load_config(None, with_bound).partition.bound == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["partition.strategy=aware"], "choose one of uniform, distribution-aware"),
        (
            ["partition.probabilities=p.csv"],
            "only applies to partition.strategy: distribution-aware or partition.slice_order: probability",
        ),
        (["partition.bound=3"], "partition.bound only applies to partition.strategy: distribution-aware"),
        (["partition.slice_order=random"], "choose one of hashed, probability"),
        (["partition.slice_order=probability", "partition.bound=3"], "partition.bound only applies"),
        (
            ["partition.strategy=distribution-aware", "partition.probabilities=p.csv", "partition.bound=0"],
            "partition.bound=0.0 must be > 0",
        ),
        (
            ["partition.strategy=distribution-aware", "partition.probabilities=p.csv", "partition.bound=-1"],
            "must be > 0",
        ),
        (
            ["partition.strategy=distribution-aware", "partition.probabilities=p.csv", "partition.bound=many"],
            "partition.bound must be a number",
        ),
        (["partition.strategy=distribution-aware", "partition.probabilities=3"], "must be a string"),
    ],
)
def test_config_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# --------------------------------------------------------------------------- the store
X, Y = blobs(600, d=10)
IDS = np.arange(600)
# Skewed: 120 "hot" ids (20%) with p = .3 hold 88% of the 40.8 expected deletions; the rest .01.
HOT = np.sort(np.random.default_rng(3).choice(IDS, size=120, replace=False))
P = np.where(np.isin(IDS, HOT), 0.3, 0.01)


def aware_config(prior: Path, *overrides: str):
    return small_config("partition.strategy=distribution-aware", f"partition.probabilities={prior}", *overrides)


def placements(ens: Ensemble, ids: list[int]) -> dict[int, tuple[int, int]]:
    return ens.locate(ids)


@pytest.mark.usefixtures("ray_session")
def test_placements_survive_deletion_and_add_places_greedily(tmp_path: Path) -> None:
    prior = write_prior(tmp_path / "prior.csv", IDS, P)
    ens = Ensemble.create(tmp_path / "st", aware_config(prior))
    ens.ingest(X, Y)
    expected, _ = distribution_aware_assignment(IDS, P, 0, 3, 3)
    before = placements(ens, IDS.tolist())
    assert [before[i][0] for i in IDS.tolist()] == expected.tolist()
    sizes = [s["samples"] for s in ens.status()["per_shard"]]
    assert sizes[0] > 400 and max(sizes[1:]) < 60  # cold data in one big shard, hot data in small ones
    masses = [s["expected_deletions"] for s in ens.status()["per_shard"]]
    assert np.allclose(masses, shard_masses(expected, P, 3)) and math.isclose(sum(masses), 40.8)
    assert all(40.8 / 3 <= m < 40.8 / 3 + 0.3 for m in masses[:2])  # filled up to C, overshoot < one p
    ens.fit()

    # Two hot ids from each small shard and one cold id, as deferred requests applied in one batch.
    victims = [i for s in (1, 2) for i in HOT[expected[HOT] == s][:2].tolist()] + [
        int(IDS[(expected == 0) & (P < 0.3)][0])
    ]
    for sid in victims:
        ens.delete([sid], defer=True)
    certificates = ens.apply()
    assert sorted({s for c in certificates for s in c["retrained_shards"]}) == [0, 1, 2]
    after = placements(ens, [i for i in IDS.tolist() if i not in victims])
    assert after == {i: where for i, where in before.items() if i not in victims}  # nothing else moved
    assert ens.verify()["ok"]

    # Later data goes, in p order, to the shard expecting the fewest deletions, in a new slice.
    new_ids, new_p = np.arange(1000, 1006), np.array([0.3, 0.01, 0.3, 0.2, 0.01, 0.3])
    masses = ens.store.meta()["shard_mass"]
    predicted, new_masses = greedy_shards(new_ids, new_p, 0, masses)
    x2, y2 = blobs(6, d=10, seed=9)
    report = ens.add(x2, y2, new_ids, probabilities=new_p)
    now = placements(ens, [*after, *new_ids.tolist()])
    assert [now[i] for i in new_ids.tolist()] == [(s, 3) for s in predicted.tolist()]
    assert {i: now[i] for i in after} == after
    assert ens.store.meta()["shard_mass"] == new_masses
    assert report.trained == {s: [4] for s in sorted(set(predicted.tolist()))}
    ens.close()


def test_bad_prior_leaves_the_store_unchanged(tmp_path: Path) -> None:
    prior = tmp_path / "prior.csv"
    ens = Ensemble.create(tmp_path / "st", aware_config(prior))
    first = np.arange(300)
    bad_files = [
        (None, "does not exist; set partition.probabilities"),
        ("id,prob\n0,0.1\n", "header must be id,probability"),
        ("id,probability\n" + "".join(f"{i},0.1\n" for i in range(299)), r"no probability for 1 .*first: 299"),
        ("id,probability\n" + "".join(f"{i},0.1\n" for i in [*range(300), 7]), r"more than once \(first: 7\)"),
        ("id,probability\n" + "".join(f"{i},{'nan' if i == 4 else 0.1}\n" for i in range(300)), "NaN/inf"),
        ("id,probability\n" + "".join(f"{i},{'inf' if i == 4 else 0.1}\n" for i in range(300)), "NaN/inf"),
        ("id,probability\n" + "".join(f"{i},{-0.1 if i == 4 else 0.1}\n" for i in range(300)), "1 negative"),
        ("id,probability\n" + "".join(f"{i},{1.5 if i == 4 else 0.1}\n" for i in range(300)), r"1 > 1 prob"),
        ("id,probability\n" + "".join(f"{i},0\n" for i in range(300)), "every probability is 0"),
        ("id,probability\n0,often\n", "'often' is not a number"),
    ]

    def attempts() -> None:
        digest = store_digest(ens.path)
        for text, message in bad_files:
            prior.unlink(missing_ok=True)
            if text is not None:
                prior.write_text(text)
            with pytest.raises(DataError, match=message):
                ens.ingest(X[first], Y[first], first)
            assert store_digest(ens.path) == digest, message
        with pytest.raises(DataError, match="shape"):
            ens.ingest(X[first], Y[first], first, probabilities=np.full(5, 0.1))
        with pytest.raises(DataError, match="NaN/inf"):
            ens.ingest(X[first], Y[first], first, probabilities=np.full(300, np.nan))
        assert store_digest(ens.path) == digest

    attempts()  # on the empty store (Algorithm 1 would run)
    ens.ingest(X[:50], Y[:50], IDS[:50], probabilities=P[:50])
    first = np.arange(50, 350)
    bad_files[2] = ("id,probability\n" + "".join(f"{i},0.1\n" for i in range(50, 349)), "first: 349")
    bad_files[3] = ("id,probability\n" + "".join(f"{i},0.1\n" for i in [*range(50, 350), 60]), "first: 60")
    attempts()  # after a first ingest (greedy placement would run)
    ens.close()

    for name, message in (("prior.txt", "unknown extension '.txt'"), ("prior.npz", "not an .npz archive")):
        (tmp_path / name).write_text("id,probability\n0,0.1\n")
        with Ensemble.create(tmp_path / f"st-{name}", aware_config(tmp_path / name)) as other:
            digest = store_digest(other.path)
            with pytest.raises(DataError, match=message):
                other.ingest(X[:10], Y[:10])
            assert store_digest(other.path) == digest


def test_bound_mismatch_and_uniform_with_probabilities_leave_the_store_unchanged(tmp_path: Path) -> None:
    prior = write_prior(tmp_path / "prior.npz", IDS, P)
    with Ensemble.create(tmp_path / "bound", aware_config(prior, "partition.bound=5")) as ens:
        digest = store_digest(ens.path)
        with pytest.raises(ConfigError, match=r"into 8 shard\(s\), but shards=3; set shards: 8"):
            ens.ingest(X, Y)
        assert store_digest(ens.path) == digest
    with Ensemble.create(tmp_path / "uniform", small_config()) as ens:
        digest = store_digest(ens.path)
        with pytest.raises(DataError, match="partition.strategy is uniform"):
            ens.ingest(X, Y, probabilities=P)
        assert store_digest(ens.path) == digest
        ens.ingest(X, Y)
        assert "shard_mass" not in ens.store.meta()
        assert ens.status()["per_shard"][0]["expected_deletions"] is None


def test_a_prior_array_needs_no_file_and_no_prior_at_all_is_refused(tmp_path: Path) -> None:
    cfg = small_config("partition.strategy=distribution-aware")  # no file: Python users pass arrays
    with Ensemble.create(tmp_path / "none", cfg) as ens:
        digest = store_digest(ens.path)
        with pytest.raises(DataError, match="no deletion prior was given.*pass probabilities="):
            ens.ingest(X, Y)
        assert store_digest(ens.path) == digest
        ens.ingest(X, Y, probabilities=P)
        assert sum(ens.store.meta()["shard_mass"]) == pytest.approx(float(np.sum(P)))


def test_prior_path_may_change_but_not_the_strategy(tmp_path: Path) -> None:
    prior = write_prior(tmp_path / "prior.csv", IDS, P)
    with Ensemble.create(tmp_path / "st", aware_config(prior)) as ens:
        ens.reconfigure(aware_config(tmp_path / "elsewhere.csv"))  # placements are persisted: nothing moves
        assert ens.config.partition.probabilities == str(tmp_path / "elsewhere.csv")
        with pytest.raises(ConfigError, match="partition.*cannot change"):
            ens.reconfigure(small_config())
        with pytest.raises(ConfigError, match="partition.*cannot change"):
            ens.reconfigure(aware_config(prior, "partition.bound=2"))
