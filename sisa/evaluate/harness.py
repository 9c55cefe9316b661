"""The unlearning-evaluation harness: every method on the same data, forget set and architecture.

For each forget set it trains the gold standard (a monolithic model retrained without the
forget set, under several seeds), runs SISA's exact deletion on a trained ensemble and the
approximate baselines on a monolithic model trained on everything, and scores them all
(:mod:`sisa.evaluate.scoring`). The forget sets are :mod:`sisa.evaluate.forgets`, their
evaluation sets :mod:`sisa.evaluate.sets`, the report :mod:`sisa.evaluate.report`.
``docs/metrics.md`` defines each column and how to read it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
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
from sisa.errors import ConfigError
from sisa.evaluate.approximate import APPROXIMATE_METHODS, REPORT_ATTRIBUTE
from sisa.evaluate.forgets import METHODS, ForgetSpec, parse_methods, refuse_repeats, store_names
from sisa.evaluate.metrics import accuracy, kl_divergence
from sisa.evaluate.monolithic import train_monolithic, usable_threads
from sisa.evaluate.report import forget_set_sizes, ordered_rows
from sisa.evaluate.scoring import MethodRow, Scorer, model_fn, retrain_rows, summarise_retrains
from sisa.evaluate.sets import EvalSets, build_sets, subset
from sisa.evaluate.settings import EvaluateConfig

__all__ = ["evaluate"]

log = logging.getLogger(__name__)

Say = Callable[[str], None]
# Per forget spec: its scorer, the retrains' summary row, and the other methods' rows.
SpecRows = tuple[Scorer, MethodRow, list[MethodRow]]


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
        methods: Subset of :data:`~sisa.evaluate.forgets.METHODS`.
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
    _refuse(cfg, forgets)
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
    by_data: dict[int, list[EvalSets]] = {}
    for sets in all_sets:
        by_data.setdefault(id(sets.train), []).append(sets)
    groups = list(by_data.values())
    per_spec, group_info = _run_monolithic(cfg, groups, train, settings, methods, threads, say)
    # SISA runs last: Ray's worker processes would otherwise share the cores with the
    # monolithic timings above.
    if "sisa" in methods:
        folder = store_names([spec.name for spec in forgets])
        _run_sisa(cfg, groups, group_info, per_spec, train, test, workdir, folder, address, say)

    rows, targets = ordered_rows(per_spec, methods)
    first = group_info[0]  # the clean group when there is one (groups keep the order of the specs)
    return {
        "forget_sets": forget_set_sizes(groups, group_info),
        "methods": list(methods),
        "rows": [asdict(r) for r in rows],
        "targets": targets,
        "original_train_seconds": first["original_train_seconds"],
        "sisa_base": first.get("sisa_base", {}),
        "threads": threads,
        "wall_seconds": time.perf_counter() - started,
        "config": {**config_to_dict(cfg), "evaluate": config_to_dict(settings)},
    }


def _refuse(cfg: SisaConfig, forgets: Sequence[ForgetSpec]) -> None:
    """Refuse a run without forget sets, with a repeated one, or on a config with a shared backbone.

    Raises:
        ConfigError: Saying what to pass or set instead.
    """
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


def _run_monolithic(
    cfg: SisaConfig,
    groups: list[list[EvalSets]],
    train: LabeledArrays,
    settings: EvaluateConfig,
    methods: Sequence[str],
    threads: int,
    say: Say,
) -> tuple[list[SpecRows], list[dict[str, Any]]]:
    """Each group's original model, then each spec's retrains and monolithic methods; the rows and group times."""
    per_spec: list[SpecRows] = []
    group_info: list[dict[str, Any]] = []
    for members in groups:
        data = members[0].train
        label = "original" if data is train else f"original ({members[0].spec.name})"
        say(f"{label}: monolithic model on all {len(data)} samples")
        original, original_seconds = train_monolithic(cfg, data, seed=cfg.seed, threads=threads)
        group_info.append({"original_train_seconds": original_seconds})
        for sets in members:
            per_spec.append(_monolithic_rows(sets, original, original_seconds, cfg, settings, methods, threads, say))
    return per_spec, group_info


def _run_sisa(
    cfg: SisaConfig,
    groups: list[list[EvalSets]],
    group_info: list[dict[str, Any]],
    per_spec: list[SpecRows],
    train: LabeledArrays,
    test: LabeledArrays,
    workdir: Path,
    folder: dict[str, str],
    address: str | None,
    say: Say,
) -> None:
    """Train each group's SISA base, then delete each spec's forget set from a copy; rows go to ``per_spec``."""
    by_spec = {id(scorer.sets): (scorer, spec_rows) for scorer, _, spec_rows in per_spec}
    for info, members in zip(group_info, groups, strict=True):
        data = members[0].train
        base = workdir / ("sisa-base" if data is train else f"sisa-base-{folder[members[0].spec.name]}")
        say(f"sisa: {cfg.shards} shards x {cfg.slices} slices on {len(data)} samples")
        attack = members[0].attack if data is not train else None  # a scenario's group holds one spec
        info["sisa_base"], before_test, before_attack = _train_sisa_base(cfg, data, test, base, address, attack)
        for sets in members:
            scorer, spec_rows = by_spec[id(sets)]
            path = workdir / f"sisa-{folder[sets.spec.name]}"
            spec_rows.append(_sisa_row(scorer, base, before_test, path, address, say, before_attack))


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
    say: Say,
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


def _monolithic_rows(
    sets: EvalSets,
    original: nn.Module,
    original_seconds: float,
    cfg: SisaConfig,
    settings: EvaluateConfig,
    methods: Sequence[str],
    threads: int,
    say: Say,
) -> tuple[Scorer, MethodRow, list[MethodRow]]:
    """The retrains, the original, the never-poisoned model (scenarios) and the approximate methods."""
    scorer = Scorer(sets, cfg, settings)
    seeds = retrain_rows(scorer, cfg, threads, say)
    retrain = summarise_retrains(seeds)
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


def _unpoisoned_row(scorer: Scorer, first_retrain: MethodRow, cfg: SisaConfig, threads: int, say: Say) -> MethodRow:
    """A model never trained on poison: monolithic, seed ``cfg.seed``, on the training data minus every poisoned id.

    When the forget set names every poisoned id (``found=1``) that is exactly the first retrain,
    which is reused instead of trained again.
    """
    sets = scorer.sets
    assert sets.poisoned_ids is not None
    if len(sets.poisoned_ids) == len(sets.forget):
        return replace(first_retrain, method="unpoisoned", extra={**first_retrain.extra, "same_as_retrain": True})
    clean = subset(sets.train, ~np.isin(sets.train.ids, sets.poisoned_ids))
    say(f"{sets.spec.name}: unpoisoned model on {len(clean)} samples")
    model, seconds = train_monolithic(cfg, clean, seed=cfg.seed, threads=threads)
    return scorer.row("unpoisoned", scorer.probas(model_fn(model)), seconds, seed=cfg.seed, same_as_retrain=False)
