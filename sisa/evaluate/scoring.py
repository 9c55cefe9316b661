"""Scoring a method on one forget set against the reference retrain: its row of metrics, and the retrains' row.

``docs/metrics.md`` defines each column and how to read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.evaluate.metrics import accuracy, kl_divergence, membership_inference, per_sample_loss
from sisa.evaluate.monolithic import predict_proba, train_monolithic
from sisa.evaluate.sets import EvalSets
from sisa.evaluate.settings import EvaluateConfig

__all__ = ["MethodRow", "ProbaFn", "Scorer", "model_fn", "retrain_reference", "retrain_rows", "summarise_retrains"]

ProbaFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class MethodRow:
    """One method's scores on one forget set.

    Attributes:
        forget: Forget-set spec name.
        method: Method name (``original`` is the model before any unlearning).
        forget_accuracy: Accuracy on the forget set.
        retain_accuracy: Accuracy on (a sample of) the retain set.
        test_accuracy: Accuracy on the test split.
        mia_accuracy: Cross-validated accuracy of the loss-based attack, forget vs held-out.
        mia_auc: Its ROC AUC.
        kl_forget: Mean KL(retrain || method) on the forget set; for ``retrain`` the floor
            between the reference retrain and the other seeds.
        kl_test: The same on the test split.
        seconds: Wall time of the unlearning step (training time for ``retrain``).
        extra: Method-specific details (seed spreads, certificates, ...).
        attack_success: For a poisoning scenario, the attack-success rate on the test split
            (:func:`sisa.evaluate.scenarios.attack_set`); ``None`` otherwise.
    """

    forget: str
    method: str
    forget_accuracy: float
    retain_accuracy: float
    test_accuracy: float
    mia_accuracy: float
    mia_auc: float
    kl_forget: float
    kl_test: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    attack_success: float | None = None


class Scorer:
    """Scores models on one forget spec's sets against the reference retrain.

    :func:`retrain_reference` fills in the reference probabilities; every later
    :meth:`row` measures KL against them.
    """

    def __init__(self, sets: EvalSets, cfg: SisaConfig, settings: EvaluateConfig | None = None) -> None:
        """Score on ``sets`` with the attack settings of ``settings`` (default: :class:`EvaluateConfig`'s)."""
        self.sets = sets
        self.cfg = cfg
        self.settings = settings if settings is not None else EvaluateConfig()
        self.ref_forget: np.ndarray | None = None
        self.ref_test: np.ndarray | None = None
        # The monolithic model trained on everything, for SISA's family-gap reference.
        self.original: dict[str, np.ndarray] | None = None

    def probas(self, fn: ProbaFn) -> dict[str, np.ndarray]:
        """Probabilities of ``fn`` on the forget, retain-sample, test and held-out sets."""
        s = self.sets
        out = {"forget": fn(s.forget.x), "retain": fn(s.retain_eval.x), "test": fn(s.test.x)}
        out["heldout"] = out["test"] if s.heldout is s.test else fn(s.heldout.x)
        if s.attack is not None:
            out["attack"] = fn(s.attack.x)
        return out

    def row(self, method: str, p: dict[str, np.ndarray], seconds: float, **extra: Any) -> MethodRow:
        """Every metric of one method from its :meth:`probas`.

        Args:
            method: Row name.
            p: The method's probabilities.
            seconds: Wall time of its unlearning step.
            **extra: Stored in the row's ``extra``.

        Returns:
            The row.
        """
        s, ev = self.sets, self.settings
        mia = membership_inference(
            per_sample_loss(p["forget"], s.forget.y),
            per_sample_loss(p["heldout"], s.heldout.y),
            folds=ev.mia_folds,
            max_samples=ev.mia_samples,
            seed=self.cfg.seed,
        )
        assert self.ref_forget is not None and self.ref_test is not None
        return MethodRow(
            forget=s.spec.name,
            method=method,
            forget_accuracy=accuracy(p["forget"], s.forget.y),
            retain_accuracy=accuracy(p["retain"], s.retain_eval.y),
            test_accuracy=accuracy(p["test"], s.test.y),
            mia_accuracy=mia.accuracy,
            mia_auc=mia.auc,
            kl_forget=float(kl_divergence(self.ref_forget, p["forget"]).mean()),
            kl_test=float(kl_divergence(self.ref_test, p["test"]).mean()),
            seconds=seconds,
            extra=extra,
            attack_success=accuracy(p["attack"], s.attack.y) if s.attack is not None else None,
        )


def model_fn(model: nn.Module) -> ProbaFn:
    """The probability function of one torch model, for :meth:`Scorer.probas`."""
    return lambda x: predict_proba(model, x)


def retrain_reference(scorer: Scorer, cfg: SisaConfig, threads: int, say: Callable[[str], None]) -> MethodRow:
    """Train the retrains of ``scorer``'s forget set and set the first as its KL reference.

    ``scorer.settings.retrain_seeds`` retrains, seeds ``cfg.seed`` on.

    Returns:
        The summary ``retrain`` row (means over seeds, KL = seed-to-seed floor).
    """
    return summarise_retrains(retrain_rows(scorer, cfg, threads, say))


def retrain_rows(scorer: Scorer, cfg: SisaConfig, threads: int, say: Callable[[str], None]) -> list[MethodRow]:
    """Train the retrains (first = reference), returning one row per seed."""
    rows = []
    sets = scorer.sets
    for k in range(scorer.settings.retrain_seeds):
        say(f"{sets.spec.name}: retrain seed {cfg.seed + k} on {len(sets.retain)} samples")
        model, seconds = train_monolithic(cfg, sets.retain, seed=cfg.seed + k, threads=threads)
        p = scorer.probas(model_fn(model))
        if k == 0:
            scorer.ref_forget, scorer.ref_test = p["forget"], p["test"]
        rows.append(scorer.row("retrain", p, seconds, seed=cfg.seed + k))
    return rows


def summarise_retrains(rows: list[MethodRow]) -> MethodRow:
    """One ``retrain`` row: means over seeds; KL = the seed-to-seed floor; the spread in ``extra``."""
    others = rows[1:]

    def mean(attr: str, of: list[MethodRow] = rows) -> float:
        return float(np.mean([getattr(r, attr) for r in of]))

    aucs = [r.mia_auc for r in rows]
    asr = [r.attack_success for r in rows if r.attack_success is not None]
    return MethodRow(
        forget=rows[0].forget,
        method="retrain",
        forget_accuracy=mean("forget_accuracy"),
        retain_accuracy=mean("retain_accuracy"),
        test_accuracy=mean("test_accuracy"),
        mia_accuracy=mean("mia_accuracy"),
        mia_auc=mean("mia_auc"),
        kl_forget=mean("kl_forget", others),
        kl_test=mean("kl_test", others),
        seconds=mean("seconds"),
        extra={
            "seeds": [r.extra["seed"] for r in rows],
            "seconds_per_seed": [r.seconds for r in rows],
            "mia_auc_per_seed": aucs,
            "mia_auc_spread": [min(aucs), max(aucs)],
            "test_accuracy_per_seed": [r.test_accuracy for r in rows],
            "kl_floor_forget": mean("kl_forget", others),
            "kl_floor_test": mean("kl_test", others),
            **({"attack_success_per_seed": asr} if asr else {}),
        },
        attack_success=float(np.mean(asr)) if asr else None,
    )
