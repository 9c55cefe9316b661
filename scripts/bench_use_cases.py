r"""Use cases: remove a backdoor and a flipped-label subgroup, for found = 1.0, 0.5 and 0.1.

Runs :func:`sisa.evaluate.harness.evaluate` (what ``sisa evaluate`` runs) once per poisoning spec on
Fashion-MNIST: the backdoor scenario (``backdoor:rate=0.01,target=0``: 1% of the images of
other classes get a 3x3 corner patch and the label 0) and the label-flip scenario
(``flip:rate=0.4,from=3,to=5``: 40% of the dresses relabelled sandal), each with the deletion
request naming ``found`` = 100%, 50% and 10% of the poisoned ids. Every method of the harness
runs on every spec: the monolithic retrain, SISA's exact deletion (checked bit for bit against
its shards retrained from scratch) and the approximate methods ``gradient_ascent``,
``finetune``, ``prune`` and ``newton``.

Writes ``docs/bench/use_cases.json`` (one row per scenario, ``found`` and method: clean test
accuracy, attack-success rate, the never-poisoned model's ASR, seconds, SISA's verified flag;
each spec's full ``evaluate`` result under ``evaluations``) and ``docs/bench/use_cases.png``
(per scenario, ASR and clean test accuracy per method and ``found``), and prints the markdown
table of ``docs/benchmarks.md``. Each spec's result is also kept in ``--workdir``; ``--resume``
reuses those of an interrupted run that used the same config, spec and methods.

The monolithic models train with ``evaluate.threads`` torch threads (0 = every usable core). On a
machine whose cores other work shares, pass ``evaluate.threads=1``: on 2 shared cores, 2 threads
made one 60,000-sample training take 48-82 s where another of the same size took 7 s (presumably
threads waiting for each other); with 1 thread they took 9-24 s.

Run:
    .venv/bin/python scripts/bench_use_cases.py evaluate.threads=1   # 6 evaluations, 12 min on 2 shared cores
    .venv/bin/python scripts/bench_use_cases.py --quick --out /tmp/uc.json   # smoke run
    .venv/bin/python scripts/bench_use_cases.py --replot        # table and PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import machine_info, script_parser  # noqa: E402

from sisa.config.fields import config_to_dict  # noqa: E402
from sisa.config.loader import load_config  # noqa: E402
from sisa.evaluate.forgets import METHODS, parse_forget, parse_methods  # noqa: E402
from sisa.evaluate.harness import evaluate  # noqa: E402
from sisa.evaluate.settings import EvaluateConfig, load_evaluate_config  # noqa: E402
from sisa.train import orchestrator  # noqa: E402

BACKDOOR = "backdoor:rate=0.01,target=0"
FLIP = "flip:rate=0.4,from=3,to=5"
FOUND = (1.0, 0.5, 0.1)
QUICK_OVERRIDES = ("data.train_limit=6000", "data.test_limit=1000", "train.epochs=2")
# Rows in the order of the table and the plot.
ORDER = ("unpoisoned", "original", "retrain", "sisa", "gradient_ascent", "finetune", "prune", "newton")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = script_parser(__doc__, Path("configs/fashion_mnist.yaml"))
    p.add_argument("--backdoor", default=BACKDOOR, help=f"backdoor spec without found= (default {BACKDOOR})")
    p.add_argument("--flip", default=FLIP, help=f"flip spec without found= (default {FLIP})")
    p.add_argument(
        "--found", default=",".join(f"{f:g}" for f in FOUND), help="comma-separated found shares (default 1,0.5,0.1)"
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default all)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_use_cases"), help="SISA stores, per-spec JSON")
    p.add_argument("--out", type=Path, default=Path("docs/bench/use_cases.json"), help="JSON result (PNG beside it)")
    p.add_argument("--resume", action="store_true", help="reuse per-spec results in --workdir (same config)")
    p.add_argument("--replot", action="store_true", help="no evaluation: table and PNG from --out")
    p.add_argument("--quick", action="store_true", help="6,000 samples, 2 epochs (smoke run)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def specs(args: argparse.Namespace) -> list[str]:
    """The canonical spec names to run, scenario-major, in ``--found`` order."""
    found = [float(f) for f in args.found.split(",") if f.strip()]
    return [parse_forget(f"{base},found={f:g}").name for base in (args.backdoor, args.flip) for f in found]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name)


def summary_rows(spec: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The use-case rows of one spec's :func:`evaluate` result.

    Args:
        spec: The canonical spec name.
        result: What :func:`evaluate` returned for that spec alone.

    Returns:
        One dict per method: scenario, found, method, test accuracy, ASR, the unpoisoned ASR,
        seconds and (``sisa``) the verified flag and the ensemble's ASR before the deletion.
    """
    scenario = parse_forget(spec).scenario
    assert scenario is not None
    target = result["targets"][spec]
    sizes = result["forget_sets"][spec]
    out = []
    for r in result["rows"]:
        if r["forget"] != spec:
            continue
        extra = r["extra"]
        out.append(
            {
                "scenario": scenario.kind,
                "spec": spec,
                "found": scenario["found"],
                "method": r["method"],
                "test_accuracy": r["test_accuracy"],
                "attack_success": r["attack_success"],
                "attack_success_unpoisoned": target["attack_success_unpoisoned"],
                "forget_accuracy": r["forget_accuracy"],
                "seconds": r["seconds"],
                "verified_equal_to_retrain": extra.get("verified_equal_to_retrain"),
                "attack_success_before": extra.get("attack_success_before"),
                "poisoned": sizes["poisoned"],
                "forget": sizes["forget"],
            }
        )
    return sorted(out, key=lambda row: ORDER.index(row["method"]))


def run_one(
    cfg: Any, settings: EvaluateConfig, spec: str, methods: tuple[str, ...], workdir: Path, resume: bool
) -> dict[str, Any]:
    """Evaluate one spec (or reuse its stored result with ``--resume``); store it in ``workdir``."""
    stored = workdir / f"{_slug(spec)}.json"
    config = {**config_to_dict(cfg), "evaluate": config_to_dict(settings)}
    key = {"config": config, "spec": spec, "methods": list(methods)}
    if resume and stored.exists():
        saved = json.loads(stored.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            print(f"{spec}: reusing {stored}", flush=True)
            return dict(saved["result"])
    started = time.perf_counter()
    result = evaluate(
        cfg,
        [parse_forget(spec)],
        methods,
        workdir / _slug(spec),
        progress=lambda msg: print(msg, flush=True),
        settings=settings,
    )
    print(f"{spec}: {time.perf_counter() - started:.0f} s", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps({"key": key, "result": result}, indent=1, sort_keys=True))
    return result


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per scenario: method x found, clean test accuracy / ASR; the verified flags under it."""
    lines: list[str] = []
    for kind in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == kind]
        founds = sorted({r["found"] for r in mine}, reverse=True)
        spec = mine[0]["spec"].rsplit(",found=", 1)[0].split(",patch=")[0]
        lines += [
            f"`{spec}` ({mine[0]['poisoned']} poisoned ids); each cell: clean test accuracy / ASR",
            "",
            "| method | " + " | ".join(f"found={f:g} ({_forget(mine, f)} named)" for f in founds) + " |",
            "|---|" + "---|" * len(founds),
        ]
        for method in ORDER:
            cells = []
            for f in founds:
                r = next((r for r in mine if r["method"] == method and r["found"] == f), None)
                cells.append("" if r is None else f"{_cell(r['test_accuracy'])} / {_cell(r['attack_success'])}")
            if any(cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        sisa = [r for r in mine if r["method"] == "sisa"]
        if sisa:
            lines += [
                "",
                "SISA: ASR before the deletion "
                + ", ".join(f"{_cell(r['attack_success_before'])} (found={r['found']:g})" for r in sisa)
                + "; after it bit-identical to its shards retrained from scratch: "
                + ", ".join(f"{r['verified_equal_to_retrain']} (found={r['found']:g})" for r in sisa)
                + ".",
            ]
        lines.append("")
    return "\n".join(lines)


def _forget(rows: list[dict[str, Any]], found: float) -> int:
    return int(next(r["forget"] for r in rows if r["found"] == found))


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per scenario two panels: ASR and clean test accuracy, one bar per method and ``found``.

    The dashed line is the never-poisoned model's ASR (the attack's base rate).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(len(kinds), 2, figsize=(13, 4.2 * len(kinds)), squeeze=False)
    colours = ("#1f4e79", "#4f8fcf", "#a9cbee")
    for i, kind in enumerate(kinds):
        mine = [r for r in rows if r["scenario"] == kind]
        founds = sorted({r["found"] for r in mine}, reverse=True)
        methods = [m for m in ORDER if m != "unpoisoned" and any(r["method"] == m for r in mine)]
        x = np.arange(len(methods))
        width = 0.8 / len(founds)
        spec = mine[0]["spec"].rsplit(",found=", 1)[0]
        for j, (key, label) in enumerate((("attack_success", "ASR"), ("test_accuracy", "clean test accuracy"))):
            ax = axes[i][j]
            for k, f in enumerate(founds):
                values = [
                    next((r[key] for r in mine if r["method"] == m and r["found"] == f), None) or 0.0 for m in methods
                ]
                bars = ax.bar(
                    x + (k - (len(founds) - 1) / 2) * width, values, width, color=colours[k % 3], label=f"found={f:g}"
                )
                if key == "attack_success":
                    ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            reference = next(r for r in mine if r["method"] == "unpoisoned")
            ax.axhline(reference[key], color="#d62728", ls="--", lw=1, label=f"unpoisoned ({reference[key]:.3f})")
            ax.set_xticks(x)
            ax.set_xticklabels(methods, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{spec}: {label}", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
            if key == "test_accuracy":
                low = min(r["test_accuracy"] for r in mine)
                ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["test_accuracy"] for r in mine) + 0.03))
            else:
                top = max(r["attack_success"] or 0.0 for r in mine)
                ax.set_ylim(0, min(1.1, max(0.1, 1.15 * top)))
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        result = json.loads(args.out.read_text())
    else:
        overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
        cfg = load_config(args.config, overrides)
        settings = load_evaluate_config(args.config, overrides)
        methods = parse_methods(args.methods)
        names = specs(args)
        info = machine_info()
        started = time.perf_counter()
        evaluations: dict[str, Any] = {}
        try:
            for spec in names:
                evaluations[spec] = run_one(cfg, settings, spec, methods, args.workdir, args.resume)
        finally:
            orchestrator.shutdown()
        argv_used = list(argv) if argv is not None else sys.argv[1:]
        result = {
            "command": " ".join([".venv/bin/python", "scripts/bench_use_cases.py", *argv_used]),
            "machine": info,
            "wall_seconds": time.perf_counter() - started,
            "config": {**config_to_dict(cfg), "evaluate": config_to_dict(settings)},
            "methods": list(methods),
            "specs": names,
            "rows": [row for spec in names for row in summary_rows(spec, evaluations[spec])],
            "evaluations": evaluations,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    png = plot(result["rows"], args.out.with_suffix(".png"))
    print(markdown_table(result["rows"]))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
