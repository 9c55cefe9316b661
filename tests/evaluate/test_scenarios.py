"""Poisoning scenarios (issue 15 items 1, 3, 5): spec parsing, exact poisoning, ASR, SISA deletion of poison."""

import json
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.evaluate.forgets import parse_forget, split_forgets
from sisa.evaluate.metrics import accuracy
from sisa.evaluate.scenarios import attack_set, parse_scenario, poison, stamp
from sisa.evaluate.sets import build_sets
from tests.conftest import blobs, live_state, small_config, write_config


def images(n: int, seed: int) -> LabeledArrays:
    """Learnable 1x8x8 "images": 3 Gaussian blobs in 64 dimensions, ids 10, 13, 16, ..."""
    x, y = blobs(n=n, d=64, classes=3, seed=seed)
    return LabeledArrays(x=x.reshape(n, 1, 8, 8), y=y, ids=10 + 3 * np.arange(n, dtype=np.int64))


def test_parse_scenario_specs() -> None:
    b = parse_forget("backdoor:rate=0.01,target=0,found=0.5")
    assert b.kind == "backdoor" and b.value == 0.01 and b.scenario is not None
    assert b.name == "backdoor:rate=0.01,target=0,found=0.5,patch=3"  # defaults filled in, canonical order
    assert parse_forget(" backdoor: target=0 , rate=0.01 ").name == "backdoor:rate=0.01,target=0,found=1,patch=3"
    f = parse_forget("flip:rate=0.05,from=3,to=5")
    assert f.name == "flip:rate=0.05,from=3,to=5,found=1" and f.scenario is not None and f.scenario.label("to") == 5
    assert split_forgets("random:0.01,backdoor:rate=0.01,target=0,found=0.1, class:3") == [
        "random:0.01",
        "backdoor:rate=0.01,target=0,found=0.1",
        "class:3",
    ]
    bad = {
        "backdoor:rate=0.01": "missing target",
        "backdoor:rate=0,target=0": "rate=0 must be in",
        "backdoor:rate=1.5,target=0": "rate=1.5 must be in",
        "backdoor:rate=0.1,target=0,found=0": "found=0 must be in",
        "backdoor:rate=0.1,target=0,found=2": "found=2 must be in",
        "backdoor:rate=0.1,target=-1": "target=-1 must be a class",
        "backdoor:rate=0.1,target=0.5": "target='0.5' is not an integer",
        "backdoor:rate=0.1,target=0,colour=red": "'colour=red' is not one of",
        "backdoor:rate=0.1,target=0,rate=0.2": "rate is given twice",
        "backdoor:rate=0.1,target=0,patch=0": "patch=0 must be >= 1",
        "flip:rate=0.1,from=2,to=2": "same class",
        "flip:rate=0.1,from=2": "missing to",
    }
    for spec, message in bad.items():
        with pytest.raises(ConfigError, match=message) as err:
            parse_forget(spec)
        assert "e.g." in str(err.value)  # every message shows a working spelling


def test_backdoor_stamps_exactly_the_seeded_ids() -> None:
    clean = images(400, seed=1)
    sc = parse_scenario("backdoor:rate=0.1,target=2,found=0.5,patch=3")
    p = poison(sc, clean, num_classes=3, seed=7)
    others = clean.ids[clean.y != 2]
    assert len(p.poisoned_ids) == round(0.1 * len(others)) and np.isin(p.poisoned_ids, others).all()
    assert len(p.named_ids) == round(0.5 * len(p.poisoned_ids)) and np.isin(p.named_ids, p.poisoned_ids).all()
    assert p.trigger_value == float(clean.x.max())
    # Bytes compared row by row: exactly the poisoned rows changed, in the patch only, to the trigger value.
    changed = [i for i in range(len(clean)) if p.train.x[i].tobytes() != clean.x[i].tobytes()]
    assert np.array_equal(clean.ids[changed], p.poisoned_ids)
    rows = np.isin(clean.ids, p.poisoned_ids)
    assert np.array_equal(p.train.x[rows][..., :-3, :], clean.x[rows][..., :-3, :])
    assert np.array_equal(p.train.x[rows][..., :, :-3], clean.x[rows][..., :, :-3])
    assert (p.train.x[rows][..., -3:, -3:] == p.trigger_value).all()
    assert np.array_equal(p.train.y[~rows], clean.y[~rows]) and (p.train.y[rows] == 2).all()
    assert np.array_equal(p.train.ids, clean.ids)
    # stamp is a pure function: the input is untouched, and the same seed poisons the same ids.
    before = clean.x.tobytes()
    stamp(clean.x, 3, 99.0)
    assert clean.x.tobytes() == before
    again = poison(sc, clean, num_classes=3, seed=7)
    assert np.array_equal(again.poisoned_ids, p.poisoned_ids) and np.array_equal(again.named_ids, p.named_ids)
    assert not np.array_equal(poison(sc, clean, num_classes=3, seed=8).poisoned_ids, p.poisoned_ids)
    # The attack set: every test image of another class, stamped, labelled with the target.
    test = images(90, seed=2)
    attack = attack_set(sc, test, p.trigger_value)
    assert np.array_equal(attack.ids, test.ids[test.y != 2]) and (attack.y == 2).all()
    assert np.array_equal(attack.x, stamp(test.x[test.y != 2], 3, p.trigger_value))


def test_flip_relabels_only_the_seeded_subgroup() -> None:
    clean = images(400, seed=1)
    sc = parse_scenario("flip:rate=0.25,from=1,to=0")
    p = poison(sc, clean, num_classes=3, seed=0)
    assert clean.x.tobytes() == p.train.x.tobytes()
    flipped = clean.ids[p.train.y != clean.y]
    assert np.array_equal(flipped, p.poisoned_ids) and np.array_equal(p.named_ids, p.poisoned_ids)
    assert len(flipped) == round(0.25 * (clean.y == 1).sum())
    assert (clean.y[np.isin(clean.ids, flipped)] == 1).all() and (p.train.y[np.isin(clean.ids, flipped)] == 0).all()
    test = images(90, seed=2)
    attack = attack_set(sc, test, p.trigger_value)
    assert np.array_equal(attack.ids, test.ids[test.y == 1]) and (attack.y == 0).all()


def test_scenarios_that_do_not_fit_the_data() -> None:
    clean = images(300, seed=1)
    with pytest.raises(DataError, match="target=3 is not a class.*0..2"):
        poison(parse_scenario("backdoor:rate=0.1,target=3"), clean, num_classes=3, seed=0)
    with pytest.raises(DataError, match="to=7 is not a class"):
        poison(parse_scenario("flip:rate=0.1,from=0,to=7"), clean, num_classes=3, seed=0)
    flat = LabeledArrays(x=clean.x.reshape(300, 64), y=clean.y, ids=clean.ids)
    with pytest.raises(DataError, match=r"needs image data.*shaped \(64,\).*flip: scenario"):
        poison(parse_scenario("backdoor:rate=0.1,target=0"), flat, num_classes=3, seed=0)
    with pytest.raises(DataError, match="patch="):
        poison(parse_scenario("backdoor:rate=0.1,target=0,patch=9"), clean, num_classes=3, seed=0)
    with pytest.raises(DataError, match="poisons none"):
        poison(parse_scenario("backdoor:rate=0.001,target=0"), clean, num_classes=3, seed=0)


@pytest.fixture(scope="module")
def image_config(tmp_path_factory: pytest.TempPathFactory) -> SisaConfig:
    root = tmp_path_factory.mktemp("scenario-data")
    data = images(900, seed=5)  # one draw: train and test share the class centres
    np.savez(root / "train.npz", x=data.x[:600], y=data.y[:600])
    np.savez(root / "test.npz", x=data.x[600:], y=data.y[600:])
    return small_config(
        "data.dataset=npz",
        f"data.train={root / 'train.npz'}",
        f"data.test={root / 'test.npz'}",
    )


@pytest.mark.kernels
@pytest.mark.usefixtures("ray_session")
def test_sisa_deleting_the_poison_equals_retraining_without_it(image_config: SisaConfig, tmp_path: Path) -> None:
    from sisa.data.loaders import load_split

    clean, test = load_split(image_config.data, "train"), load_split(image_config.data, "test")
    sets = build_sets(parse_forget("backdoor:rate=0.2,target=0,found=1.0"), clean, test, image_config)
    assert sets.attack is not None and sets.poisoned_ids is not None
    assert np.array_equal(sets.forget.ids, sets.poisoned_ids)  # found=1: the request names all poison
    with Ensemble.create(tmp_path / "poisoned", image_config) as ens:
        ens.ingest(sets.train)
        ens.fit()
        asr_backdoored = accuracy(ens.predict_proba(sets.attack.x), sets.attack.y)
        ens.delete(sets.forget.ids)
        after = live_state(ens)
        p_after = {k: ens.predict_proba(getattr(sets, k).x) for k in ("attack", "test")}
    with Ensemble.create(tmp_path / "retrain", image_config) as ens:
        ens.ingest(sets.retain)  # never saw a poisoned sample
        ens.fit()
        retrained = live_state(ens)
        p_retrain = {k: ens.predict_proba(getattr(sets, k).x) for k in ("attack", "test")}
    # SISA's promise: the same weights, bit for bit, so the same predictions and the same ASR.
    assert {s: w for s, (_, w) in after.items()} == {s: w for s, (_, w) in retrained.items()}
    for k in p_after:
        assert np.array_equal(p_after[k], p_retrain[k]), k
    asr_after = accuracy(p_after["attack"], sets.attack.y)
    assert asr_after == accuracy(p_retrain["attack"], sets.attack.y)
    # The backdoor worked before the deletion, measured against the clean ensemble of this run.
    assert asr_backdoored > asr_after, (asr_backdoored, asr_after)


@pytest.mark.kernels
@pytest.mark.usefixtures("ray_session")
def test_cli_reports_attack_success_per_method(
    image_config: SisaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = write_config(image_config, tmp_path / "cfg.yaml")
    out = tmp_path / "out"
    spec = "backdoor:rate=0.2,target=0,found=0.5"
    flip = "flip:rate=0.3,from=1,to=2"  # found=1 by default
    argv = ["evaluate", "--config", str(cfg_file), "--forget", f"random:0.05,{spec}", "--forget", flip]
    argv += ["--methods", "retrain,finetune,sisa", "--out", str(out), "--no-plot", "evaluate.threads=1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "ASR" in text and "attack success" in text and "bit-identical to its shards retrained" in text
    saved = json.loads((out / "evaluation.json").read_text())
    name = parse_forget(spec).name
    rows = {(r["forget"], r["method"]): r for r in saved["rows"]}
    assert [r["method"] for r in saved["rows"] if r["forget"] == name] == [
        "retrain",
        "unpoisoned",
        "original",
        "sisa",
        "finetune",
    ]
    assert all(r["attack_success"] is None for r in saved["rows"] if r["forget"] == "random:0.05")
    info = saved["forget_sets"][name]
    assert info["forget"] == round(0.5 * info["poisoned"]) and info["attack_set"] == int(
        (np.load(image_config.data.test)["y"] != 0).sum()
    )
    # found=0.5 keeps half the poison in the retrain; the never-poisoned model is trained apart.
    assert rows[name, "unpoisoned"]["extra"]["same_as_retrain"] is False
    t = saved["targets"][name]
    assert t["attack_success_unpoisoned"] == rows[name, "unpoisoned"]["attack_success"]
    assert t["attack_success"]["sisa"] == rows[name, "sisa"]["attack_success"]
    # The harness checks SISA's exactness itself: after the deletion every shard equals its retrain from scratch.
    sisa = rows[name, "sisa"]["extra"]
    assert sisa["verified_equal_to_retrain"] is True and sisa["verify_seconds"] > 0
    assert 0.0 <= sisa["attack_success_before"] <= 1.0
    # found=1 names every flipped id: the retrain never saw poison and is the never-poisoned model.
    flipped = parse_forget(flip).name
    assert rows[flipped, "unpoisoned"]["extra"]["same_as_retrain"] is True
    assert (
        rows[flipped, "unpoisoned"]["attack_success"] == rows[flipped, "retrain"]["extra"]["attack_success_per_seed"][0]
    )
    assert saved["forget_sets"][flipped]["forget"] == saved["forget_sets"][flipped]["poisoned"]
    assert (out / "sisa-base").is_dir() and (out / "sisa-base-backdoor-rate-0.2-target-0-found-0.5-patch-3").is_dir()


def test_cli_rejects_bad_scenarios_before_any_work(
    image_config: SisaConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = write_config(image_config, tmp_path / "cfg.yaml")
    flat_root = tmp_path / "flat"
    flat_root.mkdir()
    x, y = blobs(n=60, d=12, classes=3, seed=0)
    np.savez(flat_root / "train.npz", x=x[:40], y=y[:40])
    np.savez(flat_root / "test.npz", x=x[40:], y=y[40:])
    flat = [f"data.train={flat_root / 'train.npz'}", f"data.test={flat_root / 'test.npz'}"]
    out = tmp_path / "never"
    cases = [
        (["--forget", "backdoor:rate=2,target=0"], [], "rate=2 must be in (0, 1]"),
        (["--forget", "backdoor:rate=0.1,target=0,size=3"], [], "'size=3' is not one of"),
        (["--forget", "random:0.1,flip:rate=0.1,from=1"], [], "missing to"),
        (["--forget", "backdoor:rate=0.1,target=3"], [], "target=3 is not a class"),
        (["--forget", "backdoor:rate=0.1,target=0"], flat, "needs image data"),
    ]
    for args, overrides, message in cases:
        argv = ["evaluate", "--config", str(cfg_file), *args, "--out", str(out), "--no-plot", *overrides]
        assert main(argv) == 2, args
        assert message in capsys.readouterr().err, args
        assert not out.exists(), args
