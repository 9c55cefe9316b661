"""``scripts/bench_receipts.py`` at a tiny N: the JSON has its fields, and the numbers are exact where they can be.

Runs the script as a user would (a subprocess), 3000 samples, one deletion. Timings are only checked
to be positive (never a threshold); the log's growth per deletion is exact: one "model published"
entry for the retrained shard and the certificate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_receipts.py"


def test_tiny_run(tmp_path: Path, env_python: dict[str, str]) -> None:
    cmd = [sys.executable, str(SCRIPT), "--sizes", "3000", "--deletes", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_python, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "receipts.json").read_text())
    assert (tmp_path / "receipts.png").stat().st_size > 0
    [run] = result["runs"]
    [one] = run["deletions"]
    assert run["n"] == 3000 and run["fit_commit_s"] > 0 and run["fit_sign_s"] > 0
    assert len(one["retrained_shards"]) == 1 and one["log_leaves_added"] == 2 and one["buckets"] == 256
    assert one["commit_s"] > 0 and one["sign_s"] > 0 and one["non_retrain_s"] > one["commit_s"]
    assert 0 < one["receipt_bytes"] < 64 * 1024 and one["verify_s"] > 0
    assert one["flat_commit_s"] > 0 and one["scratch_commit_s"] > 0 and one["flat_share"] > 0
    assert run["median_flat_commit_s"] == one["flat_commit_s"] and run["median_share"] == one["share"]
