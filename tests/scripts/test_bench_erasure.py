"""``scripts/bench_erasure.py`` on this checkout only, at a tiny N: the JSON has its fields and sane numbers.

Runs the script as a user would (a subprocess that starts one child per layout and N), for
the ``new`` layout only (no git worktree of the old revision), 2000 samples, S=2, R=2. Checks
the fields and that the numbers are possible (positive sizes, non-negative seconds besides
the retrain, bytes written), never a timing threshold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_erasure.py"

sys.path.insert(0, str(ROOT / "scripts"))
import bench_erasure  # noqa: E402


def test_features_are_uint8_and_a_pure_function_of_the_id() -> None:
    x, y, ids = bench_erasure.make_batch(5, 9)
    x2, _, _ = bench_erasure.make_batch(0, 9)
    assert x.dtype == np.uint8 and x.shape == (4, bench_erasure.FEATURES)
    assert np.array_equal(x, x2[5:]) and ids.tolist() == [5, 6, 7, 8] and y.tolist() == [5, 6, 7, 8]
    sizes = [len(b[2]) for b in bench_erasure.batches(bench_erasure.BATCH + 3)]
    assert sizes == [bench_erasure.BATCH, 3]


def test_new_layout_tiny_run(tmp_path: Path, env_python: dict[str, str]) -> None:
    out = tmp_path / "erasure.json"
    work = tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--sizes", "2000", "--layouts", "new", "--out", str(out)]
    cmd += ["--workdir", str(work), "shards=2", "slices=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_python, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2000 new" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert list(work.iterdir()) == []  # the stores were removed

    assert set(result["layouts"]) == {"new"} and result["old_rev"] is None
    tree = result["layouts"]["new"]
    assert Path(tree["sisa_file"]).is_relative_to(ROOT) and len(tree["revision"]) == 40
    assert result["ratios_old_over_new"] == []
    assert result["config_overrides"][-2:] == ["shards=2", "slices=2"]

    (row,) = result["runs"]
    assert row["layout"] == "new" and row["n"] == 2000 and row["ingested"] == 2000
    assert row["ingest_s"] > 0 and row["fit_s"] > 0 and row["ingest_peak_anon_mib"] > 0
    for key in ("disk_after_fit", "disk_after_deletes"):
        disk = row[key]
        assert disk["bytes_on_disk"] > 0 and disk["bytes_apparent"] > 0
        assert disk["files"] and all(on_disk >= 0 and size >= 0 for on_disk, size in disk["files"].values())
        assert sum(v[0] for v in disk["files"].values()) == disk["bytes_on_disk"]
    assert row["bytes_on_disk_per_sample"] > 0 and row["checkpoints_stored_bytes"] > 0
    assert 0 < row["bytes_on_disk_per_sample_excl_checkpoints"] < row["bytes_on_disk_per_sample"]
    assert row["samples_after"] == 2000 - 1 - bench_erasure.BATCH_DELETE

    for kind, ids in (("single", 1), ("batch", bench_erasure.BATCH_DELETE)):
        cost = row[kind]
        assert cost["ids"] == ids
        assert cost["wall_s"] > 0 and cost["retrain_s"] >= 0
        assert cost["non_retrain_s"] >= 0
        assert cost["non_retrain_s"] == cost["wall_s"] - cost["retrain_s"]
        assert cost["written_bytes"] > 0 and cost["retrained_shards"]
        assert cost["checkpoint_bytes"] is not None and cost["checkpoint_bytes"] > 0
        assert cost["erasure_bytes"] == cost["written_bytes"] - cost["checkpoint_bytes"]
