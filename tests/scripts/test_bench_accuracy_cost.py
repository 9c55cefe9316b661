"""``scripts/bench_accuracy_cost.py``: the Pareto front and the target verdicts on known numbers (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sisa.config.fields import config_to_dict
from sisa.config.loader import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_accuracy_cost as bac  # noqa: E402


def test_pareto_front_keeps_exactly_the_undominated_points_in_ascending_x() -> None:
    points = [
        (10.0, -1.0),  # 0: front
        (5.0, -0.5),  # 1: front (most accurate)
        (10.0, -2.0),  # 2: dominated by 0 (same x, lower y)
        (100.0, -3.0),  # 3: front (fastest)
        (50.0, -3.0),  # 4: dominated by 3 (same y, lower x)
        (4.0, -0.6),  # 5: dominated by 1 in both
        (30.0, -1.5),  # 6: front
    ]
    assert bac.pareto_front(points) == [1, 0, 6, 3]


def test_pareto_front_keeps_equal_points_and_handles_edges() -> None:
    assert bac.pareto_front([]) == []
    assert bac.pareto_front([(1.0, 1.0)]) == [0]
    assert bac.pareto_front([(1.0, -1.0), (1.0, 0.0)]) == [1]  # same x: the better y alone dominates
    assert bac.pareto_front([(1.0, 0.0), (2.0, 0.0)]) == [1]  # same y: the larger x alone dominates
    assert bac.pareto_front([(2.0, 0.0), (2.0, 0.0), (1.0, -1.0)]) == [0, 1]  # equals do not dominate each other
    # infinite speedup (a deletion faster than the clock) still compares
    assert bac.pareto_front([(float("inf"), -5.0), (3.0, -5.0), (3.0, 0.0)]) == [2, 0]


def _point(arm: str, agg: str, diff: float, speedup: float, shards: int = 16) -> dict[str, Any]:
    return {"arm": arm, "shards": shards, "aggregate": agg, "accuracy_diff_pp": diff, "speedup": speedup}


def test_targets_are_judged_only_from_measured_full_size_points() -> None:
    full = [
        _point("head", "mean", -2.5, 150.0),
        _point("lora", "vote", -0.8, 12.0),
        _point("head_ring1", "mean", -0.9, 40.0),
    ]
    subset = [_point("head", "mean", -6.0, 150.0), _point("head_ring3", "weighted", -2.9, 20.0)]
    sets = {"full": {"n": 60000, "points": full}, "subset": {"n": 20000, "points": subset}}
    goal = bac.targets(sets, quick=False)
    assert goal["full_s16"]["met"] is True and goal["full_s16"]["best_meeting"]["arm"] == "head_ring1"
    assert goal["subset_s16"]["goal_gap_pp"] == -3.0 and goal["subset_s16"]["met"] is True

    sets["full"]["points"] = full[:2]  # accurate enough but too slow, or fast but too far: not met
    sets["subset"]["points"] = [subset[0], _point("lora", "mean", -3.1, 9.0)]
    goal = bac.targets(sets, quick=False)
    assert goal["full_s16"]["met"] is False
    assert goal["full_s16"]["most_accurate_fast_enough"]["arm"] == "head"
    assert goal["full_s16"]["fastest_accurate_enough"]["arm"] == "lora"
    assert goal["subset_s16"]["met"] is False

    # a quick run, another size, or no S=16 is never judged
    assert all(t["met"] is None for t in bac.targets(sets, quick=True).values())
    sets["full"]["n"] = 3000
    sets["subset"]["points"] = [_point("head", "mean", -6.0, 150.0, shards=8)]
    goal = bac.targets(sets, quick=False)
    assert goal["full_s16"]["met"] is None and "60000" in goal["full_s16"]["not_measured"]
    assert goal["subset_s16"]["met"] is None and "S=16" in goal["subset_s16"]["not_measured"]


def test_monolithic_rows_are_reused_only_from_a_run_of_the_same_config_overrides_and_sizes(tmp_path: Path) -> None:
    base = load_config(ROOT / "configs/fashion_mnist_cnn.yaml", ["data.train_limit=2000"])
    row = {"method": "monolithic", "accuracy": 0.9, "fit_s": 12.0}
    earlier = {"config": config_to_dict(base), "overrides": ["data.train_limit=2000"], "sets": {}}
    earlier["sets"]["full"] = {"n": 2000, "monolithic": row}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(earlier))
    got = bac.reused_monolithic(path, base, ["data.train_limit=2000"], {"full": 2000})
    assert got == {"full": {**row, "reused_from": str(path)}}
    # another size, other overrides, another config, or not a result at all: refused, naming the file
    with pytest.raises(SystemExit, match="full set has another size than this run's 1999"):
        bac.reused_monolithic(path, base, ["data.train_limit=2000"], {"full": 1999})
    with pytest.raises(SystemExit, match="another config or other overrides"):
        bac.reused_monolithic(path, base, ["data.train_limit=2000", "train.epochs=3"], {"full": 2000})
    other = load_config(ROOT / "configs/fashion_mnist_cnn.yaml", ["data.train_limit=2000", "train.epochs=3"])
    with pytest.raises(SystemExit, match="another config or other overrides"):
        bac.reused_monolithic(path, other, ["data.train_limit=2000"], {"full": 2000})
    path.write_text("{}")
    with pytest.raises(SystemExit, match=f"--monolithic-from {path}: not a bench_accuracy_cost result"):
        bac.reused_monolithic(path, base, ["data.train_limit=2000"], {"full": 2000})
