"""Unlearning metrics on predicted probabilities: accuracy, loss, KL, ROC AUC and a loss-based MIA.

Everything here is plain numpy on arrays of class probabilities, so the same code scores a
monolithic model, an approximate unlearning method and a SISA ensemble alike. Definitions
and references are in ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MiaResult",
    "accuracy",
    "fit_logistic",
    "kl_divergence",
    "membership_inference",
    "per_sample_loss",
    "roc_auc",
]

# Probabilities are clipped here before a log: a model that puts exactly zero mass on the
# true class would otherwise give an infinite loss and poison every mean.
EPS = 1e-12


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose most probable class is the label.

    Args:
        proba: ``(n, classes)`` probabilities (or any scores).
        y: ``(n,)`` integer labels.

    Returns:
        Accuracy in ``[0, 1]``; ``nan`` for an empty set.
    """
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.argmax(proba, axis=1) == y))


def per_sample_loss(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each sample: ``-log p(y | x)``.

    Args:
        proba: ``(n, classes)`` probabilities.
        y: ``(n,)`` integer labels.

    Returns:
        ``(n,)`` float64 losses.
    """
    p = np.asarray(proba, dtype=np.float64)[np.arange(len(y)), y]
    return -np.log(np.clip(p, EPS, 1.0))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row KL divergence ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` in nats.

    Args:
        p: ``(n, classes)`` reference probabilities (the retrained model's).
        q: ``(n, classes)`` probabilities of the model under test.

    Returns:
        ``(n,)`` non-negative divergences; terms with ``p_k = 0`` contribute 0.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = np.clip(p, 0.0, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    # Clip q (not renormalised: that would shift every term by ~EPS) so a zero where p has
    # mass gives a large finite value; float rounding can still dip below 0, hence the max.
    q = np.clip(q, EPS, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability a random positive outscores a random negative.

    Computed exactly as the Mann-Whitney U statistic with average ranks, so ties count
    one half.

    Args:
        scores: ``(n,)`` real scores, higher meaning "more likely positive".
        labels: ``(n,)`` 0/1 labels.

    Returns:
        AUC in ``[0, 1]``; ``nan`` when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average the 1-based ranks over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-4, iters: int = 50) -> np.ndarray:
    """Fit an L2-regularised logistic regression by Newton's method.

    Args:
        x: ``(n, d)`` features (standardise them first: Newton steps assume a sane scale).
        y: ``(n,)`` 0/1 targets.
        l2: Ridge penalty on the weights (not the intercept); keeps separable data finite.
        iters: Maximum Newton iterations (it converges in well under 20 on one feature).

    Returns:
        ``(d + 1,)`` weights, intercept first.
    """
    x1 = np.c_[np.ones(len(x)), np.asarray(x, dtype=np.float64)]
    t = np.asarray(y, dtype=np.float64)
    w = np.zeros(x1.shape[1])
    penalty = np.full(x1.shape[1], l2 * len(x))
    penalty[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x1 @ w, -40, 40)))
        grad = x1.T @ (p - t) + penalty * w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


@dataclass(frozen=True)
class MiaResult:
    """Cross-validated membership-inference attack on per-sample loss.

    Attributes:
        accuracy: Mean held-out accuracy over folds (0.5 = chance on the balanced sets).
        auc: Mean held-out ROC AUC over folds, "member" as the positive class.
        samples_per_side: Samples drawn from each of the member and non-member sets.
        folds: Number of folds.
    """

    accuracy: float
    auc: float
    samples_per_side: int
    folds: int


def membership_inference(
    member_loss: np.ndarray,
    nonmember_loss: np.ndarray,
    *,
    folds: int = 5,
    max_samples: int = 5000,
    seed: int = 0,
) -> MiaResult:
    """The simple MIA of the unlearning literature: logistic regression on the loss.

    Both sets are subsampled to the same size (so chance is exactly 0.5), split into
    stratified folds, and a one-feature logistic regression trained on each fold's
    complement predicts membership on the fold.

    Args:
        member_loss: Losses of the candidate members (the forget set).
        nonmember_loss: Losses of samples the model never saw (held-out data).
        folds: Cross-validation folds.
        max_samples: At most this many samples per side.
        seed: Seed of the subsampling and fold split.

    Returns:
        The attack's mean held-out accuracy and AUC.

    Raises:
        ValueError: If a side has fewer samples than folds.
    """
    n = min(len(member_loss), len(nonmember_loss), max_samples)
    if n < folds:
        raise ValueError(f"membership inference needs at least {folds} samples per side, got {n}")
    rng = np.random.default_rng(seed)
    members = rng.choice(np.asarray(member_loss, dtype=np.float64), n, replace=False)
    others = rng.choice(np.asarray(nonmember_loss, dtype=np.float64), n, replace=False)
    # Stratified folds: each fold holds an equal share of both sides.
    fold_of = np.r_[rng.permutation(n) % folds, rng.permutation(n) % folds]
    feature = np.r_[members, others]
    label = np.r_[np.ones(n), np.zeros(n)]
    accs, aucs = [], []
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        mu, sd = feature[train].mean(), feature[train].std() or 1.0
        w = fit_logistic(((feature[train] - mu) / sd)[:, None], label[train])
        score = w[0] + w[1] * (feature[test] - mu) / sd
        accs.append(float(np.mean((score > 0) == label[test].astype(bool))))
        aucs.append(roc_auc(score, label[test]))
    return MiaResult(accuracy=float(np.mean(accs)), auc=float(np.mean(aucs)), samples_per_side=n, folds=folds)
