"""End to end through Ray: fit, determinism across runs, resume after a crash, predict, reopen."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sisa.data.loaders import LabeledArrays
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError, NotTrainedError
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)


def trained(path: Path, *overrides: str) -> Ensemble:
    ens = Ensemble.create(path, small_config(*overrides))
    ens.ingest(X, Y)
    ens.fit()
    return ens


def live_digests(ens: Ensemble) -> dict[int, str]:
    return {s["shard"]: s["live_weights"] for s in ens.status()["per_shard"]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, ray_session: None):
    ens = trained(tmp_path_factory.mktemp("fit") / "st")
    yield ens
    ens.close()


@pytest.mark.kernels
def test_fit_trains_every_stage_and_learns(fitted: Ensemble) -> None:
    status = fitted.status()
    assert status["trained_shards"] == 3
    assert all(s["stages_done"] == 3 and s["live"] for s in status["per_shard"])
    assert fitted.score(X, Y) > 0.9
    assert all(acc > 0.8 for acc in fitted.shard_scores(X, Y).values())


def test_two_fits_are_bit_identical(fitted: Ensemble, tmp_path: Path) -> None:
    with trained(tmp_path / "again") as again:
        assert live_digests(again) == live_digests(fitted)
        with again.store.read() as a, fitted.store.read() as b:
            for shard in range(3):
                ra, rb = again.store.stage_records(a, shard), fitted.store.stage_records(b, shard)
                assert [r["key"] for r in ra] == [r["key"] for r in rb]
                assert [again.store.checkpoint(a, r) for r in ra] == [fitted.store.checkpoint(b, r) for r in rb]


def test_refit_is_a_no_op(fitted: Ensemble) -> None:
    report = fitted.fit()
    assert report.trained == {} and report.skipped == [0, 1, 2]


def test_crash_mid_fit_resumes_from_last_finished_stage(fitted: Ensemble, tmp_path: Path) -> None:
    ens = Ensemble.create(tmp_path / "crash", small_config())
    ens.ingest(X, Y)
    seen: list[tuple[int, int]] = []

    def die_after_four(result) -> None:
        seen.append((result.shard, result.stage))
        if len(seen) == 4:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        ens.fit(progress=die_after_four)
    done = {s["shard"]: s["stages_done"] for s in ens.status()["per_shard"]}
    assert sum(done.values()) == 4  # exactly the committed stages survived
    report = ens.fit()
    assert sum(len(v) for v in report.trained.values()) == 9 - 4
    for shard, stages in report.trained.items():
        assert stages[0] == done[shard] + 1  # each shard resumed after its last finished stage
    assert live_digests(ens) == live_digests(fitted)
    ens.close()


@pytest.mark.kernels
def test_predictions_and_aggregation_methods(fitted: Ensemble) -> None:
    proba = fitted.predict_proba(X[:50])
    assert proba.shape == (50, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(fitted.predict(X[:50]), proba.argmax(axis=1))
    for method in ("vote", "weighted"):
        assert fitted.score(X, Y, method=method) > 0.9
    with pytest.raises(DataError, match="sample shape"):
        fitted.predict(np.zeros((2, 4), np.float32))


def test_reopen_in_another_process_predicts_the_same(fitted: Ensemble, env_python: dict) -> None:
    np.save(fitted.path.parent / "x.npy", X[:20])
    code = (
        "import json, numpy as np; from sisa.ensemble import Ensemble\n"
        f"e = Ensemble.open({str(fitted.path)!r}, readonly=True)\n"
        f"print(json.dumps(e.predict_proba(np.load({str(fitted.path.parent / 'x.npy')!r})).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_python, check=True)
    assert np.array_equal(np.array(json.loads(out.stdout), dtype=np.float32), fitted.predict_proba(X[:20]))


def test_recipe_change_retrains_and_partition_change_is_refused(tmp_path: Path) -> None:
    ens = trained(tmp_path / "re")
    before = live_digests(ens)
    ens.reconfigure(small_config("aggregate.method=vote"))
    assert ens.fit().trained == {}  # aggregation is not part of the recipe
    ens.reconfigure(small_config("train.lr=0.02"))
    assert sorted(ens.fit().trained) == [0, 1, 2]
    assert live_digests(ens) != before
    with pytest.raises(ConfigError, match="shards.*cannot change"):
        ens.reconfigure(small_config("shards=4"))
    ens.close()


def test_new_data_retrains_only_from_the_slice_it_lands_in(fitted: Ensemble, tmp_path: Path) -> None:
    ens = trained(tmp_path / "grow")
    x2, y2 = blobs(1, d=10, seed=5)
    ens.ingest(x2, y2, ids=[10_000])
    with ens.store.read() as txn:
        where = [(s, r) for s in range(3) for r in range(3) if 10_000 in ens.store.slice_ids(txn, s, r)]
    ((shard, slice_),) = where
    report = ens.fit()
    assert report.trained == {shard: list(range(slice_ + 1, 4))}
    ens.close()


def test_errors_before_training(tmp_path: Path) -> None:
    ens = Ensemble.create(tmp_path / "empty", small_config())
    with pytest.raises(NotTrainedError, match="no samples"):
        ens.fit()
    with pytest.raises(NotTrainedError, match="no trained shards"):
        ens.predict(X[:2])
    ens.ingest(X[:5], Y[:5])
    with pytest.raises(ConfigError, match="fewer than slices"):
        ens.fit()
    ens.close()


def test_predict_takes_a_dataset_and_open_says_how_to_change_the_config(fitted: Ensemble) -> None:
    from torch.utils.data import TensorDataset

    expected = fitted.predict_proba(X[:50])
    pairs = TensorDataset(torch.from_numpy(X[:50]), torch.from_numpy(Y[:50]))
    assert np.array_equal(fitted.predict_proba(pairs), expected)
    assert np.array_equal(fitted.predict_proba(TensorDataset(torch.from_numpy(X[:50]))), expected)
    assert np.array_equal(fitted.predict(LabeledArrays(X[:50], Y[:50], np.arange(50))), expected.argmax(axis=1))
    with pytest.raises(DataError, match="Dataset to predict on is empty"):
        fitted.predict(TensorDataset(torch.from_numpy(X[:0])))
    with pytest.raises(ConfigError, match=r"takes no config.*ens\.reconfigure\(config\)"):
        Ensemble.open(fitted.path, small_config(), readonly=True)
