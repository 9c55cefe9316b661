r"""Benchmark SISA training against one monolithic model, in one run, side by side.

Measures, with the same architecture and recipe throughout:

1. **Monolithic**: the config with ``shards=1 slices=1`` (the recalibrated schedule then
   trains exactly ``train.epochs`` epochs), trained through the Ensemble API on Ray:
   test accuracy, ``fit()`` wall time and pure compute (``FitReport.stage_seconds``).
2. **SISA at each S** in ``--shards`` with R=``--slices``: test accuracy (mean and vote
   aggregation), mean per-shard accuracy, ``fit()`` wall time and compute seconds.
   One Ray instance with all cores; every run uses a fresh store (create, ingest, fit).
3. **Parallel speedup**: the SISA fit at S=8 (or the largest S <= 8 listed) on a Ray
   instance limited to 1 CPU vs 2 CPUs; each timed fit follows a tiny warm-up fit on
   the same fresh instance, so Ray worker start-up and the torch import are excluded.
4. **Trainer overhead**: samples/s of ``sisa.train.trainer.train_shard`` on all training
   data as one stage vs a plain hand-written torch loop (same model, seed, optimizer,
   batch size, 1 epoch, 1 thread), run alternately, in-process, 3 repeats each.

Writes a table to stdout, everything to a JSON file and a two-panel PNG beside it.

Full run (the CNN config; roughly 40 minutes on 2 idle cores)::

    .venv/bin/python scripts/bench_train.py

Quick smoke run (MLP, 6000 train / 2000 test samples, 2 epochs, S in 1,2,4)::

    .venv/bin/python scripts/bench_train.py --quick --config configs/fashion_mnist.yaml \
        --out results/bench_train_quick.json

Trailing ``key=value`` arguments are config overrides, e.g. ``train.epochs=5``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Let `python scripts/bench_train.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.evaluate.monolithic import single_stage_job  # noqa: E402
from sisa.train.models import build_model  # noqa: E402
from sisa.train.trainer import derive_seed, train_shard  # noqa: E402

QUICK_OVERRIDES = ("data.train_limit=6000", "data.test_limit=2000", "train.epochs=2")
QUICK_SHARDS = (1, 2, 4)
FULL_SHARDS = (1, 2, 4, 8, 16)
OVERHEAD_REPEATS = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): shard counts and slices, run options, trailing ``overrides``."""
    parser = benchlib.script_parser(__doc__, config=Path("configs/fashion_mnist_cnn.yaml"))
    benchlib.add_mode_option(
        parser,
        "--shards",
        kind=str,
        what="comma-separated shard counts S",
        full=",".join(map(str, FULL_SHARDS)),
        quick=",".join(map(str, QUICK_SHARDS)),
    )
    parser.add_argument("--slices", type=int, default=4, help="slices R per shard of the SISA runs")
    quick = f"smoke run: adds {' '.join(QUICK_OVERRIDES)} and shards {','.join(map(str, QUICK_SHARDS))}"
    benchlib.add_run_options(parser, out=Path("results/bench_train.json"), quick_help=quick)
    return parser.parse_args(argv)


def run_store(
    cfg: SisaConfig, train: LabeledArrays, test: LabeledArrays | None, workdir: Path, name: str
) -> dict[str, Any]:
    """Create a fresh store, ingest ``train``, fit it on Ray, and score it on ``test``.

    Args:
        cfg: The ensemble's config.
        train: Training samples to ingest.
        test: Test samples to score on, or ``None`` to skip scoring (warm-ups).
        workdir: Parent directory of the store; the store is removed afterwards.
        name: Store directory name (unique within ``workdir``).

    Returns:
        Timings (ingest, fit wall, compute) and, with ``test``, the accuracies.
    """
    path = workdir / name
    try:
        ens, report, times = benchlib.build_and_fit(cfg, train, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        row: dict[str, Any] = {
            "shards": cfg.shards,
            "slices": cfg.slices,
            "epochs_per_stage": cfg.train.stage_epochs(cfg.slices),
            "train_samples": len(train),
            **times,
            "fit_report_s": report.seconds,
            "compute_s": report.stage_seconds,
            "stages_trained": sum(len(v) for v in report.trained.values()),
        }
        if test is not None:
            t0 = time.perf_counter()
            row["acc_mean"] = ens.score(test.x, test.y, method="mean")
            row["acc_vote"] = ens.score(test.x, test.y, method="vote")
            shard_acc = ens.shard_scores(test.x, test.y)
            row["shard_acc_mean"] = float(statistics.fmean(shard_acc.values()))
            row["shard_acc_min"] = float(min(shard_acc.values()))
            row["shard_acc_max"] = float(max(shard_acc.values()))
            row["score_s"] = time.perf_counter() - t0
        return row
    finally:
        ens.close()
        shutil.rmtree(path, ignore_errors=True)


def plain_loop(cfg: SisaConfig, x_np: np.ndarray, y_np: np.ndarray, epochs: int) -> float:
    """Train with a plain hand-written torch loop; the same model, seed and optimizer as the trainer.

    Args:
        cfg: Recipe (model, optimizer, lr, batch size, seed).
        x_np: Features.
        y_np: Labels.
        epochs: Epochs to train.

    Returns:
        Wall seconds, model construction and tensor conversion included (as in the trainer).
    """
    t0 = time.perf_counter()
    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    model = build_model(cfg.model, tuple(x_np.shape[1:]), cfg.data.num_classes)
    t = cfg.train
    if t.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n, bs = x.shape[0], t.batch_size
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def trainer_run(cfg: SisaConfig, train: LabeledArrays) -> tuple[float, float]:
    """Train all of ``train`` as one stage with ``sisa.train.trainer.train_shard``.

    Args:
        cfg: Config with ``shards=1 slices=1`` so there is exactly one stage.
        train: Training data (ids sorted ascending, as a store hands them out).

    Returns:
        (wall seconds of the whole call, the stage's own ``seconds``).
    """
    job = single_stage_job(cfg, train)
    t0 = time.perf_counter()
    results = list(train_shard(job))
    wall = time.perf_counter() - t0
    return wall, sum(r.seconds for r in results)


def trainer_overhead(cfg: SisaConfig, train: LabeledArrays, repeats: int = OVERHEAD_REPEATS) -> dict[str, Any]:
    """Compare the trainer's throughput with a plain torch loop, alternating, 1 thread each.

    The trainer sets ``torch.use_deterministic_algorithms(True)`` and the thread count
    process-wide; both are restored before each plain run and at the end, so the plain
    loop runs as a user would write it.

    Args:
        cfg: Config with ``shards=1 slices=1 train.epochs=1``.
        train: All training data.
        repeats: Runs of each.

    Returns:
        Median wall seconds and samples/s of both, and the ratio ours/plain of
        throughput by wall time (the headline) and by process CPU time.
    """
    epochs = cfg.train.stage_epochs(cfg.slices)
    threads0 = torch.get_num_threads()
    determ0 = torch.are_deterministic_algorithms_enabled()
    ours: list[float] = []
    ours_cpu: list[float] = []
    ours_stage: list[float] = []
    plain: list[float] = []
    plain_cpu: list[float] = []
    try:
        for _ in range(repeats):
            torch.use_deterministic_algorithms(determ0)
            torch.set_num_threads(1)
            c0 = time.process_time()
            plain.append(plain_loop(cfg, train.x, train.y, epochs))
            plain_cpu.append(time.process_time() - c0)
            torch.set_num_threads(1)
            c0 = time.process_time()
            wall, stage = trainer_run(cfg, train)
            ours_cpu.append(time.process_time() - c0)
            ours.append(wall)
            ours_stage.append(stage)
    finally:
        torch.set_num_threads(threads0)
        torch.use_deterministic_algorithms(determ0)
    samples = len(train) * epochs
    ours_med, plain_med = statistics.median(ours), statistics.median(plain)
    ours_cpu_med, plain_cpu_med = statistics.median(ours_cpu), statistics.median(plain_cpu)
    return {
        "samples": len(train),
        "epochs": epochs,
        "batch_size": cfg.train.batch_size,
        "threads": 1,
        "repeats": repeats,
        "order": "alternating, plain first",
        "ours_s": ours,
        "ours_stage_s": ours_stage,
        "ours_cpu_s": ours_cpu,
        "plain_s": plain,
        "plain_cpu_s": plain_cpu,
        "ours_median_s": ours_med,
        "plain_median_s": plain_med,
        "ours_samples_per_s": samples / ours_med,
        "plain_samples_per_s": samples / plain_med,
        "ratio_ours_over_plain": plain_med / ours_med,
        "ratio_ours_over_plain_cpu": plain_cpu_med / ours_cpu_med,
        "note": "ours = wall time of list(train_shard(job)) incl. checkpoint encoding and digests; "
        "plain = model build + loop; both 1 torch thread; *_cpu_s = process CPU time, "
        "less sensitive than wall time to other load on a shared machine",
    }


TARGET_ACC_GAP_PP = 2.0
TARGET_SPEEDUP = 1.7
TARGET_TRAINER_RATIO = 0.9


def plot(mono: dict[str, Any], rows: list[dict[str, Any]], slices: int, title: str, path: Path) -> None:
    """Two panels: test accuracy vs S and fit wall time vs S, monolithic as a horizontal line.

    Args:
        mono: The monolithic run.
        rows: SISA runs, one per S.
        slices: R of the SISA runs.
        title: Figure title.
        path: PNG to write.
    """
    plt = benchlib.pyplot()

    s = [r["shards"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(s, [100 * r["acc_mean"] for r in rows], marker="o", label="SISA, mean aggregation")
    ax1.plot(s, [100 * r["acc_vote"] for r in rows], marker="s", linestyle="--", label="SISA, vote")
    ax1.plot(s, [100 * r["shard_acc_mean"] for r in rows], marker="^", linestyle=":", label="single shard (mean)")
    mono_label = f"monolithic ({100 * mono['acc_mean']:.2f}%)"
    ax1.axhline(100 * mono["acc_mean"], color="black", linewidth=1.2, label=mono_label)
    ax1.set_xlabel(f"shards S (R={slices} slices each)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Test accuracy")
    ax2.plot(s, [r["fit_s"] for r in rows], marker="o", label="SISA fit() wall time")
    ax2.plot(s, [r["compute_s"] for r in rows], marker="s", linestyle="--", label="SISA compute (sum of stages)")
    ax2.axhline(mono["fit_s"], color="black", linewidth=1.2, label=f"monolithic fit() ({mono['fit_s']:.1f} s)")
    ax2.set_xlabel(f"shards S (R={slices} slices each)")
    ax2.set_ylabel("seconds")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Training time")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(s)
        ax.set_xticklabels([str(v) for v in s])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    benchlib.save_figure(fig, path, title, fontsize=10)


def print_table(mono: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print the monolithic and SISA runs as one table."""
    header = (
        f"{'run':<11} {'S':>3} {'R':>3} {'ep/st':>5} {'acc_mean':>9} {'acc_vote':>9} "
        f"{'shard_acc':>9} {'fit_s':>8} {'compute_s':>9} {'ingest_s':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, r in [("monolithic", mono)] + [("sisa", r) for r in rows]:
        print(
            f"{label:<11} {r['shards']:>3} {r['slices']:>3} {r['epochs_per_stage']:>5} "
            f"{100 * r['acc_mean']:>8.2f}% {100 * r['acc_vote']:>8.2f}% {100 * r['shard_acc_mean']:>8.2f}% "
            f"{r['fit_s']:>8.2f} {r['compute_s']:>9.2f} {r['ingest_s']:>8.2f}",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Run all four measurements and write the table, JSON and PNG."""
    args = parse_args(argv)
    default_shards = (",".join(map(str, QUICK_SHARDS)), ",".join(map(str, FULL_SHARDS)))
    shard_list = benchlib.parse_ints(benchlib.by_mode(args.shards, args.quick, *default_shards), "shards")
    if args.slices < 1:
        raise SystemExit(f"--slices={args.slices} must be >= 1")
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    base = load_config(args.config, overrides)
    info = benchlib.machine_info()
    print(f"config {args.config} overrides {overrides or '(none)'}; shards {shard_list}, R={args.slices}", flush=True)
    print(f"machine: {info['nproc']} cores, torch {info['torch']}, ray {info['ray']}", flush=True)

    train = load_split(base.data, "train")
    test = load_split(base.data, "test")
    print(f"data: {len(train)} train, {len(test)} test samples of shape {train.feature_shape}", flush=True)

    speed_s = max([s for s in shard_list if s <= 8], default=shard_list[0])

    def cfg_for(shards: int, slices: int, extra: Sequence[str] = ()) -> SisaConfig:
        return load_config(args.config, [*overrides, f"shards={shards}", f"slices={slices}", *extra])

    with benchlib.run_folder(args.workdir, "bench_train-") as workdir:
        # 4. Trainer overhead first: in-process, before any Ray worker exists.
        print("\n[1/4] trainer overhead (in-process, 1 thread, alternating) ...", flush=True)
        overhead = trainer_overhead(cfg_for(1, 1, ["train.epochs=1"]), train)
        print(
            f"  ours {overhead['ours_samples_per_s']:.0f} samples/s, plain {overhead['plain_samples_per_s']:.0f} "
            f"samples/s, ratio {overhead['ratio_ours_over_plain']:.3f} (by CPU time "
            f"{overhead['ratio_ours_over_plain_cpu']:.3f})",
            flush=True,
        )

        # 1 + 2. Monolithic and SISA on one Ray instance with all cores.
        print("\n[2/4] Ray with all cores: warm-up ...", flush=True)
        ray_cpus = benchlib.start_ray()
        warm_all = benchlib.warm_up(cfg_for(max(shard_list), args.slices), train, workdir / "warmup-all", samples=200)
        print(f"  warm-up fit {warm_all:.2f}s on {ray_cpus} Ray CPUs", flush=True)
        print("[2/4] monolithic ...", flush=True)
        mono_cfg = cfg_for(1, 1)
        mono = run_store(mono_cfg, train, test, workdir, "monolithic")
        print(f"  acc {100 * mono['acc_mean']:.2f}%  fit {mono['fit_s']:.2f}s", flush=True)
        rows: list[dict[str, Any]] = []
        for s in shard_list:
            print(f"[3/4] SISA S={s} R={args.slices} ...", flush=True)
            row = run_store(cfg_for(s, args.slices), train, test, workdir, f"sisa-s{s}")
            rows.append(row)
            print(
                f"  acc {100 * row['acc_mean']:.2f}% (vote {100 * row['acc_vote']:.2f}%)  fit {row['fit_s']:.2f}s",
                flush=True,
            )

        # 3. Parallel speedup: fresh Ray instances with 1 and 2 CPUs.
        speed: dict[str, Any] = {"shards": speed_s, "slices": args.slices, "warmup_excluded": True}
        speed_cfg = cfg_for(speed_s, args.slices)
        for cpus in (1, 2):
            print(f"[4/4] speedup: Ray with {cpus} CPU(s), S={speed_s} ...", flush=True)
            benchlib.start_ray(cpus)
            warm = benchlib.warm_up(speed_cfg, train, workdir / f"warmup-{cpus}cpu", samples=200)
            run = run_store(speed_cfg, train, None, workdir, f"speed-{cpus}cpu")
            speed[f"cpus{cpus}"] = {"warmup_fit_s": warm, **run}
            print(f"  warm-up {warm:.2f}s, fit {run['fit_s']:.2f}s, compute {run['compute_s']:.2f}s", flush=True)
        speed["speedup"] = speed["cpus1"]["fit_s"] / speed["cpus2"]["fit_s"]
        speed["note"] = (
            "each timed fit ran on a fresh Ray instance after one tiny warm-up fit with the same config "
            "(worker start-up and torch import excluded); speedup = fit_s(1 cpu) / fit_s(2 cpus)"
        )

    ref = next(r for r in rows if r["shards"] == speed_s)
    gap_pp = 100 * (ref["acc_mean"] - mono["acc_mean"])
    summary = {
        "accuracy_gap_shards": speed_s,
        "sisa_minus_monolithic_pp": gap_pp,
        "target_gap_pp": TARGET_ACC_GAP_PP,
        "gap_ok": gap_pp >= -TARGET_ACC_GAP_PP,  # within 2 pp below, or better
        "parallel_speedup": speed["speedup"],
        "target_speedup": TARGET_SPEEDUP,
        "speedup_ok": speed["speedup"] >= TARGET_SPEEDUP,
        "trainer_over_plain": overhead["ratio_ours_over_plain"],
        "trainer_over_plain_cpu": overhead["ratio_ours_over_plain_cpu"],
        "target_trainer_ratio": TARGET_TRAINER_RATIO,
        "trainer_ok": overhead["ratio_ours_over_plain"] >= TARGET_TRAINER_RATIO,
    }

    print()
    print_table(mono, rows)
    print()
    print(
        f"SISA S={speed_s} accuracy - monolithic: {gap_pp:+.2f} pp   "
        f"(target: within {TARGET_ACC_GAP_PP:g} pp with the CNN config) {'OK' if summary['gap_ok'] else 'MISS'}"
    )
    print(
        f"parallel speedup S={speed_s}, 1 -> 2 CPUs: {speed['speedup']:.2f}x "
        f"({speed['cpus1']['fit_s']:.2f}s -> {speed['cpus2']['fit_s']:.2f}s; target >= {TARGET_SPEEDUP:g}x) "
        f"{'OK' if summary['speedup_ok'] else 'MISS'}"
    )
    print(
        f"trainer / plain torch throughput: {overhead['ratio_ours_over_plain']:.3f} "
        f"({overhead['ours_samples_per_s']:.0f} vs {overhead['plain_samples_per_s']:.0f} samples/s; "
        f"target >= {TARGET_TRAINER_RATIO:g}) {'OK' if summary['trainer_ok'] else 'MISS'}; "
        f"by CPU time {overhead['ratio_ours_over_plain_cpu']:.3f}"
    )

    info["loadavg_end"] = benchlib.loadavg()
    info["ray_cpus_all_cores_run"] = ray_cpus
    result = {
        **benchlib.run_header(args.config, overrides, args.quick, base),
        "shards_list": shard_list,
        "slices": args.slices,
        "data": {"train": len(train), "test": len(test), "feature_shape": list(train.feature_shape)},
        "machine": info,
        "warmup_all_cores_fit_s": warm_all,
        "monolithic": mono,
        "sisa": rows,
        "speedup": speed,
        "trainer_overhead": overhead,
        "summary": summary,
    }
    title = (
        f"{args.config.name} {' '.join(overrides)} | {len(train)} train / {len(test)} test | "
        f"{info['nproc']} cores, {info['date']}"
    )
    benchlib.write_results(args.out, result, lambda png: plot(mono, rows, args.slices, title, png))


if __name__ == "__main__":
    main()
