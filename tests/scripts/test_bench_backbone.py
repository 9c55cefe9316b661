"""``scripts/bench_backbone.py --quick``: every method and S measured, and the facts its numbers rest on.

Runs the script as a user would (a subprocess with its own Ray instance) on a small
Fashion-MNIST subset with an MLP backbone, S in 4,8. Checks the fields, that accuracies are
finite probabilities, that the backbone methods stored a backbone once (bytes > 0, trained on
the declared core set, refused a core deletion) and keep per-shard checkpoints smaller than a
full model's, and that every deletion retrained exactly what its certificate says; never a
timing threshold.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sisa.data.loaders import FASHION_CACHE_DIR, FASHION_DEBIAN_DIR

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_backbone.py"

sys.path.insert(0, str(ROOT / "scripts"))
import bench_backbone  # noqa: E402

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _fashion_installed() -> bool:
    return any(all((d / f).is_file() for f in FILES) for d in (FASHION_DEBIAN_DIR, FASHION_CACHE_DIR))


@pytest.mark.integration
@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST is not installed")
def test_quick_run_measures_every_method_and_shard_count(tmp_path: Path, env_python: dict[str, str]) -> None:
    out = tmp_path / "backbone.json"
    work = tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_python, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "feature caching (not stored)" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert list(work.iterdir()) == []  # the stores were removed

    assert result["quick"] is True and result["shards"] == [4, 8]
    assert result["methods"] == ["scratch", "head", "lora"]
    core_size = result["core_size"]
    assert core_size == round(0.1 * result["data"]["train"]) > 0

    mono = result["monolithic"]
    for row in mono.values():
        assert row["shards"] == 1 and row["slices"] == 1
        assert 0.0 <= row["accuracy"] <= 1.0 and row["fit_s"] > 0 and row["compute_s"] > 0
    full_bytes = mono["same_threads"]["checkpoint_bytes"]["mean"]

    rows = {(r["method"], r["shards"]): r for r in result["results"]}
    assert set(rows) == {(m, s) for m in ("scratch", "head", "lora") for s in (4, 8)}
    for (method, shards), row in rows.items():
        assert math.isfinite(row["accuracy"]) and 0.0 <= row["accuracy"] <= 1.0
        assert math.isfinite(row["accuracy_diff_pp"])  # its arithmetic: test_derive_and_targets_on_known_numbers
        ckpt = row["checkpoint_bytes"]
        assert ckpt["count"] == shards * row["slices"] and ckpt["mean"] > 0
        assert row["infer_s"] > 0 and row["infer_ratio_vs_scratch"] > 0
        d = row["delete"]
        assert d["id"] == result["delete_id"]  # the same id in every store
        assert d["retrained_shards"] == [d["shard"]] and d["new_checkpoints_match"]
        assert d["wall_s"] > 0 and d["compute_s"] >= 0 and d["work"] > 0
        assert d["speedup_wall_vs_monolithic"] > 0
        if method == "scratch":
            assert "backbone" not in row and "core_delete_refused" not in row
            assert row["trainable_params_per_shard"] == mono["same_threads"]["trainable_params_per_shard"]
            continue
        backbone = row["backbone"]
        assert backbone["bytes"] > 0 and backbone["core"] == core_size and backbone["source"] == "core"
        assert backbone["seconds"] >= 0 and row["setup_from_scratch_wall_s"] >= backbone["seconds"]
        assert row["core_delete_refused"] is True
        # per-shard checkpoints hold only the head / adapters: smaller than the full model's, both ways measured
        assert ckpt["mean"] < rows[("scratch", shards)]["checkpoint_bytes"]["mean"] and ckpt["mean"] < full_bytes
        assert row["trainable_params_per_shard"] < rows[("scratch", shards)]["trainable_params_per_shard"]
        assert d["speedup_wall_vs_setup_from_scratch"] > 0
    for shards in (4, 8):  # LoRA adds adapters to the head; the same core set gives the same backbone
        assert rows[("head", shards)]["checkpoint_bytes"]["mean"] < rows[("lora", shards)]["checkpoint_bytes"]["mean"]
        assert rows[("head", shards)]["backbone"]["digest"] == rows[("lora", shards)]["backbone"]["digest"]

    feature = result["feature_caching"]
    assert feature["shards"] == 8 and feature["samples"] > 0 and feature["seconds"] > 0
    assert feature["shard"] == rows[("head", 8)]["delete"]["shard"]
    assert feature["share_of_retrain_compute"] >= 0

    targets = result["targets"]
    assert targets["shards"] == 16 and targets["best_method"] is None  # S=16 not in the quick run
    assert targets["accuracy_met"] is None and targets["speedup_met"] is None


def _row(method: str, shards: int, accuracy: float, wall_s: float, infer_s: float, ckpt: float) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "shards": shards, "accuracy": accuracy, "infer_s": infer_s}
    row["checkpoint_bytes"] = {"mean": ckpt}
    row["delete"] = {"wall_s": wall_s, "compute_s": wall_s / 2}
    if method != "scratch":
        row["backbone"] = {}
        row["setup_from_scratch_wall_s"], row["setup_from_scratch_compute_s"] = 30.0, 12.0
    return row


def test_derive_and_targets_on_known_numbers() -> None:
    # Hand-computed: monolithic accuracy 0.80, fit 120 s (60 s compute); whole machine 40 s.
    mono = {
        "same_threads": {"accuracy": 0.80, "fit_s": 120.0, "compute_s": 60.0},
        "whole_machine": {"accuracy": 0.80, "fit_s": 40.0, "compute_s": 60.0},
    }
    rows = [
        _row("scratch", 16, 0.75, wall_s=8.0, infer_s=2.0, ckpt=1000.0),
        _row("head", 16, 0.795, wall_s=2.0, infer_s=1.0, ckpt=250.0),
        _row("lora", 16, 0.78, wall_s=1.0, infer_s=3.0, ckpt=400.0),
    ]
    bench_backbone.derive(rows, mono)
    scratch, head, lora = rows
    assert scratch["accuracy_diff_pp"] == pytest.approx(-5.0)
    assert head["accuracy_diff_pp"] == pytest.approx(-0.5) and lora["accuracy_diff_pp"] == pytest.approx(-2.0)
    assert scratch["delete"]["speedup_wall_vs_monolithic"] == pytest.approx(15.0)  # 120 / 8
    assert head["delete"]["speedup_wall_vs_monolithic"] == pytest.approx(60.0)  # 120 / 2
    assert head["delete"]["speedup_compute_vs_monolithic"] == pytest.approx(60.0)  # 60 / 1
    assert head["delete"]["speedup_wall_vs_monolithic_whole_machine"] == pytest.approx(20.0)  # 40 / 2
    assert head["delete"]["speedup_wall_vs_setup_from_scratch"] == pytest.approx(15.0)  # 30 / 2
    assert lora["delete"]["speedup_compute_vs_setup_from_scratch"] == pytest.approx(24.0)  # 12 / 0.5
    assert "speedup_wall_vs_setup_from_scratch" not in scratch["delete"]
    assert head["infer_ratio_vs_scratch"] == pytest.approx(0.5) and lora["infer_ratio_vs_scratch"] == pytest.approx(1.5)
    assert lora["checkpoint_bytes_ratio_vs_scratch"] == pytest.approx(0.4)

    goal = bench_backbone.targets(rows, mono["same_threads"])
    # The best backbone method by accuracy is head (0.795 > 0.78; scratch is not a backbone method):
    # -0.5 pp is within 1 pp, and 60x is at least 50x.
    assert goal["best_method"] == "head" and goal["accuracy_diff_pp"] == pytest.approx(-0.5)
    assert goal["accuracy_met"] is True and goal["deletion_speedup_wall"] == pytest.approx(60.0)
    assert goal["speedup_met"] is True
    head["accuracy"], head["accuracy_diff_pp"] = 0.70, -10.0  # now lora (-2 pp, 120x) is the best: too far
    goal = bench_backbone.targets(rows, mono["same_threads"])
    assert goal["best_method"] == "lora" and goal["accuracy_met"] is False and goal["speedup_met"] is True
    assert bench_backbone.targets(rows[:0], mono["same_threads"])["best_method"] is None
