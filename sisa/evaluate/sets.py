"""The evaluation sets of one forget spec: forget, retain, a retain sample, test, the attack's held-out set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.data.inputs import as_model_inputs
from sisa.errors import DataError
from sisa.evaluate.forgets import ForgetSpec, forget_ids
from sisa.evaluate.scenarios import attack_set, poison

__all__ = ["RETAIN_EVAL_SAMPLES", "EvalSets", "build_sets", "subset"]

# Retain-set accuracy is estimated on at most this many retain samples: it moves little
# and a full pass costs as much as the rest of the scoring together.
RETAIN_EVAL_SAMPLES = 10_000


def subset(data: LabeledArrays, mask: np.ndarray) -> LabeledArrays:
    """The samples of ``data`` where ``mask`` is true."""
    return LabeledArrays(x=data.x[mask], y=data.y[mask], ids=data.ids[mask])


@dataclass
class EvalSets:
    """The evaluation sets of one forget spec (built by :func:`build_sets`)."""

    spec: ForgetSpec
    forget: LabeledArrays
    retain: LabeledArrays
    retain_eval: LabeledArrays
    test: LabeledArrays
    heldout: LabeledArrays  # non-members for the attack, same label mix as the forget set
    train: LabeledArrays  # what every model of this spec trains on (poisoned for a scenario)
    attack: LabeledArrays | None = None  # a scenario's attack set: accuracy on it is the ASR
    poisoned_ids: np.ndarray | None = None  # every id a scenario poisoned (the forget set names a share)


def build_sets(spec: ForgetSpec, train: LabeledArrays, test: LabeledArrays, cfg: SisaConfig) -> EvalSets:
    """Split ``train`` into forget and retain sets and pick the attack's held-out set.

    For a poisoning scenario, ``train`` is poisoned first (:func:`sisa.evaluate.scenarios.poison`); the
    forget set is the named share of the poisoned ids, and ``attack`` the scenario's attack set.

    Args:
        spec: Forget-set spec.
        train: Clean training data.
        test: Test data (the attack's non-members; for ``class:K`` only its class-K samples).
        cfg: Config (seed, number of classes).

    Returns:
        The sets.

    Raises:
        DataError: On an empty or all-covering forget set, or no held-out samples.
    """
    # Model inputs from here on: the monolithic models are fed these arrays directly, and the
    # forget, retain and attack sets are cut from them (raw values with a scale would not be scaled).
    train, test = as_model_inputs(train), as_model_inputs(test)
    attack = poisoned_ids = None
    if spec.scenario is not None:
        poisoned = poison(spec.scenario, train, cfg.data.num_classes, cfg.seed)
        train, ids, poisoned_ids = poisoned.train, poisoned.named_ids, poisoned.poisoned_ids
        attack = attack_set(spec.scenario, test, poisoned.trigger_value)
        if len(attack) == 0:
            raise DataError(f"forget set {spec.name}: the test split has no samples to score the attack on")
    else:
        ids = forget_ids(spec, train, cfg.data.num_classes, cfg.seed)
    in_forget = np.isin(train.ids, ids)
    retain = subset(train, ~in_forget)
    rng = np.random.default_rng([cfg.seed, 0xE7A1])
    keep = np.zeros(len(retain), dtype=bool)
    keep[rng.choice(len(retain), size=min(RETAIN_EVAL_SAMPLES, len(retain)), replace=False)] = True
    # For a class forget set the attack compares with test samples of that class: against the
    # whole test split it would only detect the label, which says nothing about membership.
    heldout = subset(test, test.y == int(spec.value)) if spec.kind == "class" else test
    if len(heldout) == 0:
        raise DataError(f"forget set {spec.name}: the test split has no samples of that class to compare with")
    return EvalSets(
        spec, subset(train, in_forget), retain, subset(retain, keep), test, heldout, train, attack, poisoned_ids
    )
