"""Determinism domains: what below the recipe changes a shard's bits, and how a worker is pinned to one.

Same recipe, same data and same *domain* give bit-identical weights (invariant 2), so
``verify`` is a hash comparison only when the replay runs in the domain the live model
was trained in. A domain is measured in the process that trains: torch release and
build, BLAS and oneDNN versions, the CPU kernel level torch actually dispatches to, the
MKL and oneDNN instruction-set pins in force, the CPU vendor (MKL promises equal results
across CPUs of one branch only on Intel's), threads, device, and for GPUs the model,
compute capability, SM count and CUDA / cuDNN / cuBLAS versions.

``resources.cpu_isa`` pins the CPU kernel levels that can be pinned, through environment
variables set before torch loads (a Ray task's ``runtime_env``, or the child process that
``--address local`` trains in), so x86-64 nodes of different generations share a domain.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sisa.config.settings import CPU_ISAS

__all__ = [
    "CPU_ISAS",
    "PIN_VARS",
    "Domain",
    "current",
    "describe",
    "DOMAIN_FIX",
    "domain_id",
    "missing_reason",
    "pin_env",
    "pinned_from_start",
    "unavailable_message",
]

# The switches, each read once per process by its library: ATen's vectorised kernels, MKL's
# code branch (conditional numerical reproducibility, STRICT: independent of alignment) and
# oneDNN's JIT instruction set (convolutions).
PIN_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
_PINS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def pin_env(cpu_isa: str, device: str = "cpu") -> dict[str, str]:
    """Environment variables that pin a worker to ``cpu_isa`` (empty for ``native`` on the CPU).

    Args:
        cpu_isa: One of :data:`CPU_ISAS`.
        device: ``cpu`` or ``cuda``; a CUDA worker also gets cuBLAS's deterministic workspace
            (:func:`sisa.train.gpu.cuda_env`), which cuBLAS reads once, at its start.

    Returns:
        Variables to set before torch is imported in the worker.

    Raises:
        ValueError: On an unknown level.
    """
    if cpu_isa not in CPU_ISAS:
        raise ValueError(f"cpu_isa={cpu_isa!r} must be one of {', '.join(CPU_ISAS)}")
    env = dict(_PINS.get(cpu_isa, {}))
    if device == "cuda":
        from sisa.train import gpu

        env.update(gpu.cuda_env())
    return env


@functools.lru_cache(maxsize=1)
def _initial_env() -> dict[str, str]:
    """The environment this process was started with.

    Libraries read their switches once, early; a variable put into ``os.environ`` later
    may or may not have been seen. Linux keeps the start environment in
    ``/proc/self/environ``; elsewhere the current one is the best guess.
    """
    try:
        with open("/proc/self/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return dict(os.environ)
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def pinned_from_start(cpu_isa: str, device: str = "cpu") -> bool:
    """Whether this process started with ``cpu_isa``'s pins, so it may train in that domain itself.

    ``native`` pins nothing on the CPU, so any process qualifies. For a pinned level every
    variable must have been in the environment the process started with: set afterwards,
    torch, MKL, oneDNN or cuBLAS may already have read the old value.
    """
    start = _initial_env()
    return all(start.get(k) == v for k, v in pin_env(cpu_isa, device).items())


@functools.lru_cache(maxsize=1)
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("vendor_id", "CPU implementer")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    import torch

    text = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+ Build \d+|[\w.\-]+)", text)
    dnn = re.search(r"MKL-DNN v([\w.]+)", text)
    blas = re.search(r"BLAS_INFO=(\w+)", text)
    return {
        "blas": f"{blas.group(1) if blas else '?'}" + (f" {mkl.group(1)}" if mkl else ""),
        "onednn": dnn.group(1) if dnn else "",
        "torch": str(torch.__version__),
        "torch_build": str(torch.version.git_version),
    }


def _cublas_version() -> str:
    """The cuBLAS version installed beside torch (its wheel's), or empty when unknown."""
    from importlib import metadata

    for dist in ("nvidia-cublas-cu12", "nvidia-cublas-cu13", "nvidia-cublas-cu11", "nvidia-cublas"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


@dataclasses.dataclass(frozen=True)
class Domain:
    """Everything below the recipe that decides a shard's bits, as measured in one process.

    Attributes:
        machine: CPU architecture (``x86_64``, ``aarch64``).
        cpu_vendor: ``GenuineIntel``, ``AuthenticAMD``, ... (MKL branches differ by vendor).
        cpu_kernels: The kernel level torch dispatches to (``AVX512``, ``AVX2``, ``DEFAULT``).
        mkl_cbwr: ``MKL_CBWR`` the process started with ("" when unset: MKL picks per CPU).
        onednn_isa: ``ONEDNN_MAX_CPU_ISA`` the process started with ("" when unset).
        torch: torch release.
        torch_build: torch's git revision (two builds of one release can differ).
        blas: BLAS library and version.
        onednn: oneDNN version.
        threads: torch intra-op threads of a stage.
        device: ``cpu`` or ``cuda``.
        gpu: GPU model ("" on the CPU).
        gpu_capability: CUDA compute capability, e.g. ``9.0``.
        gpu_sms: Streaming multiprocessors (cuBLAS may split work by them).
        cuda: CUDA runtime torch was built with.
        cudnn: cuDNN version.
        cublas: cuBLAS version ("" when unknown).
        gpu_math: The math switches and cuBLAS workspace a stage trains under on the GPU
            (:func:`sisa.train.gpu.math_signature`: TF32, reduced-precision reductions,
            cuDNN); "" on the CPU, where it is left out of the id, so CPU domain ids are the
            ones stores recorded before this field existed.
    """

    machine: str
    cpu_vendor: str
    cpu_kernels: str
    mkl_cbwr: str
    onednn_isa: str
    torch: str
    torch_build: str
    blas: str
    onednn: str
    threads: int
    device: str
    gpu: str = ""
    gpu_capability: str = ""
    gpu_sms: int = 0
    cuda: str = ""
    cudnn: str = ""
    cublas: str = ""
    gpu_math: str = ""

    @property
    def id(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON of every field (``gpu_math`` only when set)."""
        fields = dataclasses.asdict(self)
        if not fields["gpu_math"]:
            del fields["gpu_math"]
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"sisa-domain-v1|" + blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus ``id``, as stored in stage records."""
        return {"id": self.id, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Domain:
        """Inverse of :meth:`to_dict` (the ``id`` is recomputed, not trusted)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def current(threads: int, device: str = "cpu") -> Domain:
    """The domain a stage trained in this process, now, would be in.

    Reading torch's CPU capability fixes it for the process (torch reads
    ``ATEN_CPU_CAPABILITY`` once), which is harmless: training is about to run here.

    Args:
        threads: Intra-op threads a stage uses.
        device: ``cpu`` or ``cuda``.

    Returns:
        The measured domain.
    """
    import torch

    libs = _library_versions()
    start = _initial_env()
    gpu: dict[str, Any] = {}
    if device == "cuda":
        from sisa.train import gpu as cuda

        # No GPU here: a domain with empty GPU fields would be a fake one that no worker trains in.
        cuda.require_cuda()
        cuda.ensure_cuda_env()
        with cuda.pinned_math() as flags:  # what a stage trains under, read back in this process
            math = cuda.math_signature(flags)
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        major, minor = torch.cuda.get_device_capability(index)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        gpu = {
            "gpu": str(props.name),
            "gpu_capability": f"{major}.{minor}",
            "gpu_sms": int(props.multi_processor_count),
            "cuda": str(torch.version.cuda or ""),
            "cudnn": str(cudnn or ""),
            "cublas": _cublas_version(),
            "gpu_math": math,
        }
    return Domain(
        machine=platform.machine(),
        cpu_vendor=_cpu_vendor(),
        cpu_kernels=str(torch.backends.cpu.get_cpu_capability()),
        mkl_cbwr=start.get("MKL_CBWR", ""),
        onednn_isa=start.get("ONEDNN_MAX_CPU_ISA", ""),
        torch=libs["torch"],
        torch_build=libs["torch_build"],
        blas=libs["blas"],
        onednn=libs["onednn"],
        threads=int(threads),
        device=device,
        **gpu,
    )


def describe(domain: Mapping[str, Any] | Domain | None) -> str:
    """One line a person can read: ``abcd1234... (x86_64 AuthenticAMD AVX2, torch 2.13.0+cpu, 1 thread)``."""
    if domain is None:
        return "unrecorded (trained before domains were recorded)"
    d = domain.to_dict() if isinstance(domain, Domain) else dict(domain)
    where = f"{d.get('machine', '?')} {d.get('cpu_vendor', '?')} {d.get('cpu_kernels', '?')}"
    pins = ", ".join(f"{k}={d[k]}" for k in ("mkl_cbwr", "onednn_isa") if d.get(k))
    if pins:
        where += f" [{pins}]"
    if d.get("device") == "cuda":
        gpu = f"{d.get('gpu', '?')} sm_{d.get('gpu_capability', '?')} x{d.get('gpu_sms', '?')} SMs"
        where += f", {gpu}, cuda {d.get('cuda')} cudnn {d.get('cudnn')} cublas {d.get('cublas') or '?'}"
    threads = d.get("threads", "?")
    return f"{d.get('id', '?')} ({where}, torch {d.get('torch', '?')}, {threads} thread{'s' if threads != 1 else ''})"


def domain_id(record: Mapping[str, Any] | None) -> str | None:
    """The domain id of a stage or live record (None when absent or recorded before domains)."""
    domain = (record or {}).get("domain")
    return str(domain["id"]) if isinstance(domain, Mapping) and "id" in domain else None


def missing_reason(
    needed: Mapping[str, Any] | None, needed_id: str, available: Sequence[Domain | Mapping[str, Any]]
) -> str:
    """Why a shard cannot be retrained or replayed here, in one clause: its domain, and what exists.

    Args:
        needed: The domain record the shard was trained in (None when only the id is known).
        needed_id: That domain's id.
        available: The domains that are available.

    Returns:
        ``no node here trains in its determinism domain ... (available: ...)``.
    """
    have = "; ".join(describe(d) for d in available) or "none"
    what = describe(needed) if needed else needed_id
    return f"no node here trains in its determinism domain {what} (available: {have})"


# The explanation and the fix, said once after the shard-by-shard reasons.
DOMAIN_FIX = (
    "A retrain or replay in another domain differs in the last bits without anything being wrong, so sisa "
    "does not run it there. Fix: add a node in that domain (same CPU vendor and kernel level, torch build and "
    "threads; `sisa domains --store STORE` lists the domain of each node and shard, docs/cluster.md 'What "
    "verify proves, and where' says how), or let a deletion rebind the shard (resources.on_missing_domain: "
    "rebind retrains it from scratch where nodes exist)"
)


def unavailable_message(
    shard: int, needed: Mapping[str, Any] | None, needed_id: str, available: Sequence[Domain | Mapping[str, Any]]
) -> str:
    """What to tell a user whose shard's domain has no node: the shard, the domain, what exists, the fix.

    Args:
        shard: The shard.
        needed: The domain record it was trained in (None when only the id is known).
        needed_id: That domain's id.
        available: The domains that are available.

    Returns:
        The message.
    """
    return f"shard {shard}: {missing_reason(needed, needed_id, available)}. {DOMAIN_FIX}"
