r"""Benchmark the unlearn policies while deletions wait: what the ensemble serves, and how well.

One store is trained once (``configs/fashion_mnist.yaml``: MLP, S=8, R=4, all 60,000 images) and
copied once per policy (``exclude``, ``serve-clean``, ``serve-stale``; the copies are bit-identical
stores, so every policy starts from the same models). For each ``--waiting`` count K, the same K ids
(drawn uniformly, seeded) are journaled as deferred requests in every copy (``delete(defer=True)``),
and while they wait the script measures, per policy:

- shards in service, and the slices the served models were trained on (a clean interim model of
  stage r holds r of the R slices);
- test accuracy of the ensemble (``mean`` and ``weighted`` aggregation) on all 10,000 test images;
- whether any served checkpoint saw a waiting id (``serve-stale`` does, by design; the others must not).

Then ``apply()`` retrains every copy, and the final models must be identical across policies (the
policy changes what is served in the window, never the result). Writes a table, a JSON file and a
PNG beside it.

Run (about 3 minutes on 2 cores)::

    .venv/bin/python scripts/bench_policies.py --out docs/bench/policies.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import machine_info, pyplot, run_folder, save_figure, script_parser  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402

POLICIES = ("exclude", "serve-clean", "serve-stale")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--config", default="configs/fashion_mnist.yaml", help="sisa config")
    parser.add_argument("--waiting", default="1,4,16,64", help="comma-separated counts of waiting ids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the id draw")
    parser.add_argument("--out", type=Path, default=Path("results/policies.json"), help="JSON output")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary stores")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def served(ens: Ensemble, waiting_shards: set[int]) -> dict[str, Any]:
    """Shards in service and the slices their models hold, from the store's live records."""
    status = ens.status()
    live = [s for s in status["per_shard"] if s["live"]]
    return {
        "shards_in_service": len(live),
        "affected_in_service": sum(s["shard"] in waiting_shards for s in live),
        "slices_served": sum(int(s["live_stage"]) for s in live),
        "slices_total": status["shards"] * status["slices"],
    }


def places(ens: Ensemble, ids: list[int]) -> dict[int, int]:
    """Shard -> the first (0-based) slice holding one of ``ids``, read before they are deleted."""
    first: dict[int, int] = {}
    for shard, slice_ in ens.locate(ids).values():
        first[shard] = min(first.get(shard, slice_), slice_)
    return first


def saw_waiting(ens: Ensemble, first_slice: dict[int, int]) -> bool:
    """Whether a served model trained on a waiting id: stage r trained on slices 1..r (1-based)."""
    with ens.store.read() as txn:
        live = ens.store.live(txn)
    return any(shard in first_slice and record["stage"] > first_slice[shard] for shard, record in live.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; non-zero when a policy leaks or the final models differ."""
    args = parse_args(argv)
    counts = [int(k) for k in args.waiting.split(",")]
    cfg = load_config(args.config, args.overrides)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    info = machine_info()
    rows: list[dict[str, Any]] = []
    finals: dict[str, list[Any]] = {}
    ok = True
    with run_folder(args.workdir, "bench-policies-") as workdir:
        base = workdir / "base"
        with Ensemble.create(base, cfg) as ens:
            ens.ingest(train)
            t0 = time.perf_counter()
            ens.fit()
            fit_s = time.perf_counter() - t0
            before = {m: ens.score(test.x, test.y, method=m) for m in ("mean", "weighted")}
        print(f"trained S={cfg.shards} R={cfg.slices} on {len(train)} in {fit_s:.1f}s: {before}", flush=True)
        rng = np.random.default_rng(args.seed)
        for k in counts:
            ids = sorted(int(i) for i in rng.choice(train.ids, size=k, replace=False))
            for policy in POLICIES:
                path = workdir / f"{policy}-{k}"
                shutil.copytree(base, path)
                with Ensemble.open(path) as ens:
                    ens.reconfigure(load_config(args.config, [*args.overrides, f"unlearn.policy={policy}"]))
                    first_slice = places(ens, ids)
                    pending = ens.delete(ids, defer=True)
                    shards = {int(s) for s in pending["shards"]}
                    row: dict[str, Any] = {"waiting": k, "policy": policy, "affected_shards": len(shards)}
                    row.update(served(ens, shards))
                    row["leaks"] = saw_waiting(ens, first_slice)
                    if row["shards_in_service"]:
                        for m in ("mean", "weighted"):
                            row[f"acc_{m}"] = ens.score(test.x, test.y, method=m)
                    else:
                        row["acc_mean"] = row["acc_weighted"] = None
                    t0 = time.perf_counter()
                    ens.apply()
                    row["apply_s"] = time.perf_counter() - t0
                    row["acc_after"] = ens.score(test.x, test.y, method="mean")
                    finals.setdefault(str(k), []).append(
                        [(s["live_checkpoint"], s["live_weights"]) for s in ens.status()["per_shard"]]
                    )
                rows.append(row)
                shutil.rmtree(path, ignore_errors=True)
                acc = "-" if row["acc_mean"] is None else f"{row['acc_mean']:.4f}"
                print(
                    f"  K={k:>3} {policy:>11}: {row['shards_in_service']}/{cfg.shards} shards, "
                    f"{row['slices_served']}/{row['slices_total']} slices served, acc {acc}, leaks {row['leaks']}",
                    flush=True,
                )
                ok &= row["leaks"] == (policy == "serve-stale")
    same = all(all(f == v[0] for f in v) for v in finals.values())
    ok &= same
    result = {
        "script": "scripts/bench_policies.py",
        "command": " ".join([".venv/bin/python", "scripts/bench_policies.py", *(argv or sys.argv[1:])]),
        "config": args.config,
        "overrides": args.overrides,
        "shards": cfg.shards,
        "slices": cfg.slices,
        "train": len(train),
        "test": len(test),
        "fit_s": fit_s,
        "accuracy_before": before,
        "rows": rows,
        "final_models_identical_across_policies": same,
        "machine": info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"final models identical across policies: {same}; wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if ok else 1


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy and shards in service against the number of waiting ids, per policy."""
    plt = pyplot()

    fig, (acc, svc) = plt.subplots(1, 2, figsize=(10, 4))
    for k, policy in enumerate(POLICIES):
        sel = [r for r in result["rows"] if r["policy"] == policy]
        xs = [r["waiting"] for r in sel]
        acc.plot(
            xs, [r["acc_mean"] if r["acc_mean"] is not None else np.nan for r in sel], "o-", color=f"C{k}", label=policy
        )
        svc.plot(xs, [r["shards_in_service"] for r in sel], "o-", color=f"C{k}", label=policy)
    acc.axhline(result["accuracy_before"]["mean"], color="gray", linestyle="--", label="before the requests")
    acc.set_ylabel("test accuracy while deletions wait (mean)")
    svc.set_ylabel(f"shards in service (of {result['shards']})")
    for ax in (acc, svc):
        ax.set_xscale("log")
        ax.set_xlabel("waiting ids")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"{result['config']} S={result['shards']} R={result['slices']} n={result['train']}")


if __name__ == "__main__":
    sys.exit(main())
