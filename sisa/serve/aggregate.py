"""Combine the predictions of SISA shard models into one ensemble prediction.

Pure torch: runs the shard models (vectorised with ``torch.func.vmap`` or one by one)
and aggregates their outputs by mean, majority vote or weighted mean.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import ParamSpec

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from sisa.errors import ConfigError, DataError, ModelError, NotTrainedError
from sisa.train.adapters import AdaptedModel

__all__ = [
    "can_vmap",
    "choose_backend",
    "combine",
    "predict",
    "predict_proba",
    "probas_of",
    "shard_logits",
    "shard_probas",
]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")

METHODS = ("mean", "vote", "weighted")
BACKENDS = ("auto", "vmap", "loop")

# Largest chunk size for which "auto" picks vmap on CPU; 0 means never. Measured with
# scripts/bench_aggregate.py --quick (S=16, 2 threads, torch 2.13 CPU, shared 2-core box,
# two runs), loop_time / vmap_time at batch 1, 16, 64, 256, 1000:
#   vmap forward alone, weights pre-stacked:  MLP 2.1 1.5 1.6 1.1 1.0   CNN 1.7 0.7 0.4 0.7 0.8
#   vmap as called here, restacking per call: MLP 0.5 0.5 0.6 0.6 0.7   CNN 0.4 0.5 0.4 0.7 0.8
# Stacking copies every weight (~2 ms MLP, ~30-40 ms CNN at S=16), more than the batched
# forward saves, so on CPU the loop always wins while we restack on every call.
CPU_VMAP_MAX_BATCH = 0


def _device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU if it has none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _check_models(models: Sequence[nn.Module]) -> None:
    if len(models) == 0:
        raise NotTrainedError("no shard models to predict with")


def can_vmap(models: Sequence[nn.Module]) -> bool:
    """Whether the models can be run as one vmapped forward.

    Args:
        models: Shard models.

    Returns:
        True if all models share class, device, and parameter/buffer names, shapes,
        dtypes and requires_grad flags (what ``stack_module_state`` needs).
    """
    if len(models) == 0:
        return False

    def signature(m: nn.Module) -> tuple[object, ...]:
        # named_parameters/named_buffers are exactly what stack_module_state stacks;
        # mixed requires_grad across models makes it raise, so compare that too.
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return (
            type(m),
            _device_of(m),
            tuple((k, tuple(t.shape), t.dtype, t.requires_grad) for k, t in tensors),
        )

    first = signature(models[0])
    return all(signature(m) == first for m in models[1:])


def choose_backend(models: Sequence[nn.Module], n: int, backend: str) -> str:
    """Resolve the backend to use for a forward over chunks of ``n`` rows.

    Args:
        models: Shard models.
        n: Number of rows per forward (the chunk size).
        backend: One of ``BACKENDS``.

    Returns:
        ``"vmap"`` or ``"loop"``.

    Raises:
        NotTrainedError: If ``models`` is empty.
        ConfigError: If ``backend`` is unknown, or is ``"vmap"`` for models that
            cannot be vmapped.
    """
    _check_models(models)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "loop":
        return "loop"
    vmappable = can_vmap(models)
    if backend == "vmap":
        if not vmappable:
            raise ConfigError(
                "backend='vmap' needs models of one class with identical parameter and "
                "buffer names/shapes/dtypes on one device; use backend='loop' or 'auto'"
            )
        return "vmap"
    # auto: vmap only pays off on GPU (not measured here: device-side stacking is a fast
    # memcpy) or for small CPU batches (see CPU_VMAP_MAX_BATCH); one model gains nothing.
    if not vmappable or len(models) == 1 or isinstance(models[0], AdaptedModel):
        # adapted models: the loop computes a shared backbone's features once for all heads
        return "loop"
    if _device_of(models[0]).type == "cuda" or n <= CPU_VMAP_MAX_BATCH:
        return "vmap"
    return "loop"


def _check_logits(out: torch.Tensor, rows: int) -> torch.Tensor:
    if out.ndim != 2 or out.shape[0] != rows:
        raise ModelError(f"model output must have shape (n, C) with n={rows}, got {tuple(out.shape)}")
    return out


def _loop(models: Sequence[nn.Module], x: torch.Tensor, starts: range, batch_size: int) -> torch.Tensor:
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    for i in starts:
        xb = x[i : i + batch_size]
        # Shards that put a head on one shared frozen backbone get its features computed once per
        # chunk, then each runs only its head: S heads instead of S full forwards.
        features: dict[int, torch.Tensor] = {}
        for out, m in zip(outs, models, strict=True):
            shared = m.shared_backbone if isinstance(m, AdaptedModel) else None
            if not isinstance(m, AdaptedModel) or shared is None:
                out.append(_check_logits(m(xb), len(xb)))
                continue
            f = features.get(id(shared))
            if f is None:
                f = features[id(shared)] = shared(xb).flatten(1)
            out.append(_check_logits(m.head(f), len(xb)))
    return torch.stack([torch.cat(out) for out in outs])


def _vmap(models: Sequence[nn.Module], x: torch.Tensor, starts: range, batch_size: int) -> torch.Tensor:
    # Restacked on every call, never cached: a stale stack after unlearning would serve
    # a deleted shard's predictions. The base copy lives on 'meta' so it holds no
    # weights; functional_call swaps in the stacked ones.
    params, buffers = stack_module_state(list(models))
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(base, (p, b), (xb,))
        return out

    batched = vmap(forward, in_dims=(0, 0, None))
    chunks = []
    for i in starts:
        xb = x[i : i + batch_size]
        out = batched(params, buffers, xb)
        _check_logits(out[0], len(xb))
        chunks.append(out)
    return torch.cat(chunks, dim=1)


def shard_logits(
    models: Sequence[nn.Module], x: torch.Tensor, *, backend: str = "auto", batch_size: int = 1024
) -> torch.Tensor:
    """Run every shard model on ``x``.

    Models are put in eval mode for the call and their original train/eval flags
    (of every submodule) restored afterwards; no autograd graph is recorded.

    Args:
        models: Shard models, all on the same device.
        x: Input batch, first dimension is the sample dimension; moved to the models'
            device.
        backend: One of ``BACKENDS``.
        batch_size: Rows per forward; larger inputs are processed in chunks.

    Returns:
        Logits of shape (S, n, C) on the models' device.

    Raises:
        NotTrainedError: If ``models`` is empty.
        ConfigError: On a bad backend or batch_size.
        DataError: If ``x`` is not a tensor with a sample dimension.
        ModelError: If a model does not return (n, C) outputs.
    """
    _check_models(models)
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise DataError("x must be a torch.Tensor with a leading sample dimension")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    chosen = choose_backend(models, min(n, batch_size), backend)
    logger.debug("shard_logits: S=%d n=%d batch_size=%d backend=%s", len(models), n, batch_size, chosen)
    device = _device_of(models[0])
    x = x.to(device)
    # Ranges over n rows; an empty x still gets one (empty) forward so C is known.
    starts = range(0, max(n, 1), batch_size)

    saved = [(mod, mod.training) for m in models for mod in m.modules()]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            out = _loop(models, x, starts, batch_size) if chosen == "loop" else _vmap(models, x, starts, batch_size)
    finally:
        for mod, flag in saved:
            mod.training = flag
    # Inference tensors cannot be modified in place or saved for backward outside
    # inference mode; a cheap copy spares callers that surprise.
    return out.clone()


def shard_probas(
    models: Sequence[nn.Module], x: torch.Tensor, *, backend: str = "auto", batch_size: int = 1024
) -> torch.Tensor:
    """Per-shard class probabilities: softmax of :func:`shard_logits` (same arguments).

    Returns:
        Probabilities of shape (S, n, C); half-precision logits are upcast to float32.
    """
    return probas_of(shard_logits(models, x, backend=backend, batch_size=batch_size))


def probas_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-shard class probabilities ``(S, n, C)`` from shard logits: what :func:`shard_probas` returns.

    Half-precision logits are upcast to float32 first.
    """
    # Softmax in half precision loses enough accuracy to flip near-tied votes.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.softmax(logits, dim=-1)


def _normalised_weights(weights: Sequence[float] | torch.Tensor | None, s: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        raise ConfigError("method='weighted' needs weights (e.g. shard sample counts), one per shard")
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if w.shape != (s,):
        raise ConfigError(f"weights must be a 1-D sequence of length S={s}, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights must be finite, non-negative and have a positive sum, got {w.tolist()}")
    return (w / w.sum()).to(dtype=like.dtype, device=like.device)


def combine(
    probas: torch.Tensor, method: str = "mean", weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Aggregate per-shard probabilities into ensemble probabilities.

    Args:
        probas: Per-shard probabilities, shape (S, n, C).
        method: ``"mean"`` (average probability), ``"vote"`` (fraction of shards
            whose argmax is each class) or ``"weighted"`` (weighted mean).
        weights: Per-shard non-negative weights, length S, normalised to sum 1.
            Required for ``"weighted"``, ignored by the other methods.

    Returns:
        Tensor of shape (n, C) whose rows sum to 1.

    Raises:
        NotTrainedError: If S is 0.
        ConfigError: On an unknown method or bad weights.
        DataError: If ``probas`` is not 3-D.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if probas.ndim != 3:
        raise DataError(f"probas must have shape (S, n, C), got {tuple(probas.shape)}")
    s, n, c = probas.shape
    if s == 0:
        raise NotTrainedError("no shard predictions to combine")
    if method == "mean":
        return probas.mean(dim=0)
    if method == "vote":
        # argmax picks the lowest label on ties, both per shard and in predict().
        labels = probas.argmax(dim=-1)  # (S, n)
        counts = torch.zeros(n, c, dtype=probas.dtype, device=probas.device)
        counts.scatter_add_(1, labels.T, torch.ones(n, s, dtype=probas.dtype, device=probas.device))
        return counts / s
    w = _normalised_weights(weights, s, probas)
    return torch.tensordot(w, probas, dims=1)


def predict_proba(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    method: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
    backend: str = "auto",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Ensemble class probabilities for ``x``.

    Args:
        models: Shard models.
        x: Input batch.
        method: One of ``METHODS``; see :func:`combine`.
        weights: Per-shard weights, required for ``"weighted"`` only.
        backend: One of ``BACKENDS``.
        batch_size: Rows per forward.

    Returns:
        Tensor of shape (n, C) whose rows sum to 1, on the models' device.

    Raises:
        See :func:`shard_logits` and :func:`combine`.
    """
    # Validate cheap arguments before running any model.
    _check_models(models)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "weighted":
        _normalised_weights(weights, len(models), torch.empty(0))
    return combine(shard_probas(models, x, backend=backend, batch_size=batch_size), method, weights)


def _labels_of(proba_fn: Callable[_P, torch.Tensor]) -> Callable[_P, torch.Tensor]:
    """A function taking ``proba_fn``'s arguments and returning the argmax of its probabilities."""

    @functools.wraps(proba_fn)
    def labels(*args: _P.args, **kwargs: _P.kwargs) -> torch.Tensor:
        return proba_fn(*args, **kwargs).argmax(dim=-1)

    return labels


predict = _labels_of(predict_proba)
predict.__name__ = predict.__qualname__ = "predict"
predict.__doc__ = """Ensemble labels for ``x``: argmax of :func:`predict_proba` (same arguments).

    Returns:
        int64 labels of shape (n,); ties go to the lowest label index.
    """
