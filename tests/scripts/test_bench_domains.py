"""``scripts/bench_domains.py --quick``: every level and model measured, the pins in force, the bits right.

Runs the script as a user would (a subprocess that starts one pinned child per level and
round) and checks the behaviour its numbers rest on, never a timing threshold: each
child ran at its level's kernels, one level's weights are bit-identical across rounds,
and ``avx2`` and ``baseline`` give different weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sisa.data.loaders import FASHION_CACHE_DIR, FASHION_DEBIAN_DIR
from sisa.train.domain import CPU_ISAS

ROOT = Path(__file__).resolve().parents[2]
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


def _fashion_installed() -> bool:
    return any(all((d / f).is_file() for f in TRAIN_FILES) for d in (FASHION_DEBIAN_DIR, FASHION_CACHE_DIR))


@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST is not installed")
def test_quick_run_measures_every_level_and_model(tmp_path: Path, env_python: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_domains.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env_python,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_domains.json").read_text())
    assert (tmp_path / "bench_domains.png").stat().st_size > 0
    assert result["repeats"] == 2 and result["bit_exact_within_levels"] is True
    assert set(result["summary"]) == {"mlp", "cnn"}
    for model, summary in result["summary"].items():
        levels = summary["levels"]
        assert set(levels) == set(CPU_ISAS), model
        assert levels["avx2"]["cpu_kernels"] == "AVX2" and levels["baseline"]["cpu_kernels"] == "DEFAULT"
        assert levels["avx2"]["mkl_cbwr"] == "AVX2,STRICT" and levels["native"]["mkl_cbwr"] == ""
        assert len({row["domain_id"] for row in levels.values()}) == len(CPU_ISAS), model
        for level, row in levels.items():
            assert row["ratio_to_native"] > 0 and row["samples_per_s"] > 0, (model, level)
            assert row["weights_equal_across_repeats"], (model, level)
            assert len(row["samples_per_s_runs"]) == 2
        runs = [r for r in result["runs"] if r["model"] == model]
        for level in CPU_ISAS:
            assert len({r["weights"] for r in runs if r["level"] == level}) == 1, (model, level)
        assert summary["digests_differ"]["avx2/baseline"] is True, model
        assert levels["avx2"]["weights"] != levels["baseline"]["weights"]
