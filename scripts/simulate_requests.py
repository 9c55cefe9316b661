r"""Check SISA's deletion cost model against a simulation of the retrain plan (no training).

For each ``S x R`` in the grid and each request size K, a stream of deletion requests is
drawn against a synthetic store layout, and for every request the script computes exactly
what the planner retrains (``sisa.unlearn.journal.record_request`` then the planner's ``fit``): every shard holding
one of the request's ids restarts from the earliest slice holding one (0-based ``r``, the
last clean checkpoint is stage ``r``), and stages ``r+1..R`` retrain, stage j on the
samples slices 1..j still hold, for ``e' = TrainConfig.stage_epochs(R)`` epochs each
(recalibrated from ``--epochs``). Work is in sample-epochs, as ``n_samples x epochs`` of
the retrained stage records of a real store. The mean work per request is compared with
``sisa.partition.cost_model.expected_work_layout`` evaluated on the layout just before each request.

Layouts (``engine``):

* ``ids``: N real ids ``0..N-1`` placed by the real partitioner
  (``sisa.partition.assign.uniform_assignment``, seed ``--seed``); a request draws K distinct live
  ids uniformly (rejection sampling on an alive mask) and looks up their (shard, slice).
* ``counts``: for N too large to hold ids (10^9), the layout is a multinomial draw of N
  samples over the S x R cells with equal probabilities, which is the exact distribution of
  the uniform partitioner's counts when its hash behaves as a random function; a request
  draws K distinct positions among the live samples (``Generator.choice(replace=False)``) and
  maps each to its cell through the cumulative counts. Samples of one cell are exchangeable
  for the planner, so this is the same plan as drawing ids.

In both, a request's ids leave the layout before the next request, so later requests see
the shrunken store. Each (engine, N, S, R, K) gets its own stream from a fresh layout.

Compared, per configuration (``ratio`` = simulated / model, ``z`` = (ratio - 1) / standard
error, the standard error from the spread of (work - model) over the stream's requests):

* ``model``: exact for K distinct ids, work counted after the deletion, on the current
  layout (``replacement=False, exclude_deleted=True``); the ratio should be 1 within noise.
* ``model_initial``: the binomial model on the initial layout, as ``bench_unlearn`` uses it;
  it drifts below 1 by about the fraction of samples the stream deleted.
* ``model_equal``: the exact model on the equal layout ``N / (S R)`` per slice, what
  ``docs/scaling.md`` tabulates; same drift.

Also reported: the full-retrain work (monolithic ``e * N``, and all SISA shards from
scratch), the cost-model speedup, shards touched per request (simulated and expected).

Full run (about 3 minutes on 2 cores; writes docs/bench/simulate_requests.{json,png})::

    .venv/bin/python scripts/simulate_requests.py

Quick run (N = 10^5 ids and 10^9 counts, S in 8,32, R in 4,16, fewer requests; seconds)::

    .venv/bin/python scripts/simulate_requests.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sisa.config.settings import TrainConfig  # noqa: E402
from sisa.partition import cost_model as cm  # noqa: E402
from sisa.partition.assign import uniform_assignment  # noqa: E402

FULL = {
    "n_ids": "1e6",
    "n_counts": "1e9",
    "shards": "8,32,128,512",
    "slices": "4,16,64",
    "batches": "1,10,100",
    "requests": "2000,600,200",
    "out": "docs/bench/simulate_requests.json",
}
QUICK = {
    "n_ids": "1e5",
    "n_counts": "1e9",
    "shards": "8,32",
    "slices": "4,16",
    "batches": "1,10,100",
    "requests": "400,150,60",
    "out": "results/simulate_requests_quick.json",
}
ID_CHUNK = 1 << 22  # ids partitioned per uniform_assignment call (bounds the temporaries)


# --------------------------------------------------------------------------- layouts
@dataclass
class IdPool:
    """Live sample ids with the (shard, slice) the real partitioner gives them."""

    shard: np.ndarray
    slice_: np.ndarray
    alive: np.ndarray
    counts: np.ndarray
    engine: str = field(default="ids", init=False)

    @classmethod
    def build(cls, n: int, shards: int, slices: int, seed: int) -> IdPool:
        """Place ids ``0..n-1`` with :func:`uniform_assignment` (in chunks) and count each cell."""
        shard = np.empty(n, dtype=np.int32)
        slice_ = np.empty(n, dtype=np.int32)
        for start in range(0, n, ID_CHUNK):
            ids = np.arange(start, min(n, start + ID_CHUNK), dtype=np.int64)
            s, r = uniform_assignment(ids, seed, shards, slices)
            shard[start : start + ids.size], slice_[start : start + ids.size] = s, r
        counts = np.bincount(shard.astype(np.int64) * slices + slice_, minlength=shards * slices)
        return cls(shard, slice_, np.ones(n, dtype=bool), counts.reshape(shards, slices).astype(np.int64))

    def draw(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Delete ``k`` distinct live ids drawn uniformly; return their shards and slices."""
        n = self.alive.size
        chosen = np.empty(0, dtype=np.int64)
        while chosen.size < k:
            cand = rng.integers(0, n, size=int((k - chosen.size) * 1.2) + 8)
            cand = np.concatenate([chosen, cand[self.alive[cand]]])
            _, first = np.unique(cand, return_index=True)  # keep the first draw of each id, in order
            chosen = cand[np.sort(first)][:k]
        self.alive[chosen] = False
        sh, sl = self.shard[chosen].astype(np.int64), self.slice_[chosen].astype(np.int64)
        np.subtract.at(self.counts, (sh, sl), 1)
        return sh, sl


@dataclass
class CountPool:
    """Only the number of live samples in each (shard, slice) cell."""

    counts: np.ndarray
    engine: str = field(default="counts", init=False)

    @classmethod
    def build(cls, n: int, shards: int, slices: int, rng: np.random.Generator) -> CountPool:
        """A multinomial layout: each of ``n`` samples in one of the ``S x R`` cells, equally likely."""
        cells = rng.multinomial(n, np.full(shards * slices, 1.0 / (shards * slices)))
        return cls(cells.reshape(shards, slices).astype(np.int64))

    def draw(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Delete ``k`` distinct live samples drawn uniformly; return their shards and slices."""
        flat = self.counts.reshape(-1)
        pos = rng.choice(int(flat.sum()), size=k, replace=False)
        cells = np.searchsorted(np.cumsum(flat), pos, side="right")
        np.subtract.at(flat, cells, 1)
        return np.divmod(cells, self.counts.shape[1])


# --------------------------------------------------------------------------- the plan
def plan_request(counts_after: np.ndarray, shards: np.ndarray, slices: np.ndarray, epochs: int) -> tuple[float, int]:
    """What the planner retrains for one request whose ids were at ``(shards, slices)``.

    Args:
        counts_after: ``(S, R)`` layout once the ids are removed.
        shards: Shard of each deleted id.
        slices: 0-based slice of each deleted id.
        epochs: Epochs per stage.

    Returns:
        Sample-epochs retrained and the number of shards retrained.
    """
    n_slices = counts_after.shape[1]
    first = np.full(counts_after.shape[0], n_slices, dtype=np.int64)
    np.minimum.at(first, shards, slices)  # record_request: restart at the earliest touched slice
    return cm.planned_work(counts_after, first, epochs), int((first < n_slices).sum())


def run_stream(
    pool: IdPool | CountPool, k: int, requests: int, epochs: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Apply ``requests`` requests of ``k`` ids to ``pool``; per request: simulated and expected work."""
    work = np.empty(requests)
    model = np.empty(requests)
    touched = np.empty(requests)
    touched_model = np.empty(requests)
    for i in range(requests):
        before = pool.counts.astype(np.float64)
        model[i] = cm.expected_work_layout(before, epochs, k, replacement=False, exclude_deleted=True)
        touched_model[i] = cm.expected_shards_touched(before, k, replacement=False)
        sh, sl = pool.draw(rng, k)
        work[i], touched[i] = plan_request(pool.counts, sh, sl, epochs)
    return {"work": work, "model": model, "touched": touched, "touched_model": touched_model}


def summarise(
    stream: dict[str, np.ndarray], initial: np.ndarray, n: int, k: int, epochs: int, stage_epochs: int
) -> dict[str, Any]:
    """Ratios of simulated to expected work for one stream, with their standard errors."""
    work, model = stream["work"], stream["model"]
    count = work.size
    mean_model = float(model.mean())
    se = float(np.std(work - model, ddof=1) / math.sqrt(count) / mean_model) if count > 1 else math.nan
    ratio = float(work.sum() / model.sum())
    shards, slices = initial.shape
    model_initial = cm.expected_work_layout(initial, stage_epochs, k)
    model_equal = cm.expected_work_layout(cm.equal_layout(n, shards, slices), stage_epochs, k, replacement=False)
    mono = cm.monolithic_work(n, epochs)
    mean_work = float(work.mean())
    out = {
        "requests": count,
        "deleted": count * k,
        "deleted_fraction": count * k / n,
        "mean_work": mean_work,
        "mean_model": mean_model,
        "ratio": ratio,
        "se": se,
        "z": (ratio - 1.0) / se if se > 0 else math.nan,
        "work_sd": float(work.std(ddof=1)) if count > 1 else math.nan,
        "model_initial": model_initial,
        "ratio_initial": mean_work / model_initial,
        "model_equal": model_equal,
        "ratio_equal": mean_work / model_equal,
        "work_per_id": mean_work / k,
        "model_equal_per_id": model_equal / k,
        "monolithic_work": mono,
        "sisa_full_work": cm.full_sisa_work(initial, stage_epochs),
        "fraction_of_monolithic_per_id": mean_work / k / mono,
        "speedup_per_request": mono / mean_work,
        "shards_touched": float(stream["touched"].mean()),
        "shards_touched_model": float(stream["touched_model"].mean()),
    }
    if k == 1:
        out["paper_single_formula"] = cm.single_request_work(n, shards, slices, stage_epochs)
    return out


# --------------------------------------------------------------------------- options
def parse_list(text: str, name: str) -> list[int]:
    """Comma-separated positive integers (``1e6`` allowed); exits with a message on bad input."""
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"--{name}={text!r} must be comma-separated numbers") from exc
    if not values or min(values) < 1:
        raise SystemExit(f"--{name}={text!r} must list positive numbers")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; list options default to the full grid, or the quick one with ``--quick``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"small grid: {QUICK}")
    parser.add_argument("--n-ids", default=None, help=f"N for the id engine, comma-separated (full {FULL['n_ids']})")
    parser.add_argument("--n-counts", default=None, help=f"N for the count engine (full {FULL['n_counts']}; 0: none)")
    parser.add_argument("--shards", default=None, help=f"S values (full {FULL['shards']})")
    parser.add_argument("--slices", default=None, help=f"R values (full {FULL['slices']})")
    parser.add_argument("--batches", default=None, help=f"request sizes K (full {FULL['batches']})")
    parser.add_argument("--requests", default=None, help=f"requests per stream, one per K (full {FULL['requests']})")
    parser.add_argument("--epochs", type=int, default=10, help="train.epochs e (default 10, as the configs)")
    parser.add_argument(
        "--epoch-schedule", default="recalibrated", choices=["recalibrated", "constant"], help="train.epoch_schedule"
    )
    parser.add_argument("--seed", type=int, default=0, help="partition seed and root of the request streams")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (PNG beside it); full {FULL['out']}")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--plot-only",
        type=Path,
        default=None,
        help="redraw the PNG beside this JSON of an earlier run, simulate nothing",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("n_ids", "n_counts", "shards", "slices", "batches", "requests", "out"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.out = Path(args.out)
    return args


# --------------------------------------------------------------------------- run
def simulate(
    engine: str, n: int, shards: int, slices: int, k: int, requests: int, train: TrainConfig, seed: int
) -> dict[str, Any]:
    """One stream: build the layout, apply the requests, summarise against the model."""
    stage_epochs = train.stage_epochs(slices)
    rng = np.random.default_rng([seed, 0 if engine == "ids" else 1, n, shards, slices, k])
    t0 = time.perf_counter()
    pool: IdPool | CountPool
    pool = IdPool.build(n, shards, slices, seed) if engine == "ids" else CountPool.build(n, shards, slices, rng)
    layout_s = time.perf_counter() - t0
    initial = pool.counts.astype(np.float64)
    t0 = time.perf_counter()
    stream = run_stream(pool, k, min(requests, n // k), stage_epochs, rng)
    row = {
        "engine": engine,
        "n": n,
        "shards": shards,
        "slices": slices,
        "k": k,
        "epochs": train.epochs,
        "stage_epochs": stage_epochs,
        "layout_s": layout_s,
        "stream_s": time.perf_counter() - t0,
        "shard_size_min": int(initial.sum(axis=1).min()),
        "shard_size_max": int(initial.sum(axis=1).max()),
        **summarise(stream, initial, n, k, train.epochs, stage_epochs),
    }
    return row


def model_curves(
    n: int, ks: Sequence[int], slices_list: Sequence[int], train: TrainConfig, s_max: int
) -> dict[str, Any]:
    """Exact model on equal layouts over a dense S grid: work per id as a fraction of ``e * n``."""
    grid = sorted({int(v) for v in np.round(np.geomspace(2, s_max * 2, 28))})
    out: dict[str, Any] = {"n": n, "shards": grid, "curves": {}}
    for k in ks:
        for r in slices_list:
            e_stage = train.stage_epochs(r)
            vals = [
                cm.expected_work_layout(cm.equal_layout(n, s, r), e_stage, k, replacement=False)
                / k
                / cm.monolithic_work(n, train.epochs)
                for s in grid
            ]
            out["curves"][f"k{k}_r{r}"] = vals
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per stream: simulated and expected work, ratios, z, shards touched."""
    header = (
        f"{'engine':<6} {'N':>7} {'S':>4} {'R':>3} {'K':>4} {'e_st':>4} {'reqs':>5} {'sim work':>11} "
        f"{'model':>11} {'ratio':>6} {'se':>6} {'z':>6} {'r_init':>6} {'r_eq':>6} {'/id of eN':>9} "
        f"{'touched':>7} {'model':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['engine']:<6} {r['n']:>7.0e} {r['shards']:>4} {r['slices']:>3} {r['k']:>4} {r['stage_epochs']:>4} "
            f"{r['requests']:>5} {r['mean_work']:>11.4g} {r['mean_model']:>11.4g} {r['ratio']:>6.3f} "
            f"{r['se']:>6.3f} {r['z']:>6.2f} {r['ratio_initial']:>6.3f} {r['ratio_equal']:>6.3f} "
            f"{r['fraction_of_monolithic_per_id']:>9.2e} {r['shards_touched']:>7.2f} {r['shards_touched_model']:>7.2f}"
        )
    print(
        "ratio = simulated / model (exact, current layout); se its standard error; z = (ratio - 1) / se;\n"
        "r_init = simulated / binomial model on the initial layout; r_eq = simulated / model on the equal layout;\n"
        "/id of eN = work per deleted id as a fraction of retraining one model on all N (e * N)"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Top: work per id vs S, model curves per R, simulation points; bottom: every ratio with 2 se."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = result["runs"], result["model_curves"]
    ks = result["params"]["batches"]
    slices_list = result["params"]["slices"]
    fig = plt.figure(figsize=(4.2 * len(ks), 8.2))
    grid = fig.add_gridspec(2, len(ks), height_ratios=[1.25, 1.0])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"ids": "o", "counts": "x"}
    for col, k in enumerate(ks):
        ax = fig.add_subplot(grid[0, col])
        for i, r in enumerate(slices_list):
            c = colors[i % len(colors)]
            stage = TrainConfig(epochs=result["params"]["epochs"]).stage_epochs(r)
            ax.plot(curves["shards"], curves["curves"][f"k{k}_r{r}"], "-", color=c, label=f"model R={r} (e'={stage})")
            for engine in ("ids", "counts"):
                pts = [x for x in rows if x["k"] == k and x["slices"] == r and x["engine"] == engine]
                if pts:
                    ax.plot(
                        [x["shards"] for x in pts],
                        [x["fraction_of_monolithic_per_id"] for x in pts],
                        markers[engine],
                        color=c,
                        markersize=7 if engine == "ids" else 9,
                        fillstyle="none",
                    )
        for engine, n_list in (("ids", result["params"]["n_ids"]), ("counts", result["params"]["n_counts"])):
            if n_list:
                ax.plot(
                    [],
                    [],
                    markers[engine],
                    color="black",
                    fillstyle="none",
                    label=f"simulated, {engine} engine, N={','.join(f'{n:.0e}' for n in n_list)}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("shards S")
        ax.set_title(f"K = {k} id(s) per applied request")
        ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            ax.set_ylabel("retrained work per deleted id / (e * N)")
        ax.legend(fontsize=6)
    ax = fig.add_subplot(grid[1, :])
    labels = []
    for i, r in enumerate(rows):
        c = colors[ks.index(r["k"]) % len(colors)]
        ax.errorbar(
            i,
            r["ratio"],
            yerr=2 * r["se"],
            fmt=markers[r["engine"]],
            color=c,
            markersize=5,
            capsize=2,
            fillstyle="none",
        )
        labels.append(f"{r['engine'][0]} {r['n']:.0e} {r['shards']}x{r['slices']} K{r['k']}")
    ax.axhline(1.0, color="black", linewidth=1)
    for k in ks:
        ax.plot([], [], "s", color=colors[ks.index(k) % len(colors)], label=f"K={k}")
    for engine in ("ids", "counts"):
        ax.plot([], [], markers[engine], color="black", fillstyle="none", label=f"{engine} engine")
    ax.legend(fontsize=7, ncol=len(ks) + 2, loc="upper right")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=5)
    ax.set_ylabel("simulated / model (± 2 se)")
    ax.set_title("Planned work of the simulated stream over the cost model, per configuration (colour = K)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every stream, print the table, write the JSON and the PNG; returns the result."""
    args = parse_args(argv)
    if args.plot_only is not None:
        earlier: dict[str, Any] = json.loads(args.plot_only.read_text())
        plot(earlier, args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return earlier
    n_ids = parse_list(args.n_ids, "n-ids") if args.n_ids not in ("", "0") else []
    n_counts = parse_list(args.n_counts, "n-counts") if args.n_counts not in ("", "0") else []
    shards_list = parse_list(args.shards, "shards")
    slices_list = parse_list(args.slices, "slices")
    ks = parse_list(args.batches, "batches")
    reqs = parse_list(args.requests, "requests")
    if len(reqs) == 1:
        reqs = reqs * len(ks)
    if len(reqs) != len(ks):
        raise SystemExit(f"--requests lists {len(reqs)} counts for {len(ks)} batch sizes; give one per K (or one)")
    train = TrainConfig(epochs=args.epochs, epoch_schedule=args.epoch_schedule)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    jobs = [("ids", n) for n in n_ids] + [("counts", n) for n in n_counts]
    for engine, n in jobs:
        for shards in shards_list:
            for slices in slices_list:
                if n < shards * slices:
                    print(f"skipping N={n} S={shards} R={slices}: fewer samples than slices", flush=True)
                    continue
                for k, count in zip(ks, reqs, strict=True):
                    rows.append(simulate(engine, n, shards, slices, k, count, train, args.seed))
        print(f"[{engine} N={n:.0e}] done after {time.perf_counter() - started:.1f}s", flush=True)
    total = time.perf_counter() - started
    print()
    print_table(rows)
    z = np.array([r["z"] for r in rows if math.isfinite(r["z"])])
    ratios = np.array([r["ratio"] for r in rows])
    summary = {
        "configurations": len(rows),
        "ratio_min": float(ratios.min()),
        "ratio_max": float(ratios.max()),
        "ratio_mean": float(ratios.mean()),
        "pooled_ratio": float(
            sum(r["mean_work"] * r["requests"] for r in rows) / sum(r["mean_model"] * r["requests"] for r in rows)
        ),
        "abs_z_max": float(np.abs(z).max()) if z.size else math.nan,
        "abs_z_over_2": int((np.abs(z) > 2).sum()),
        "abs_z_over_3": int((np.abs(z) > 3).sum()),
        "mean_z": float(z.mean()) if z.size else math.nan,
        "chi2_z": float((z**2).sum()),
        "chi2_dof": int(z.size),
        "ratio_initial_min": float(min(r["ratio_initial"] for r in rows)),
        "ratio_initial_max": float(max(r["ratio_initial"] for r in rows)),
        "ratio_equal_min": float(min(r["ratio_equal"] for r in rows)),
        "ratio_equal_max": float(max(r["ratio_equal"] for r in rows)),
        "seconds": total,
    }
    print(
        f"\n{len(rows)} streams in {total:.1f}s: simulated / model "
        f"{summary['ratio_min']:.4f}..{summary['ratio_max']:.4f} "
        f"(pooled {summary['pooled_ratio']:.4f}); |z| max {summary['abs_z_max']:.2f}, "
        f"{summary['abs_z_over_2']} of {z.size} over 2, {summary['abs_z_over_3']} over 3; "
        f"sum z^2 = {summary['chi2_z']:.1f} on {z.size} dof; vs initial binomial model "
        f"{summary['ratio_initial_min']:.4f}..{summary['ratio_initial_max']:.4f}, vs equal layout "
        f"{summary['ratio_equal_min']:.4f}..{summary['ratio_equal_max']:.4f}"
    )
    command = "scripts/simulate_requests.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": f".venv/bin/python {command}".strip(),
        "params": {
            "quick": args.quick,
            "n_ids": n_ids,
            "n_counts": n_counts,
            "shards": shards_list,
            "slices": slices_list,
            "batches": ks,
            "requests": reqs,
            "epochs": args.epochs,
            "epoch_schedule": args.epoch_schedule,
            "seed": args.seed,
        },
        "machine": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "summary": summary,
        "runs": rows,
        "model_curves": model_curves(max([*n_ids, *n_counts]), ks, slices_list, train, max(shards_list)),
        "notes": {
            "work": "sample-epochs: sum over retrained stages of (samples in slices 1..j after the deletion) x e'",
            "model": "cost_model.expected_work_layout(layout before the request, e', K, replacement=False, "
            "exclude_deleted=True), averaged over the stream's requests",
            "model_initial": "expected_work_layout(initial layout, e', K) (binomial, before deletion; bench_unlearn's)",
            "model_equal": "expected_work_layout(equal layout N/(S R), e', K, replacement=False)",
            "se": "std(work - model) / sqrt(requests) / mean(model)",
            "counts engine": "multinomial layout and positional draws; exact for the planner, no ids held",
        },
    }
    result["title"] = (
        f"SISA retrain plan: simulation vs cost model | e={args.epochs} ({args.epoch_schedule}) | "
        f"ids N={','.join(f'{n:.0e}' for n in n_ids) or '-'}, counts N={','.join(f'{n:.0e}' for n in n_counts) or '-'}"
        f" | {result['machine']['date']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + ("" if args.no_plot else f" and {args.out.with_suffix('.png')}"))
    return result


if __name__ == "__main__":
    main()
