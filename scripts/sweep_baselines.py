r"""Choose the approximate baselines' default hyperparameters by a small sweep on a validation split.

Never looks at the test split: a random ``--validation`` samples of the *training* split
play the role of test data (accuracy and the attack's non-members), and the forget sets
are drawn from the rest. For each forget set it trains the retrain reference once, runs
every grid point of every method on the same model-trained-on-everything, and scores it
with the harness's own metrics. The selection objective, lower is better, is

    |forget acc - retrain forget acc| + |MIA AUC - retrain MIA AUC| + max(0, retrain val acc - val acc)

averaged over the forget sets: land where the retrained model is, without paying in accuracy.

Run:
    .venv/bin/python scripts/sweep_baselines.py --config configs/fashion_mnist.yaml
writes ``docs/bench/sweep_baselines.json`` and prints the table that ``docs/metrics.md`` quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import machine_info  # noqa: E402

from sisa.config.fields import config_to_dict  # noqa: E402
from sisa.config.loader import load_config  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.evaluate.approximate import APPROXIMATE_METHODS  # noqa: E402
from sisa.evaluate.forgets import parse_forget  # noqa: E402
from sisa.evaluate.monolithic import train_monolithic, usable_threads  # noqa: E402
from sisa.evaluate.scoring import MethodRow, Scorer, model_fn, retrain_reference  # noqa: E402
from sisa.evaluate.sets import build_sets  # noqa: E402
from sisa.evaluate.settings import EvaluateConfig, load_evaluate_config  # noqa: E402

GRID: dict[str, dict[str, Sequence[Any]]] = {
    "gradient_ascent": {"lr": (1e-5, 1e-4, 1e-3), "epochs": (1, 3), "retain_weight": (0.0, 1.0)},
    "finetune": {"lr": (1e-4, 1e-3), "epochs": (1, 2, 4)},
    "prune": {"fraction": (0.01, 0.05, 0.2), "mode": ("zero", "reinit"), "repair_epochs": (1,)},
}
QUICK_GRID: dict[str, dict[str, Sequence[Any]]] = {
    "gradient_ascent": {"lr": (1e-4, 1e-3), "retain_weight": (1.0,)},
    "finetune": {"epochs": (1,)},
    "prune": {"fraction": (0.05,)},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--config", type=Path, default=Path("configs/fashion_mnist.yaml"), help="YAML config")
    p.add_argument("--forget", default="random:0.01,class:0", help="comma-separated forget specs")
    p.add_argument("--validation", type=int, default=10_000, help="training samples held out as validation")
    p.add_argument("--quick", action="store_true", help="6,000 samples and a 4-point grid (smoke run)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/sweep_baselines.json"), help="JSON result")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def split(train: LabeledArrays, n_val: int, seed: int) -> tuple[LabeledArrays, LabeledArrays]:
    """A seeded random validation split of the training data."""
    val = np.zeros(len(train), dtype=bool)
    val[np.random.default_rng([seed, 0x5A1]).choice(len(train), n_val, replace=False)] = True
    take = lambda m: LabeledArrays(train.x[m], train.y[m], train.ids[m])  # noqa: E731
    return take(~val), take(val)


def with_params(settings: EvaluateConfig, method: str, params: dict[str, Any]) -> EvaluateConfig:
    """``settings`` with ``<method>`` fields replaced (``evaluate.<method>`` in the config file)."""
    section = dataclasses.replace(getattr(settings, method), **params)
    return dataclasses.replace(settings, **{method: section})


def objective(row: MethodRow, retrain: MethodRow) -> float:
    """Distance to the retrained model (see the module docstring)."""
    return (
        abs(row.forget_accuracy - retrain.forget_accuracy)
        + abs(row.mia_auc - retrain.mia_auc)
        + max(0.0, retrain.test_accuracy - row.test_accuracy)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["data.train_limit=6000", "train.epochs=2"]
    cfg = load_config(args.config, overrides)
    settings = load_evaluate_config(args.config, overrides)
    grid = QUICK_GRID if args.quick else GRID
    n_val = min(args.validation, 1000) if args.quick else args.validation
    threads = usable_threads(settings.threads)
    started = time.perf_counter()
    train, val = split(load_split(cfg.data, "train"), n_val, cfg.seed)
    print(f"sweep: {len(train)} train, {len(val)} validation samples; forget {args.forget}", flush=True)
    original, _ = train_monolithic(cfg, train, seed=cfg.seed, threads=threads)
    points: list[dict[str, Any]] = []
    for spec in (parse_forget(s) for s in args.forget.split(",")):
        scorer = Scorer(build_sets(spec, train, val, cfg), cfg, settings)
        retrain = retrain_reference(scorer, cfg, threads, lambda m: print(m, flush=True))
        for method, axes in grid.items():
            for values in itertools.product(*axes.values()):
                params = dict(zip(axes, values, strict=True))
                tuned = with_params(settings, method, params)
                t0 = time.perf_counter()
                sets = scorer.sets
                model = APPROXIMATE_METHODS[method](
                    original, sets.forget, sets.retain, cfg, seed=cfg.seed, threads=threads, settings=tuned
                )
                seconds = time.perf_counter() - t0
                row = scorer.row(method, scorer.probas(model_fn(model)), seconds)
                points.append(
                    {
                        "forget": spec.name,
                        "method": method,
                        "params": params,
                        "objective": objective(row, retrain),
                        "row": dataclasses.asdict(row),
                        "retrain": {k: getattr(retrain, k) for k in ("forget_accuracy", "mia_auc", "test_accuracy")},
                    }
                )
                print(f"{spec.name:12s} {method:16s} {params} objective {points[-1]['objective']:.4f}", flush=True)

    best: dict[str, Any] = {}
    for method in grid:
        mean_obj: dict[str, tuple[float, dict[str, Any]]] = {}
        for p in (p for p in points if p["method"] == method):
            key = json.dumps(p["params"], sort_keys=True)
            mean_obj.setdefault(key, (0.0, p["params"]))
            mean_obj[key] = (mean_obj[key][0] + p["objective"], p["params"])
        n_specs = len(args.forget.split(","))
        key, (total, params) = min(mean_obj.items(), key=lambda kv: kv[1][0])
        best[method] = {"params": params, "mean_objective": total / n_specs}

    print("\n| method | chosen | mean objective |\n|---|---|---|")
    for method, b in best.items():
        print(f"| {method} | {', '.join(f'{k}={v}' for k, v in b['params'].items())} | {b['mean_objective']:.4f} |")
    result = {
        "command": " ".join(["python", "scripts/sweep_baselines.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "config": {**config_to_dict(cfg), "evaluate": config_to_dict(settings)},
        "validation_samples": len(val),
        "grid": {m: {k: list(v) for k, v in axes.items()} for m, axes in grid.items()},
        "points": points,
        "best": best,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out} in {result['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
