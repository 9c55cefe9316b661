r"""Benchmark distribution-aware sharding (SISA's Algorithm 1) and probability-ordered slices, side by side.

One run, one Ray instance with all cores, the same data, prior and deletion requests for every store:

1. **Prior**: a skewed deletion prior over the training ids: a random ``--hot-fraction``
   of them (5%) holds ``--hot-mass`` (90%) of the probability that a request names them,
   the rest share the remainder uniformly. It is written to a prior file (``.npz``), which
   the stores that use a prior read through ``partition.probabilities``.
2. **Requests**: ``--requests`` ids drawn from the prior (without replacement, seeded);
   then ``--cold-requests`` more drawn from the cold ids alone. Under distribution-aware
   sharding with the default bound the one large shard holds all cold ids and expects 1/S
   of the requests, so a short sequence may never touch it (20 draws at S=8 miss it with
   probability about 0.875^20 = 7%), yet those are its expensive requests: the extra cold
   requests measure them.
3. **Stores**, one per ``--arms`` entry, created, ingested and fitted one after the other:
   ``uniform``, ``distribution-aware`` (default bound C = total mass / S), and either with
   ``+ordered`` (``partition.slice_order: probability``: inside each shard the likeliest to
   be deleted go to the last slice). Per store: shard sizes and expected deletions per
   shard, ingest and fit times, test accuracy with ``mean``, ``weighted`` and ``vote``
   aggregation, and each shard model's own accuracy.
4. **Deletions**: each request is one ``Ensemble.delete([id])``, applied immediately,
   alternating between the stores (request i on every store in turn) so that load on the
   machine falls on all alike. Per request: samples retrained (the
   sum of ``n_samples`` over the retrained stages, found from the certificate's
   ``new_checkpoints``), sample-epochs, retrain compute, ``delete()`` wall time.
5. **Expectation under the prior**: the mean samples retrained per request that the
   initial layout implies (each id weighted by its probability, retraining its shard
   from its slice on), a noise-free companion to the few drawn requests. Every measured
   request is checked against the same formula on the layout of its moment (``exact``).
   The expected wall time is ``a + b * E[samples]`` with ``a``, ``b`` fitted (least
   squares) to the measured requests of that store.
6. **Ratios** of every store to the first one; then ``verify`` replays the shards
   of the last request in each store (must be bit-identical).

Wall times share the machine with whatever else runs on it; the two strategies alternate
request by request so both see the same load, and the ratios are the numbers to compare.

Writes a table to stdout, everything to a JSON file and a three-panel PNG beside it.

Full run (``configs/fashion_mnist.yaml``: MLP 784-128-10, S=8, R=4, all 60,000 images, 20
requests; about 5 minutes on 2 cores)::

    .venv/bin/python scripts/bench_sharding.py

Quick smoke run (6,000 train / 1,000 test samples, 2 epochs, 6 requests; well under a minute)::

    .venv/bin/python scripts/bench_sharding.py --quick

Probability-ordered slices against hashed ones, both strategies (about 10 minutes)::

    .venv/bin/python scripts/bench_sharding.py --out docs/bench/slice_order.json \
        --arms uniform,distribution-aware,uniform+ordered,distribution-aware+ordered

Trailing ``key=value`` arguments are config overrides, e.g. ``train.epochs=5``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Let `python scripts/bench_sharding.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.partition.assign import shard_masses  # noqa: E402
from sisa.partition.prior import write_prior  # noqa: E402

# Each arm: the partition overrides of its store ({prior} is the run's prior file). The first arm of
# a run is the baseline of its ratios.
ARMS = {
    "uniform": (),
    "distribution-aware": ("partition.strategy=distribution-aware", "partition.probabilities={prior}"),
    "uniform+ordered": ("partition.slice_order=probability", "partition.probabilities={prior}"),
    "distribution-aware+ordered": (
        "partition.strategy=distribution-aware",
        "partition.slice_order=probability",
        "partition.probabilities={prior}",
    ),
}
DEFAULT_ARMS = "uniform,distribution-aware"
QUICK_OVERRIDES = ("data.train_limit=6000", "data.test_limit=1000", "train.epochs=2")
QUICK_REQUESTS = 6
FULL_REQUESTS = 20
QUICK_COLD_REQUESTS = 2
FULL_COLD_REQUESTS = 6


# --------------------------------------------------------------------------- options
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): the prior, requests and arms, run options, trailing ``overrides``."""
    parser = benchlib.script_parser(__doc__, config=Path("configs/fashion_mnist.yaml"))
    benchlib.add_mode_option(
        parser, "--requests", kind=int, what="single-id deletion requests", full=FULL_REQUESTS, quick=QUICK_REQUESTS
    )
    benchlib.add_mode_option(
        parser,
        "--cold-requests",
        kind=int,
        what="extra requests drawn from the cold ids only",
        full=FULL_COLD_REQUESTS,
        quick=QUICK_COLD_REQUESTS,
    )
    parser.add_argument("--hot-fraction", type=float, default=0.05, help="fraction of ids that are often deleted")
    parser.add_argument("--hot-mass", type=float, default=0.9, help="share of the deletion mass those ids hold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior and of the request draw")
    parser.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help=f"comma-separated stores to compare, the first is the baseline (from: {', '.join(ARMS)}; "
        "'+ordered' adds partition.slice_order: probability)",
    )
    benchlib.add_run_options(
        parser,
        out=None,
        out_help="JSON output; the PNG goes beside it (default docs/bench/sharding.json; "
        "results/bench_sharding_quick.json with --quick)",
        workdir_help="folder for the temporary stores and prior (default: the system tempdir); they are removed",
        quick_help=f"smoke run: adds {' '.join(QUICK_OVERRIDES)}, {QUICK_REQUESTS} requests",
    )
    parser.add_argument(
        "--plot-only", type=Path, default=None, help="redraw the PNG beside this earlier JSON output, run nothing"
    )
    args = parser.parse_args(argv)
    if not 0 < args.hot_fraction < 1 or not 0 < args.hot_mass < 1:
        raise SystemExit("--hot-fraction and --hot-mass must lie strictly between 0 and 1")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or len(args.arms) < 2 or len(set(args.arms)) != len(args.arms):
        raise SystemExit(f"--arms={','.join(args.arms)}: give two or more distinct arms from {', '.join(ARMS)}")
    return args


# --------------------------------------------------------------------------- prior and requests
def skewed_prior(ids: np.ndarray, hot_fraction: float, hot_mass: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each id's probability of being the one a deletion request names.

    Args:
        ids: Training ids.
        hot_fraction: Fraction of ids drawn (seeded) to be "hot".
        hot_mass: Share of the total probability the hot ids hold, equally.
        seed: Seed of the draw.

    Returns:
        ``(p, hot)``: probabilities summing to 1, and the boolean mask of hot ids.
    """
    rng = np.random.default_rng([seed, 0])
    n_hot = max(1, round(hot_fraction * len(ids)))
    hot = np.zeros(len(ids), dtype=bool)
    hot[rng.choice(len(ids), size=n_hot, replace=False)] = True
    p = np.where(hot, hot_mass / n_hot, (1.0 - hot_mass) / (len(ids) - n_hot))
    return p, hot


def draw_requests(ids: np.ndarray, p: np.ndarray, k: int, seed: int) -> list[int]:
    """``k`` distinct ids drawn from the prior, in request order."""
    rng = np.random.default_rng([seed, 1])
    return [int(i) for i in rng.choice(ids, size=k, replace=False, p=p / p.sum())]


def draw_cold(ids: np.ndarray, hot: np.ndarray, k: int, taken: Sequence[int], seed: int) -> list[int]:
    """``k`` distinct cold ids not in ``taken``, drawn uniformly (the prior is flat over cold ids)."""
    pool = np.setdiff1d(ids[~hot], np.asarray(taken, dtype=np.int64))
    rng = np.random.default_rng([seed, 2])
    return [int(i) for i in rng.choice(pool, size=min(k, len(pool)), replace=False)]


# --------------------------------------------------------------------------- stores
def layout(ens: Ensemble) -> tuple[dict[int, tuple[int, int]], list[list[int]]]:
    """Where every sample lives now: id -> (shard, slice), and the samples per slice of each shard."""
    where: dict[int, tuple[int, int]] = {}
    sizes: list[list[int]] = []
    with ens.store.read() as txn:
        counts = ens.planner.slice_counts(txn)
        for shard in range(ens.config.shards):
            sizes.append([])
            for r in range(counts[shard]):
                ids = ens.store.slice_ids(txn, shard, r)
                sizes[-1].append(len(ids))
                where.update((i, (shard, r)) for i in ids.tolist())
    return where, sizes


def expected_retrain(
    where: dict[int, tuple[int, int]], sizes: list[list[int]], ids: np.ndarray, p: np.ndarray
) -> dict[str, float]:
    """Mean samples retrained per single-id request drawn from the prior, for this layout.

    Deleting an id in (0-based) slice r of a shard retrains stages r+1..R, and stage j
    trains on slices 1..j, so it costs ``sum_{j > r} |slices 1..j|`` samples (computed
    before the deletion; the measured stages hold one sample less).

    Returns:
        ``samples`` (the expectation) and ``share_of_full_retrain`` (over retraining every
        stage of every shard).
    """
    tails = []
    for shard_sizes in sizes:
        cum = np.cumsum(shard_sizes)
        tails.append(np.cumsum(cum[::-1])[::-1])  # tails[s][r] = sum over stages r+1..R of their samples
    cost = np.array([tails[where[i][0]][where[i][1]] for i in ids.tolist()], dtype=np.float64)
    expected = float((p / p.sum()) @ cost)
    full = float(sum(t[0] for t in tails if len(t)))
    return {"samples": expected, "share_of_full_retrain": expected / full}


def build(
    cfg: SisaConfig, train: LabeledArrays, test: LabeledArrays | None, path: Path
) -> tuple[Ensemble, dict[str, Any]]:
    """Create a store, ingest and fit; score it on ``test`` unless None.

    Returns:
        The open ensemble and its row: times, accuracies, per-shard sizes and accuracies.
    """
    ens, report, times = benchlib.build_and_fit(cfg, train, path)
    try:
        row: dict[str, Any] = {
            "strategy": cfg.partition.strategy,
            "slice_order": cfg.partition.slice_order,
            **times,
            "compute_s": report.stage_seconds,
        }
        if test is not None:
            for method in ("mean", "weighted", "vote"):
                row[f"acc_{method}"] = ens.score(test.x, test.y, method=method)
            row["shard_acc"] = [float(a) for _, a in sorted(ens.shard_scores(test.x, test.y).items())]
    except BaseException:
        ens.close()
        raise
    return ens, row


def stages_cost(sizes: Sequence[int], slice_: int) -> int:
    """Samples that retraining a shard with these slice sizes from (0-based) ``slice_`` on trains on."""
    return int(np.cumsum(sizes)[slice_:].sum())


def timed_delete(ens: Ensemble, sample_id: int, hot: bool, predicted: int) -> dict[str, Any]:
    """Delete one id (applied at once) and measure what it cost.

    Args:
        ens: A writable ensemble.
        sample_id: The id to forget.
        hot: Whether the prior counts it as often deleted.
        predicted: Samples the layout says the retrain must train on (checked: ``exact``).
    """
    cert, wall, cost = benchlib.applied_delete(ens, sample_id)
    # the work and compute from the certificate; samples and the checkpoint match from the store's records
    got = {key: cost[key] for key in ("samples", "work", "compute_s", "stages")}
    got["matches"] = cost["new_checkpoints_match"]
    return {
        "id": sample_id,
        "hot": hot,
        "shards": cert["retrained_shards"],
        "from_slice": [int(v["from_slice"]) for v in cert["shards"].values()],
        "wall_s": wall,
        "retrain_fit_s": float(cert["batch"]["retrain_seconds"]),
        **got,
        "predicted_samples": predicted,
        "exact": got["samples"] == predicted and got["matches"],
    }


def summarize(rows: list[dict[str, Any]], extra_cold: list[dict[str, Any]], expected: float) -> dict[str, Any]:
    """Mean and median of the drawn requests, hot and cold means, and the expected wall time.

    Args:
        rows: The requests drawn from the prior.
        extra_cold: The extra requests drawn from the cold ids.
        expected: Expected samples retrained per request under the prior.
    """
    out: dict[str, Any] = {}
    every = [*rows, *extra_cold]
    hot = [r for r in every if r["hot"]]
    cold = [r for r in every if not r["hot"]]
    for key in ("samples", "work", "compute_s", "wall_s"):
        values = [float(r[key]) for r in rows]
        out[key] = {
            "mean": statistics.fmean(values),
            "median": statistics.median(values),
            "max": max(values),
            "mean_hot": statistics.fmean(float(r[key]) for r in hot) if hot else None,
            "mean_cold": statistics.fmean(float(r[key]) for r in cold) if cold else None,
        }
    # Wall time is close to linear in the samples retrained (a fixed part: journal, Ray
    # dispatch, compaction; plus training), so its expectation follows from E[samples].
    b, a = np.polyfit([float(r["samples"]) for r in every], [float(r["wall_s"]) for r in every], 1)
    out["wall_fit"] = {"fixed_s": float(a), "s_per_sample": float(b), "expected_wall_s": float(a + b * expected)}
    out["overhead_s"] = {"median": statistics.median(r["wall_s"] - r["retrain_fit_s"] for r in every)}
    out["hot_requests"] = sum(r["hot"] for r in rows)
    out["cold_requests_measured"] = len(cold)
    out["all_exact"] = all(r["exact"] for r in every)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- report
def print_report(res: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]], n_requests: int) -> None:
    """The per-arm table and the ratios to the first arm."""
    header = (
        f"{'arm':<27} {'acc mean':>8} {'acc wtd':>8} {'acc vote':>8} {'fit_s':>6} {'E[samples]':>10} "
        f"{'samples mean':>12} {'median':>8} {'cold':>8} {'E[wall]':>7} {'wall mean':>9} {'median':>7} {'cold':>6}"
        "  shard sizes"
    )
    print(f"\n{n_requests} single-id requests drawn from the prior, each applied at once")
    print(header)
    print("-" * len(header))
    for name, r in res.items():
        s = r["summary"]
        cold_n, cold_w = s["samples"]["mean_cold"], s["wall_s"]["mean_cold"]
        cold_n_text = "n/a" if cold_n is None else f"{cold_n:.0f}"
        cold_w_text = "n/a" if cold_w is None else f"{cold_w:.2f}"
        print(
            f"{name:<27} {r['acc_mean']:>8.4f} {r['acc_weighted']:>8.4f} {r['acc_vote']:>8.4f} {r['fit_s']:>6.1f} "
            f"{r['expected']['samples']:>10.0f} {s['samples']['mean']:>12.0f} {s['samples']['median']:>8.0f} "
            f"{cold_n_text:>8} {s['wall_fit']['expected_wall_s']:>7.2f} "
            f"{s['wall_s']['mean']:>9.2f} {s['wall_s']['median']:>7.2f} {cold_w_text:>6}"
            f"  {r['shard_sizes']}"
        )
    print(
        "E[samples]: expectation under the prior, from the layout; E[wall]: fixed + per-sample fit at E[samples];\n"
        "samples/wall mean and median: the drawn requests; cold: mean over every cold request measured"
    )
    for name, arm_ratios in ratios.items():
        print(f"ratios {name} / {next(iter(res))}:")
        for key, value in arm_ratios.items():
            print(f"  {key:<28} {value:.3f}" if value is not None else f"  {key:<28} n/a")


def arm_ratios(arm: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """Every compared quantity of ``arm`` over the same of ``base``."""
    a, b = arm["summary"], base["summary"]
    return {
        "samples_mean": ratio(a["samples"]["mean"], b["samples"]["mean"]),
        "samples_median": ratio(a["samples"]["median"], b["samples"]["median"]),
        "samples_cold_mean": ratio(a["samples"]["mean_cold"], b["samples"]["mean_cold"]),
        "samples_expected_under_prior": ratio(arm["expected"]["samples"], base["expected"]["samples"]),
        "compute_mean": ratio(a["compute_s"]["mean"], b["compute_s"]["mean"]),
        "wall_mean": ratio(a["wall_s"]["mean"], b["wall_s"]["mean"]),
        "wall_median": ratio(a["wall_s"]["median"], b["wall_s"]["median"]),
        "wall_expected_under_prior": ratio(a["wall_fit"]["expected_wall_s"], b["wall_fit"]["expected_wall_s"]),
        "wall_cold_mean": ratio(a["wall_s"]["mean_cold"], b["wall_s"]["mean_cold"]),
        "acc_mean": ratio(arm["acc_mean"], base["acc_mean"]),
        "acc_weighted": ratio(arm["acc_weighted"], base["acc_weighted"]),
        "acc_vote": ratio(arm["acc_vote"], base["acc_vote"]),
        "fit_wall": ratio(arm["fit_s"], base["fit_s"]),
    }


def plot(res: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Three panels: shard sizes; samples retrained per request; delete() wall time per request."""
    plt = benchlib.pyplot()

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.4))
    width = 0.8 / len(res)
    for k, (name, r) in enumerate(res.items()):
        color = f"C{k}"
        shards = np.arange(len(r["shard_sizes"]))
        ax1.bar(shards + (k - (len(res) - 1) / 2) * width, r["shard_sizes"], width, color=color, label=name)
        rows = [*r["requests"], *r.get("cold_requests", [])]
        reqs = np.arange(1, len(rows) + 1)
        hot = np.array([q["hot"] for q in rows])
        for ax, key in ((ax2, "samples"), (ax3, "wall_s")):
            values = np.array([q[key] for q in rows], dtype=np.float64)
            ax.plot(reqs, values, "-", color=color, alpha=0.4, label=name)
            ax.plot(reqs[hot], values[hot], "o", color=color, label=f"{name}: hot id")
            ax.plot(reqs[~hot], values[~hot], "x", color=color, label=f"{name}: cold id")
        ax2.axhline(r["expected"]["samples"], color=color, linestyle=":", label=f"{name}: E under prior")
    ax1.set_yscale("log")
    ax1.set_xlabel("shard")
    ax1.set_ylabel("samples")
    ax1.set_title("Shard sizes")
    ax2.set_yscale("log")
    ax2.set_ylabel("samples retrained")
    ax2.set_title("Samples retrained per request")
    ax3.set_ylabel("seconds")
    ax3.set_title("delete() wall time per request")
    n_drawn = len(next(iter(res.values()))["requests"])
    for ax in (ax2, ax3):
        ax.set_xlabel(f"request (1-{n_drawn}: drawn from the prior; then extra cold ids)")
        ax.axvline(n_drawn + 0.5, color="gray", linestyle="--", linewidth=1)
    for ax in (ax1, ax2, ax3):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    benchlib.save_figure(fig, path, title)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    """Build the prior and requests, train both stores, run the requests, write JSON and PNG."""
    args = parse_args(argv)
    if args.plot_only is not None:
        old = json.loads(args.plot_only.read_text())
        title = old.get("title") or f"{old['config_path']} {' '.join(old['overrides'])} | {old['machine']['date']}"
        plot(old["results"], title, args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return
    n_requests = benchlib.by_mode(args.requests, args.quick, QUICK_REQUESTS, FULL_REQUESTS)
    n_cold = benchlib.by_mode(args.cold_requests, args.quick, QUICK_COLD_REQUESTS, FULL_COLD_REQUESTS)
    if n_requests < 1 or n_cold < 0:
        raise SystemExit(f"--requests={n_requests} must be >= 1 and --cold-requests={n_cold} >= 0")
    out = args.out or Path("results/bench_sharding_quick.json" if args.quick else "docs/bench/sharding.json")
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    base = load_config(args.config, overrides)
    info = benchlib.machine_info()
    print(f"config {args.config} overrides {overrides or '(none)'}; {n_requests} requests", flush=True)
    print(f"machine: {info['nproc']} cores ({benchlib.usable_cpus()} usable), torch {info['torch']}, ray {info['ray']}")
    train, test = load_split(base.data, "train"), load_split(base.data, "test")
    print(f"data: {len(train)} train, {len(test)} test samples of shape {train.feature_shape}", flush=True)
    p, hot = skewed_prior(train.ids, args.hot_fraction, args.hot_mass, args.seed)
    hot_of = dict(zip(train.ids.tolist(), hot.tolist(), strict=True))
    requests = draw_requests(train.ids, p, n_requests, args.seed)
    cold_requests = draw_cold(train.ids, hot, n_cold, requests, args.seed)
    print(
        f"prior: {int(hot.sum())} hot ids ({args.hot_fraction:.0%}) hold {args.hot_mass:.0%} of the mass; "
        f"{sum(hot_of[i] for i in requests)} of the {n_requests} requests name a hot id; "
        f"then {len(cold_requests)} extra cold requests",
        flush=True,
    )

    started = time.perf_counter()
    res: dict[str, dict[str, Any]] = {}
    stores: dict[str, Ensemble] = {}
    layouts: dict[str, tuple[dict[int, tuple[int, int]], list[list[int]]]] = {}
    with benchlib.run_folder(args.workdir, "bench_sharding-") as workdir:
        prior_path = write_prior(workdir / "prior.npz", train.ids, p)
        configs = {
            name: load_config(args.config, [*overrides, *(o.format(prior=prior_path) for o in ARMS[name])])
            for name in args.arms
        }
        try:
            ray_cpus = benchlib.start_ray()
            warm = benchlib.warm_up(base, train, workdir / "warmup", per_stage=0)
            print(f"Ray: {ray_cpus} CPUs; warm-up fit {warm:.1f}s", flush=True)
            for name in args.arms:
                print(f"[{name}] ingest + fit ...", flush=True)
                ens, row = build(configs[name], train, test, workdir / name)
                stores[name] = ens
                where, sizes = layout(ens)
                layouts[name] = (where, [list(s) for s in sizes])
                shard_of = np.array([where[i][0] for i in train.ids.tolist()])
                row["shard_sizes"] = [sum(s) for s in sizes]
                row["slice_sizes"] = sizes
                row["expected_deletions_per_shard"] = shard_masses(shard_of, p, base.shards)
                row["expected"] = expected_retrain(where, sizes, train.ids, p)
                row["requests"] = []
                row["cold_requests"] = []
                res[name] = row
                print(
                    f"  ingest {row['ingest_s']:.1f}s, fit {row['fit_s']:.1f}s; acc mean {row['acc_mean']:.4f} "
                    f"weighted {row['acc_weighted']:.4f}; shard sizes {row['shard_sizes']}",
                    flush=True,
                )
            sequence = [("requests", sid) for sid in requests] + [("cold_requests", sid) for sid in cold_requests]
            for k, (kind, sid) in enumerate(sequence, 1):
                for name in args.arms:  # alternate, so load on the machine falls on every arm alike
                    shard, slice_ = layouts[name][0][sid]
                    sizes_now = layouts[name][1][shard]
                    sizes_now[slice_] -= 1  # the retrain trains on the shard without the deleted id
                    q = timed_delete(stores[name], sid, hot_of[sid], stages_cost(sizes_now, slice_))
                    res[name][kind].append(q)
                    print(
                        f"  {kind[:-1].replace('_', ' ')} {k}/{len(sequence)} id {sid} "
                        f"({'hot' if q['hot'] else 'cold'}) {name}: shard {q['shards']} from slice {q['from_slice']}, "
                        f"{q['samples']} samples "
                        f"retrained, {q['wall_s']:.2f}s",
                        flush=True,
                    )
            for name in args.arms:
                last = res[name]["cold_requests" if cold_requests else "requests"][-1]["shards"]
                t0 = time.perf_counter()
                ok = bool(stores[name].verify(shards=last)["ok"])
                res[name]["verify"] = {"shards": last, "ok": ok, "seconds": time.perf_counter() - t0}
                res[name]["summary"] = summarize(
                    res[name]["requests"], res[name]["cold_requests"], res[name]["expected"]["samples"]
                )
                print(f"[{name}] verify shards {last}: ok={ok}", flush=True)
        finally:
            for ens in stores.values():
                ens.close()
    total_s = time.perf_counter() - started

    baseline = res[args.arms[0]]
    ratios = {name: arm_ratios(res[name], baseline) for name in args.arms[1:]}
    print_report(res, ratios, n_requests)
    print(f"total {total_s / 60:.1f} min")

    info["loadavg_end"] = benchlib.loadavg()
    info["ray_cpus"] = ray_cpus
    result = {
        **benchlib.run_header(args.config, overrides, args.quick, base),
        "prior": {
            "hot_fraction": args.hot_fraction,
            "hot_mass": args.hot_mass,
            "hot_ids": int(hot.sum()),
            "p_hot": float(p[hot][0]),
            "p_cold": float(p[~hot][0]),
            "format": "npz (ids, probability), written to the run's temporary folder",
        },
        "seed": args.seed,
        "requests": requests,
        "cold_requests": cold_requests,
        "data": {"train": len(train), "test": len(test), "feature_shape": list(train.feature_shape)},
        "machine": info,
        "total_s": total_s,
        "results": res,
        "arms": {name: [o.format(prior="PRIOR") for o in ARMS[name]] for name in args.arms},
        f"ratios_over_{args.arms[0]}": ratios,
        "notes": {
            "samples": "sum of n_samples over the stages a request retrained (stage j trains on slices 1..j)",
            "work": "samples x epochs of those stages (the certificate's sample_epochs)",
            "compute_s": "sum of those stages' training seconds (the certificate's compute_seconds)",
            "wall_s": "perf_counter around Ensemble.delete([id]): journal, retrain on Ray, compaction, certificate",
            "expected": "mean samples retrained per request under the prior, from the layout before any deletion",
            "exact": "measured samples == the layout's prediction for that id (and records == certificate)",
            "wall_fit": "least squares wall_s = fixed_s + s_per_sample x samples over every measured request",
            "acc_*": "ensemble test accuracy after training, before the deletions",
        },
    }
    title = (
        f"{args.config.name} {' '.join(overrides)} | n={len(train)} | S={base.shards} R={base.slices} | "
        f"{int(hot.sum())} hot ids hold {args.hot_mass:.0%} | {info['nproc']} cores, {info['date']}"
    )
    result["title"] = title
    benchlib.write_results(out, result, lambda png: plot(res, title, png))


if __name__ == "__main__":
    main()
