"""Poisoning scenarios of ``sisa evaluate``: a patch backdoor and a flipped-label subgroup.

A scenario poisons the training data *before* any model trains, then asks to forget a seeded
``found`` share of the poisoned ids. Everything here is a pure function of the data and the
seed, so a test can check exactly which rows changed. ``docs/metrics.md`` defines the specs and
the attack-success rate (ASR).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sisa.data.arrays import LabeledArrays
from sisa.errors import ConfigError, DataError

__all__ = [
    "SCENARIO_KINDS",
    "Poisoned",
    "Scenario",
    "attack_set",
    "parse_scenario",
    "poison",
    "stamp",
]

SCENARIO_KINDS = ("backdoor", "flip")
# key -> (integer?, required?, default); the order is the canonical spelling's.
_KEYS: dict[str, dict[str, tuple[bool, bool, float]]] = {
    "backdoor": {
        "rate": (False, True, 0.0),
        "target": (True, True, 0.0),
        "found": (False, False, 1.0),
        "patch": (True, False, 3.0),
    },
    "flip": {
        "rate": (False, True, 0.0),
        "from": (True, True, 0.0),
        "to": (True, True, 0.0),
        "found": (False, False, 1.0),
    },
}
_HINT = {
    "backdoor": "use backdoor:rate=R,target=T[,found=F][,patch=P], e.g. backdoor:rate=0.01,target=0,found=1.0",
    "flip": "use flip:rate=R,from=A,to=B[,found=F], e.g. flip:rate=0.05,from=3,to=5,found=1.0",
}


@dataclass(frozen=True)
class Scenario:
    """A parsed poisoning scenario.

    Attributes:
        kind: ``backdoor`` or ``flip``.
        params: ``(key, value)`` pairs in canonical order, defaults filled in.
    """

    kind: str
    params: tuple[tuple[str, float], ...]

    def __getitem__(self, key: str) -> float:
        """The value of ``key`` (``rate``, ``found``, ``target``, ...)."""
        return dict(self.params)[key]

    def label(self, key: str) -> int:
        """An integer parameter (a class or the patch size)."""
        return int(self[key])

    @property
    def name(self) -> str:
        """The canonical spelling, e.g. ``backdoor:rate=0.01,target=0,found=1,patch=3``."""
        return f"{self.kind}:" + ",".join(f"{k}={v:g}" for k, v in self.params)


def parse_scenario(text: str) -> Scenario:
    """Parse ``backdoor:KEY=VALUE,...`` or ``flip:KEY=VALUE,...``.

    Args:
        text: The spec.

    Returns:
        The scenario, defaults filled in.

    Raises:
        ConfigError: On an unknown, missing, repeated or out-of-range key, naming the fix.
    """
    kind, _, body = text.strip().partition(":")
    if kind not in _KEYS:
        raise ConfigError(f"scenario {text!r} is not understood; {_HINT['backdoor']} or {_HINT['flip']}")
    keys, hint = _KEYS[kind], _HINT[kind]
    given: dict[str, float] = {}
    for item in (s.strip() for s in body.split(",")):
        key, eq, raw = (p.strip() for p in item.partition("="))
        if not eq or key not in keys:
            raise ConfigError(f"{text!r}: {item!r} is not one of {', '.join(k + '=' for k in keys)}; {hint}")
        if key in given:
            raise ConfigError(f"{text!r}: {key} is given twice; {hint}")
        integer = keys[key][0]
        try:
            given[key] = float(int(raw)) if integer else float(raw)
        except ValueError:
            kind_word = "an integer" if integer else "a number"
            raise ConfigError(f"{text!r}: {key}={raw!r} is not {kind_word}; {hint}") from None
    missing = [k for k, (_, required, _) in keys.items() if required and k not in given]
    if missing:
        raise ConfigError(f"{text!r}: missing {', '.join(missing)}; {hint}")
    values = {k: given.get(k, default) for k, (_, _, default) in keys.items()}
    for key in ("rate", "found"):
        if not (0 < values[key] <= 1):
            raise ConfigError(f"{text!r}: {key}={values[key]:g} must be in (0, 1]; {hint}")
    for key in ("target", "from", "to"):
        if key in values and values[key] < 0:
            raise ConfigError(f"{text!r}: {key}={values[key]:g} must be a class label >= 0; {hint}")
    if kind == "backdoor" and values["patch"] < 1:
        raise ConfigError(f"{text!r}: patch={values['patch']:g} must be >= 1 (pixels per side); {hint}")
    if kind == "flip" and values["from"] == values["to"]:
        raise ConfigError(f"{text!r}: from and to are the same class, nothing would flip; {hint}")
    return Scenario(kind, tuple(values.items()))


def stamp(x: np.ndarray, patch: int, value: float) -> np.ndarray:
    """A copy of ``x`` with the trigger stamped: a ``patch`` x ``patch`` square set to ``value``.

    The square sits in the bottom-right corner of the last two axes (height, width), on every
    channel; every other entry is unchanged.

    Args:
        x: ``(n, ..., H, W)`` images.
        patch: Side of the square in pixels.
        value: The value written (the data's maximum: a bright patch).

    Returns:
        The stamped copy, same dtype.
    """
    out = np.array(x, copy=True)
    out[..., -patch:, -patch:] = value
    return out


@dataclass(frozen=True)
class Poisoned:
    """Training data after poisoning.

    Attributes:
        train: The poisoned training data (same ids and order as the clean data).
        poisoned_ids: Sorted ids whose sample was changed.
        named_ids: Sorted ids the deletion request names: a seeded ``found`` share of ``poisoned_ids``.
        trigger_value: The value the backdoor's patch writes (``nan`` for ``flip``).
    """

    train: LabeledArrays
    poisoned_ids: np.ndarray
    named_ids: np.ndarray
    trigger_value: float


def _check(sc: Scenario, data: LabeledArrays, num_classes: int) -> None:
    """Raise :class:`DataError` when ``sc`` cannot apply to ``data``."""
    for key in ("target", "from", "to"):
        if key in dict(sc.params) and sc.label(key) >= num_classes:
            raise DataError(
                f"{sc.name}: {key}={sc.label(key)} is not a class of this data (labels 0..{num_classes - 1}); "
                "pick a class in that range"
            )
    if sc.kind == "backdoor":
        shape = data.x.shape[1:]
        patch = sc.label("patch")
        if len(shape) < 2 or min(shape[-2:]) < patch:
            raise DataError(
                f"{sc.name}: the patch trigger needs image data (samples shaped (C, H, W) or (H, W) with H, W >= "
                f"{patch}); this data's samples are shaped {tuple(shape)}: use image data, a smaller patch=, "
                "or the flip: scenario"
            )


def poison(sc: Scenario, train: LabeledArrays, num_classes: int, seed: int) -> Poisoned:
    """Poison ``train`` as ``sc`` says and draw the ids the deletion request names.

    ``backdoor``: a seeded ``rate`` share of the samples whose label is not ``target`` get the
    trigger stamped and the label ``target``. ``flip``: a seeded ``rate`` share of class
    ``from`` is relabelled ``to`` (images unchanged).

    Args:
        sc: The scenario.
        train: Clean training data.
        num_classes: Number of classes.
        seed: Seed of both draws (same seed, same ids).

    Returns:
        The poisoned data and its ids.

    Raises:
        DataError: On a class outside the data, non-image data for a patch, or an empty draw.
    """
    _check(sc, train, num_classes)
    if sc.kind == "backdoor":
        pool = train.y != sc.label("target")
        to = sc.label("target")
    else:
        pool = train.y == sc.label("from")
        to = sc.label("to")
    candidates = train.ids[pool]
    n = int(round(sc["rate"] * len(candidates)))
    if n == 0:
        raise DataError(
            f"{sc.name}: rate={sc['rate']:g} of {len(candidates)} candidate samples poisons none; raise rate="
        )
    rng = np.random.default_rng([seed, 0xBAD])
    poisoned = np.sort(rng.choice(candidates, size=n, replace=False).astype(np.int64))
    k = max(1, int(round(sc["found"] * n)))
    named = np.sort(np.random.default_rng([seed, 0xF0D]).choice(poisoned, size=k, replace=False))
    if k == len(train):
        raise DataError(f"{sc.name}: the deletion request would name every training sample; lower rate=")
    rows = np.isin(train.ids, poisoned)
    x, y = train.x, train.y.copy()
    value = float("nan")
    if sc.kind == "backdoor":
        value = float(train.x.max())
        x = train.x.copy()
        x[rows] = stamp(train.x[rows], sc.label("patch"), value)
    y[rows] = to
    return Poisoned(LabeledArrays(x=x, y=y, ids=train.ids, scale=train.scale), poisoned, named, value)


def attack_set(sc: Scenario, test: LabeledArrays, trigger_value: float) -> LabeledArrays:
    """The test samples the attack is scored on, labelled with the attacker's wanted class.

    The accuracy of a model on this set is the attack-success rate. ``backdoor``: the test
    samples whose true class is not ``target``, trigger stamped, label ``target``. ``flip``:
    the test samples of class ``from``, label ``to``.

    Args:
        sc: The scenario.
        test: Clean test data.
        trigger_value: :attr:`Poisoned.trigger_value`.

    Returns:
        The attack set (empty when the test split has no such sample).
    """
    if sc.kind == "backdoor":
        target = sc.label("target")
        keep = test.y != target
        x = stamp(test.x[keep], sc.label("patch"), trigger_value)
        y = np.full(int(keep.sum()), target, dtype=test.y.dtype)
        return LabeledArrays(x=x, y=y, ids=test.ids[keep], scale=test.scale)
    keep = test.y == sc.label("from")
    y = np.full(int(keep.sum()), sc.label("to"), dtype=test.y.dtype)
    return LabeledArrays(x=test.x[keep], y=y, ids=test.ids[keep], scale=test.scale)
