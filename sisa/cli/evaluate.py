"""``sisa evaluate``: compare exact SISA deletion with retraining and approximate unlearning.

Prints one table row per (forget set, method), writes ``evaluation.json`` and (unless
``--no-plot``) ``evaluation.png`` into ``--out``; ``--json`` prints the JSON instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from sisa.cli.format import progress_bar, table
from sisa.config.loader import load_config
from sisa.evaluate.approximate import APPROXIMATE_METHODS
from sisa.evaluate.forgets import METHODS, ForgetSpec, parse_forget, parse_methods, refuse_repeats, split_forgets
from sisa.evaluate.harness import evaluate
from sisa.evaluate.plot import plot_evaluation, require_matplotlib
from sisa.evaluate.settings import EvaluateConfig, load_evaluate_config

__all__ = ["cmd_evaluate", "format_rows", "format_targets"]

_COLUMNS = (
    ("forget", "forget"),
    ("method", "method"),
    ("forget_accuracy", "forget acc"),
    ("retain_accuracy", "retain acc"),
    ("test_accuracy", "test acc"),
    ("mia_accuracy", "MIA acc"),
    ("mia_auc", "MIA AUC"),
    ("kl_forget", "KL forget"),
    ("kl_test", "KL test"),
    ("seconds", "seconds"),
)
# Shown only when some row has it (a poisoning scenario): the attack-success rate.
_ATTACK_COLUMN = ("attack_success", "ASR")


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The evaluation table as text (also used by ``scripts/bench_quality.py``).

    Args:
        rows: ``evaluate(...)["rows"]``.

    Returns:
        An aligned table.
    """

    def cell(value: Any, key: str) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}" if key == "seconds" else f"{value:.4f}"
        return str(value)

    columns = list(_COLUMNS)
    if any(r.get("attack_success") is not None for r in rows):
        columns.insert(columns.index(("mia_accuracy", "MIA acc")), _ATTACK_COLUMN)
    return table([title for _, title in columns], [[cell(r.get(k), k) for k, _ in columns] for r in rows])


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` when the evaluation could not compute it (``None``)."""
    return "n/a" if value is None else format(value, spec)


def _times(ratio: float | None) -> str:
    """A ratio as ``3.00x``, or ``n/a times`` when its denominator was zero (``None``)."""
    return "n/a times" if ratio is None else f"{ratio:.2f}x"


def format_targets(targets: dict[str, Any]) -> list[str]:
    """One line per forget set comparing SISA with the retrain references.

    A ratio whose denominator was zero (a retrain floor of exactly 0, no ensemble-vs-monolith gap) is
    ``None`` in ``evaluation.json`` and prints as ``n/a``.

    Args:
        targets: ``evaluate(...)["targets"]``: forget-set name -> the facts of ``evaluation._targets``
            (empty when ``sisa`` was not among the methods).

    Returns:
        The lines, without newlines.
    """
    lines = []
    for name, t in targets.items():
        if "attack_success" in t:
            asr = ", ".join(f"{m} {_num(v, '.4f')}" for m, v in t["attack_success"].items())
            lines.append(
                f"{name}: attack success {asr}; never-poisoned model {_num(t['attack_success_unpoisoned'], '.4f')}, "
                f"retrain {_num(t['attack_success_retrain'], '.4f')}"
                + (
                    f"; sisa before the deletion {_num(t['attack_success_before'], '.4f')}, after it "
                    f"{'bit-identical' if t['verified_equal_to_retrain'] else 'NOT bit-identical'} "
                    "to its shards retrained from scratch"
                    if "verified_equal_to_retrain" in t
                    else ""
                )
            )
        if "sisa_mia_auc" not in t:
            continue
        lo, hi = t["retrain_mia_auc_spread"]
        gap = t["sisa_test_accuracy_gap"]
        lines.append(
            f"{name}: sisa MIA AUC {_num(t['sisa_mia_auc'], '.4f')} vs retrain seed spread "
            f"[{_num(lo, '.4f')}, {_num(hi, '.4f')}] "
            f"({'inside' if t['sisa_mia_within_retrain_spread'] else 'outside'}); "
            f"KL(test) {_times(t['sisa_kl_test_over_floor'])} the retrain floor, "
            f"{_times(t['sisa_kl_test_over_family_gap'])} the ensemble-vs-monolith gap; "
            f"test accuracy gap {_num(None if gap is None else 100 * gap, '+.2f')} pp"
        )
    return lines


def _steps(settings: EvaluateConfig, forgets: list[ForgetSpec], methods: tuple[str, ...]) -> int:
    """Progress steps: per training group an original (and a SISA base); per spec its retrains and methods."""
    approximate = sum(m in APPROXIMATE_METHODS for m in methods)
    sisa = "sisa" in methods
    scenarios = [f.scenario for f in forgets if f.scenario is not None]
    groups = len(scenarios) + (len(scenarios) < len(forgets))
    unpoisoned = sum(sc["found"] < 1 for sc in scenarios)  # found=1 reuses the first retrain
    verify = sisa * len(scenarios)
    return groups * (1 + sisa) + unpoisoned + verify + len(forgets) * (settings.retrain_seeds + sisa + approximate)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation grid; print the table and write the JSON and PNG."""
    # One file, two layers: the ensemble's settings, and the harness's own `evaluate:` section.
    cfg = load_config(args.config, args.overrides)
    settings = load_evaluate_config(args.config, args.overrides)
    forgets = [parse_forget(part) for text in (args.forget or ["random:0.01"]) for part in split_forgets(text)]
    methods = parse_methods(args.methods or ",".join(METHODS))  # the parser stays light: its default is None
    if not args.no_plot:
        require_matplotlib()
    refuse_repeats(forgets)  # before the progress bar and any work
    out = Path(args.out)
    steps = _steps(settings, forgets, methods)
    with progress_bar(steps, "evaluating", unit="step") if not args.json else contextlib.nullcontext() as bar:

        def progress(message: str) -> None:
            if bar is not None:
                bar.set_description(message[:60])
                bar.update(1)

        result = evaluate(cfg, forgets, methods, out, address=args.address, progress=progress, settings=settings)
    (out / "evaluation.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    result["json"] = str(out / "evaluation.json")
    if not args.no_plot:
        result["plot"] = str(plot_evaluation(result, out / "evaluation.png"))
    if not args.json:
        print(format_rows(result["rows"]))
        for line in format_targets(result["targets"]):
            print(line)
        print(f"wrote {result['json']}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result
