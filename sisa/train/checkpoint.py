"""The checkpoint codec: one dict with all resume state (model, optimizer, RNG, meta), as bytes.

Encoded with ``torch.save`` from CPU tensors only, decoded with ``weights_only=True`` so a
crafted file cannot run code, and checked against the sha256 the store recorded.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from sisa.errors import IntegrityError
from sisa.store.digests import sha256

__all__ = ["CHECKPOINT_FORMAT", "encode_checkpoint", "load_checkpoint", "on_cpu"]

CHECKPOINT_FORMAT = 1


def load_checkpoint(blob: bytes, expected_sha256: str | None = None) -> dict[str, Any]:
    """Decode checkpoint bytes without executing any pickled code.

    Args:
        blob: Bytes written by the trainer.
        expected_sha256: Digest recorded in the store; checked first when given.

    Returns:
        The checkpoint dict (``model``, ``optimizer``, ``rng``, ``meta``).

    Raises:
        IntegrityError: If the digest differs or the bytes are not a checkpoint.
    """
    if expected_sha256 is not None and sha256(blob) != expected_sha256:
        raise IntegrityError("checkpoint bytes do not match their recorded sha256: the store was modified")
    try:
        # weights_only=True: a crafted pickle cannot run code on load.
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"checkpoint cannot be decoded safely: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise IntegrityError("checkpoint has an unknown format")
    return ckpt


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested in dicts, lists and tuples) moved to the CPU.

    A checkpoint holds CPU tensors only, so any loader opens it without ``map_location``;
    the optimizer puts its state back on its parameters' device when it loads it. On the
    CPU this is the identity (the same tensor objects), so CPU checkpoint bytes do not change.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def encode_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> bytes:
    """The checkpoint bytes of ``model`` and ``optimizer`` now, with the torch RNG state and ``meta``."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": on_cpu(model.state_dict()),
        "optimizer": on_cpu(optimizer.state_dict()),
        "rng": {"torch": torch.get_rng_state()},
        "meta": meta,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
