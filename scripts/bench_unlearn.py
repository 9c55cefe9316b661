r"""Benchmark SISA unlearning: deletion cost vs retraining one monolithic model, and vs the cost model.

For each ``S x R`` setting in ``--settings``, in one run (one Ray instance with all cores):

1. **Monolithic retrain** (once, shared by all settings): the config with
   ``shards=1 slices=1`` (the recalibrated schedule then trains exactly ``train.epochs``
   epochs) trained through the Ensemble API on Ray, (a) with 1 torch thread, the compute
   one SISA shard model gets ("same compute per model"), and (b) with every usable core
   (``threads_per_shard = cpus_per_shard = cores``, "whole machine"). ``fit()`` wall
   seconds and pure compute (``FitReport.stage_seconds``).
2. **Full SISA retrain**: create + ingest + fit at ``S x R`` (1 thread per shard); this
   trained store is the base of everything below.
3. **Single deletions**: ``--singles`` random ids (seeded), each its own
   ``Ensemble.delete([id])`` on the base store, one after another. Per deletion: wall
   seconds of ``delete()`` end to end (journal, retrain, compaction, certificate), the
   retrain compute (summed ``seconds`` of the new stage records) and the work actually
   retrained, sum over retrained stages of ``n_samples x epochs`` (sample-epochs).
   Summarised by the median. The certificates' ``from_slice`` values are kept, and
   ``Ensemble.verify`` replays the shards of the last single deletion (must be ``ok``).
4. **Batches**: for each K in ``--batches``, a copy of the base store as it was before
   the singles; K random ids deleted as one request; the same measurements.
5. **Cost model** (Bourtoule et al., SISA): with per-stage epochs ``e'`` and the actual
   slice sizes of the store, retraining shard k from (1-based) slice r costs
   ``e' * sum_{j=r..R} |slices 1..j|`` sample-epochs; a request of K uniform ids puts
   Binomial(K, |shard|/n) of them in each shard and, given m >= 1 there,
   ``P(r_min >= r) = q_r^m`` with q_r the shard's fraction in slices r..R. The expected
   work is summed exactly over the binomial. Also the work predicted for the ids that
   were actually drawn (must equal the measured work: SISA retrains exactly that).
   Monolithic work is ``e * n``; the cost-model speedup is ``e * n / E[work]``
   (``3RS / (2R + 1)`` in the exact-recalibration limit: 10.7x at 8x4, 22.6x at 16x8).
6. **Speedups** per median single deletion and per batch: same compute
   (monolithic (a) compute / deletion compute), same threads (monolithic (a) wall /
   deletion wall), whole machine (monolithic (b) wall / deletion wall); efficiency =
   same-compute speedup / cost-model speedup; for batches also the per-id cost vs a
   single deletion.

Writes a table per setting to stdout, everything to a JSON file, and a two-panel PNG
beside it (measured vs predicted work per K; deletion wall time per K against the
monolithic retrain times).

Full run (CNN config, settings 8x4 and 16x8, K in 1,10,100,1000). Estimated runtime:
about 60 one-thread epochs of the monolithic CNN in wall time (monolithic runs ~16,
8x4 ~26, 16x8 ~18, from the cost model) at ~45 s each (~1300 samples/s per thread),
plus ~5 minutes of ingest, store copies and compaction: about 50 minutes on 2 idle
cores, 1.5 hours or more when another job shares them::

    .venv/bin/python scripts/bench_unlearn.py

Quick smoke run (MLP, 6000 train samples, 2 epochs, setting 4x4, K in 1,10,100; under a
minute)::

    .venv/bin/python scripts/bench_unlearn.py --quick --out results/bench_unlearn_quick.json

Trailing ``key=value`` arguments are config overrides, e.g. ``train.epochs=5``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Let `python scripts/bench_unlearn.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.partition.cost_model import (  # noqa: E402
    drawn_work,
    expected_work,
    expected_work_closed_form,
)

QUICK_OVERRIDES = ("data.train_limit=6000", "data.test_limit=1000", "train.epochs=2", "model.name=mlp")
QUICK_SETTINGS = "4x4"
QUICK_BATCHES = "1,10,100"
FULL_SETTINGS = "8x4,16x8"
FULL_BATCHES = "1,10,100,1000"


# --------------------------------------------------------------------------- options
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): settings, deletions, batches, run options, trailing ``overrides``."""
    parser = benchlib.script_parser(__doc__, config=Path("configs/fashion_mnist_cnn.yaml"))
    benchlib.add_mode_option(
        parser, "--settings", kind=str, what="comma-separated SxR pairs", full=FULL_SETTINGS, quick=QUICK_SETTINGS
    )
    parser.add_argument("--singles", type=int, default=5, help="single-id deletions per setting (median reported)")
    benchlib.add_mode_option(
        parser, "--batches", kind=str, what="comma-separated batch sizes K", full=FULL_BATCHES, quick=QUICK_BATCHES
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids to delete")
    quick = f"smoke run: adds {' '.join(QUICK_OVERRIDES)}, settings {QUICK_SETTINGS}, batches {QUICK_BATCHES}"
    benchlib.add_run_options(parser, out=Path("results/bench_unlearn.json"), quick_help=quick)
    return parser.parse_args(argv)


def parse_settings(text: str) -> list[tuple[int, int]]:
    """Turn ``--settings`` (``8x4,16x8``) into a list of distinct ``(S, R)`` pairs, in order.

    Raises:
        SystemExit: On a malformed pair or a non-positive number.
    """
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            s, r = (int(v) for v in part.split("x"))
        except ValueError as exc:
            raise SystemExit(f"--settings: {part!r} is not SxR, e.g. 8x4") from exc
        if s < 1 or r < 1:
            raise SystemExit(f"--settings: {part!r} needs S >= 1 and R >= 1")
        if (s, r) not in out:
            out.append((s, r))
    if not out:
        raise SystemExit(f"--settings={text!r} lists no SxR pair")
    return out


# --------------------------------------------------------------------------- stores


def build_store(cfg: SisaConfig, train: LabeledArrays, path: Path) -> tuple[Ensemble, dict[str, Any]]:
    """Create a store at ``path``, ingest ``train`` and fit it on Ray.

    Args:
        cfg: The ensemble's config.
        train: Training samples.
        path: Store directory (new).

    Returns:
        The open ensemble and the timings: ingest, fit wall, compute, stages, work.
    """
    ens, report, times = benchlib.build_and_fit(cfg, train, path)
    try:
        records = benchlib.stage_records(ens)
    except BaseException:
        ens.close()
        raise
    row = {
        "shards": cfg.shards,
        "slices": cfg.slices,
        "threads_per_shard": cfg.resources.threads_per_shard,
        "cpus_per_shard": cfg.resources.cpus_per_shard,
        "epochs_per_stage": cfg.train.stage_epochs(cfg.slices),
        "train_samples": len(train),
        **times,
        "compute_s": report.stage_seconds,
        "stages_trained": sum(len(v) for v in report.trained.values()),
        "work": benchlib.sample_epochs(records),
    }
    return ens, row


def monolithic(cfg: SisaConfig, train: LabeledArrays, workdir: Path, name: str) -> dict[str, Any]:
    """Train the one-model baseline (``cfg`` has ``shards=1 slices=1``) and drop its store.

    Returns:
        Its timings (see :func:`build_store`).
    """
    path = workdir / name
    ens, row = build_store(cfg, train, path)
    ens.close()
    shutil.rmtree(path, ignore_errors=True)
    return row


def slice_sizes(ens: Ensemble) -> list[list[int]]:
    """Samples per slice of every shard, now."""
    return [list(s["slice_samples"]) for s in ens.status()["per_shard"]]


# --------------------------------------------------------------------------- cost model
# shard_work, binomial_pmf, expected_work, expected_work_closed_form and drawn_work moved to
# sisa/cost_model.py (imported above), shared with scripts/simulate_requests.py.


def first_slices(ens: Ensemble, ids: Sequence[int]) -> dict[int, int]:
    """Shard -> 1-based first slice holding one of ``ids``, where the store placed them (call before deleting)."""
    out: dict[int, int] = {}
    for s, r in ens.locate(list(ids)).values():
        out[s] = min(out.get(s, r + 1), r + 1)
    return out


def cost_model(sizes: Sequence[Sequence[int]], cfg: SisaConfig, ks: Sequence[int]) -> dict[str, Any]:
    """Expected retraining work per request size, and the cost-model speedups over the monolithic work.

    Args:
        sizes: The base store's samples per slice of each shard.
        cfg: The setting's config.
        ks: Request sizes.

    Returns:
        Per K: expected work, speedup ``e * n / E[work]``; a dense ``curve`` of
        ``[K, E[work]]`` for the plot; plus the idealized figures
        (equal shards, exact recalibration ``e' = 2e / (R + 1)``).
    """
    s, r, e = cfg.shards, cfg.slices, cfg.train.epochs
    e_stage = cfg.train.stage_epochs(r)
    n = sum(sum(x) for x in sizes)
    mono_work = float(e * n)
    per_k = {}
    for k in ks:
        exp = expected_work(sizes, e_stage, k)
        closed = expected_work_closed_form(sizes, e_stage, k)
        per_k[str(k)] = {
            "expected_work": exp,
            "expected_work_closed_form": closed,
            "speedup": mono_work / exp,
            "expected_shards_touched": sum(1 - (1 - sum(x) / n) ** k for x in sizes),
        }
    dense = sorted({int(v) for v in np.round(np.geomspace(1, max(ks), 40))} | set(ks))
    curve = [[k, expected_work_closed_form(sizes, e_stage, k)] for k in dense]
    uniform_single = e_stage * (n / s) / r * (r + 1) * (2 * r + 1) / 6
    return {
        "n": n,
        "epochs": e,
        "epochs_per_stage": e_stage,
        "epochs_per_stage_exact": 2 * e / (r + 1) if cfg.train.epoch_schedule == "recalibrated" else e,
        "monolithic_work": mono_work,
        "per_k": per_k,
        "curve": curve,
        "single_uniform_formula_work": uniform_single,
        "single_uniform_formula_speedup": mono_work / uniform_single,
        "ideal_speedup_3RS_over_2R_plus_1": 3 * r * s / (2 * r + 1),
    }


# --------------------------------------------------------------------------- deletions
def timed_delete(ens: Ensemble, ids: Sequence[int], expected: float) -> dict[str, Any]:
    """Delete ``ids`` as one request and measure it.

    Args:
        ens: A writable ensemble.
        ids: Ids to forget.
        expected: Cost-model expected work of a request of this size.

    Returns:
        Wall seconds of ``delete()``, the certificate's retrain seconds, the retrained
        stages' compute and work, ``from_slice`` per shard, and the work predicted for
        these very ids.
    """
    cfg = ens.config
    firsts = first_slices(ens, ids)
    t0 = time.perf_counter()
    cert = ens.delete(list(ids))
    wall = time.perf_counter() - t0
    if cert.get("state") != "applied":
        raise RuntimeError(f"deletion of {len(ids)} id(s) was not applied: {cert.get('state')}")
    got = benchlib.retrain_cost(ens, cert)
    predicted = drawn_work(slice_sizes(ens), cfg.train.stage_epochs(cfg.slices), firsts)
    from_slice = {int(k): int(v["from_slice"]) for k, v in cert["shards"].items()}
    return {
        "k": len(ids),
        "request_id": cert["request_id"],
        "wall_s": wall,
        "retrain_fit_s": float(cert["batch"]["retrain_seconds"]),
        "overhead_s": wall - float(cert["batch"]["retrain_seconds"]),
        "erasure": cert["batch"]["erasure"],
        "retrained_shards": cert["retrained_shards"],
        "from_slice": from_slice,
        "from_slice_matches_partition": from_slice == firsts,
        "stages": got["stages"],
        "compute_s": got["compute_s"],
        "work": got["work"],
        "new_checkpoints_match": got["new_checkpoints_match"],
        "work_for_drawn_ids": predicted,
        "work_exact": got["work"] == round(predicted),
        "expected_work": expected,
        "ids": list(ids) if len(ids) <= 10 else None,
    }


def speedups(
    wall: float, compute: float, work: float, k: int, model: dict[str, Any], mono: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Speedups of one deletion (or the median single) over retraining the monolithic model.

    Args:
        wall: Deletion wall seconds.
        compute: Retrain compute seconds.
        work: Retrained sample-epochs.
        k: Ids in the request.
        model: The setting's cost model.
        mono: ``same_threads`` and ``whole_machine`` monolithic runs.

    Returns:
        Same-compute, same-threads and whole-machine speedups, the cost-model speedup,
        efficiency, the work ratio and throughput ratio (sample-epochs per compute second
        of the deletion over the monolithic run's).
    """
    a, b = mono["same_threads"], mono["whole_machine"]
    expected = model["per_k"][str(k)]["expected_work"]
    model_sp = model["per_k"][str(k)]["speedup"]
    same_compute = a["compute_s"] / compute if compute > 0 else math.inf
    return {
        "speedup_same_compute": same_compute,
        "speedup_same_threads": a["fit_s"] / wall,
        "speedup_whole_machine": b["fit_s"] / wall,
        "cost_model_speedup": model_sp,
        "efficiency": same_compute / model_sp,
        "work_ratio": work / expected,
        "throughput_ratio": (work / compute) / (a["work"] / a["compute_s"]) if compute > 0 else math.nan,
    }


def copy_store(src: Path, dst: Path) -> None:
    """Copy a closed store directory (``data.mdb``, ``lock.mdb``, ``hmac.key``, ``writer.lock``)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def run_setting(
    shards: int,
    slices: int,
    cfg: SisaConfig,
    train: LabeledArrays,
    workdir: Path,
    mono: dict[str, dict[str, Any]],
    n_singles: int,
    batches: Sequence[int],
    seed: int,
) -> dict[str, Any]:
    """Full SISA fit, single deletions, verify, then batches, for one ``S x R`` setting.

    Args:
        shards: S.
        slices: R.
        cfg: The setting's config (1 thread per shard).
        train: Training data.
        workdir: Where the stores go (removed by the caller).
        mono: The monolithic runs.
        n_singles: Single-id deletions.
        batches: Request sizes K.
        seed: Seed of the id draws.

    Returns:
        Everything measured for this setting.
    """
    tag = f"S={shards} R={slices}"
    rng = np.random.default_rng([seed, shards, slices])
    base, snap = workdir / f"s{shards}r{slices}-base", workdir / f"s{shards}r{slices}-snapshot"
    print(f"\n[{tag}] full SISA fit ...", flush=True)
    ens, full = build_store(cfg, train, base)
    try:
        sizes = slice_sizes(ens)
    finally:
        ens.close()
    print(f"  fit {full['fit_s']:.1f}s wall, {full['compute_s']:.1f}s compute", flush=True)
    copy_store(base, snap)
    model = cost_model(sizes, cfg, sorted({1, *batches}))

    singles: list[dict[str, Any]] = []
    single_ids = rng.choice(train.ids, size=n_singles, replace=False).tolist() if n_singles else []
    verify: dict[str, Any] | None = None
    ens = Ensemble.open(base)
    try:
        for i, sid in enumerate(single_ids, 1):
            row = timed_delete(ens, [int(sid)], model["per_k"]["1"]["expected_work"])
            row.update(speedups(row["wall_s"], row["compute_s"], row["work"], 1, model, mono))
            singles.append(row)
            print(
                f"  single {i}/{n_singles}: id {sid} shard {row['retrained_shards']} from_slice "
                f"{list(row['from_slice'].values())}  {row['wall_s']:.2f}s wall, {row['compute_s']:.2f}s compute",
                flush=True,
            )
        if singles:
            last = singles[-1]["retrained_shards"]
            print(f"[{tag}] verify shards {last} ...", flush=True)
            t0 = time.perf_counter()
            res = ens.verify(shards=last)
            verify = {"shards": last, "ok": bool(res["ok"]), "seconds": time.perf_counter() - t0, "detail": res}
            print(f"  verify ok={verify['ok']} ({verify['seconds']:.1f}s)", flush=True)
    finally:
        ens.close()
    shutil.rmtree(base, ignore_errors=True)

    median: dict[str, Any] | None = None
    if singles:
        med = {key: statistics.median(r[key] for r in singles) for key in ("wall_s", "compute_s", "work")}
        mean = {key: statistics.fmean(r[key] for r in singles) for key in ("wall_s", "compute_s", "work")}
        median = {
            "k": 1,
            **med,
            "expected_work": model["per_k"]["1"]["expected_work"],
            **speedups(med["wall_s"], med["compute_s"], med["work"], 1, model, mono),
            "mean": {**mean, **speedups(mean["wall_s"], mean["compute_s"], mean["work"], 1, model, mono)},
            "from_slices": [list(r["from_slice"].values())[0] for r in singles],
        }

    rows: list[dict[str, Any]] = []
    for k in batches:
        if k > len(train):
            print(f"  skipping K={k}: more than the {len(train)} samples", flush=True)
            continue
        path = workdir / f"s{shards}r{slices}-k{k}"
        copy_store(snap, path)
        ids = rng.choice(train.ids, size=k, replace=False).tolist()
        print(f"[{tag}] batch K={k} ...", flush=True)
        ens = Ensemble.open(path)
        try:
            row = timed_delete(ens, [int(i) for i in ids], model["per_k"][str(k)]["expected_work"])
        finally:
            ens.close()
            shutil.rmtree(path, ignore_errors=True)
        row.update(speedups(row["wall_s"], row["compute_s"], row["work"], k, model, mono))
        if median is not None:
            row["per_id_wall_vs_single"] = (row["wall_s"] / k) / median["wall_s"]
            row["per_id_compute_vs_single"] = (row["compute_s"] / k) / median["compute_s"]
        rows.append(row)
        print(
            f"  {len(row['retrained_shards'])} shards, {row['stages']} stages, {row['wall_s']:.2f}s wall, "
            f"{row['compute_s']:.2f}s compute, work {row['work']:.0f} (expected {row['expected_work']:.0f})",
            flush=True,
        )
    shutil.rmtree(snap, ignore_errors=True)
    return {
        "shards": shards,
        "slices": slices,
        "epochs_per_stage": cfg.train.stage_epochs(slices),
        "slice_sizes": sizes,
        "full_fit": full,
        "cost_model": model,
        "singles": singles,
        "single_median": median,
        "verify": verify,
        "batches": rows,
    }


# --------------------------------------------------------------------------- report
TARGET_WORK_RATIO_K = 100
TARGET_WORK_RATIO = 1.25
TARGET_EFFICIENCY = 0.8


def print_setting(res: dict[str, Any], mono: dict[str, dict[str, Any]]) -> None:
    """Print one setting's table: median single deletion and each batch against the cost model."""
    model, full = res["cost_model"], res["full_fit"]
    a, b = mono["same_threads"], mono["whole_machine"]
    print(
        f"\n=== S={res['shards']} R={res['slices']}: n={model['n']}, e={model['epochs']}, "
        f"e'={model['epochs_per_stage']} epochs/stage (exact {model['epochs_per_stage_exact']:.2f}) ==="
    )
    print(
        f"full SISA fit {full['fit_s']:.1f}s wall / {full['compute_s']:.1f}s compute (work {full['work']:.0f}); "
        f"monolithic 1 thread {a['fit_s']:.1f}s wall / {a['compute_s']:.1f}s compute (work {a['work']:.0f}); "
        f"monolithic {b['threads_per_shard']} threads {b['fit_s']:.1f}s wall"
    )
    print(
        f"cost model, single id: {model['per_k']['1']['speedup']:.1f}x "
        f"(equal shards {model['single_uniform_formula_speedup']:.1f}x, "
        f"3RS/(2R+1) = {model['ideal_speedup_3RS_over_2R_plus_1']:.1f}x)"
    )
    header = (
        f"{'request':<11} {'K':>5} {'shards':>6} {'stages':>6} {'work':>9} {'pred':>9} {'ratio':>5} "
        f"{'wall_s':>7} {'comp_s':>7} {'sp_comp':>7} {'sp_thr':>6} {'sp_mach':>7} {'model':>6} {'eff':>5} "
        f"{'id/single':>9}"
    )
    print(header)
    print("-" * len(header))
    rows: list[tuple[str, dict[str, Any]]] = []
    if res["single_median"] is not None:
        rows.append(("single med", res["single_median"]))
    rows += [("batch", r) for r in res["batches"]]
    for label, r in rows:
        shards = len(r["retrained_shards"]) if "retrained_shards" in r else 1
        stages = r.get("stages", "")
        per_id = f"{r['per_id_wall_vs_single']:.3f}" if "per_id_wall_vs_single" in r else ""
        print(
            f"{label:<11} {r['k']:>5} {shards:>6} {stages!s:>6} {r['work']:>9.0f} {r['expected_work']:>9.0f} "
            f"{r['work_ratio']:>5.2f} {r['wall_s']:>7.2f} {r['compute_s']:>7.2f} {r['speedup_same_compute']:>6.1f}x "
            f"{r['speedup_same_threads']:>5.1f}x {r['speedup_whole_machine']:>6.1f}x {r['cost_model_speedup']:>5.1f}x "
            f"{r['efficiency']:>5.2f} {per_id:>9}"
        )
    if res["singles"]:
        print(
            f"singles: from_slice {res['single_median']['from_slices']}, work exact "
            f"{all(s['work_exact'] for s in res['singles'])}, mean-based efficiency "
            f"{res['single_median']['mean']['efficiency']:.2f}, throughput vs monolithic "
            f"{res['single_median']['throughput_ratio']:.2f}"
        )
    if res["verify"] is not None:
        print(f"verify shards {res['verify']['shards']}: ok={res['verify']['ok']}")
    print(
        "columns: work, pred = retrained sample-epochs measured, cost-model expectation (ratio = work / pred);\n"
        "  sp_comp = monolithic(1 thread) compute / retrain compute; sp_thr = monolithic(1 thread) wall / delete wall\n"
        "  sp_mach = monolithic(all cores) wall / delete wall; model = cost-model speedup; eff = sp_comp / model;\n"
        "  id/single = (batch wall / K) / median single wall"
    )


def plot(results: list[dict[str, Any]], mono: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Two panels: measured vs predicted work per K (log-log); deletion wall per K vs monolithic retrain.

    Args:
        results: One entry per setting.
        mono: The monolithic runs.
        title: Figure title.
        path: PNG to write.
    """
    plt = benchlib.pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, res in enumerate(results):
        c = colors[i % len(colors)]
        label = f"S={res['shards']} R={res['slices']}"
        curve = np.asarray(res["cost_model"]["curve"])
        ax1.plot(curve[:, 0], curve[:, 1], color=c, label=f"{label} cost model E[work]")
        ks = [r["k"] for r in res["batches"]]
        ax1.plot(ks, [r["work"] for r in res["batches"]], "o", color=c, label=f"{label} measured")
        ax2.plot(ks, [r["wall_s"] for r in res["batches"]], "o-", color=c, label=f"{label} delete() wall")
        ax2.plot(ks, [r["compute_s"] for r in res["batches"]], "s:", color=c, label=f"{label} retrain compute")
        if res["single_median"] is not None:
            ax2.plot([1], [res["single_median"]["wall_s"]], "*", color=c, markersize=11, label=f"{label} single median")
    if results:
        ax1.axhline(
            results[0]["cost_model"]["monolithic_work"], color="black", linewidth=1.2, label="monolithic retrain (e*n)"
        )
    a, b = mono["same_threads"], mono["whole_machine"]
    ax2.axhline(a["fit_s"], color="black", linewidth=1.2, label=f"monolithic 1 thread ({a['fit_s']:.3g} s)")
    ax2.axhline(
        b["fit_s"],
        color="gray",
        linestyle="--",
        linewidth=1.2,
        label=f"monolithic {b['threads_per_shard']} threads ({b['fit_s']:.3g} s)",
    )
    ax1.set_ylabel("retrained work (sample-epochs)")
    ax1.set_title("Work per deletion request")
    ax2.set_ylabel("seconds")
    ax2.set_title("Deletion time vs monolithic retrain")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ids per request K")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    benchlib.save_figure(fig, path, title)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    """Run the monolithic baselines and every setting; write the tables, JSON and PNG."""
    args = parse_args(argv)
    settings = parse_settings(benchlib.by_mode(args.settings, args.quick, QUICK_SETTINGS, FULL_SETTINGS))
    batches = benchlib.parse_ints(benchlib.by_mode(args.batches, args.quick, QUICK_BATCHES, FULL_BATCHES), "batches")
    if args.singles < 0:
        raise SystemExit(f"--singles={args.singles} must be >= 0")
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    base = load_config(args.config, overrides)
    info = benchlib.machine_info()
    cores = benchlib.usable_cpus()
    print(
        f"config {args.config} overrides {overrides or '(none)'}; settings "
        f"{', '.join(f'{s}x{r}' for s, r in settings)}; singles {args.singles}; batches {batches}",
        flush=True,
    )
    print(f"machine: {info['nproc']} cores ({cores} usable), torch {info['torch']}, ray {info['ray']}", flush=True)
    train = load_split(base.data, "train")
    print(f"data: {len(train)} train samples of shape {train.feature_shape}", flush=True)

    def cfg_for(shards: int, slices: int, extra: Sequence[str] = ()) -> SisaConfig:
        return load_config(
            args.config,
            [*overrides, f"shards={shards}", f"slices={slices}", "resources.threads_per_shard=1", *extra],
        )

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with benchlib.run_folder(args.workdir, "bench_unlearn-") as workdir:
        ray_cpus = benchlib.start_ray()
        s_max, r_max = max(settings)
        warm = benchlib.warm_up(cfg_for(s_max, r_max), train, workdir / "warmup")
        print(f"\nRay: {ray_cpus} CPUs; warm-up fit {warm:.2f}s", flush=True)
        print("[monolithic] 1 thread ...", flush=True)
        mono = {"same_threads": monolithic(cfg_for(1, 1), train, workdir, "mono-1thread")}
        print(f"  fit {mono['same_threads']['fit_s']:.1f}s, compute {mono['same_threads']['compute_s']:.1f}s")
        print(f"[monolithic] {cores} threads ...", flush=True)
        whole = [f"resources.threads_per_shard={cores}", f"resources.cpus_per_shard={cores}"]
        mono["whole_machine"] = monolithic(cfg_for(1, 1, whole), train, workdir, "mono-all")
        print(f"  fit {mono['whole_machine']['fit_s']:.1f}s, compute {mono['whole_machine']['compute_s']:.1f}s")
        for shards, slices in settings:
            res = run_setting(
                shards, slices, cfg_for(shards, slices), train, workdir, mono, args.singles, batches, args.seed
            )
            results.append(res)
    total_s = time.perf_counter() - started

    for res in results:
        print_setting(res, mono)

    summary = []
    for res in results:
        target = next((r for r in res["batches"] if r["k"] == TARGET_WORK_RATIO_K), None)
        med = res["single_median"]
        summary.append(
            {
                "setting": f"{res['shards']}x{res['slices']}",
                "verify_ok": res["verify"]["ok"] if res["verify"] else None,
                "work_exact_all": all(r["work_exact"] for r in [*res["singles"], *res["batches"]]),
                "single_efficiency": med["efficiency"] if med else None,
                "single_efficiency_ok": med["efficiency"] >= TARGET_EFFICIENCY if med else None,
                f"work_ratio_k{TARGET_WORK_RATIO_K}": target["work_ratio"] if target else None,
                "work_ratio_ok": target["work_ratio"] <= TARGET_WORK_RATIO if target else None,
            }
        )
    print()
    for s in summary:
        k_ratio = s[f"work_ratio_k{TARGET_WORK_RATIO_K}"]
        print(
            f"{s['setting']}: verify ok={s['verify_ok']}; measured work == work for the drawn ids: "
            f"{s['work_exact_all']}; single efficiency "
            + (f"{s['single_efficiency']:.2f}" if s["single_efficiency"] is not None else "n/a")
            + f" (target >= {TARGET_EFFICIENCY}); K={TARGET_WORK_RATIO_K} work ratio "
            + (f"{k_ratio:.2f}" if k_ratio is not None else "n/a")
            + f" (target <= {TARGET_WORK_RATIO})"
        )
    print(f"total {total_s / 60:.1f} min")

    info["loadavg_end"] = benchlib.loadavg()
    info["ray_cpus"] = ray_cpus
    result = {
        **benchlib.run_header(args.config, overrides, args.quick, base),
        "settings": [f"{s}x{r}" for s, r in settings],
        "singles": args.singles,
        "batches": batches,
        "seed": args.seed,
        "data": {"train": len(train), "feature_shape": list(train.feature_shape)},
        "machine": info,
        "total_s": total_s,
        "warmup_fit_s": warm,
        "monolithic": mono,
        "results": results,
        "summary": summary,
        "targets": {
            "efficiency": TARGET_EFFICIENCY,
            "work_ratio": TARGET_WORK_RATIO,
            "work_ratio_k": TARGET_WORK_RATIO_K,
        },
        "notes": {
            "work": "sample-epochs: sum over retrained stages of n_samples x epochs (n_samples = slices 1..stage), "
            "as the certificate's sample_epochs per shard",
            "compute_s": "sum of the retrained stage records' seconds (pure training + checkpoint encoding), "
            "as the certificate's compute_seconds per shard",
            "wall_s": "time.perf_counter around Ensemble.delete(): journal, retrain on Ray, compaction, certificate",
            "speedup_same_compute": "monolithic(1 thread) FitReport.stage_seconds / deletion compute_s",
            "speedup_same_threads": "monolithic(1 thread) fit wall / deletion wall",
            "speedup_whole_machine": "monolithic(all cores as one model) fit wall / deletion wall",
            "efficiency": "speedup_same_compute / cost-model speedup (e*n / expected work)",
            "throughput_ratio": "(work / compute_s) of the deletion over that of the monolithic(1 thread) run",
        },
    }
    title = (
        f"{args.config.name} {' '.join(overrides)} | n={len(train)} | e={base.train.epochs} | "
        f"{info['nproc']} cores, {info['date']}"
    )
    benchlib.write_results(args.out, result, lambda png: plot(results, mono, title, png))


if __name__ == "__main__":
    main()
