"""The deletion cost model (sisa/cost_model.py) against the simulated plan and a real store.

Three layers: (1) the model's expectation equals the exact mean of the planned work over
every possible request on a tiny layout (enumeration, no randomness); (2) the simulation
of ``scripts/simulate_requests.py`` agrees with the model within 4 standard errors of its
own draws; (3) the work the simulation plans for hand-picked requests equals what a real
store's deletion retrains (``n_samples x epochs`` of the new stage records).
"""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from sisa.config.settings import TrainConfig
from sisa.ensemble import Ensemble
from sisa.partition import cost_model as cm
from sisa.partition.assign import uniform_assignment
from tests.conftest import blobs, small_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import simulate_requests as sim  # noqa: E402

# A stream's ratio sim/model has a standard error se estimated from its own draws; 4 se
# bounds a false failure at about 6e-5 for a normal mean (and the seeds are fixed).
Z_TOLERANCE = 4.0


def test_model_matches_bench_unlearn_forms() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(50, 200, size=(5, 4))
    for k in (1, 7, 40):
        closed = cm.expected_work_closed_form(counts.tolist(), 3, k)
        assert cm.expected_work(counts.tolist(), 3, k) == pytest.approx(closed, rel=1e-12)
        assert cm.expected_work_layout(counts, 3, k) == pytest.approx(closed, rel=1e-12)
    n, s, r = 6000, 6, 5
    assert cm.expected_work_layout(cm.equal_layout(n, s, r), 2, 1) == pytest.approx(
        cm.single_request_work(n, s, r, 2), rel=1e-12
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_model_is_exact_mean_over_every_request(k: int) -> None:
    # Tiny layout with ids placed by hand: enumerate all C(n, k) requests of distinct ids.
    counts = np.array([[2, 1, 3], [0, 2, 1], [1, 1, 0]])
    cells = [(s, r) for s in range(3) for r in range(3) for _ in range(counts[s, r])]
    works = []
    for request in itertools.combinations(range(len(cells)), k):
        after = counts.copy()
        sh = np.array([cells[i][0] for i in request])
        sl = np.array([cells[i][1] for i in request])
        np.subtract.at(after, (sh, sl), 1)
        works.append(sim.plan_request(after, sh, sl, epochs=3)[0])
    exact = float(np.mean(works))
    assert cm.expected_work_layout(counts, 3, k, replacement=False, exclude_deleted=True) == pytest.approx(exact)
    if k > 1:  # the binomial model (independent draws, work before deletion) is only close
        assert cm.expected_work_layout(counts, 3, k) != pytest.approx(exact)


@pytest.mark.parametrize("engine", ["ids", "counts"])
@pytest.mark.parametrize(("k", "requests"), [(1, 1500), (10, 300)])
def test_simulated_stream_agrees_with_model(engine: str, k: int, requests: int) -> None:
    row = sim.simulate(engine, 20_000, 4, 4, k, requests, TrainConfig(epochs=10), seed=1)
    assert row["requests"] == requests and row["deleted"] == requests * k
    assert 0 < row["se"] < 0.03  # enough draws that the check means something
    assert abs(row["ratio"] - 1.0) < Z_TOLERANCE * row["se"], row
    assert row["shards_touched"] == pytest.approx(row["shards_touched_model"], abs=Z_TOLERANCE * 0.05)
    # The stream shrank the store by `deleted` samples; the static model ignores that.
    assert row["ratio_initial"] < row["ratio"] + 0.01


def test_id_pool_uses_the_real_partitioner_and_deletes_each_id_once() -> None:
    pool = sim.IdPool.build(5000, 8, 4, seed=7)
    shard, slice_ = uniform_assignment(np.arange(5000), 7, 8, 4)
    assert np.array_equal(pool.shard, shard) and np.array_equal(pool.slice_, slice_)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(40):
        sh, sl = pool.draw(rng, 25)
        seen += sh.size
    assert (~pool.alive).sum() == seen == 1000 and pool.counts.sum() == 4000
    assert np.array_equal(
        pool.counts, np.bincount(shard[pool.alive] * 4 + slice_[pool.alive], minlength=32).reshape(8, 4)
    )


@pytest.mark.usefixtures("ray_session")
def test_planned_work_equals_a_real_deletion(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    cfg = small_config()  # S=3, R=3, 4 epochs -> 2 per stage
    ens = Ensemble.create(tmp_path / "st", cfg)
    try:
        ens.ingest(x, y)
        ens.fit()
        epochs = cfg.train.stage_epochs(cfg.slices)
        for ids in ([17], [3, 50, 101, 200, 333]):
            counts = np.array([s["slice_samples"] for s in ens.status()["per_shard"]])
            sh, sl = uniform_assignment(np.array(ids), cfg.seed, cfg.shards, cfg.slices)
            np.subtract.at(counts, (sh, sl), 1)
            planned, touched = sim.plan_request(counts, sh, sl, epochs)
            cert = ens.delete(ids)
            work = 0
            with ens.store.read() as txn:
                for key, info in cert["shards"].items():
                    new = [r for r in ens.store.stage_records(txn, int(key)) if r["stage"] > info["restart_stage"]]
                    assert [r["sha256"] for r in new] == list(info["new_checkpoints"])
                    work += sum(int(r["n_samples"]) * int(r["epochs"]) for r in new)
            assert touched == len(cert["retrained_shards"])
            assert work == planned > 0
    finally:
        ens.close()
