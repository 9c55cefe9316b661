"""``scripts/bench_combiner.py --quick``: the four aggregations measured on one store, and verify after a deletion.

Runs the script as a user would (a subprocess) on a small Fashion-MNIST subset. Checks the
fields, that every accuracy is a probability, and that the store verified (shards and the
combiner's bytes) after the deletion; never an accuracy ordering or a timing threshold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.test_bench_backbone import _fashion_installed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_combiner.py"


@pytest.mark.integration
@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST is not installed")
def test_quick_run_measures_every_aggregation_and_verifies(tmp_path: Path, env_python: dict[str, str]) -> None:
    out = tmp_path / "combiner.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_python, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["shards"] == 4 and row["core"] == 300
    for accuracies in (row["accuracy"], row["accuracy_after_delete"]):
        assert set(accuracies) == {"mean", "vote", "weighted", "combiner"}
        assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    assert row["verify_ok"] and row["combiner_verified"]
    assert row["combiner_refit_s"] > 0 and row["delete_s"] > 0
    # Both stacking formats fitted side by side on the same log-probabilities: the same optimum (no timing asserted).
    assert set(row["stacker_fit_s"]) == {"1", "2"} and all(v > 0 for v in row["stacker_fit_s"].values())
    assert row["stacker_max_weight_diff"] < 1e-6 and row["stacker_speedup"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
