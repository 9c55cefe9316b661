r"""Benchmark what pinning the CPU kernel levels costs: sisa training at each ``resources.cpu_isa``.

Every shard worker is pinned to ``resources.cpu_isa`` before torch loads
(``sisa.train.domain.pin_env``): ``native`` pins nothing, ``avx2`` (the default) sets
``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2``, ``baseline``
sets ATen's default kernels, MKL's COMPATIBLE branch and oneDNN's SSE4.1. The libraries
read these variables once per process, so every measurement runs in a child process
started with its level's environment (this same script in ``--child`` mode).

A child trains one shard of Fashion-MNIST per model with ``sisa.train.trainer.train_shard``:
the first N training images in R contiguous slices (R and the recipe from the model's
config; ``resources.threads_per_shard=1`` and the level's ``resources.cpu_isa``),
after one untimed warm-up stage on a few samples (model build, kernel JIT). It reports
samples trained per second (sum over stages of ``n_samples * epochs``, divided by the
wall time of the whole ``train_shard`` call, checkpoints included), the process CPU
time, the stage's determinism domain and the final weights digest; it fails unless the
domain shows the pin took effect (kernel level ``AVX2`` for ``avx2``, ``DEFAULT`` for
``baseline``, and the MKL and oneDNN pins in force).

The levels are interleaved (native, avx2, baseline, native, ...) for ``--repeats``
rounds, so load from other work on the machine hits every level alike; each child
measures every model in turn. Reported per model and level: the median samples/s and
its ratio to ``native``, whether the weight digests of one level are equal across
repeats (they must be: bit-exact within a domain; the script exits 1 otherwise), and
whether they differ between levels (they should: other kernels round differently).

Full run (MLP on 36,000 images, CNN on 3,000, 3 rounds; about 6 minutes on 2 quiet cores)::

    .venv/bin/python scripts/bench_domains.py

Smoke run (a few hundred images, 2 rounds; about 30 s, mostly process start-up)::

    .venv/bin/python scripts/bench_domains.py --quick            # writes results/bench_domains.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import machine_info, pyplot, save_figure, script_parser  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.train import domain as domains  # noqa: E402
from sisa.train.jobs import ShardJob, SliceData  # noqa: E402
from sisa.train.trainer import train_shard  # noqa: E402

LEVELS = domains.CPU_ISAS
# The kernel level torch must report under each pinned level.
EXPECTED_KERNELS = {"avx2": "AVX2", "baseline": "DEFAULT"}
MODELS = {"mlp": "configs/fashion_mnist.yaml", "cnn": "configs/fashion_mnist_cnn.yaml"}
FULL_SAMPLES = {"mlp": 36000, "cnn": 3000}
QUICK_SAMPLES = {"mlp": 400, "cnn": 48}
FULL_WARMUP, QUICK_WARMUP = 128, 16
FULL_REPEATS, QUICK_REPEATS = 3, 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The options.
    """
    parser = script_parser(__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of bench_domains.json and .png (docs/bench; results with --quick, so a smoke run "
        "never overwrites the run of record)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"rounds of all levels ({FULL_REPEATS}; {QUICK_REPEATS} with --quick)"
    )
    for name in MODELS:
        parser.add_argument(
            f"--{name}-samples",
            type=int,
            default=None,
            help=f"training images of the {name} shard ({FULL_SAMPLES[name]}; {QUICK_SAMPLES[name]} with --quick)",
        )
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, 2 rounds")
    parser.add_argument("--child", choices=LEVELS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    if args.out is None:
        args.out = Path("results" if args.quick else "docs/bench")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def shard_job(config: str, level: str, x: np.ndarray, y: np.ndarray, n: int) -> ShardJob:
    """A from-scratch job for one shard: the first ``n`` samples in the config's R contiguous slices.

    Args:
        config: Path of the sisa config (recipe, R, model).
        level: ``resources.cpu_isa`` to put into the config.
        x: Features of the samples (ids are their row numbers).
        y: Labels.
        n: Samples in the shard.

    Returns:
        The job for :func:`sisa.train.trainer.train_shard`.
    """
    cfg = load_config(config, overrides=[f"resources.cpu_isa={level}", "resources.threads_per_shard=1"])
    ids = np.arange(n, dtype=np.int64)
    parts = np.array_split(ids, min(cfg.slices, n))
    return ShardJob(
        config=cfg,
        shard=0,
        slices=tuple(SliceData(p, x[p], y[p]) for p in parts),
        start_stage=0,
        parent=None,
        parent_key=None,
        input_shape=tuple(x.shape[1:]),
        num_classes=cfg.data.num_classes,
    )


def check_pinned(level: str, domain: dict[str, Any]) -> None:
    """Fail unless ``domain`` (a stage's) shows that ``level``'s pins took effect.

    Args:
        level: The level the process was started with.
        domain: ``StageResult.domain``.

    Raises:
        SystemExit: When a pin is not in force.
    """
    pins = domains.pin_env(level)
    found = {
        "cpu_kernels": domain["cpu_kernels"],
        "mkl_cbwr": domain["mkl_cbwr"],
        "onednn_isa": domain["onednn_isa"],
        "pinned_from_start": domains.pinned_from_start(level),
    }
    want: dict[str, Any] = {
        "mkl_cbwr": pins.get("MKL_CBWR", ""),
        "onednn_isa": pins.get("ONEDNN_MAX_CPU_ISA", ""),
        "pinned_from_start": True,
    }
    if level in EXPECTED_KERNELS:
        want["cpu_kernels"] = EXPECTED_KERNELS[level]
    wrong = {k: (found[k], v) for k, v in want.items() if found[k] != v}
    if wrong:
        raise SystemExit(f"cpu_isa={level}: the pin did not take effect (found, wanted): {wrong}")


def measure(level: str, model: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Train one model's shard in this process after a warm-up; time it and check the pins.

    Args:
        level: This process's ``cpu_isa`` level.
        model: ``name``, ``config``, ``samples`` and ``warmup`` (samples of the warm-up stage).
        x: Features (at least ``samples`` rows).
        y: Labels.

    Returns:
        Samples trained, wall and CPU seconds, samples/s, the domain and the weights digest.
    """
    warm = shard_job(model["config"], level, x, y, model["warmup"])
    list(train_shard(dataclasses.replace(warm, slices=warm.slices[:1])))
    job = shard_job(model["config"], level, x, y, model["samples"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = list(train_shard(job))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    domain = results[-1].domain
    check_pinned(level, domain)
    trained = sum(r.n_samples * r.epochs for r in results)
    return {
        "model": model["name"],
        "level": level,
        "samples": model["samples"],
        "stages": len(results),
        "epochs_per_stage": results[-1].epochs,
        "samples_trained": trained,
        "wall_s": wall,
        "cpu_s": cpu,
        "stage_s": sum(r.seconds for r in results),
        "samples_per_s": trained / wall,
        "samples_per_cpu_s": trained / cpu,
        "weights": results[-1].weights,
        "domain": domain,
    }


def child_main(level: str, spec_path: Path) -> int:
    """``--child`` mode: measure every model of the spec at ``level``; print one JSON line.

    Args:
        level: The level this process was started with.
        spec_path: JSON with ``data`` (an ``.npz`` of ``x`` and ``y``) and ``models``.

    Returns:
        0 (failures raise).
    """
    spec = json.loads(spec_path.read_text())
    with np.load(spec["data"]) as arrays:
        x, y = arrays["x"], arrays["y"]
    runs = [measure(level, model, x, y) for model in spec["models"]]
    print(json.dumps(runs), flush=True)
    return 0


def run_child(level: str, spec_path: Path) -> list[dict[str, Any]]:
    """Start this script in ``--child`` mode with ``level``'s pins (and no others) in its environment.

    Args:
        level: The level to measure.
        spec_path: The spec file for the child.

    Returns:
        The child's measurements, one per model.

    Raises:
        RuntimeError: When the child fails.
    """
    env = {k: v for k, v in os.environ.items() if k not in domains.PIN_VARS}
    env.update(domains.pin_env(level))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", level, "--spec", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child at cpu_isa={level} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: per level the median samples/s, ratios to native and digests; digest checks across levels.

    Args:
        runs: Every child measurement (with its ``repeat``, the round it ran in).

    Returns:
        ``{model: {"levels": {level: row}, "digests_differ": {"a/b": bool}, "bit_exact_within_levels": bool}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        levels: dict[str, dict[str, Any]] = {}
        for level in LEVELS:
            sel = [r for r in runs if r["model"] == model and r["level"] == level]
            levels[level] = {
                "samples_per_s": statistics.median(r["samples_per_s"] for r in sel),
                "samples_per_s_runs": [r["samples_per_s"] for r in sel],
                "samples_per_cpu_s": statistics.median(r["samples_per_cpu_s"] for r in sel),
                "weights": sel[0]["weights"],
                "weights_equal_across_repeats": len({r["weights"] for r in sel}) == 1,
                "domain_id": sel[0]["domain"]["id"],
                "cpu_kernels": sel[0]["domain"]["cpu_kernels"],
                "mkl_cbwr": sel[0]["domain"]["mkl_cbwr"],
                "onednn_isa": sel[0]["domain"]["onednn_isa"],
            }
        base = levels["native"]
        native = {r["repeat"]: r["samples_per_s"] for r in runs if r["model"] == model and r["level"] == "native"}
        for level, row in levels.items():
            row["ratio_to_native"] = row["samples_per_s"] / base["samples_per_s"]
            row["ratio_to_native_cpu"] = row["samples_per_cpu_s"] / base["samples_per_cpu_s"]
            # Paired within a round (the runs closest in time): the spread says how noisy the ratio is.
            row["ratio_to_native_per_round"] = [
                r["samples_per_s"] / native[r["repeat"]]
                for r in runs
                if r["model"] == model and r["level"] == level and r["repeat"] in native
            ]
        pairs = [(a, b) for i, a in enumerate(LEVELS) for b in LEVELS[i + 1 :]]
        out[model] = {
            "levels": levels,
            "digests_differ": {f"{a}/{b}": levels[a]["weights"] != levels[b]["weights"] for a, b in pairs},
            "bit_exact_within_levels": all(row["weights_equal_across_repeats"] for row in levels.values()),
        }
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU model, vendor and vector extensions from ``/proc/cpuinfo`` (empty fields elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {
        "model": fields.get("model name", ""),
        "vendor": fields.get("vendor_id", ""),
        "avx2": "avx2" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
    }


def plot(summary: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Bars of samples/s relative to native, per model and level, each run as a dot.

    Args:
        summary: The output of :func:`summarise`.
        title: Figure title.
        path: PNG to write.
    """
    plt = pyplot()

    models = list(summary)
    width = 0.8 / len(LEVELS)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, level in enumerate(LEVELS):
        xs = [m + (i - (len(LEVELS) - 1) / 2) * width for m in range(len(models))]
        rows = [summary[name]["levels"][level] for name in models]
        ratios = [row["ratio_to_native"] for row in rows]
        bars = ax.bar(xs, ratios, width, label=f"{level} ({rows[0]['cpu_kernels']})")
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=8)
        for x, row, name in zip(xs, rows, models, strict=True):
            native = summary[name]["levels"]["native"]["samples_per_s"]
            runs = [v / native for v in row["samples_per_s_runs"]]
            ax.plot([x] * len(runs), runs, "k.", markersize=4)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(
        [f"{name}\n(native {summary[name]['levels']['native']['samples_per_s']:,.0f} samples/s)" for name in models]
    )
    ax.set_ylabel("samples/s relative to native (median; dots: runs)")
    ax.set_ylim(0, max(1.3, ax.get_ylim()[1]))
    ax.legend(fontsize=8, title="resources.cpu_isa", title_fontsize=8, loc="upper center", ncol=len(LEVELS))
    save_figure(fig, path, title)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--child``, one measurement); write the table, JSON and PNG.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0, or 1 when a level's weights differ between repeats.
    """
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)
    samples = {
        name: getattr(args, f"{name}_samples") or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)[name]
        for name in MODELS
    }
    warmup = QUICK_WARMUP if args.quick else FULL_WARMUP
    info = machine_info()
    cfg = load_config(MODELS["mlp"])
    train = load_split(cfg.data, "train")
    n = max(samples.values())
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-domains-") as tmp:
        data = Path(tmp) / "data.npz"
        np.savez(data, x=train.x[:n], y=train.y[:n])
        models = [
            {"name": name, "config": str(ROOT / path), "samples": samples[name], "warmup": min(warmup, samples[name])}
            for name, path in MODELS.items()
        ]
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"data": str(data), "models": models}))
        for rep in range(args.repeats):
            for level in LEVELS:
                for run in run_child(level, spec):
                    run["repeat"] = rep + 1
                    runs.append(run)
                    print(
                        f"  round {rep + 1} {level:>8} {run['model']}: {run['samples_per_s']:8.0f} samples/s "
                        f"({run['wall_s']:.1f} s, {run['domain']['cpu_kernels']}, weights {run['weights'][:12]})",
                        flush=True,
                    )
    info["loadavg_end"] = list(os.getloadavg())
    summary = summarise(runs)
    exact = all(s["bit_exact_within_levels"] for s in summary.values())
    first = runs[0]["domain"]
    result = {
        "script": "scripts/bench_domains.py",
        "command": " ".join([".venv/bin/python", "scripts/bench_domains.py", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "repeats": args.repeats,
        "order": "per round: native, avx2, baseline; each child process trains the mlp shard, then the cnn shard",
        "models": {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in models},
        "pins": {level: domains.pin_env(level) for level in LEVELS},
        "seconds": time.perf_counter() - started,
        "bit_exact_within_levels": exact,
        "summary": summary,
        "runs": [{**r, "domain": r["domain"]["id"]} for r in runs],
        "domains": {r["domain"]["id"]: r["domain"] for r in runs},
        "cpu": cpu_info(),
        "libraries": {k: first[k] for k in ("torch", "torch_build", "blas", "onednn")},
        "machine": info,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_domains.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["cpu"]
    title = (
        f"{cpu['model']} ({'AVX-512' if cpu['avx512'] else 'no AVX-512'}), torch {first['torch']}, 1 thread | "
        + ", ".join(f"{name} n={samples[name]}" for name in MODELS)
        + f" | {args.repeats} rounds"
    )
    plot(summary, title, path.with_suffix(".png"))
    header = f"{'model':>5} {'level':>9} {'kernels':>8} {'samples/s':>10} {'x native':>9} {'x (cpu)':>8}"
    print(f"{header} {'x per round':>20} {'same bits':>10}")
    for name, s in summary.items():
        for level, row in s["levels"].items():
            print(
                f"{name:>5} {level:>9} {row['cpu_kernels']:>8} {row['samples_per_s']:10.0f} "
                f"{row['ratio_to_native']:9.3f} {row['ratio_to_native_cpu']:8.3f} "
                f"{' '.join(f'{v:.2f}' for v in row['ratio_to_native_per_round']):>20} "
                f"{str(row['weights_equal_across_repeats']):>10}"
            )
        print(f"      weights differ between levels: {s['digests_differ']}")
    print(f"bit-exact within every level: {exact}; wrote {path} and {path.with_suffix('.png')}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
