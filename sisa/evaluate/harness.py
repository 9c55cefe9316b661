"""The unlearning-evaluation harness: every method on the same data, forget set and architecture.

For each forget set it trains the gold standard (a monolithic model retrained without the
forget set, under several seeds), runs SISA's exact deletion on a trained ensemble and the
approximate baselines on a monolithic model trained on everything, and scores them all with
:mod:`sisa.evaluate.metrics`. ``docs/metrics.md`` defines each column and how to read it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sisa.config.fields import config_to_dict
from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.data.inputs import as_model_inputs
from sisa.data.loaders import load_split
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.evaluate.approximate import APPROXIMATE_METHODS, REPORT_ATTRIBUTE
from sisa.evaluate.metrics import accuracy, kl_divergence, membership_inference, per_sample_loss
from sisa.evaluate.monolithic import predict_proba, train_monolithic, usable_threads
from sisa.evaluate.scenarios import SCENARIO_KINDS, Scenario, attack_set, parse_scenario, poison
from sisa.evaluate.settings import EvaluateConfig

__all__ = [
    "METHODS",
    "EvalSets",
    "ForgetSpec",
    "MethodRow",
    "Scorer",
    "build_sets",
    "evaluate",
    "forget_ids",
    "model_fn",
    "parse_forget",
    "parse_methods",
    "refuse_repeats",
    "retrain_reference",
    "split_forgets",
    "store_names",
]

log = logging.getLogger(__name__)

METHODS = ("retrain", "sisa", "gradient_ascent", "finetune", "prune", "newton")
# Retain-set accuracy is estimated on at most this many retain samples: it moves little
# and a full pass costs as much as the rest of the scoring together.
RETAIN_EVAL_SAMPLES = 10_000

ProbaFn = Callable[[np.ndarray], np.ndarray]


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


def _subset(data: LabeledArrays, mask: np.ndarray) -> LabeledArrays:
    return LabeledArrays(x=data.x[mask], y=data.y[mask], ids=data.ids[mask])


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
    retain = _subset(train, ~in_forget)
    rng = np.random.default_rng([cfg.seed, 0xE7A1])
    keep = np.zeros(len(retain), dtype=bool)
    keep[rng.choice(len(retain), size=min(RETAIN_EVAL_SAMPLES, len(retain)), replace=False)] = True
    # For a class forget set the attack compares with test samples of that class: against the
    # whole test split it would only detect the label, which says nothing about membership.
    heldout = _subset(test, test.y == int(spec.value)) if spec.kind == "class" else test
    if len(heldout) == 0:
        raise DataError(f"forget set {spec.name}: the test split has no samples of that class to compare with")
    return EvalSets(
        spec, _subset(train, in_forget), retain, _subset(retain, keep), test, heldout, train, attack, poisoned_ids
    )


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
    return _summarise_retrains(_retrain_rows(scorer, cfg, threads, say))


def _retrain_rows(scorer: Scorer, cfg: SisaConfig, threads: int, say: Callable[[str], None]) -> list[MethodRow]:
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


def _summarise_retrains(rows: list[MethodRow]) -> MethodRow:
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


def _train_sisa_base(
    cfg: SisaConfig,
    train: LabeledArrays,
    test: LabeledArrays,
    path: Path,
    address: str | None,
    attack: LabeledArrays | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Train the ensemble every forget set starts from; its test and attack-set probabilities before any deletion."""
    if path.exists():
        shutil.rmtree(path)
    with Ensemble.create(path, cfg, address=address) as ens:
        ens.ingest(train)
        report = ens.fit()
        before_test = ens.predict_proba(test.x)
        before_attack = ens.predict_proba(attack.x) if attack is not None else None
    return {"fit_seconds": report.seconds, "train_compute_seconds": report.stage_seconds}, before_test, before_attack


def _sisa_row(
    scorer: Scorer,
    base: Path,
    before_test: np.ndarray,
    path: Path,
    address: str | None,
    say: Callable[[str], None],
    before_attack: np.ndarray | None = None,
) -> MethodRow:
    sets = scorer.sets
    if path.exists():
        shutil.rmtree(path)
    # Every forget set starts from the same trained ensemble: a copy of the closed base store.
    shutil.copytree(base, path, ignore=shutil.ignore_patterns("writer.lock", "lock.mdb"))
    with Ensemble.open(path, address=address) as ens:
        say(f"{sets.spec.name}: sisa deletes {len(sets.forget)} samples")
        started = time.perf_counter()
        cert = ens.delete(sets.forget.ids)
        seconds = time.perf_counter() - started
        p = scorer.probas(ens.predict_proba)
        scenario: dict[str, Any] = {}
        if sets.attack is not None and before_attack is not None:
            # The ASR claim rests on exactness: retrain every shard from scratch on what it holds
            # now (never the named ids) and compare bit for bit. Not part of the deletion's time.
            say(f"{sets.spec.name}: sisa verify (every shard retrained from scratch)")
            t0 = time.perf_counter()
            scenario = {
                "attack_success_before": accuracy(before_attack, sets.attack.y),
                "verified_equal_to_retrain": bool(ens.verify()["ok"]),
                "verify_seconds": time.perf_counter() - t0,
            }
    return scorer.row(
        "sisa",
        p,
        seconds,
        retrained_shards=cert.get("retrained_shards", []),
        test_accuracy_before=accuracy(before_test, sets.test.y),
        # Ensemble vs monolithic model when both saw the same data: the distance that the
        # model family alone explains, which exact unlearning cannot remove.
        family_gap_kl_test=(
            float(kl_divergence(scorer.original["test"], before_test).mean()) if scorer.original else None
        ),
        store=str(path),
        **scenario,
    )


def evaluate(
    cfg: SisaConfig,
    forgets: Sequence[ForgetSpec],
    methods: Sequence[str] = METHODS,
    workdir: str | Path = "runs/evaluate",
    *,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    settings: EvaluateConfig | None = None,
) -> dict[str, Any]:
    """Run every method on every forget set and score them.

    The retrain reference is always trained (KL and the attack's ideal value need it);
    ``retrain`` in ``methods`` only decides whether its row is reported. The model
    trained on everything is reported as ``original``.

    Args:
        cfg: Ensemble config: data, model and training recipe for every method.
        forgets: Forget-set specs.
        methods: Subset of :data:`METHODS`.
        workdir: Directory for the SISA stores (``sisa-base``, ``sisa-<forget>``), replaced
            on every run.
        address: Ray address for SISA training.
        progress: Called with a short description before each long step.
        settings: The harness's own settings, the config file's ``evaluate:`` section
            (:func:`sisa.evaluate.settings.load_evaluate_config`); ``None`` takes the defaults.

    Returns:
        ``{"rows": [...], "targets": {...}, "config": {...}, ...}``, JSON-able; ``config`` is
        ``cfg`` with ``settings`` as its ``evaluate`` section, the shape of the YAML file. A poisoning
        scenario trains its own original model and SISA base on its poisoned data; its
        ``forget_sets`` entry holds their times, and the top-level ``original_train_seconds``
        and ``sisa_base`` are those of the first group (the clean data's when a clean spec is given).

    Raises:
        ConfigError: On unknown methods, no forget set, or a config with a shared backbone.
        DataError: On a forget set that is empty or covers all data.
    """
    methods = parse_methods(list(methods))
    if not forgets:
        raise ConfigError("no forget set given; pass e.g. random:0.01, random:0.1 or class:3")
    if cfg.backbone.enabled:
        # Its retrain baselines train model.name whole, which is not the network a backbone ensemble runs.
        raise ConfigError(
            f"sisa evaluate compares SISA trained from scratch with retraining one model; this config shares a "
            f"backbone (backbone.source={cfg.backbone.source}). Measure it with scripts/bench_backbone.py, or set "
            "backbone.source=none model.adapter=none"
        )
    refuse_repeats(forgets)
    say = progress or (lambda msg: log.info("%s", msg))
    workdir = Path(workdir)
    settings = settings if settings is not None else EvaluateConfig()
    threads = usable_threads(settings.threads)
    # As model inputs (the loaders' floats already are): build_sets then keeps these very objects,
    # which the grouping below compares by identity.
    train, test = as_model_inputs(load_split(cfg.data, "train")), as_model_inputs(load_split(cfg.data, "test"))
    all_sets = [build_sets(spec, train, test, cfg) for spec in forgets]  # validate every spec before any work
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # Specs that train on the same data share the original model and the SISA base: the clean
    # specs form one group, each poisoning scenario its own (its training data is poisoned).
    groups: dict[int, list[EvalSets]] = {}
    for sets in all_sets:
        groups.setdefault(id(sets.train), []).append(sets)
    per_spec: list[tuple[Scorer, MethodRow, list[MethodRow]]] = []
    group_info: list[dict[str, Any]] = []
    for members in groups.values():
        data = members[0].train
        label = "original" if data is train else f"original ({members[0].spec.name})"
        say(f"{label}: monolithic model on all {len(data)} samples")
        original, original_seconds = train_monolithic(cfg, data, seed=cfg.seed, threads=threads)
        group_info.append({"original_train_seconds": original_seconds})
        for sets in members:
            per_spec.append(_monolithic_rows(sets, original, original_seconds, cfg, settings, methods, threads, say))

    # SISA runs last: Ray's worker processes would otherwise share the cores with the
    # monolithic timings above.
    if "sisa" in methods:
        by_spec = {id(scorer.sets): (scorer, spec_rows) for scorer, _, spec_rows in per_spec}
        folder = store_names([spec.name for spec in forgets])
        for info, members in zip(group_info, groups.values(), strict=True):
            data = members[0].train
            base = workdir / ("sisa-base" if data is train else f"sisa-base-{folder[members[0].spec.name]}")
            say(f"sisa: {cfg.shards} shards x {cfg.slices} slices on {len(data)} samples")
            attack = members[0].attack if data is not train else None  # a scenario's group holds one spec
            info["sisa_base"], before_test, before_attack = _train_sisa_base(cfg, data, test, base, address, attack)
            for sets in members:
                scorer, spec_rows = by_spec[id(sets)]
                path = workdir / f"sisa-{folder[sets.spec.name]}"
                spec_rows.append(_sisa_row(scorer, base, before_test, path, address, say, before_attack))

    order = {m: i for i, m in enumerate(("retrain", "unpoisoned", "original", *METHODS[1:]))}
    rows: list[MethodRow] = []
    targets: dict[str, Any] = {}
    for scorer, retrain, spec_rows in per_spec:
        shown = sorted(([retrain] if "retrain" in methods else []) + spec_rows, key=lambda r: order[r.method])
        for r in shown:
            r.extra["speedup_vs_retrain"] = retrain.seconds / r.seconds if r.seconds > 0 else None
        rows.extend(shown)
        targets[scorer.sets.spec.name] = _targets(retrain, spec_rows)

    forget_sets: dict[str, Any] = {}
    for info, members in zip(group_info, groups.values(), strict=True):
        for s in members:
            forget_sets[s.spec.name] = {"forget": len(s.forget), "retain": len(s.retain)}
            if s.poisoned_ids is not None:
                assert s.attack is not None
                forget_sets[s.spec.name].update(poisoned=len(s.poisoned_ids), attack_set=len(s.attack), **info)
    first = group_info[0]  # the clean group when there is one (groups keep the order of the specs)
    return {
        "forget_sets": forget_sets,
        "methods": list(methods),
        "rows": [asdict(r) for r in rows],
        "targets": targets,
        "original_train_seconds": first["original_train_seconds"],
        "sisa_base": first.get("sisa_base", {}),
        "threads": threads,
        "wall_seconds": time.perf_counter() - started,
        "config": {**config_to_dict(cfg), "evaluate": config_to_dict(settings)},
    }


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


def _monolithic_rows(
    sets: EvalSets,
    original: nn.Module,
    original_seconds: float,
    cfg: SisaConfig,
    settings: EvaluateConfig,
    methods: Sequence[str],
    threads: int,
    say: Callable[[str], None],
) -> tuple[Scorer, MethodRow, list[MethodRow]]:
    """The retrains, the original, the never-poisoned model (scenarios) and the approximate methods."""
    scorer = Scorer(sets, cfg, settings)
    seeds = _retrain_rows(scorer, cfg, threads, say)
    retrain = _summarise_retrains(seeds)
    scorer.original = scorer.probas(model_fn(original))
    spec_rows = [scorer.row("original", scorer.original, 0.0, train_seconds=original_seconds)]
    if sets.poisoned_ids is not None:
        spec_rows.append(_unpoisoned_row(scorer, seeds[0], cfg, threads, say))
    for name in methods:
        if name in APPROXIMATE_METHODS:
            say(f"{sets.spec.name}: {name}")
            t0 = time.perf_counter()
            model = APPROXIMATE_METHODS[name](
                original, sets.forget, sets.retain, cfg, seed=cfg.seed, threads=threads, settings=settings
            )
            seconds = time.perf_counter() - t0
            details = getattr(model, REPORT_ATTRIBUTE, {})
            spec_rows.append(scorer.row(name, scorer.probas(model_fn(model)), seconds, **details))
    return scorer, retrain, spec_rows


def _unpoisoned_row(
    scorer: Scorer, first_retrain: MethodRow, cfg: SisaConfig, threads: int, say: Callable[[str], None]
) -> MethodRow:
    """A model never trained on poison: monolithic, seed ``cfg.seed``, on the training data minus every poisoned id.

    When the forget set names every poisoned id (``found=1``) that is exactly the first retrain,
    which is reused instead of trained again.
    """
    sets = scorer.sets
    assert sets.poisoned_ids is not None
    if len(sets.poisoned_ids) == len(sets.forget):
        return replace(first_retrain, method="unpoisoned", extra={**first_retrain.extra, "same_as_retrain": True})
    clean = _subset(sets.train, ~np.isin(sets.train.ids, sets.poisoned_ids))
    say(f"{sets.spec.name}: unpoisoned model on {len(clean)} samples")
    model, seconds = train_monolithic(cfg, clean, seed=cfg.seed, threads=threads)
    return scorer.row("unpoisoned", scorer.probas(model_fn(model)), seconds, seed=cfg.seed, same_as_retrain=False)


def _targets(retrain: MethodRow, rows: Sequence[MethodRow]) -> dict[str, Any]:
    """The issue's targets for SISA, stated as measured facts (never pass/fail by fiat)."""
    sisa = next((r for r in rows if r.method == "sisa"), None)
    attack: dict[str, Any] = {}
    if retrain.attack_success is not None:
        unpoisoned = next(r for r in rows if r.method == "unpoisoned")
        attack = {
            "attack_success_retrain": retrain.attack_success,
            "attack_success_unpoisoned": unpoisoned.attack_success,
            "attack_success": {r.method: r.attack_success for r in rows},
        }
    if sisa is None:
        return attack
    lo, hi = retrain.extra["mia_auc_spread"]
    floor_f, floor_t = retrain.extra["kl_floor_forget"], retrain.extra["kl_floor_test"]
    gap = sisa.extra.get("family_gap_kl_test")
    return {
        "sisa_mia_auc": sisa.mia_auc,
        "retrain_mia_auc_spread": [lo, hi],
        "sisa_mia_within_retrain_spread": bool(lo <= sisa.mia_auc <= hi),
        "sisa_mia_distance_to_retrain_mean": abs(sisa.mia_auc - retrain.mia_auc),
        "sisa_kl_test_over_floor": sisa.kl_test / floor_t if floor_t > 0 else None,
        "sisa_kl_forget_over_floor": sisa.kl_forget / floor_f if floor_f > 0 else None,
        "sisa_test_accuracy_gap": retrain.test_accuracy - sisa.test_accuracy,
        "sisa_family_gap_kl_test": gap,
        "sisa_kl_test_over_family_gap": sisa.kl_test / gap if gap else None,
        **attack,
        **{k: sisa.extra[k] for k in ("attack_success_before", "verified_equal_to_retrain") if k in sisa.extra},
    }
