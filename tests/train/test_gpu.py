"""The GPU path, checked on the CPU: what CUDA's absence, torch's argument checks and Ray can show.

No GPU runs here (CI has none): ``scripts/gpu_check.sh`` is the check on hardware. These
tests pin what a CPU can show: the memory cap's device argument and its scope, the share
left after each process's CUDA context, the math switches pinned and restored, the domain
that records them (with CPU domain ids unchanged), cuBLAS's environment in every worker,
the clear errors of a GPU store where no GPU is, and a shard out of GPU memory letting the
others finish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from torch.cuda._utils import _get_device_index

from sisa.ensemble import Ensemble
from sisa.errors import GpuMemoryError, TrainingError
from sisa.train import domain as domains
from sisa.train import gpu, orchestrator, routing
from sisa.train.checkpoint import on_cpu
from tests.conftest import blobs, live_state, small_config, store_digest
from tests.train.oom_model import MARK

GIB = 2**30
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="shows the behaviour of a machine without CUDA")


def test_each_share_holds_its_process_context_and_eight_shares_fit_the_card() -> None:
    total = 80 * GIB
    fraction = gpu.cap_fraction(0.125, total)
    # allocator cap + CUDA context = the share, so 8 processes at 1/8 never overcommit the card
    assert fraction * total + gpu.CUDA_CONTEXT_BYTES == pytest.approx(0.125 * total)
    assert 8 * (fraction * total + gpu.CUDA_CONTEXT_BYTES) <= total
    with pytest.raises(TrainingError, match=r"raise resources.gpus_per_shard"):
        gpu.cap_fraction(0.005, total)  # 0.4 GiB: not even the context fits


class FakeCard:
    """torch.cuda's memory-fraction calls on a CPU machine, checking the device argument as torch does."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.fraction = 1.0
        self.calls: list[tuple[float, Any]] = []

    def set_fraction(self, fraction: float, device: Any = None) -> None:
        _get_device_index(device)  # torch's own check: ValueError for torch.device("cuda") without an index
        assert isinstance(fraction, float) and 0 <= fraction <= 1
        self.calls.append((fraction, device))
        self.fraction = fraction

    def get_fraction(self, device: Any = None) -> float:
        _get_device_index(device)
        return self.fraction

    def properties(self, device: Any) -> Any:
        _get_device_index(device)
        return type("Props", (), {"total_memory": self.total})()


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> FakeCard:
    fake = FakeCard(80 * GIB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake.properties)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fake.set_fraction)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fake.get_fraction)
    return fake


def test_the_memory_cap_names_a_device_index_and_comes_off_after_the_shard(card: FakeCard) -> None:
    # torch.device("cuda") has no index: torch.cuda refuses it (the crash of every fractional shard)
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))
    with gpu.memory_cap(0.125) as cap:
        assert cap["device"] == 0 and card.fraction == pytest.approx(gpu.cap_fraction(0.125, card.total))
        assert cap["fraction"] == card.fraction
    assert card.fraction == 1.0  # lifted: a driver, a notebook or the warm CLI worker is not left capped
    assert [d for _, d in card.calls] == [0, 0]
    with gpu.memory_cap(1.0) as cap:  # a whole GPU: nothing capped
        assert cap["fraction"] is None
    assert len(card.calls) == 2


def test_the_cap_comes_off_when_training_fails(card: FakeCard) -> None:
    with pytest.raises(RuntimeError, match="boom"), gpu.memory_cap(0.25):
        raise RuntimeError("boom")
    assert card.fraction == 1.0


def test_math_switches_are_pinned_inside_training_and_the_callers_restored_after() -> None:
    b = torch.backends
    before = gpu.math_flags()
    try:
        # what a notebook or a user's model callable might have set
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = True, True, True
        b.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        torch.set_float32_matmul_precision("medium")
        user = gpu.math_flags()
        with gpu.pinned_math() as inside:
            assert inside == gpu.PINNED_MATH == gpu.math_flags()
            assert torch.get_float32_matmul_precision() == "highest"
            assert not b.cuda.matmul.allow_tf32 and not b.cudnn.allow_tf32 and not b.cudnn.enabled
        assert gpu.math_flags() == user and torch.get_float32_matmul_precision() == "medium"
    finally:
        for name, (owner, attr) in gpu._switches().items():
            setattr(owner, attr, before[name])
        torch.set_float32_matmul_precision("highest")


CPU_DOMAIN = domains.Domain(
    machine="x86_64",
    cpu_vendor="GenuineIntel",
    cpu_kernels="AVX2",
    mkl_cbwr="AVX2,STRICT",
    onednn_isa="AVX2",
    torch="2.13.0+cpu",
    torch_build="abc",
    blas="mkl 2025",
    onednn="3.9",
    threads=1,
    device="cpu",
)


def test_cpu_domain_ids_are_the_ones_stores_recorded_and_gpu_math_changes_a_gpu_domain() -> None:
    # The id this very domain had before gpu_math existed (computed with the earlier code): CPU
    # stores keep their domains, no shard rebinds after an upgrade.
    assert CPU_DOMAIN.id == "eeadc7fdfe6e52a9"
    gpu_domain = dict(CPU_DOMAIN.to_dict(), device="cuda", gpu="H100", gpu_capability="9.0", gpu_sms=132)
    pinned = domains.Domain.from_dict({**gpu_domain, "gpu_math": gpu.math_signature(gpu.PINNED_MATH)})
    tf32 = domains.Domain.from_dict(
        {**gpu_domain, "gpu_math": gpu.math_signature({**gpu.PINNED_MATH, "matmul_allow_tf32": True})}
    )
    assert pinned.id != tf32.id  # a worker with TF32 on is another domain, never a false "not bit-identical"
    assert "matmul_allow_tf32=0" in pinned.gpu_math and "cudnn_enabled=0" in pinned.gpu_math
    assert "cublas_workspace=" in pinned.gpu_math


def test_every_cuda_worker_starts_with_cublas_pinned() -> None:
    assert domains.pin_env("native", "cuda") == {"CUBLAS_WORKSPACE_CONFIG": gpu.CUBLAS_WORKSPACE}
    assert domains.pin_env("avx2", "cuda")["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG" not in domains.pin_env("avx2")  # CPU workers are as before
    res = small_config("resources.gpus_per_shard=0.5").resources
    env = routing.task_options(res)["runtime_env"]["env_vars"]
    assert env["CUBLAS_WORKSPACE_CONFIG"] == gpu.CUBLAS_WORKSPACE


def test_cublas_workspace_is_set_before_cuda_starts_and_a_late_or_other_value_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    gpu.ensure_cuda_env()
    assert gpu.os.environ["CUBLAS_WORKSPACE_CONFIG"] == gpu.CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with pytest.raises(TrainingError, match=r"CUBLAS_WORKSPACE_CONFIG=':16:8'.*Unset it"):
        gpu.ensure_cuda_env()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(TrainingError, match="CUDA was initialised in this process before"):
        gpu.ensure_cuda_env()


def test_a_reused_or_misassigned_gpu_worker_is_refused() -> None:
    problem = orchestrator.gpu_assignment_problem
    assert problem(["1"], "1", cuda_started=False) is None
    assert problem(["0", "1"], "0,1", cuda_started=False) is None
    assert "reused worker" in (problem(["1"], "1", cuda_started=True) or "")
    assert "assigned GPU(s) 1" in (problem(["1"], "0", cuda_started=False) or "")
    assert "no GPU" in (problem([], None, cuda_started=False) or "")


def test_checkpoint_tensors_go_to_the_cpu_and_cpu_ones_keep_their_memory() -> None:
    t = torch.ones(3)
    state = {"state": {0: {"exp_avg": t, "step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    moved = on_cpu(state)
    # On the CPU the same memory (CPU checkpoint bytes do not change); nested containers keep their types.
    assert moved["state"][0]["exp_avg"].data_ptr() == t.data_ptr()
    assert moved["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert isinstance(on_cpu((t, [t])), tuple)


@no_cuda
def test_a_machine_without_cuda_never_builds_a_fake_gpu_domain() -> None:
    with pytest.raises(TrainingError, match="no CUDA device"):
        domains.current(1, "cuda")


@no_cuda
def test_a_gpu_store_routes_to_ray_from_a_driver_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    res = small_config("resources.gpus_per_shard=0.5").resources
    monkeypatch.delenv("SISA_RUNNER", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # else "Ray is up" decides first
    assert orchestrator.plan_runner(None, 1, [0.1], res).runner == "ray"
    cpu = small_config().resources
    assert orchestrator.plan_runner(None, 1, [0.1], cpu).runner == "local"


@no_cuda
@pytest.mark.usefixtures("ray_session")
def test_a_gpu_store_without_a_gpu_fails_clearly_and_commits_nothing(tmp_path: Path) -> None:
    x, y = blobs(300, d=6)
    with Ensemble.create(tmp_path / "st", small_config("resources.gpus_per_shard=0.5")) as ens:
        ens.ingest(x, y)
    before = store_digest(tmp_path / "st")
    with Ensemble.open(tmp_path / "st", address="local") as ens:  # this machine: no CUDA
        with pytest.raises(TrainingError, match="no CUDA device"):
            ens.fit()
    with Ensemble.open(tmp_path / "st") as ens:  # the test session's Ray: no node has a GPU
        with pytest.raises(TrainingError, match="no node of the Ray cluster offers a GPU"):
            ens.fit()
    assert store_digest(tmp_path / "st") == before


@pytest.mark.usefixtures("ray_session")
def test_a_shard_out_of_gpu_memory_lets_the_others_finish_and_says_what_to_change(tmp_path: Path) -> None:
    x, y = blobs(1500, d=6)
    # Long enough that the others are still training when one shard fails in its first stage.
    cfg = small_config("model.name=tests.train.oom_model:build", "slices=2", "train.epochs=40")
    with Ensemble.create(tmp_path / "scratch", cfg) as ens:  # where each id goes depends on the id only
        ens.ingest(x, y)
        victim = next(i for i, (_, slice_) in ens.locate(range(100)).items() if slice_ == 0)
        failing = ens.locate([victim])[victim][0]
    x[victim, 0] = MARK  # its shard's model "runs out of GPU memory" in stage 1
    with Ensemble.create(tmp_path / "st", cfg) as ens:
        ens.ingest(x, y)
    with Ensemble.open(tmp_path / "st", address=ray.get_runtime_context().gcs_address) as ens:
        with pytest.raises(GpuMemoryError, match=r"shard \d stage 1: the GPU ran out of memory.*Committed stages"):
            ens.fit()
        with ens.store.read() as txn:
            committed = {s: len(ens.store.stage_records(txn, s)) for s in range(3)}
        served = live_state(ens)
    # Every other shard trained to the end (its task was not cancelled by the failure) and serves.
    assert sorted(served) == sorted(set(range(3)) - {failing}), committed
    assert committed == {s: 0 if s == failing else 2 for s in range(3)}
