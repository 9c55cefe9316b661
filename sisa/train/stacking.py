"""The combiner's model: per-shard, per-class weights over the shards' log-probabilities, fitted by Newton.

``p(c | x) = softmax_c(sum_s W[s, c] * log p_s(c | x) + b[c])``: a shard may count more for the
classes it predicts well. With ``W = 1/S`` and ``b = 0`` (where the fit starts, and what the L2
penalty pulls towards) it is the normalised geometric mean of the shards' probabilities.

The fit is full-batch Newton with a backtracking line search in float64, from a fixed start, with
no randomness: the same log-probabilities and labels give the same bytes. The objective and the
gradient are numpy's own loops (``einsum`` without ``optimize``). The Hessian, ``(C(S+1))^2`` sums
over the core set, is the fit's cost; how it is summed is the stored combiner's ``format``:

* 1: numpy's ``einsum`` loops (not a BLAS), O(n (C(S+1))^2) multiply-adds one at a time: at S=32
  and 6,000 core samples about half a second a Newton step, most of a head deletion's time.
* 2 (what a fit writes): the same sums as matrix products on torch's BLAS (the whole fit 7.5x / 11.5x /
  13.6x faster at S = 8 / 16 / 32 on 2,000 core samples, ``scripts/bench_combiner.py``). Like
  the linear solve each step has always run there, they run on torch's intra-op threads, which the
  caller pins (the shards' determinism domain: CPU kernels, BLAS and its reproducibility mode, thread
  count), so within a domain they give the same bytes.

Both are kept: ``verify`` refits a stored combiner in the format it was written in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from sisa.errors import DataError, IntegrityError

__all__ = [
    "FORMATS",
    "L2",
    "LOGP_FLOOR",
    "STACKING_FORMAT",
    "Stacker",
    "apply_weights",
    "fit_stacker",
    "log_probs",
]

STACKING_FORMAT = 2  # what a fit writes
FORMATS = (1, 2)  # what a stored combiner may be (and verify refits in)
# The L2 penalty, per sample (the loss is a mean), towards the geometric mean: a core set is small
# and each shard trained on some of it, so a free fit would trust whichever shard memorised it.
L2 = 1e-2
# Log-probabilities are clipped here: a confident shard's log(0) = -inf would poison the fit.
LOGP_FLOOR = -30.0
_MAX_STEPS = 100
_TOLERANCE = 1e-10  # stop when every gradient entry is below this


@dataclass(frozen=True)
class Stacker:
    """A fitted combiner's weights.

    Attributes:
        weights: ``(S, C)`` float64, one weight per shard and class.
        bias: ``(C,)`` float64.
        steps: Newton steps the fit took (a record of the fit, part of the bytes).
        format: How the fit summed its Hessian (see the module docstring), part of the bytes.
    """

    weights: np.ndarray
    bias: np.ndarray
    steps: int
    format: int = STACKING_FORMAT

    def encode(self, header: dict[str, object]) -> bytes:
        """Canonical bytes: one JSON line (``header``, shapes, format), then the little-endian float64 arrays."""
        s, c = self.weights.shape
        head = {**header, "format": self.format, "shards": s, "classes": c, "steps": self.steps, "l2": L2}
        line = json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        return line + self.weights.astype("<f8").tobytes() + self.bias.astype("<f8").tobytes()

    @staticmethod
    def decode(blob: bytes) -> tuple[Stacker, dict[str, object]]:
        """The stacker and the header of bytes from :meth:`encode`.

        Raises:
            IntegrityError: If the bytes are not a combiner of this format.
        """
        line, sep, body = blob.partition(b"\n")
        try:
            head = json.loads(line)
            s, c = int(head["shards"]), int(head["classes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"the stored combiner cannot be decoded: {exc}") from exc
        if not sep or head.get("format") not in FORMATS or len(body) != 8 * (s * c + c):
            raise IntegrityError("the stored combiner has an unknown format or the wrong size")
        values = np.frombuffer(body, dtype="<f8").astype(np.float64)
        weights, bias = values[: s * c].reshape(s, c), values[s * c :].copy()
        return Stacker(weights, bias, int(head["steps"]), int(head["format"])), head


def log_probs(logits: torch.Tensor) -> np.ndarray:
    """``(S, n, C)`` logits as the float64 clipped log-probabilities the combiner reads."""
    out = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1).clamp_min(LOGP_FLOOR)
    return out.numpy()


def _objective(z: np.ndarray, y: np.ndarray, theta: np.ndarray, prior: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy plus the L2 penalty, and the class probabilities. ``theta``: ``(C, S+1)``."""
    logits = np.einsum("nck,ck->nc", z, theta)
    logits -= logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(axis=1))
    nll = float((log_norm - logits[np.arange(len(y)), y]).mean())
    proba = np.exp(logits - log_norm[:, None])
    return nll + 0.5 * L2 * float(((theta - prior) ** 2).sum()), proba


def fit_stacker(logp: np.ndarray, y: np.ndarray, fmt: int = STACKING_FORMAT) -> Stacker:
    """Fit the weights on per-shard log-probabilities of labelled samples (the core set).

    Args:
        logp: ``(S, n, C)`` float64 from :func:`log_probs`.
        y: ``(n,)`` integer labels in ``[0, C)``.
        fmt: The format to fit in (one of :data:`FORMATS`): how the Hessian is summed.

    Returns:
        The fitted stacker.

    Raises:
        DataError: If there are no samples, or labels outside ``[0, C)``.
        IntegrityError: If ``fmt`` is not a known format.
    """
    if fmt not in FORMATS:
        raise IntegrityError(f"unknown combiner format {fmt!r}; this sisa fits formats {FORMATS}")
    s, n, c = logp.shape
    y = np.asarray(y, dtype=np.int64)
    if n == 0 or y.shape != (n,) or y.min() < 0 or y.max() >= c:
        raise DataError(f"the combiner needs labelled core samples with labels in [0, {c}); got {n} sample(s)")
    # Per class c, the features of sample n are (log p_1(c), ..., log p_S(c), 1); theta[c] their weights.
    z = np.concatenate([logp.transpose(1, 2, 0), np.ones((n, c, 1))], axis=2)  # (n, C, S+1)
    prior = np.concatenate([np.full((c, s), 1.0 / s), np.zeros((c, 1))], axis=1)
    theta = prior.copy()
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    loss, proba = _objective(z, y, theta, prior)
    steps = 0
    for steps in range(1, _MAX_STEPS + 1):  # noqa: B007 - the count is recorded
        grad = np.einsum("nc,nck->ck", proba - onehot, z) / n + L2 * (theta - prior)
        if np.abs(grad).max() < _TOLERANCE:
            steps -= 1
            break
        hessian = _hessian(z, proba, n) if fmt == 1 else _hessian_mm(z, proba, n)
        # torch's LAPACK, not numpy's: it runs on torch's intra-op threads, which the caller pins
        # (numpy's BLAS picks its own thread count per machine, and so its own rounding).
        step = torch.linalg.solve(torch.from_numpy(hessian), torch.from_numpy(grad.ravel())).numpy()
        step = step.reshape(theta.shape)
        theta, loss, proba = _line_search(z, y, theta, prior, loss, grad, step)
    return Stacker(theta[:, :s].T.copy(), theta[:, s].copy(), steps, fmt)


def _hessian_mm(z: np.ndarray, proba: np.ndarray, n: int) -> np.ndarray:
    """:func:`_hessian` as matrix products on torch's (pinned) BLAS threads: format 2."""
    c, k = z.shape[1], z.shape[2]
    weighted = torch.from_numpy(proba[:, :, None] * z)  # (n, C, K)
    flat = weighted.reshape(n, c * k)
    h = -(flat.T @ flat)  # [c*K + i, d*K + j] = -sum_n w[n, c, i] w[n, d, j]
    # Per class, sum_n w[n, c, i] z[n, c, j]: one batched product over the classes.
    diagonal = torch.bmm(weighted.permute(1, 2, 0), torch.from_numpy(z).permute(1, 0, 2))  # (C, K, K)
    for cls in range(c):
        h[cls * k : (cls + 1) * k, cls * k : (cls + 1) * k] += diagonal[cls]
    return (h / n + L2 * torch.eye(c * k, dtype=torch.float64)).numpy()


def _hessian(z: np.ndarray, proba: np.ndarray, n: int) -> np.ndarray:
    """The loss's Hessian over ``theta`` (flattened class-major), penalty included: format 1 (numpy's loops)."""
    c, k = z.shape[1], z.shape[2]
    weighted = proba[:, :, None] * z  # (n, C, K)
    h = -np.einsum("nci,ndj->cidj", weighted, weighted)
    diagonal = np.einsum("nci,ncj->cij", weighted, z)
    for cls in range(c):
        h[cls, :, cls, :] += diagonal[cls]
    h = h.reshape(c * k, c * k) / n
    return h + L2 * np.eye(c * k)


def _line_search(
    z: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    prior: np.ndarray,
    loss: float,
    grad: np.ndarray,
    step: np.ndarray,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Backtracking (Armijo) along the Newton step: the loss is convex, so a full step is taken near the optimum."""
    slope = float((grad * step).sum())
    t = 1.0
    for _ in range(40):
        trial = theta - t * step
        new_loss, proba = _objective(z, y, trial, prior)
        if new_loss <= loss - 1e-4 * t * slope:
            return trial, new_loss, proba
        t *= 0.5
    return theta, *_objective(z, y, theta, prior)  # no decrease left in float64: stay


def apply_weights(logits: torch.Tensor, stacker: Stacker) -> torch.Tensor:
    """Ensemble probabilities ``(n, C)`` from shard logits ``(S, n, C)``, in float32 on the logits' device.

    Raises:
        DataError: If the logits' shards or classes differ from the stacker's.
    """
    s, _, c = logits.shape
    if stacker.weights.shape != (s, c):
        raise DataError(f"the combiner was fitted on {stacker.weights.shape} (shards, classes), got {(s, c)}")
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1).clamp_min(LOGP_FLOOR)
    w = torch.from_numpy(stacker.weights).to(logp.device)
    b = torch.from_numpy(stacker.bias).to(logp.device)
    return torch.softmax(torch.einsum("snc,sc->nc", logp, w) + b, dim=-1).to(torch.float32)
