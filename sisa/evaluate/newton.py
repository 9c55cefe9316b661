"""The Newton removal step of Guo et al. (2020) and its influence-function form for whole networks.

Both solve ``H_retain s = Delta`` and return ``w + s``, where ``Delta`` is the forget set's
share of the L2-regularised loss gradient. The head form is exact and convex; the network
form uses Hessian-vector products and conjugate gradient. ``docs/metrics.md`` says what is
certified and what is not. Pure torch; :func:`sisa.evaluate.approximate.newton` is the entry point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sisa.errors import ConfigError, TrainingError

__all__ = ["NewtonReport", "full_step", "head_features", "head_step", "last_linear"]

# Conjugate gradient stops once ||r|| <= CG_TOL * ||Delta||.
CG_TOL = 1e-6


@dataclass(frozen=True)
class NewtonReport:
    """What one Newton removal step did, in the mean-loss normalisation.

    Every gradient norm is of ``L_D(w) = mean_{i in D} CE_i(w) + l2/2 * ||w||^2`` over the
    parameters the step moves.

    Attributes:
        scope: ``head`` or ``full``.
        parameters: Number of parameters moved.
        step_norm: ``||H^-1 Delta||`` (the step taken).
        grad_norm_full_before: ``||grad L_all(w)||`` at the input model: 0 at the full-data
            optimum, which Guo et al.'s bound assumes.
        grad_norm_retain_before: ``||grad L_retain(w)||`` at the input model.
        grad_norm_retain_after: ``||grad L_retain(w_new)||``: 0 means the step landed
            exactly on the retain optimum.
        max_feature_norm: Largest ``||[z, 1]||`` of a retain sample's head input (``head``
            only; the bound's constants scale with it).
        cg_iterations: Conjugate-gradient iterations run (``full`` only).
        cg_relative_residual: ``||H s - Delta|| / ||Delta||`` when CG stopped (``full`` only).
        negative_curvature: Whether CG met a direction of non-positive curvature and
            stopped early (``full`` only).
    """

    scope: str
    parameters: int
    step_norm: float
    grad_norm_full_before: float
    grad_norm_retain_before: float
    grad_norm_retain_after: float
    max_feature_norm: float | None = None
    cg_iterations: int | None = None
    cg_relative_residual: float | None = None
    negative_curvature: bool | None = None


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (its classification head).

    Raises:
        ConfigError: If the model has none.
    """
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(
            "evaluate.newton.scope=head needs a model whose last layer is an nn.Linear; "
            "this model has none: use evaluate.newton.scope=full"
        )
    return found[-1]


def head_features(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The inputs of the model's last ``nn.Linear`` (the frozen features), in eval mode.

    Args:
        model: The model (put in eval mode).
        x: Model inputs.
        batch_size: Rows per forward pass.

    Returns:
        ``(n, d)`` features.

    Raises:
        ConfigError: If the last Linear's output is not the model's output (something
            follows it), so the head is not a linear model on frozen features.
    """
    head = last_linear(model)
    seen: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append(inputs[0].detach())
        outs.append(output.detach())

    hook = head.register_forward_hook(record)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                calls = len(seen)
                logits = model(x[start : start + batch_size])
                if len(seen) != calls + 1 or not torch.equal(outs[-1], logits):
                    raise ConfigError(
                        "evaluate.newton.scope=head needs the model's output to be its last nn.Linear's "
                        f"output; in this {type(model).__name__} something follows it or it runs more "
                        "than once: use evaluate.newton.scope=full"
                    )
    finally:
        hook.remove()
    return torch.cat(seen) if seen else x.new_zeros((0, head.in_features))


def _augmented(z: torch.Tensor) -> torch.Tensor:
    """Features with a constant 1 column, so ``[W | b]`` acts as one matrix."""
    return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], dim=1)


def _head_grad_sum(wb: torch.Tensor, z: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Summed cross-entropy gradient with respect to ``[W | b]`` (``K x (d+1)``)."""
    g = torch.zeros_like(wb)
    for start in range(0, len(y), batch_size):
        zc, yc = z[start : start + batch_size], y[start : start + batch_size]
        p = torch.softmax(zc @ wb.T, dim=1)
        p[torch.arange(len(yc)), yc] -= 1.0
        g += p.T @ zc
    return g


def _head_hessian_sum(wb: torch.Tensor, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Summed cross-entropy Hessian with respect to ``[W | b]`` flattened row-major.

    Per sample it is ``(diag(p) - p p^T) kron (z z^T)``: the block-diagonal part is
    ``Z^T diag(p_k) Z`` per class, the rest ``-U^T U`` with rows ``U_i = p_i kron z_i``.
    """
    k, d = wb.shape
    h = torch.zeros(k * d, k * d, dtype=wb.dtype, device=wb.device)
    for start in range(0, len(z), batch_size):
        zc = z[start : start + batch_size]
        p = torch.softmax(zc @ wb.T, dim=1)
        for c in range(k):
            h[c * d : (c + 1) * d, c * d : (c + 1) * d] += zc.T @ (p[:, c : c + 1] * zc)
        u = (p[:, :, None] * zc[:, None, :]).reshape(len(zc), k * d)
        h -= u.T @ u
    return h


def head_step(
    wb: torch.Tensor,
    z_forget: torch.Tensor,
    y_forget: torch.Tensor,
    z_retain: torch.Tensor,
    y_retain: torch.Tensor,
    l2: float,
    batch_size: int,
    *,
    bias: bool = True,
) -> tuple[torch.Tensor, NewtonReport]:
    """Guo et al.'s removal step for multinomial logistic regression on fixed features.

    With sums over samples, ``L_D(w) = sum_D CE_i + l2 * |D| / 2 * ||w||^2``,
    ``Delta = sum_forget grad CE_i(w) + l2 * m * w`` (``m`` forget samples) and ``H`` the
    Hessian of ``L_retain`` at ``w``; the step is ``w + H^-1 Delta``. At the full-data
    optimum ``-Delta`` is the retain gradient, so this is one Newton step on the retain loss.

    Args:
        wb: ``[W | b]``, ``K x (d+1)`` (``W`` alone without a bias); computed in its
            dtype (use float64).
        z_forget: Forget features ``(m, d)``.
        y_forget: Forget labels.
        z_retain: Retain features ``(n - m, d)``.
        y_retain: Retain labels.
        l2: The L2 strength ``lambda`` (> 0).
        batch_size: Rows per chunk.
        bias: Whether the head has a bias (the last column of ``wb``).

    Returns:
        The new ``[W | b]`` and the step's report.

    Raises:
        TrainingError: If the Hessian is not numerically positive definite.
    """
    zf, zr = (_augmented(z_forget), _augmented(z_retain)) if bias else (z_forget, z_retain)
    m, n_r = len(y_forget), len(y_retain)
    g_forget = _head_grad_sum(wb, zf, y_forget, batch_size) + l2 * m * wb
    g_retain = _head_grad_sum(wb, zr, y_retain, batch_size) + l2 * n_r * wb
    h = _head_hessian_sum(wb, zr, batch_size)
    h.diagonal().add_(l2 * n_r)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise TrainingError(
            f"newton: the retain Hessian of the head is not positive definite (l2={l2}); "
            "raise evaluate.newton.l2 or compute in float64"
        )
    step = torch.cholesky_solve(g_forget.reshape(-1, 1), chol).reshape(wb.shape)
    new = wb + step
    after = _head_grad_sum(new, zr, y_retain, batch_size) + l2 * n_r * new
    report = _report("head", step, g_forget, g_retain, after, m, n_r)
    return new, dataclasses.replace(report, max_feature_norm=float(zr.norm(dim=1).max()) if n_r else 0.0)


def _report(
    scope: str,
    step: torch.Tensor,
    g_forget: torch.Tensor,
    g_retain: torch.Tensor,
    after: torch.Tensor,
    m: int,
    n_r: int,
) -> NewtonReport:
    """The report fields both scopes share, from the step, the gradient sums and the set sizes.

    ``g_forget`` and ``g_retain`` are the regularised gradient sums at the input model,
    ``after`` the retain one at the new parameters; the step moved ``step.numel()`` of them.
    """
    return NewtonReport(
        scope=scope,
        parameters=step.numel(),
        step_norm=float(step.norm()),
        grad_norm_full_before=float((g_forget + g_retain).norm()) / (m + n_r),
        grad_norm_retain_before=float(g_retain.norm()) / n_r,
        grad_norm_retain_after=float(after.norm()) / n_r,
    )


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _loss_grad_sum(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Flat gradient of the summed cross-entropy over ``(x, y)``."""
    total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(y), batch_size):
        loss = loss_fn(model(x[start : start + batch_size]), y[start : start + batch_size])
        total += _flat(torch.autograd.grad(loss, params))
    return total


def _hvp_sum(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Hessian of the summed cross-entropy times ``v``, by double backward."""
    total = torch.zeros_like(v)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(y), batch_size):
        loss = loss_fn(model(x[start : start + batch_size]), y[start : start + batch_size])
        grads = _flat(torch.autograd.grad(loss, params, create_graph=True))
        total += _flat(torch.autograd.grad(grads @ v, params))
    return total


def _conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int
) -> tuple[torch.Tensor, int, float, bool]:
    """Solve ``A s = b`` for a symmetric ``A``, stopping at non-positive curvature (truncated CG).

    On an indefinite ``A`` (a network's Hessian away from a strict minimum) CG's residual is not
    monotone: the iterate at which it meets non-positive curvature can be far worse than an
    earlier one (measured: a relative residual of 3.3, a step that wrecked the retained
    accuracy, on one CPU kernel level and not on another). So the iterate with the smallest
    residual seen is returned, and never one worse than no step at all (``s = 0``, residual 1).

    Returns:
        The solution, iterations run, ``||A s - b|| / ||b||`` of the returned solution and
        whether it stopped on non-positive curvature.
    """
    s = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    b_norm = float(b.norm())
    if b_norm == 0:
        return s, 0, 0.0, False
    best, best_residual = s.clone(), 1.0  # no step at all: residual ||b|| / ||b||
    done = 0
    negative = False
    while done < iters:
        done += 1
        ap = apply(p)
        curvature = p @ ap
        if curvature <= 0:
            negative = True
            break
        alpha = rr / curvature
        s += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        residual = float(rr_new.sqrt()) / b_norm
        if residual < best_residual:
            best, best_residual = s.clone(), residual
        if residual <= CG_TOL:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return best, done, best_residual, negative


def full_step(
    model: nn.Module,
    x_forget: torch.Tensor,
    y_forget: torch.Tensor,
    x_retain: torch.Tensor,
    y_retain: torch.Tensor,
    *,
    l2: float,
    damping: float,
    cg_iters: int,
    batch_size: int,
) -> NewtonReport:
    """The influence-function form of the same step on every parameter, in place.

    Solves ``(H_retain / n_r + damping I) s = Delta / n_r`` by conjugate gradient, with
    ``H_retain`` the Hessian of the summed L2-regularised retain loss (through
    Hessian-vector products, never formed) and ``Delta`` as in :func:`head_step`; then
    adds ``s`` to the parameters. The model should be in eval mode (dropout off).

    Args:
        model: The model to update in place.
        x_forget: Forget inputs.
        y_forget: Forget labels.
        x_retain: Retain inputs.
        y_retain: Retain labels.
        l2: The L2 strength.
        damping: Added to the mean Hessian's diagonal.
        cg_iters: Most CG iterations.
        batch_size: Rows per pass.

    Returns:
        The step's report.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    theta = _flat([p.detach() for p in params])
    m, n_r = len(y_forget), len(y_retain)
    g_forget = _loss_grad_sum(model, params, x_forget, y_forget, batch_size) + l2 * m * theta
    g_retain = _loss_grad_sum(model, params, x_retain, y_retain, batch_size) + l2 * n_r * theta

    def apply(v: torch.Tensor) -> torch.Tensor:
        return _hvp_sum(model, params, x_retain, y_retain, v, batch_size) / n_r + (l2 + damping) * v

    step, iters, residual, negative = _conjugate_gradient(apply, g_forget / n_r, cg_iters)
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(step[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    theta_new = _flat([p.detach() for p in params])
    after = _loss_grad_sum(model, params, x_retain, y_retain, batch_size) + l2 * n_r * theta_new
    report = _report("full", step, g_forget, g_retain, after, m, n_r)
    return dataclasses.replace(report, cg_iterations=iters, cg_relative_residual=residual, negative_curvature=negative)
