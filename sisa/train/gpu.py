"""A shard's CUDA side: pinned math flags, the scoped memory cap, and CUDA's pinned environment.

On a GPU the bits of a stage depend on switches below the recipe: whether float32 matrix
products and convolutions may run in TF32, whether cuBLAS may reduce bf16/fp16 products in
reduced precision, which cuDNN algorithm runs, and cuBLAS's workspace. A user's model
callable, a notebook or a library can flip any of them, so training pins them for its
block and restores the caller's after (:func:`pinned_math`), and the domain records the
values in force (:func:`math_signature`), so two workers with other settings never share
a domain id. cuDNN is switched off inside the block: under memory pressure it silently
tries the next algorithm when one cannot get its workspace (and caches that choice), so
the bits would depend on what else ran on the card; the native kernels have no such
fallback.

A fractional GPU share (``resources.gpus_per_shard`` < 1) caps the caching allocator at
the share of the card minus the CUDA context the process holds outside it
(:func:`cap_fraction`), for the duration of the shard's training only (:func:`memory_cap`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sisa.errors import TrainingError

__all__ = [
    "CUBLAS_WORKSPACE",
    "CUDA_CONTEXT_BYTES",
    "PINNED_MATH",
    "cap_fraction",
    "cuda_env",
    "ensure_cuda_env",
    "math_flags",
    "math_signature",
    "memory_cap",
    "pinned_math",
    "release_cached_memory",
    "require_cuda",
]

log = logging.getLogger(__name__)

# cuBLAS's deterministic workspace setting (one of the two it documents); read once, when
# cuBLAS first initialises in a process, so it must be in the environment before that.
CUBLAS_WORKSPACE = ":4096:8"
# What a process's CUDA context takes on the card outside torch's caching allocator (about
# 0.5 GiB on recent GPUs and drivers): N processes each capped at 1/N of the card would
# otherwise overcommit it by N contexts.
CUDA_CONTEXT_BYTES = 512 * 2**20

# The switches a stage trains under, and their pinned values: full float32 precision
# everywhere, deterministic kernels, no autotuning, no cuDNN (see the module docstring).
PINNED_MATH: dict[str, bool] = {
    "matmul_allow_tf32": False,
    "matmul_allow_bf16_reduced": False,
    "matmul_allow_fp16_reduced": False,
    "cudnn_enabled": False,
    "cudnn_allow_tf32": False,
    "cudnn_deterministic": True,
    "cudnn_benchmark": False,
}


def _switches() -> dict[str, tuple[Any, str]]:
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return {
        "matmul_allow_tf32": (matmul, "allow_tf32"),
        "matmul_allow_bf16_reduced": (matmul, "allow_bf16_reduced_precision_reduction"),
        "matmul_allow_fp16_reduced": (matmul, "allow_fp16_reduced_precision_reduction"),
        "cudnn_enabled": (cudnn, "enabled"),
        "cudnn_allow_tf32": (cudnn, "allow_tf32"),
        "cudnn_deterministic": (cudnn, "deterministic"),
        "cudnn_benchmark": (cudnn, "benchmark"),
    }


def math_flags() -> dict[str, bool]:
    """The switches of :data:`PINNED_MATH` as they are in this process now."""
    with warnings.catch_warnings():  # newer torch steers towards fp32_precision; the old flags still hold
        warnings.simplefilter("ignore")
        return {name: bool(getattr(owner, attr)) for name, (owner, attr) in _switches().items()}


def _set_flags(flags: dict[str, bool]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (owner, attr) in _switches().items():
            setattr(owner, attr, flags[name])


@contextmanager
def pinned_math() -> Iterator[dict[str, bool]]:
    """Pin :data:`PINNED_MATH` (and float32 matmul precision ``highest``) for a block, then restore.

    Yields:
        The flags in force inside the block, as read back.
    """
    import torch

    saved, precision = math_flags(), torch.get_float32_matmul_precision()
    _set_flags(PINNED_MATH)
    torch.set_float32_matmul_precision("highest")
    try:
        yield math_flags()
    finally:
        _set_flags(saved)
        torch.set_float32_matmul_precision(precision)


def math_signature(flags: dict[str, bool]) -> str:
    """One canonical string of the flags and cuBLAS's workspace, as a domain records them."""
    parts = [f"{name}={int(value)}" for name, value in sorted(flags.items())]
    parts.append(f"cublas_workspace={os.environ.get('CUBLAS_WORKSPACE_CONFIG', '')}")
    return ",".join(parts)


def cuda_env() -> dict[str, str]:
    """Environment variables a CUDA worker must start with (a Ray ``runtime_env``, the local child)."""
    return {"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}


def ensure_cuda_env() -> None:
    """Make sure cuBLAS in this process uses :data:`CUBLAS_WORKSPACE`, before any training on CUDA.

    Raises:
        TrainingError: If the variable holds another value, or is unset while CUDA is
            already initialised here (cuBLAS may have read it already): the bits would
            depend on it without anything recording it.
    """
    import torch

    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value == CUBLAS_WORKSPACE:
        return
    if value is not None:
        raise TrainingError(
            f"CUBLAS_WORKSPACE_CONFIG={value!r} is set in this process, but sisa trains on CUDA with "
            f"{CUBLAS_WORKSPACE!r} in every worker (the workspace decides cuBLAS's bits). Unset it, or set it "
            f"to {CUBLAS_WORKSPACE!r}, before starting Python"
        )
    if torch.cuda.is_initialized():
        raise TrainingError(
            "CUDA was initialised in this process before sisa could set CUBLAS_WORKSPACE_CONFIG, which cuBLAS "
            "reads once; a shard trained here could differ from one trained in a worker. Start Python with "
            f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment, or train on Ray (its workers get it)"
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def require_cuda(gpus_per_shard: float | None = None) -> None:
    """Refuse to train or probe a GPU store in a process that has no CUDA device.

    Args:
        gpus_per_shard: The config's share, named in the message when given.

    Raises:
        TrainingError: Naming what is missing and what to do instead.
    """
    import torch

    if not torch.cuda.is_available():
        share = "" if gpus_per_shard is None else f" (resources.gpus_per_shard={gpus_per_shard})"
        raise TrainingError(
            f"this store trains on GPUs{share}, but this process has no "
            f"CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Its shards "
            "can only be trained or replayed where CUDA is: run on a Ray cluster with GPU nodes (--address), "
            "or on a machine with a GPU and a CUDA build of torch"
        )


def cap_fraction(share: float, total_bytes: int, context_bytes: int = CUDA_CONTEXT_BYTES) -> float:
    """The allocator fraction that keeps a process with ``share`` of a card inside its share.

    Args:
        share: The process's share of the card (``resources.gpus_per_shard``, 0 < share < 1).
        total_bytes: The card's memory.
        context_bytes: What the process's CUDA context takes outside the allocator.

    Returns:
        The fraction of ``total_bytes`` the allocator may hold.

    Raises:
        TrainingError: If the share cannot even hold the context.
    """
    usable = share * total_bytes - context_bytes
    if usable <= 0:
        raise TrainingError(
            f"resources.gpus_per_shard={share} gives each shard {share * total_bytes / 2**30:.2f} GiB of this "
            f"{total_bytes / 2**30:.1f} GiB GPU, less than the {context_bytes / 2**30:.1f} GiB its CUDA context "
            "alone takes: pack fewer shards per GPU (raise resources.gpus_per_shard)"
        )
    return usable / total_bytes


@contextmanager
def memory_cap(share: float) -> Iterator[dict[str, Any]]:
    """Cap this process's caching allocator on its current CUDA device for a block, then lift it.

    Scoped, because the cap is per process: in a driver, a notebook or the warm CLI worker it
    must not outlive the shard's training. Cached blocks are released at the end, so the
    next task on the card finds the memory free.

    Args:
        share: ``resources.gpus_per_shard``; 1 or more caps nothing.

    Yields:
        ``device`` (index), ``total_bytes`` and ``fraction`` (None when uncapped): what
        :func:`~sisa.train.trainer.train_shard` reports in an out-of-memory error.
    """
    import torch

    index = torch.cuda.current_device()  # an index: torch.device("cuda") without one is refused
    total = int(torch.cuda.get_device_properties(index).total_memory)
    info: dict[str, Any] = {"device": index, "total_bytes": total, "fraction": None}
    if share >= 1:
        try:
            yield info
        finally:
            release_cached_memory()
        return
    fraction = cap_fraction(share, total)
    before = torch.cuda.get_per_process_memory_fraction(index)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    info["fraction"] = fraction
    try:
        yield info
    finally:
        torch.cuda.set_per_process_memory_fraction(before, index)
        release_cached_memory()


def release_cached_memory() -> None:
    """Give the caching allocator's unused blocks back to the card (a no-op where CUDA never started)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
