"""The ``sisa`` command line: train, eval and status over a store directory.

Every command takes ``--json`` (one JSON object on stdout) and exits non-zero with a
one-line ``error:`` message on bad input; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sisa.config import config_from_dict, config_to_dict, load_config
from sisa.data import load_split
from sisa.ensemble import Ensemble
from sisa.errors import SisaError

__all__ = ["main"]

EXIT_ERROR = 2


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _evaluate(ens: Ensemble, method: str | None = None) -> dict[str, Any]:
    test = load_split(ens.config.data, "test")
    started = time.perf_counter()
    accuracy = ens.score(test.x, test.y, method=method)
    per_shard = ens.shard_scores(test.x, test.y)
    return {
        "accuracy": accuracy,
        "method": method or ens.config.aggregate.method,
        "per_shard_accuracy": {str(k): v for k, v in per_shard.items()},
        "test_samples": len(test),
        "eval_seconds": time.perf_counter() - started,
    }


def _print_eval(result: dict[str, Any]) -> None:
    rows = [[f"shard {k}", f"{v:.4f}"] for k, v in result["per_shard_accuracy"].items()]
    rows.append([f"ensemble ({result['method']})", f"{result['accuracy']:.4f}"])
    print(_table(["model", "test accuracy"], rows))


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, disable=not sys.stderr.isatty() and None)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Create (or resume) a store, ingest the configured training data, train, evaluate."""
    started = time.perf_counter()
    store = Path(args.store)
    if (store / "data.mdb").exists():
        ens = Ensemble.open(store, address=args.address)
        try:
            if args.config or args.overrides:
                # Overrides apply on top of the given file, or else on top of the stored config.
                new = (
                    load_config(args.config, args.overrides)
                    if args.config
                    else config_from_dict(config_to_dict(ens.config), args.overrides)
                )
                ens.reconfigure(new)
        except BaseException:
            ens.close()
            raise
    else:
        ens = Ensemble.create(store, load_config(args.config, args.overrides), address=args.address)
    with ens:
        ingested = 0
        if ens.feature_shape is None:
            ingested = ens.ingest(load_split(ens.config.data, "train"))
        cfg = ens.config
        bar = _progress_bar(cfg.shards * cfg.slices, "training") if not args.json else None
        report = ens.fit(progress=(lambda _r: bar.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        result = _evaluate(ens)
        result.update(
            {
                "store": str(store),
                "ingested": ingested,
                "trained": {str(k): v for k, v in report.trained.items()},
                "skipped": report.skipped,
                "fit_seconds": report.seconds,
                "train_compute_seconds": report.stage_seconds,
                "wall_seconds": time.perf_counter() - started,
            }
        )
    if not args.json:
        _print_eval(result)
        print(
            f"trained {sum(len(v) for v in report.trained.values())} stages on {len(report.trained)} shards "
            f"(skipped {len(report.skipped)} up-to-date), fit {result['fit_seconds']:.1f}s, "
            f"wall {result['wall_seconds']:.1f}s"
        )
    return result


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Ensemble and per-shard accuracy on the configured test split."""
    with Ensemble.open(args.store, readonly=True) as ens:
        result = _evaluate(ens, args.method)
    if not args.json:
        _print_eval(result)
    return result


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    """Shards, slices, sample counts and live checkpoint digests."""
    with Ensemble.open(args.store, readonly=True) as ens:
        result = ens.status()
    if not args.json:
        print(
            f"store {result['store']}: {result['samples']} samples, {result['shards']} shards x "
            f"{result['slices']} slices, model {result['model']}, {result['trained_shards']} shards live"
        )
        rows = [
            [
                s["shard"],
                s["samples"],
                " ".join(map(str, s["slice_samples"])),
                s["stages_done"],
                (s["live_checkpoint"] or "-")[:16],
            ]
            for s in result["per_shard"]
        ]
        print(_table(["shard", "samples", "per slice", "stages", "live checkpoint"], rows))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sisa`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", required=True, help="store directory of the ensemble")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    parser = argparse.ArgumentParser(prog="sisa", description="Exact machine unlearning with SISA training.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", parents=[common], help="ingest the configured data and train (or resume)")
    train.add_argument("--config", help="YAML config (e.g. configs/fashion_mnist.yaml)")
    train.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards=8 train.lr=0.01"
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", parents=[common], help="test accuracy of the ensemble and of each shard")
    ev.add_argument(
        "--method", choices=["mean", "vote", "weighted"], default=None, help="aggregation (default: config)"
    )
    ev.set_defaults(func=cmd_eval)

    st = sub.add_parser("status", parents=[common], help="shards, slices, sample counts, live checkpoints")
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sisa`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 on success, 2 on a sisa error.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except SisaError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
