"""Approximate unlearning baselines applied to a model trained on everything.

``gradient_ascent``, ``finetune``, ``prune`` and ``newton`` are the usual cheap alternatives
to retraining (see ``docs/metrics.md`` for sources). None of them gives a guarantee for a
network (``newton`` on the last layer alone is the convex case of Guo et al.): the
evaluation harness measures how close each gets to a model retrained without the forget
set. Every method copies its input model, is deterministic for a given seed and leaves
the caller's torch settings as they were: threads, deterministic mode and torch's global
random number generators (saved before and restored after, so the caller's next draw is
the one it would have been).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.data.inputs import model_inputs
from sisa.evaluate.newton import full_step, head_features, head_step, last_linear
from sisa.evaluate.settings import EvaluateConfig, FinetuneConfig, GradientAscentConfig, NewtonConfig, PruneConfig
from sisa.train.models import build_model
from sisa.train.trainer import autocast, deterministic, make_optimizer, train_epochs

__all__ = ["APPROXIMATE_METHODS", "REPORT_ATTRIBUTE", "finetune", "gradient_ascent", "newton", "prune", "prune_mask"]

log = logging.getLogger(__name__)

# A method may leave details of its step on the returned model under this attribute (a
# JSON-able dict); the harness copies them into the row's ``extra``.
REPORT_ATTRIBUTE = "unlearning_report"


@contextmanager
def _own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators with ``seed`` for a block, restoring the caller's states after.

    Dropout and re-initialisation draw from the global generators; forking them keeps each
    method deterministic for its seed without moving the caller's random stream.

    Args:
        seed: Seed of the block's draws.
        device: The device computed on (its CUDA generators are saved too).
    """
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _tensors(data: LabeledArrays, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and the id-sorted row order on ``device``."""
    order = np.argsort(data.ids, kind="stable")
    return (
        torch.from_numpy(model_inputs(data.x, data.scale)).to(device),  # raw values: as a store gives them
        torch.from_numpy(np.ascontiguousarray(data.y)).to(device),
        torch.from_numpy(order).to(device),
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# One method's work on the copy ``out``, in place, inside the method's own random state and
# determinism: (out, forget, retain, cfg, settings, seed) -> details for the report, or None.
_Step = Callable[[nn.Module, LabeledArrays, LabeledArrays, SisaConfig, EvaluateConfig, int], "dict[str, Any] | None"]


class _ApproximateMethod:
    """The frame every approximate method shares around its own step.

    Calling it copies the model, runs the step under :func:`_own_rng` and
    :func:`~sisa.train.trainer.deterministic`, logs the step's details (if any) and leaves
    them on the copy as ``unlearning_report``, and returns the copy in eval mode. The
    method's name and docstring are its step's.
    """

    def __init__(self, step: _Step) -> None:
        self._step = step
        self.__name__ = self.__qualname__ = step.__name__.lstrip("_")
        self.__module__ = step.__module__
        self.__doc__ = step.__doc__

    def __repr__(self) -> str:
        return f"<approximate unlearning method {self.__name__}>"

    def __call__(
        self,
        model: nn.Module,
        forget: LabeledArrays,
        retain: LabeledArrays,
        cfg: SisaConfig,
        *,
        seed: int,
        threads: int = 1,
        settings: EvaluateConfig | None = None,
    ) -> nn.Module:
        """Unlearn ``forget`` from a copy of ``model``.

        Args:
            model: The model trained on everything (not modified).
            forget: Samples to forget.
            retain: The rest of the training data.
            cfg: Ensemble config; what the method takes from it is in its docstring.
            seed: Seed of the method's draws (and of torch's generators while it runs).
            threads: Torch threads.
            settings: The harness's settings; the section named after the method holds its
                hyperparameters (``None``: the defaults).

        Returns:
            The unlearned copy, in eval mode.
        """
        out = copy.deepcopy(model)
        device = _device(out)
        hp = settings if settings is not None else EvaluateConfig()
        with _own_rng(seed, device), deterministic(threads, device):
            details = self._step(out, forget, retain, cfg, hp, seed)
        if details is not None:
            log.info("%s: %s", self.__name__, details)
            setattr(out, REPORT_ATTRIBUTE, details)
        return out.eval()


def _gradient_ascent(
    out: nn.Module, forget: LabeledArrays, retain: LabeledArrays, cfg: SisaConfig, settings: EvaluateConfig, seed: int
) -> None:
    """Ascend the cross-entropy on the forget set, optionally descending it on retain batches.

    Each step takes one forget batch and, when ``retain_weight > 0``, one retain batch
    drawn with replacement; the loss is ``-CE(forget) + retain_weight * CE(retain)``.
    Called as ``gradient_ascent(model, forget, retain, cfg, *, seed, threads=1, settings=None)``
    (see :meth:`_ApproximateMethod.__call__`): ``cfg.train`` gives the optimizer kind and
    precision, ``seed`` the batch order and retain draws, ``settings.gradient_ascent`` the
    hyperparameters. Returns the unlearned copy, in eval mode.
    """
    hp: GradientAscentConfig = settings.gradient_ascent
    device = _device(out)
    loss_fn = nn.CrossEntropyLoss()
    xf, yf, order = _tensors(forget, device)
    xr, yr, _ = _tensors(retain, device)
    optimizer = make_optimizer(cfg, out, lr=hp.lr)
    generator = torch.Generator().manual_seed(seed)
    out.train()
    for _ in range(hp.epochs):
        rows = order[torch.randperm(len(order), generator=generator).to(device)]
        for start in range(0, len(rows), hp.batch_size):
            idx = rows[start : start + hp.batch_size]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.train.precision):  # the model's own training precision
                loss = -loss_fn(out(xf[idx]), yf[idx])
                if hp.retain_weight > 0 and len(yr):
                    ridx = torch.randint(len(yr), (hp.batch_size,), generator=generator).to(device)
                    loss = loss + hp.retain_weight * loss_fn(out(xr[ridx]), yr[ridx])
            loss.backward()
            optimizer.step()


gradient_ascent = _ApproximateMethod(_gradient_ascent)


def _descend(
    model: nn.Module, data: LabeledArrays, cfg: SisaConfig, *, epochs: int, lr: float, batch_size: int, seed: int
) -> None:
    """Plain cross-entropy training of ``model`` on ``data`` in place (the caller holds determinism)."""
    device = _device(model)
    x, y, order = _tensors(data, device)
    if len(y) and epochs:
        optimizer = make_optimizer(cfg, model, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        train_epochs(model, optimizer, x, y, order, epochs, batch_size, generator, precision=cfg.train.precision)


def _finetune(
    out: nn.Module, forget: LabeledArrays, retain: LabeledArrays, cfg: SisaConfig, settings: EvaluateConfig, seed: int
) -> None:
    """Keep training on the retain set only, so the forget set's traces are overwritten.

    Called as ``finetune(model, forget, retain, cfg, *, seed, threads=1, settings=None)``
    (see :meth:`_ApproximateMethod.__call__`). ``forget`` is unused (fine-tuning never
    looks at the forget set; it is kept so every method has the same signature);
    ``cfg.train`` gives the optimizer kind and precision, ``seed`` the batch order,
    ``settings.finetune`` the hyperparameters. Returns the fine-tuned copy, in eval mode.
    """
    hp: FinetuneConfig = settings.finetune
    _descend(out, retain, cfg, epochs=hp.epochs, lr=hp.lr, batch_size=hp.batch_size, seed=seed)


finetune = _ApproximateMethod(_finetune)


def prune_mask(
    model: nn.Module, forget: LabeledArrays, fraction: float, batch_size: int = 1024
) -> dict[str, torch.Tensor]:
    """Boolean masks of the weight entries most salient for the forget set.

    Saliency is the first-order estimate of the loss change when an entry is zeroed,
    ``|w * dL_forget/dw|`` (the forget loss summed over the whole set). Entries are
    ranked globally over every weight matrix and convolution kernel (biases and norm
    parameters are left alone), and the top ``fraction`` are selected.

    Args:
        model: The model (not modified; its gradients are cleared afterwards).
        forget: The forget set.
        fraction: Share of entries to select, in ``(0, 1)``.
        batch_size: Rows per forward when accumulating the gradient.

    Returns:
        Parameter name -> mask (True = prune) for every ranked parameter.
    """
    device = _device(model)
    x, y, _ = _tensors(forget, device)
    model.zero_grad(set_to_none=True)
    model.eval()  # saliency of the deployed function, without dropout noise
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(y), batch_size):
        loss_fn(model(x[start : start + batch_size]), y[start : start + batch_size]).backward()
    scores = {
        n: (p.detach() * p.grad).abs() for n, p in model.named_parameters() if p.dim() >= 2 and p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, int(round(fraction * flat.numel())))
    # topk, not a threshold: ties at the threshold would otherwise select more than k entries.
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def _prune(
    out: nn.Module, forget: LabeledArrays, retain: LabeledArrays, cfg: SisaConfig, settings: EvaluateConfig, seed: int
) -> None:
    """Prune the forget set's most salient weights, then repair on the retain set.

    With ``mode: zero`` the pruned entries are set to 0 and kept there during the repair
    (their gradients are masked, so neither the optimizer's momentum nor weight decay
    moves them); with ``mode: reinit`` they take the values of a freshly initialised
    model and the repair trains them like the rest.

    Called as ``prune(model, forget, retain, cfg, *, seed, threads=1, settings=None)``
    (see :meth:`_ApproximateMethod.__call__`): ``cfg.model`` builds the fresh weights,
    ``cfg.train`` gives the repair's optimizer kind and precision, ``seed`` seeds the
    re-initialisation and the repair's batch order, ``settings.prune`` holds the
    hyperparameters. Returns the pruned and repaired copy, in eval mode.
    """
    hp: PruneConfig = settings.prune
    device = _device(out)
    masks = prune_mask(out, forget, hp.fraction)
    params = dict(out.named_parameters())
    fresh: dict[str, torch.Tensor] = {}
    if hp.mode == "reinit":
        torch.manual_seed(seed)
        fresh_model = build_model(cfg.model, forget.feature_shape, cfg.data.num_classes).to(device)
        fresh = dict(fresh_model.named_parameters())
    hooks = []
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p[mask] = fresh[name][mask] if hp.mode == "reinit" else 0.0
            if hp.mode == "zero":
                keep = (~mask).to(p.dtype)
                hooks.append(p.register_hook(_masker(keep)))
    try:
        _descend(out, retain, cfg, epochs=hp.repair_epochs, lr=hp.lr, batch_size=hp.batch_size, seed=seed)
    finally:
        for h in hooks:
            h.remove()


prune = _ApproximateMethod(_prune)


def _masker(keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook zeroing the pruned entries (a closure per parameter)."""
    return lambda grad: grad * keep


def _newton(
    out: nn.Module, forget: LabeledArrays, retain: LabeledArrays, cfg: SisaConfig, settings: EvaluateConfig, seed: int
) -> dict[str, Any]:
    """One Newton step from the model towards the L2-regularised optimum without the forget set.

    The certified-removal update of Guo et al. (ICML 2020), ``w + H_retain^-1 Delta``, where
    ``Delta`` is the forget set's share of the gradient of ``mean CE + l2/2 ||w||^2`` and
    ``H_retain`` the Hessian of that loss on the retain set. ``scope: head`` moves only the
    last ``nn.Linear`` on frozen features (convex: exact Hessian in float64, Cholesky);
    ``scope: full`` moves every parameter, solving with Hessian-vector products and
    conjugate gradient plus ``damping`` (influence functions; not certified). No noise is
    added. The step's :class:`~sisa.evaluate.newton.NewtonReport` (gradient residual norms before
    and after) is logged and left on the returned model as ``unlearning_report``.

    Called as ``newton(model, forget, retain, cfg, *, seed, threads=1, settings=None)``
    (see :meth:`_ApproximateMethod.__call__`): ``cfg`` is unused by the step (kept so every
    method has the same signature), ``seed`` seeds torch's generators during the step (the
    step itself draws nothing), ``settings.newton`` holds the step's settings. Returns the
    updated copy, in eval mode.

    Raises:
        ConfigError: If ``scope: head`` is asked of a model whose output is not its last
            ``nn.Linear``'s.
        TrainingError: If the head's Hessian is not positive definite.
    """
    hp: NewtonConfig = settings.newton
    out.eval()  # the deployed function: no dropout noise in the Hessian
    device = _device(out)
    xf, yf, forder = _tensors(forget, device)
    xr, yr, rorder = _tensors(retain, device)
    # Id order: the sums' float rounding does not depend on how the caller ordered rows.
    dtype = next(out.parameters()).dtype
    xf, yf, xr, yr = xf[forder].to(dtype), yf[forder], xr[rorder].to(dtype), yr[rorder]
    if hp.scope == "head":
        head = last_linear(out)
        zf = head_features(out, xf, hp.batch_size).double()
        zr = head_features(out, xr, hp.batch_size).double()
        has_bias = head.bias is not None
        with torch.no_grad():
            parts = [head.weight, head.bias[:, None]] if head.bias is not None else [head.weight]
            wb = torch.cat(parts, dim=1).double()
        new, report = head_step(wb, zf, yf, zr, yr, hp.l2, hp.batch_size, bias=has_bias)
        with torch.no_grad():
            head.weight.copy_(new[:, : head.in_features])
            if head.bias is not None:
                head.bias.copy_(new[:, -1])
    else:
        report = full_step(
            out,
            xf,
            yf,
            xr,
            yr,
            l2=hp.l2,
            damping=hp.damping,
            cg_iters=hp.cg_iters,
            batch_size=hp.batch_size,
        )
    return dataclasses.asdict(report)


newton = _ApproximateMethod(_newton)


# Method name -> method; all take (model, forget, retain, cfg, *, seed, threads, settings).
APPROXIMATE_METHODS: dict[str, Callable[..., nn.Module]] = {
    "gradient_ascent": gradient_ascent,
    "finetune": finetune,
    "prune": prune,
    "newton": newton,
}
