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
import pytest

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
    assert row["bytes_on_disk_per_sample"] > 0 and row["checkpoints_stored_bytes"] > 0
    assert 0 < row["bytes_on_disk_per_sample_excl_checkpoints"] < row["bytes_on_disk_per_sample"]
    assert row["samples_after"] == 2000 - 2 - bench_erasure.BATCH_DELETE  # one id, a batch, one deferred id

    # the rates beside the deletions: through the store's own code, both ciphers alone in the parent
    assert row["ingest_samples_per_s"] == pytest.approx(2000 / row["ingest_s"])
    assert row["rekey"]["reencrypted"] > 0 and row["rekey"]["records_per_s"] > 0
    ck = row["checkpoints"]
    assert ck["checkpoints"] > 0 and ck["bytes"] > 0 and ck["open_mb_s"] > 0 and ck["seal_mb_s"] > 0
    deferred = row["deferred"]
    assert deferred["erased_at_acceptance"] is True  # this checkout erases when a request is accepted
    assert deferred["to_keys_destroyed_s"] == deferred["defer_s"] > 0
    for name in ("old", "new"):
        cipher = result["cipher"][name]
        assert cipher["rekey_records_per_s"] > 0 and cipher["blob_seal_mb_s"] > 0 and cipher["blob_open_mb_s"] > 0

    for kind, ids in (("single", 1), ("batch", bench_erasure.BATCH_DELETE)):
        cost = row[kind]
        assert cost["ids"] == ids
        assert cost["wall_s"] > 0 and cost["retrain_s"] >= 0
        assert cost["non_retrain_s"] >= 0  # its arithmetic: test_timed_delete_on_known_numbers
        assert cost["written_bytes"] > 0 and cost["retrained_shards"]
        assert cost["checkpoint_bytes"] is not None and cost["checkpoint_bytes"] > 0
        assert cost["erasure_bytes"] is not None


def test_disk_usage_on_known_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    disk = bench_erasure.disk_usage(tmp_path)
    assert list(disk["files"]) == ["a.bin", "empty", "sub/b.bin"]
    assert [v[1] for v in disk["files"].values()] == [5000, 0, 3] and disk["bytes_apparent"] == 5003
    assert disk["files"]["empty"][0] == 0
    assert disk["bytes_on_disk"] == disk["files"]["a.bin"][0] + disk["files"]["sub/b.bin"][0]


class _FakeEnsemble:
    def delete(self, ids: list[int]) -> dict[str, object]:
        return {"batch": {"retrain_seconds": 0.25}, "shards": {"1": {"sample_epochs": 40, "from_slice": 2}}}


class _FakePeaks:
    def enter(self, phase: str) -> None:
        self.phase = phase


def test_timed_delete_on_known_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hand-computed: wall 11.5 - 10.0 = 1.5 s, of which 0.25 s retraining -> 1.25 s the rest;
    # 5000 - 4000 = 1000 bytes written, 300 of them checkpoints -> 700 bytes of erasure.
    clock = iter([10.0, 11.5])
    io = iter(
        [
            {"write_bytes": 4000, "cancelled_write_bytes": 10, "wchar": 100},
            {"write_bytes": 5000, "cancelled_write_bytes": 30, "wchar": 900},
        ]
    )
    monkeypatch.setattr(bench_erasure.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(bench_erasure, "proc_io", lambda: next(io))
    monkeypatch.setattr(bench_erasure, "checkpoint_bytes", lambda ens, cert: 300)
    cost = bench_erasure.timed_delete(_FakeEnsemble(), [4, 5, 6], _FakePeaks(), "delete")
    assert cost["ids"] == 3 and cost["wall_s"] == 1.5 and cost["retrain_s"] == 0.25
    assert cost["non_retrain_s"] == 1.25
    assert cost["written_bytes"] == 1000 and cost["cancelled_write_bytes"] == 20 and cost["wchar"] == 800
    assert cost["checkpoint_bytes"] == 300 and cost["erasure_bytes"] == 700
    assert cost["retrain_sample_epochs"] == 40 and cost["from_slices"] == {"1": 2}


def test_ratios_on_known_numbers() -> None:
    def run(layout: str, n: int, non_retrain: float, disk: int) -> dict[str, object]:
        cost = {"non_retrain_s": non_retrain, "written_bytes": 800, "erasure_bytes": None, "wall_s": 2.0}
        return {
            "layout": layout,
            "n": n,
            "single": cost,
            "batch": {**cost, "non_retrain_s": 0.0},
            "disk_after_fit": {"bytes_on_disk": disk},
            "ingest_s": 3.0,
            "ingest_peak_anon_mib": 50.0,
        }

    runs = [run("old", 100, 2.0, 6000), run("new", 100, 0.5, 2000), run("new", 200, 1.0, 4000)]
    (row,) = bench_erasure.ratios(runs)  # N=200 ran one layout only: no ratio
    assert row["n"] == 100 and row["single_non_retrain_s"] == 4.0 and row["bytes_on_disk"] == 3.0
    assert row["single_written_bytes"] == 1.0 and row["ingest_s"] == 1.0
    assert row["single_erasure_bytes"] is None and row["batch_non_retrain_s"] is None  # missing / 0 -> None
