r"""Benchmark the core-trained combiner against mean, vote and weighted aggregation, on the same stores.

For each S in ``--shards``: one store of Fashion-MNIST (``configs/fashion_mnist.yaml``, MLP recipe)
with a ``--core-fraction`` core set (a seeded draw) training a shared MLP backbone
(``backbone.source=core``) and a head per shard (``model.adapter=head``), under
``aggregate.method=combiner``. On its test set, in the same run: accuracy of ``mean``, ``vote``,
``weighted`` and ``combiner`` (``predict_proba(method=...)`` of the same live models, so the four
differ only in the aggregation), the combiner's refit seconds (the stored one dropped and
:func:`sisa.train.combiner.refit_live` timed: S forwards over the core set and the fit), and one
deletion of a seeded non-core id (``delete()`` wall, which includes the refit), after which the
four accuracies are measured again and ``verify`` (shards and the combiner's bytes) must pass.

Side by side on the same store (``stacker_fit_s``): the stacker's fit alone, on the live models'
core-set log-probabilities, in each stacking format (:data:`sisa.train.stacking.FORMATS`: how the
Newton Hessian is summed, numpy's loops in format 1, torch's BLAS in format 2), each the best of
``--repeats`` runs under the shards' thread count; their ratio and the largest weight difference
(the two formats reach the same optimum, in other bytes). The PNG plots those seconds against S.

The core samples are training samples of the shards too (each lies in one shard), so the
combiner is fitted partly on samples one shard trained on: the measured test accuracy says what
that costs; no number here is assumed.

Run (S in 8,16, 20k train / 10k test; a few minutes on 2 cores)::

    .venv/bin/python scripts/bench_combiner.py

Quick smoke run (3000 train / 1000 test, 2 epochs, S=4)::

    .venv/bin/python scripts/bench_combiner.py --quick --out results/bench_combiner_quick.json
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Let `python scripts/bench_combiner.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.train import combiner  # noqa: E402
from sisa.train.stacking import FORMATS, fit_stacker, log_probs  # noqa: E402
from sisa.train.trainer import deterministic  # noqa: E402

QUICK_OVERRIDES = ("data.train_limit=3000", "data.test_limit=1000", "train.epochs=2")
FULL_OVERRIDES = ("data.train_limit=20000", "data.test_limit=10000")
BACKBONE = ("backbone.source=core", "backbone.name=mlp", "backbone.hidden=[128]", "model.adapter=head")
AGGREGATIONS = ("mean", "vote", "weighted", "combiner")


def accuracies(ens: Ensemble, test: LabeledArrays) -> dict[str, float]:
    """Test accuracy of each aggregation of the same live models."""
    return {m: round(float((ens.predict(test.x, method=m) == test.y).mean()), 4) for m in AGGREGATIONS}


def one_store(shards: int, overrides: Sequence[str], train: LabeledArrays, test: LabeledArrays, **kw: Any) -> dict:
    """Build, measure, delete one id and measure again, for one S."""
    cfg = load_config(kw["config"], [*overrides, *BACKBONE, "aggregate.method=combiner", f"shards={shards}"])
    rng = np.random.default_rng(kw["seed"])
    core = np.sort(rng.choice(train.ids, size=max(1, int(len(train.ids) * kw["core_fraction"])), replace=False))
    victim = int(rng.choice(np.setdiff1d(train.ids, core)))
    with Ensemble.create(kw["workdir"] / f"s{shards}", cfg) as ens:
        ens.ingest(train.x, train.y, train.ids, core=core)
        t0 = time.perf_counter()
        ens.fit()
        fit_s = time.perf_counter() - t0
        before = accuracies(ens, test)
        ens.store.write(ens.store.drop_combiner)
        t0 = time.perf_counter()
        combiner.refit_live(ens.store, ens.config)
        refit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ens.delete([victim])
        delete_s = time.perf_counter() - t0
        after = accuracies(ens, test)
        verdict = ens.verify()
        formats = stacker_formats(ens, kw["repeats"])
    return {
        "shards": shards,
        "core": len(core),
        "fit_s": round(fit_s, 2),
        "combiner_refit_s": round(refit_s, 3),
        "delete_s": round(delete_s, 2),
        "accuracy": before,
        "accuracy_after_delete": after,
        "verify_ok": bool(verdict["ok"]),
        "combiner_verified": bool(verdict["combiner"]["ok"]),
        **formats,
    }


def stacker_formats(ens: Ensemble, repeats: int) -> dict[str, Any]:
    """Seconds of the stacker's fit in each format on this store's live core-set log-probabilities, side by side."""
    cfg = ens.config
    with ens.store.read() as txn:
        _, x, y = combiner.read_core(ens.store, cfg, txn)
        models, _ = combiner._live_models(ens.store, cfg, txn)
    threads = cfg.resources.threads_per_shard
    with deterministic(threads, torch.device("cpu")):
        logits, _ = combiner._core_logits([models[s].eval() for s in sorted(models)], torch.from_numpy(x))
        logp = log_probs(logits)
        seconds: dict[str, float] = {str(f): float("inf") for f in FORMATS}
        fits = {}
        for _ in range(repeats):
            for f in FORMATS:  # interleaved: a load change hits both formats alike
                t0 = time.perf_counter()
                fits[f] = fit_stacker(logp, y, f)
                seconds[str(f)] = min(seconds[str(f)], time.perf_counter() - t0)
    first, last = fits[FORMATS[0]], fits[FORMATS[-1]]
    return {
        "stacker_fit_s": {f: round(v, 4) for f, v in seconds.items()},
        "stacker_speedup": round(seconds[str(FORMATS[0])] / seconds[str(FORMATS[-1])], 2),
        "stacker_steps": {str(f): fit.steps for f, fit in fits.items()},
        "stacker_max_weight_diff": float(np.abs(first.weights - last.weights).max()),
        "stacker_threads": threads,
    }


def draw(rows: list[dict[str, Any]], path: Path) -> None:
    """The stacker's fit seconds per format against S (log scale)."""
    plt = benchlib.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    shards = [r["shards"] for r in rows]
    for f in FORMATS:
        ax.plot(shards, [r["stacker_fit_s"][str(f)] for r in rows], marker="o", label=f"format {f}")
    ax.set_xlabel("shards S")
    ax.set_ylabel("stacker fit (s, best of repeats)")
    ax.set_yscale("log")
    ax.set_xticks(shards)
    ax.legend()
    benchlib.save_figure(fig, path, "combiner: the stacker's Newton fit by format")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its JSON."""
    parser = benchlib.script_parser(__doc__, config=Path("configs/fashion_mnist.yaml"))
    parser.add_argument("--shards", default=None, help="shard counts, comma-separated (default 8,16; 4 with --quick)")
    parser.add_argument("--core-fraction", type=float, default=0.1, help="fraction of training ids in the core set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the core set and of the deleted id")
    parser.add_argument("--repeats", type=int, default=3, help="fits per stacking format (the best is kept)")
    benchlib.add_run_options(parser, out=Path("docs/bench/combiner.json"), quick_help="3000/1000 samples, S=4")
    args = parser.parse_args(argv)
    overrides = [*(QUICK_OVERRIDES if args.quick else FULL_OVERRIDES), *args.overrides]
    shard_counts = benchlib.parse_ints(benchlib.by_mode(args.shards, args.quick, "4", "8,16"), "shards")
    base = load_config(args.config, overrides)
    train, test = load_split(base.data, "train"), load_split(base.data, "test")
    rows = []
    with benchlib.run_folder(args.workdir, "bench_combiner-") as workdir:
        benchlib.start_ray()
        for s in shard_counts:
            kw = {
                "config": args.config,
                "seed": args.seed,
                "core_fraction": args.core_fraction,
                "workdir": workdir,
                "repeats": args.repeats,
            }
            rows.append(one_store(s, overrides, train, test, **kw))
            print(rows[-1], flush=True)
    result = {**benchlib.run_header(args.config, overrides, args.quick, base), "machine": benchlib.machine_info()}
    result["rows"] = rows
    benchlib.write_results(args.out, result, lambda png: draw(rows, png))


if __name__ == "__main__":
    main()
