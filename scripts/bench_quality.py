r"""Unlearning quality benchmark: every method on every forget set of Fashion-MNIST, one run.

Runs :func:`sisa.evaluate.harness.evaluate` (what ``sisa evaluate`` runs) on the full grid:
forget sets ``random:0.01``, ``random:0.1`` and ``class:3``; methods retrain, sisa,
gradient_ascent, finetune and prune, with the defaults chosen by
``scripts/sweep_baselines.py``. Writes ``docs/bench/quality.json``, ``docs/bench/quality.png``
and replaces the marked quality section of ``docs/benchmarks.md`` with the table and the
exact command.

Run:
    .venv/bin/python scripts/bench_quality.py               # full grid, about 10 minutes on 2 cores
    .venv/bin/python scripts/bench_quality.py --quick --no-doc   # smoke run
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
from benchlib import machine_info  # noqa: E402

from sisa.cli.evaluate import format_rows  # noqa: E402
from sisa.config.loader import load_config  # noqa: E402
from sisa.evaluate.forgets import METHODS, parse_forget, split_forgets  # noqa: E402
from sisa.evaluate.harness import evaluate  # noqa: E402
from sisa.evaluate.plot import plot_evaluation  # noqa: E402
from sisa.evaluate.settings import load_evaluate_config  # noqa: E402
from sisa.train import orchestrator  # noqa: E402

BEGIN, END = "<!-- bench_quality:begin -->", "<!-- bench_quality:end -->"
QUICK_OVERRIDES = ("data.train_limit=6000", "data.test_limit=1000", "train.epochs=2")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--config", type=Path, default=Path("configs/fashion_mnist.yaml"), help="YAML config")
    p.add_argument("--forget", default="random:0.01,random:0.1,class:3", help="comma-separated forget specs")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--retrain-seeds", type=int, default=5, help="retrains per forget set (spread and KL floor)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_quality"), help="SISA stores (replaced)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/quality.json"), help="JSON result (PNG beside it)")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-doc", action="store_true", help="do not touch the markdown file")
    p.add_argument("--quick", action="store_true", help="6,000 samples, 2 epochs (smoke run)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def markdown(result: dict[str, Any], command: str) -> str:
    """The benchmarks.md section: command, machine, table, targets."""
    m = result["machine"]
    lines = [
        BEGIN,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpus_usable']} usable CPUs, torch {m['torch']}, ray {m['ray']}, {m['date']}. "
        f"Wall time of the whole grid: {result['wall_seconds']:.0f} s. "
        f"Retrain seeds per forget set: {result['config']['evaluate']['retrain_seeds']}.",
        "",
        "Columns are defined in [metrics.md](metrics.md). `retrain` is the mean over the retrain seeds and its "
        "KL columns are the seed-to-seed floor; `original` is the model trained on everything, before unlearning; "
        "`seconds` is the wall time of the unlearning step (training time for `retrain`).",
        "",
        "```",
        format_rows(result["rows"]),
        "```",
        "",
        "| forget set | SISA MIA AUC | retrain seed spread | inside | KL(test) / floor | KL(forget) / floor "
        "| KL(test) / family gap | SISA test-accuracy gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in result["targets"].items():
        if not t:
            continue
        lo, hi = t["retrain_mia_auc_spread"]
        inside = "yes" if t["sisa_mia_within_retrain_spread"] else "no"
        lines.append(
            f"| {name} | {t['sisa_mia_auc']:.4f} | [{lo:.4f}, {hi:.4f}] | {inside} "
            f"| {t['sisa_kl_test_over_floor']:.2f}x | {t['sisa_kl_forget_over_floor']:.2f}x "
            f"| {t['sisa_kl_test_over_family_gap']:.2f}x "
            f"| {100 * t['sisa_test_accuracy_gap']:+.2f} pp |"
        )
    lines += ["", "![quality](bench/quality.png)", "", END]
    return "\n".join(lines)


def update_doc(doc: Path, section: str) -> None:
    """Replace the marked section of ``doc`` (append it under a heading the first time)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: section, text, flags=re.S)
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## Unlearning quality: SISA vs retraining vs approximate methods\n\n"
            + section
            + "\n"
        )
    doc.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [f"evaluate.retrain_seeds={args.retrain_seeds}", *args.overrides]
    if args.quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    cfg = load_config(args.config, overrides)
    settings = load_evaluate_config(args.config, overrides)
    forgets = [parse_forget(s) for s in split_forgets(args.forget)]
    info = machine_info()
    started = time.perf_counter()
    try:
        result = evaluate(
            cfg,
            forgets,
            args.methods.split(","),
            args.workdir,
            progress=lambda msg: print(msg, flush=True),
            settings=settings,
        )
    finally:
        orchestrator.shutdown()
    result["machine"] = info
    result["bench_wall_seconds"] = time.perf_counter() - started
    command = " ".join([".venv/bin/python", "scripts/bench_quality.py", *(argv if argv is not None else sys.argv[1:])])
    result["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    png = plot_evaluation(result, args.out.with_suffix(".png"))
    print(format_rows(result["rows"]))
    section = markdown(result, command)
    if not args.no_doc:
        update_doc(args.doc, section)
    print(f"wrote {args.out}, {png}" + ("" if args.no_doc else f" and {args.doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
