"""The ``evaluate:`` config section: hyperparameters of the unlearning-evaluation harness.

The section sits in the same YAML file as the ensemble's settings, but it is not part of
:class:`~sisa.config.settings.SisaConfig`: ``sisa.load_config`` sets it aside, so it never
reaches a store's meta or a shard's Ray task. :func:`load_evaluate_config` reads it from the
file (or a whole config mapping), with the same dotted overrides (``evaluate.mia_folds=3``).

The defaults of the approximate methods come from the sweep documented in
``docs/metrics.md`` (``scripts/sweep_baselines.py``), which selects on a validation
split carved from the training data, never on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sisa.config.loader import build_config, config_tree, read_config_file
from sisa.config.rules import choice, require
from sisa.errors import ConfigError

__all__ = [
    "NEWTON_SCOPES",
    "PRUNE_MODES",
    "EvaluateConfig",
    "FinetuneConfig",
    "GradientAscentConfig",
    "NewtonConfig",
    "PruneConfig",
    "evaluate_config_from_dict",
    "load_evaluate_config",
]

PRUNE_MODES = ("zero", "reinit")
NEWTON_SCOPES = ("head", "full")


def _check_steps(section: str, epochs: int, lr: float, batch_size: int) -> None:
    require(epochs >= 0, f"evaluate.{section}.epochs={epochs} must be >= 0")
    require(lr > 0 and math.isfinite(lr), f"evaluate.{section}.lr={lr} must be > 0 and finite")
    require(batch_size >= 1, f"evaluate.{section}.batch_size={batch_size} must be >= 1")


@dataclass(frozen=True)
class GradientAscentConfig:
    """Gradient ascent on the forget set, optionally with a retain-set descent term.

    Attributes:
        epochs: Passes over the forget set.
        lr: Learning rate (the train section's optimizer kind is used).
        retain_weight: Weight of the descent loss on a retain batch drawn beside every
            forget batch; 0 gives pure ascent.
        batch_size: Forget-set (and retain) batch size.
    """

    epochs: int = 1
    lr: float = 1e-4
    retain_weight: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_steps("gradient_ascent", self.epochs, self.lr, self.batch_size)
        require(self.retain_weight >= 0, f"evaluate.gradient_ascent.retain_weight={self.retain_weight} must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on the retain set only (forgetting by overwriting).

    Attributes:
        epochs: Passes over the retain set.
        lr: Learning rate.
        batch_size: Batch size.
    """

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_steps("finetune", self.epochs, self.lr, self.batch_size)


@dataclass(frozen=True)
class PruneConfig:
    """Saliency pruning of the weights that matter most to the forget set, then a retain-set repair.

    Attributes:
        fraction: Share of the weight-matrix entries to prune, chosen globally by
            first-order saliency ``|w * dL_forget/dw|``.
        mode: ``zero`` (pruned weights stay zero through the repair) or ``reinit``
            (they restart from a fresh initialisation and are trained by the repair).
        repair_epochs: Passes over the retain set after pruning.
        lr: Repair learning rate.
        batch_size: Repair batch size.
    """

    fraction: float = 0.05
    mode: str = "reinit"
    repair_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(0 < self.fraction < 1, f"evaluate.prune.fraction={self.fraction} must be in (0, 1)")
        choice("evaluate.prune.mode", self.mode, PRUNE_MODES)
        _check_steps("prune", self.repair_epochs, self.lr, self.batch_size)


@dataclass(frozen=True)
class NewtonConfig:
    """One Newton step on the L2-regularised retain loss (Guo et al. 2020; influence functions).

    The defaults are untuned (see ``docs/metrics.md``).

    Attributes:
        scope: ``head`` (the last ``nn.Linear`` on frozen features: a convex problem, the
            exact Hessian solved by Cholesky) or ``full`` (every parameter: Hessian-vector
            products solved by conjugate gradient, with ``damping``; not certified).
        l2: Strength ``lambda`` of the L2 term ``lambda/2 * ||w||^2`` added to the mean
            cross-entropy; > 0 makes the head's loss strongly convex.
        damping: Added to the Hessian's diagonal in ``full`` scope (the network's Hessian
            can be indefinite); ignored by ``head``.
        cg_iters: Most conjugate-gradient iterations in ``full`` scope.
        batch_size: Rows per forward/backward pass when summing gradients and Hessians.
    """

    scope: str = "head"
    l2: float = 1e-3
    damping: float = 1e-2
    cg_iters: int = 50
    batch_size: int = 4096

    def __post_init__(self) -> None:
        choice("evaluate.newton.scope", self.scope, NEWTON_SCOPES)
        require(
            self.l2 > 0 and math.isfinite(self.l2),
            f"evaluate.newton.l2={self.l2} must be > 0 and finite (it makes the loss strongly convex), e.g. 1e-3",
        )
        require(
            self.damping >= 0 and math.isfinite(self.damping),
            f"evaluate.newton.damping={self.damping} must be >= 0 and finite, e.g. 1e-2",
        )
        require(self.cg_iters >= 1, f"evaluate.newton.cg_iters={self.cg_iters} must be >= 1, e.g. 50")
        require(self.batch_size >= 1, f"evaluate.newton.batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``sisa evaluate`` (they never change how an ensemble trains).

    Attributes:
        retrain_seeds: Monolithic retrains without the forget set, seeds ``seed ..
            seed + n - 1``. The first is the reference; the others give the
            seed-to-seed floor of KL and the spread of the attack's score.
        mia_folds: Cross-validation folds of the membership-inference attack.
        mia_samples: At most this many samples per side (forget, held-out) in the attack.
        threads: Torch threads for the monolithic models (0 = every usable core).
        gradient_ascent: See :class:`GradientAscentConfig`.
        finetune: See :class:`FinetuneConfig`.
        prune: See :class:`PruneConfig`.
        newton: See :class:`NewtonConfig`.
    """

    retrain_seeds: int = 2
    mia_folds: int = 5
    mia_samples: int = 5000
    threads: int = 0
    gradient_ascent: GradientAscentConfig = field(default_factory=GradientAscentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    newton: NewtonConfig = field(default_factory=NewtonConfig)

    def __post_init__(self) -> None:
        require(
            2 <= self.retrain_seeds <= 16,
            f"evaluate.retrain_seeds={self.retrain_seeds} must be in [2, 16] (two give the seed-to-seed floor)",
        )
        require(2 <= self.mia_folds <= 20, f"evaluate.mia_folds={self.mia_folds} must be in [2, 20]")
        require(self.mia_samples >= 10, f"evaluate.mia_samples={self.mia_samples} must be >= 10")
        require(self.threads >= 0, f"evaluate.threads={self.threads} must be >= 0 (0 = every usable core)")


SECTION = "evaluate"


def evaluate_config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> EvaluateConfig:
    """The validated ``evaluate`` section of a whole config mapping.

    Args:
        raw: The whole config as found in a YAML file (``seed``, ``data``, ..., ``evaluate``);
            only its ``evaluate`` key is read, and a missing one gives the defaults.
        overrides: Dotted ``key=value`` strings, as for :func:`sisa.load_config`; those under
            ``evaluate.`` (or ``evaluate={...}``) apply, the others are left to ``load_config``.

    Returns:
        The frozen section.

    Raises:
        ConfigError: On an unknown key under ``evaluate`` (naming it and the allowed ones), a
            wrong type, or a value out of range.
    """
    tree = config_tree(raw, overrides)
    section = tree.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"{SECTION} must be a mapping of keys, got {section!r}")
    return build_config(EvaluateConfig, section, SECTION + ".")


def load_evaluate_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> EvaluateConfig:
    """Load the ``evaluate:`` section of a YAML config file (the one ``sisa.load_config`` reads).

    Args:
        source: The YAML file, or the whole config as a mapping; ``None`` starts from the defaults.
        overrides: Dotted ``key=value`` strings such as ``evaluate.mia_folds=3``; overrides of
            other sections are ignored here.

    Returns:
        The validated, frozen section.

    Raises:
        ConfigError: If the file is missing or not YAML, or the section holds bad keys or values.
    """
    raw = source if isinstance(source, Mapping) else read_config_file(source)
    return evaluate_config_from_dict(raw, overrides)
