"""scripts/gpu_check.sh, the prepared GPU check, as a CPU smoke run (about 40 s: Ray start and warm-up)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def test_gpu_check_cpu_smoke_run_writes_its_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OUT=str(tmp_path), SISA_GPU_CHECK_TINY="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "cpu-smoke" and "not GPU numbers" in result["note"]
    device = result["device"]
    for key in ("device", "device_name", "torch", "torch_cuda", "cuda_available"):
        assert key in device
    assert device["device"] == "cpu" and result["machine"]["ray"]
    assert result["config"]["resources"]["gpus_per_shard"] == 0
    shards = result["config"]["shards"]
    for run in ("packed", "serial"):
        assert result[run]["fit_s"] > 0 and result[run]["stages"] == shards * result["config"]["slices"]
        assert len(result[run]["weights"]) == shards
    assert result["packed"]["work_sample_epochs"] == result["serial"]["work_sample_epochs"]
    assert result["packed_equals_serial"] is True  # Ray, packed, and in-process one by one: same bytes
    assert result["throughput_ratio"] > 0 and result["deletion_speedup"] > 0
    assert result["monolithic"]["seconds"] > 0
    assert result["deletion"]["state"] == "applied" and result["deletion"]["retrained_shards"]
    assert result["verify"]["ok"] is True and result["verify"]["shards"] == result["deletion"]["retrained_shards"]
    assert result["bf16"]["precision"] == "bf16" and result["bf16"]["repeat_identical"] is True
    assert result["bf16"]["differs_from_config_precision"] is True
    assert result["ok"] is True and result["total_s"] > 0
