"""The evaluation harness end to end on a tiny problem: forget sets, rows, targets, CLI output."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sisa.cli.main import main
from sisa.config.fields import config_to_dict
from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.evaluate.forgets import (
    METHODS,
    ForgetSpec,
    forget_ids,
    parse_forget,
    parse_methods,
    refuse_repeats,
    store_names,
)
from sisa.evaluate.harness import evaluate
from sisa.evaluate.scoring import MethodRow, summarise_retrains
from sisa.evaluate.settings import load_evaluate_config
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_parse_forget_and_methods() -> None:
    assert parse_forget("random:0.01") == ForgetSpec("random", 0.01)
    assert parse_forget(" class:3 ").name == "class:3"
    assert parse_forget("random:0.1").name == "random:0.1"
    for bad in ("random:0", "random:1.5", "class:-1", "class:x", "everything", "random:"):
        with pytest.raises(ConfigError, match="random:FRACTION"):
            parse_forget(bad)
    assert parse_methods("prune,sisa") == ("sisa", "prune")  # canonical order
    assert parse_methods(list(METHODS)) == METHODS
    with pytest.raises(ConfigError, match="unknown method.*magic"):
        parse_methods("sisa,magic")
    with pytest.raises(ConfigError, match="none given"):
        parse_methods(" , ")


def test_forget_ids_select_what_the_spec_says() -> None:
    y = np.arange(1000) % 4
    data = LabeledArrays(x=np.zeros((1000, 2), np.float32), y=y, ids=np.arange(1000) * 3)
    cls = forget_ids(ForgetSpec("class", 2), data, 4, seed=0)
    assert np.array_equal(cls, data.ids[y == 2])
    a = forget_ids(ForgetSpec("random", 0.1), data, 4, seed=0)
    assert len(a) == 100 and np.all(np.diff(a) > 0) and np.isin(a, data.ids).all()
    assert np.array_equal(a, forget_ids(ForgetSpec("random", 0.1), data, 4, seed=0))
    assert not np.array_equal(a, forget_ids(ForgetSpec("random", 0.1), data, 4, seed=1))
    with pytest.raises(DataError, match="outside"):
        forget_ids(ForgetSpec("class", 4), data, 4, seed=0)
    with pytest.raises(DataError, match="selects 0 of 1000"):
        forget_ids(ForgetSpec("random", 0.0001), data, 4, seed=0)
    one_class = LabeledArrays(x=data.x, y=np.zeros(1000, np.int64), ids=data.ids)
    with pytest.raises(DataError, match="selects 1000 of 1000"):
        forget_ids(ForgetSpec("class", 0), one_class, 4, seed=0)


@pytest.fixture(scope="module")
def blob_config(tmp_path_factory: pytest.TempPathFactory) -> SisaConfig:
    root = tmp_path_factory.mktemp("eval-data")
    x, y = blobs(n=900, d=12, classes=3, seed=5)
    np.savez(root / "train.npz", x=x[:600], y=y[:600])
    np.savez(root / "test.npz", x=x[600:], y=y[600:])
    return small_config(
        "data.dataset=npz",
        f"data.train={root / 'train.npz'}",
        f"data.test={root / 'test.npz'}",
    )


# The harness's settings on the blobs (the `evaluate:` section of the config file).
BLOB_EVALUATE = {"retrain_seeds": 3, "threads": 1}


@pytest.mark.kernels
def test_evaluate_scores_every_method_against_the_retrain(blob_config: SisaConfig, tmp_path: Path) -> None:
    settings = load_evaluate_config({"evaluate": BLOB_EVALUATE})
    result = evaluate(
        blob_config, [ForgetSpec("random", 0.1), ForgetSpec("class", 1)], METHODS, tmp_path, settings=settings
    )
    rows = {(r["forget"], r["method"]): r for r in result["rows"]}
    names = ("retrain", "original", "sisa", "gradient_ascent", "finetune", "prune", "newton")
    assert [r["method"] for r in result["rows"]] == [*names, *names]
    n_class = int((np.load(blob_config.data.train)["y"] == 1).sum())
    assert result["forget_sets"] == {
        "random:0.1": {"forget": 60, "retain": 540},
        "class:1": {"forget": n_class, "retain": 600 - n_class},
    }
    for r in result["rows"]:
        for key in ("forget_accuracy", "retain_accuracy", "test_accuracy", "mia_accuracy", "mia_auc"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key)
    # Retraining without class 1 can never predict class 1: forget accuracy is exactly 0.
    assert rows["class:1", "retrain"]["forget_accuracy"] == 0.0
    assert rows["class:1", "sisa"]["forget_accuracy"] == 0.0
    assert rows["class:1", "original"]["forget_accuracy"] > 0.9
    # The original model is far from the retrain on the forgotten class; SISA is near the floor.
    # (The floor's arithmetic is checked on known values in test_retrain_summary_floor_excludes_the_reference_seed.)
    floor = rows["class:1", "retrain"]["extra"]["kl_floor_forget"]
    assert 0.0 < floor < rows["class:1", "original"]["kl_forget"]  # seeds differ a little; far less than original
    assert rows["class:1", "original"]["kl_forget"] > 10 * rows["class:1", "sisa"]["kl_forget"]
    # newton's step report reaches the row: how close to the retain optimum the step landed.
    step = rows["random:0.1", "newton"]["extra"]
    assert step["scope"] == "head" and step["grad_norm_retain_after"] >= 0 and step["step_norm"] > 0
    spread = rows["random:0.1", "retrain"]["extra"]["mia_auc_spread"]
    assert len(rows["random:0.1", "retrain"]["extra"]["mia_auc_per_seed"]) == 3 and spread[0] <= spread[1]
    # The targets' arithmetic is checked on known values in test_evaluation_targets.py; here, that
    # they are computed from this run's rows.
    assert result["targets"]["class:1"]["sisa_mia_auc"] == rows["class:1", "sisa"]["mia_auc"]
    # SISA really deleted: its store no longer holds the forget set, and verify passes.
    store = Path(rows["class:1", "sisa"]["extra"]["store"])
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.status()["samples"] == 600 - n_class
    with Ensemble.open(store) as ens:
        assert ens.verify()["ok"]


def test_retrain_summary_floor_excludes_the_reference_seed() -> None:
    # Seed 0 is the KL reference (its KL to itself is 0), so the floor is the mean over the other
    # seeds only: (0.2 + 0.4) / 2 = 0.3, not (0 + 0.2 + 0.4) / 3 = 0.2. Accuracies average all seeds.
    def seed_row(k: int, kl_forget: float, kl_test: float, test_accuracy: float, auc: float) -> MethodRow:
        return MethodRow(
            forget="class:1",
            method="retrain",
            forget_accuracy=0.0,
            retain_accuracy=1.0,
            test_accuracy=test_accuracy,
            mia_accuracy=0.5,
            mia_auc=auc,
            kl_forget=kl_forget,
            kl_test=kl_test,
            seconds=float(k + 1),
            extra={"seed": 7 + k},
        )

    rows = [seed_row(0, 0.0, 0.0, 0.9, 0.5), seed_row(1, 0.2, 0.1, 0.8, 0.7), seed_row(2, 0.4, 0.5, 0.7, 0.6)]
    summary = summarise_retrains(rows)
    assert summary.kl_forget == pytest.approx(0.3) and summary.extra["kl_floor_forget"] == pytest.approx(0.3)
    assert summary.kl_test == pytest.approx(0.3) and summary.extra["kl_floor_test"] == pytest.approx(0.3)
    assert summary.test_accuracy == pytest.approx(0.8) and summary.mia_auc == pytest.approx(0.6)
    assert summary.seconds == pytest.approx(2.0) and summary.extra["seeds"] == [7, 8, 9]
    assert summary.extra["mia_auc_spread"] == [0.5, 0.7]


def test_cli_writes_table_json_and_png(
    blob_config: SisaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One file, as users write it: the ensemble's settings and the harness's `evaluate:` section.
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**config_to_dict(blob_config), "evaluate": BLOB_EVALUATE}))
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--config",
        str(cfg_file),
        "--forget",
        "random:0.05",
        "--methods",
        "retrain,finetune",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MIA AUC" in text and "finetune" in text and "sisa" not in text.split("wrote")[0]
    saved = json.loads((out / "evaluation.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["retrain", "original", "finetune"]
    assert len(saved["rows"][0]["extra"]["seeds"]) == 3  # the file's evaluate.retrain_seeds
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--json", "--no-plot", "evaluate.finetune.epochs=2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["config"]["evaluate"]["finetune"]["epochs"] == 2 and "plot" not in again
    assert again["config"]["evaluate"]["retrain_seeds"] == 3 and again["config"]["shards"] == blob_config.shards


def test_cli_rejects_bad_requests_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert main(["evaluate", "--forget", "random:2", "--out", str(out)]) == 2
    assert "random:FRACTION" in capsys.readouterr().err
    assert main(["evaluate", "--methods", "sisa,oracle", "--out", str(out)]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(out), "evaluate.prune.mode=melt"]) == 2
    assert "evaluate.prune.mode" in capsys.readouterr().err
    # The same forget set twice (also when written differently): refused, as its results would collide.
    assert main(["evaluate", "--forget", "random:0.01", "--forget", "class:3,random:1e-2", "--out", str(out)]) == 2
    assert "forget set random:0.01 is given twice" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_refuses_a_repeated_forget_set() -> None:
    with pytest.raises(ConfigError, match="class:3 is given twice"):
        refuse_repeats([parse_forget("class:3"), parse_forget("random:0.1"), parse_forget("class:03")])


def test_store_names_are_distinct_when_slugs_collide() -> None:
    names = store_names(["random:0.1", "a:b", "a=b"])
    assert names["random:0.1"] == "random-0.1"  # readable when unique
    assert len(set(names.values())) == 3 and names["a:b"].startswith("a-b-")


def test_each_forget_set_keeps_its_own_result_and_store(
    blob_config: SisaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the worst case: every spec's readable folder name is the same.
    monkeypatch.setattr("sisa.evaluate.forgets._slug", lambda _name: "same")
    settings = load_evaluate_config({"evaluate": {"retrain_seeds": 2, "threads": 1}})
    specs = [ForgetSpec("random", 0.1), ForgetSpec("class", 1)]
    result = evaluate(blob_config, specs, ["sisa"], tmp_path, address="local", settings=settings)

    sisa = {r["forget"]: r for r in result["rows"] if r["method"] == "sisa"}
    assert set(sisa) == set(result["targets"]) == {"random:0.1", "class:1"}
    stores = {name: Path(row["extra"]["store"]) for name, row in sisa.items()}
    assert len(set(stores.values())) == 2
    for name, store in stores.items():  # each store is still there, and holds what its own deletion left
        with Ensemble.open(store, readonly=True) as ens:
            assert ens.status()["samples"] == result["forget_sets"][name]["retain"]


def test_evaluate_refuses_a_shared_backbone_config_and_says_where_it_is_measured(tmp_path: Path) -> None:
    from sisa.evaluate.forgets import parse_forget
    from sisa.evaluate.harness import evaluate
    from tests.conftest import small_config

    cfg = small_config("backbone.source=core", "backbone.name=mlp", "model.adapter=head")
    with pytest.raises(ConfigError, match="scripts/bench_backbone.py"):
        evaluate(cfg, [parse_forget("random:0.1")], workdir=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()
