"""Forget sets and methods as ``sisa evaluate`` names them: parsing, the ids a spec selects, store names.

A forget set is ``random:FRACTION``, ``class:LABEL`` or a poisoning scenario
(``backdoor:...``, ``flip:...``, :mod:`sisa.evaluate.scenarios`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sisa.data.arrays import LabeledArrays
from sisa.errors import ConfigError, DataError
from sisa.evaluate.scenarios import SCENARIO_KINDS, Scenario, parse_scenario, poison

__all__ = [
    "METHODS",
    "ForgetSpec",
    "forget_ids",
    "parse_forget",
    "parse_methods",
    "refuse_repeats",
    "split_forgets",
    "store_names",
]

METHODS = ("retrain", "sisa", "gradient_ascent", "finetune", "prune", "newton")


@dataclass(frozen=True)
class ForgetSpec:
    """Which training samples to forget.

    Attributes:
        kind: ``random`` (a uniform random fraction), ``class`` (every sample of one label), or a
            poisoning scenario (``backdoor``, ``flip``: the training data is poisoned first and the
            forget set is the named share of the poisoned ids; see :mod:`sisa.evaluate.scenarios`).
        value: The fraction for ``random``, the label for ``class``, the poisoning rate for a scenario.
        scenario: The scenario's parameters (``None`` for ``random`` and ``class``).
    """

    kind: str
    value: float
    scenario: Scenario | None = None

    @property
    def name(self) -> str:
        """The spec as written on the command line, e.g. ``random:0.01`` or ``class:3``."""
        if self.scenario is not None:
            return self.scenario.name
        return f"{self.kind}:{int(self.value)}" if self.kind == "class" else f"{self.kind}:{self.value:g}"


def split_forgets(text: str) -> list[str]:
    """Split a comma-separated list of forget specs; commas inside a scenario's ``key=value`` list stay.

    ``"random:0.01,backdoor:rate=0.01,target=0"`` gives ``["random:0.01", "backdoor:rate=0.01,target=0"]``.
    """
    return [part for part in re.split(r",\s*(?=[A-Za-z_]+\s*:)", text) if part.strip()]


def parse_forget(text: str) -> ForgetSpec:
    """Parse ``random:FRACTION``, ``class:LABEL``, ``backdoor:KEY=VALUE,...`` or ``flip:KEY=VALUE,...``.

    Raises:
        ConfigError: Naming the bad spec and the accepted forms.
    """
    if text.strip().split(":", 1)[0] in SCENARIO_KINDS:
        scenario = parse_scenario(text)
        return ForgetSpec(scenario.kind, scenario["rate"], scenario)
    hint = (
        "use random:FRACTION (0 < FRACTION < 1, e.g. random:0.01), class:LABEL (e.g. class:3), "
        "backdoor:rate=R,target=T[,found=F][,patch=P] or flip:rate=R,from=A,to=B[,found=F]"
    )
    m = re.fullmatch(r"\s*(random|class):\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(f"forget set {text!r} is not understood; {hint}")
    kind, raw = m.groups()
    try:
        value = float(raw) if kind == "random" else int(raw)
    except ValueError:
        raise ConfigError(f"forget set {text!r}: {raw!r} is not a number; {hint}") from None
    if kind == "random" and not 0 < value < 1:
        raise ConfigError(f"forget set {text!r}: the fraction must be in (0, 1); {hint}")
    if kind == "class" and value < 0:
        raise ConfigError(f"forget set {text!r}: the label must be >= 0; {hint}")
    return ForgetSpec(kind, float(value))


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """Parse a comma-separated method list, keeping the canonical order.

    Raises:
        ConfigError: On an unknown or empty list.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip() for s in items if s.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in names)


def forget_ids(spec: ForgetSpec, train: LabeledArrays, num_classes: int, seed: int) -> np.ndarray:
    """The sorted ids of the forget set ``spec`` selects from ``train``.

    Args:
        spec: The forget-set spec.
        train: Training data.
        num_classes: Number of classes (bounds a ``class`` spec).
        seed: Seed of the random draw (the same seed always gives the same set).

    Returns:
        Sorted int64 ids.

    Raises:
        DataError: If the set would be empty or hold every sample.
    """
    if spec.scenario is not None:
        return poison(spec.scenario, train, num_classes, seed).named_ids
    if spec.kind == "class":
        label = int(spec.value)
        if label >= num_classes:
            raise DataError(f"forget set {spec.name}: label {label} is outside [0, {num_classes}); pick a valid class")
        ids = train.ids[train.y == label]
    else:
        n = int(round(spec.value * len(train)))
        rng = np.random.default_rng([seed, 0x5EED])
        ids = rng.choice(train.ids, size=n, replace=False) if n else train.ids[:0]
    if len(ids) == 0 or len(ids) == len(train):
        raise DataError(
            f"forget set {spec.name} selects {len(ids)} of {len(train)} training samples; "
            "it must leave both a forget set and a retain set: choose another fraction or class"
        )
    return np.sort(ids.astype(np.int64))


def refuse_repeats(forgets: Sequence[ForgetSpec]) -> None:
    """Refuse a forget set given twice: results and stores are keyed by its name, so one would replace the other.

    Two specs are the same forget set when their canonical names are (``random:0.01`` and
    ``random:1e-2``, ``class:3`` and ``class:03``).

    Raises:
        ConfigError: Naming the repeated set and how it was written.
    """
    seen: dict[str, ForgetSpec] = {}
    for spec in forgets:
        if spec.name in seen:
            raise ConfigError(
                f"forget set {spec.name} is given twice; each forget set is evaluated once "
                "(its results and its store are named after it): drop the repeated --forget"
            )
        seen[spec.name] = spec


def _slug(name: str) -> str:
    """A spec name as a directory name: ``backdoor:rate=0.01,...`` -> ``backdoor-rate-0.01-...``."""
    return re.sub(r"[^a-z0-9.]+", "-", name)


def store_names(names: Sequence[str]) -> dict[str, str]:
    """A directory name per forget set of one run, distinct for distinct names.

    The readable slug drops characters a directory name should not hold, so two names may map
    to the same text; those then get a short digest of the name itself appended, so every forget
    set (and every scenario's base) keeps its own store and none deletes another's.

    Args:
        names: The run's forget-set names (:attr:`ForgetSpec.name`), each once.

    Returns:
        Name -> directory-name part.
    """
    slugs = [_slug(n) for n in names]
    return {
        n: slug if slugs.count(slug) == 1 else f"{slug}-{hashlib.sha256(n.encode()).hexdigest()[:8]}"
        for n, slug in zip(names, slugs, strict=True)
    }
