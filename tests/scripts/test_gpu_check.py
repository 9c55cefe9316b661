"""scripts/gpu_check.sh, the prepared GPU check, as a CPU smoke run (about 45 s: Ray start and warm-up)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sisa.train import domain as domains
from sisa.train import gpu
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def pinned_domain_id(env: dict[str, str]) -> str:
    """The domain a fresh process started with avx2's pins (the default cpu_isa) trains a 1-thread CPU stage in."""
    code = "from sisa.train import domain; print(domain.current(1, 'cpu').id)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, **domains.pin_env("avx2")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.strip()


def test_gpu_check_cpu_smoke_run_writes_its_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in domains.PIN_VARS}
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
    # It restarted itself pinned, so serial and monolithic training ran in its own process.
    assert result["pinned"] == {"cpu_isa": "avx2", "from_start": True}
    shards, slices = result["config"]["shards"], result["config"]["slices"]
    # (The timing ratios, e.g. throughput_ratio and deletion_speedup, are the script's own divisions
    # of wall times: a test can only restate them, so it does not.)
    for run in ("packed", "serial", "repeat"):
        fitted = result[run]
        assert fitted["stages"] == shards * slices and len(fitted["weights"]) == shards
        assert fitted["work_sample_epochs"] == result["packed"]["work_sample_epochs"]
    assert result["packed_equals_serial"] is True  # Ray, packed, and in-process one by one: same bytes
    assert result["serial"]["weights"] == result["packed"]["weights"]
    bf16 = result["bf16"]
    assert bf16["precision"] == "bf16" and bf16["repeat_identical"] is True
    assert bf16["differs_from_config_precision"] is True

    # The domain it printed is the live shards' domain, every stage's, and the one a pinned process measures.
    printed = re.findall(r"^domain: ([0-9a-f]{16}) \(", proc.stdout, flags=re.MULTILINE)
    dom = result["domain"]
    assert printed == [dom["id"]] and dom["description"].startswith(dom["id"] + " (")
    assert dom["record"]["id"] == dom["id"] and domains.Domain.from_dict(dom["record"]).id == dom["id"]
    assert result["packed"]["live_domains"] == [dom["id"]] * shards
    for run in ("packed", "serial", "repeat"):
        assert result[run]["stage_domains"] == [dom["id"]]
    assert dom["id"] == pinned_domain_id(env)
    assert dom["device"] == "cpu" and dom["on_gpu"] is False and dom["record"]["threads"] == 1
    assert dom["single"] is True and dom["is_available"] is True and dom["id"] in [d["id"] for d in dom["available"]]

    # Two fits of the same store: every stage the same bits.
    assert result["repeat_identical"] is True
    assert result["repeat"]["stage_weights_digest"] == result["packed"]["stage_weights_digest"]
    assert result["repeat"]["weights"] == result["packed"]["weights"]

    retrained = result["deletion"]["retrained_shards"]
    assert result["deletion"]["state"] == "applied" and retrained
    assert result["deletion"]["domains"] == {str(s): dom["id"] for s in retrained}
    assert result["verify"]["ok"] is True and result["verify"]["shards"] == retrained
    # The "GPU" store replays on its own device (the CPU here, and it says so) in the live domain.
    gpu = result["gpu_store_verify"]
    assert gpu["on_gpu"] is False and gpu["ok"] is True and gpu["shards"] == retrained
    assert gpu["replay_devices"] == ["cpu"] and gpu["same_domain"] is True
    assert gpu["replay_domain_ids"] == gpu["live_domain_ids"] == {str(s): dom["id"] for s in retrained}
    # The gpus_per_shard=0 store replays on the CPU, every shard, in its live models' domain.
    cpu = result["cpu_store_verify"]
    assert cpu["ok"] is True and cpu["bit_identical"] is True and cpu["replay_devices"] == ["cpu"]
    assert cpu["shards"] == [0, 1, 2, 3] and cpu["stages"] == 4 * 2
    assert cpu["replay_domain_ids"] == cpu["live_domain_ids"] == {str(s): cpu["domain"] for s in range(4)}
    assert cpu["description"].startswith(f"{cpu['domain']} (")
    assert cpu["domain"] == dom["id"]  # on the CPU both stores train in one domain; on a GPU they must differ

    assert result["checks"] == dict.fromkeys(
        (
            "verify",
            "packed_equals_serial",
            "bf16_repeat_identical",
            "single_domain",
            "repeat_identical",
            "gpu_store_verify",
            "cpu_store_verify",
            "backbone_verify",
        ),
        True,
    )
    # The shared-backbone store (LoRA per shard) verified its retrained shard bit for bit, on the device.
    backbone = result["backbone"]
    assert backbone["bit_identical"] is True and backbone["replay_devices"] == ["cpu"] and len(backbone["shards"]) == 1
    assert backbone["backbone_bytes"] > 0 and backbone["core"] > 0
    assert result["ok"] is True and "all checks hold" in proc.stdout


def run_check(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SISA_GPU_CHECK_TINY", "OUT")}
    env["OUT"] = str(tmp_path)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what happens where CUDA is missing")
def test_without_cuda_the_gpu_check_fails_at_once_instead_of_running_on_the_cpu(tmp_path: Path) -> None:
    proc = run_check(tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CUDA is not available" in proc.stderr and "--tiny" in proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is False and result["error"].startswith("NoCudaError: CUDA is not available")


def test_the_deadline_stops_the_check_and_the_json_keeps_what_was_measured(tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--tiny", "--deadline", "2")
    assert proc.returncode == 124 and "FAILED (DeadlineError" in proc.stdout, proc.stdout[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is False and result["error"].startswith("DeadlineError: the check ran past its --deadline")
    assert result["mode"] == "cpu-smoke" and "device" in result  # measured before the alarm


def packed_entry(stage_gpu: list[dict | None], devices: list[str]) -> dict:
    return {"stage_gpu": stage_gpu, "stage_devices": devices}


def test_each_printed_gpu_claim_is_checked_against_the_store() -> None:
    total = 80 * 2**30
    fraction = gpu.cap_fraction(0.125, total)
    stage = {"device": 0, "total_bytes": total, "fraction": fraction, "peak_bytes": int(0.5 * fraction * total)}
    live = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_capability": "9.0",
        "gpu_sms": 132,
        "cuda": "13.0",
        "cudnn": "91000",
        "gpu_math": gpu.math_signature(gpu.PINNED_MATH),
    }
    good = gpu_check.gpu_claims(packed_entry([stage, stage], ["cuda"]), live, 0.125)
    assert good == dict.fromkeys(("memory_cap", "on_gpu", "domain_gpu_fields", "tf32_off"), True)
    over = {**stage, "peak_bytes": int(fraction * total) + 1}
    uncapped = {**stage, "fraction": None}
    context_ignored = {**stage, "fraction": 0.125}  # the cap forgot the CUDA context: N contexts overcommit
    for bad in (over, uncapped, context_ignored):
        assert gpu_check.gpu_claims(packed_entry([stage, bad], ["cuda"]), live, 0.125)["memory_cap"] is False
    assert gpu_check.gpu_claims(packed_entry([stage, None], ["cpu", "cuda"]), live, 0.125)["on_gpu"] is False
    assert (
        gpu_check.gpu_claims(packed_entry([stage], ["cuda"]), {**live, "gpu_sms": 0}, 0.125)["domain_gpu_fields"]
        is False
    )
    tf32 = gpu.math_signature({**gpu.PINNED_MATH, "cudnn_allow_tf32": True})
    assert gpu_check.gpu_claims(packed_entry([stage], ["cuda"]), {**live, "gpu_math": tf32}, 0.125)["tf32_off"] is False
