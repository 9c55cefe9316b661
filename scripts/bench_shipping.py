r"""Benchmark how shard data reaches the Ray tasks: driver memory, wall time, same bytes.

A store of ``--samples`` Fashion-MNIST images (S shards x R slices) is trained from
scratch once per mode, through ``orchestrator.run_jobs`` exactly as ``fit`` drives it
(stages are collected, not committed, so every mode trains the same store):

- ``eager``: every shard's slices loaded before the first task is submitted. This is
  what ``fit`` did before jobs became lazy, rebuilt here as the baseline.
- ``lazy``: the default now; a shard's data is loaded when its task is submitted.
- ``streamed``: ``resources.stream_slices=true``; each slice is put on its own and the
  task fetches slice r when stage r starts.
- ``streamed+limit``: also ``resources.max_shards_in_flight`` = the usable cores.

Reported per mode: the driver's peak traced heap (``tracemalloc``, which sees numpy's
buffers; Ray's object store copy lives in shared memory and is not in it), measured in
one run per mode of its own because tracing slows the driver; then the wall time and
the time to the first stage handed to the driver (untraced runs, median of
``--repeats``, mode order rotated between repeats), as ratios to ``eager``. Every run
must produce the same stage checkpoints (SHA-256), or the script exits non-zero.

Run (about 2 minutes on 2 cores)::

    .venv/bin/python scripts/bench_shipping.py --out docs/bench/bench_shipping.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import head, loadavg, machine_info, pyplot, run_folder, save_figure, script_parser, usable_cpus  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.train import orchestrator  # noqa: E402
from sisa.train.jobs import ShardJob, StageResult  # noqa: E402

MODES = ("eager", "lazy", "streamed", "streamed+limit")
MB = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--config", default="configs/fashion_mnist.yaml", help="sisa config (MLP by default)")
    parser.add_argument("--samples", type=int, default=60000, help="training images in the store")
    parser.add_argument("--shards", type=int, default=8, help="S")
    parser.add_argument("--slices", type=int, default=4, help="R")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs (kept small: shipping is measured)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every mode (order rotated)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_shipping.json"), help="JSON output")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary store")
    return parser.parse_args(argv)


def mode_config(cfg: SisaConfig, mode: str, cores: int) -> SisaConfig:
    """``cfg`` with the resources knobs of ``mode``."""
    stream = mode.startswith("streamed")
    limit = cores if mode == "streamed+limit" else 0
    res = dataclasses.replace(cfg.resources, stream_slices=stream, max_shards_in_flight=limit)
    return dataclasses.replace(cfg, resources=res)


def mode_jobs(ens: Ensemble, cfg: SisaConfig, mode: str) -> Iterable[ShardJob]:
    """The jobs of a from-scratch training of every shard, as ``mode`` hands them over."""
    jobs = (dataclasses.replace(job, config=cfg) for job in ens.planner.shard_jobs([(s, 0) for s in range(cfg.shards)]))
    if mode == "eager":
        # Load every slice of every shard before the first submission (the old fit).
        return [dataclasses.replace(j, slices=tuple(j.slices[r] for r in range(len(j.slices)))) for j in jobs]
    return jobs


def run_mode(ens: Ensemble, cfg: SisaConfig, mode: str, *, trace: bool) -> dict[str, Any]:
    """Train every shard once in ``mode``: timings, stage digests and (``trace``) the driver heap peak."""
    digests: dict[str, str] = {}
    first: list[float] = []
    if trace:
        tracemalloc.start()
        tracemalloc.reset_peak()
    started = time.perf_counter()

    def on_stage(result: StageResult) -> None:
        if not first:
            first.append(time.perf_counter() - started)
        digests[f"{result.shard}.{result.stage}"] = result.sha256

    orchestrator.run_jobs(mode_jobs(ens, cfg, mode), on_stage)
    seconds = time.perf_counter() - started
    run: dict[str, Any] = {"mode": mode, "seconds": seconds, "first_stage_s": first[0], "sha": digests}
    if trace:
        run["driver_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return run


def summarise(memory: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: the traced heap peak, median timings, and the ratios to ``eager``."""
    rows = []
    for mode in MODES:
        sel = [r for r in runs if r["mode"] == mode]
        rows.append(
            {
                "mode": mode,
                "seconds": statistics.median(r["seconds"] for r in sel),
                "first_stage_s": statistics.median(r["first_stage_s"] for r in sel),
                "driver_peak_mb": next(m["driver_peak_mb"] for m in memory if m["mode"] == mode),
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("seconds", "first_stage_s", "driver_peak_mb"):
            row[f"{key}_vs_eager"] = row[key] / base[key]
    return rows


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Driver peak heap and wall time per mode, as bars."""
    plt = pyplot()

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in rows]
    mem.bar(names, [r["driver_peak_mb"] for r in rows], color="tab:blue")
    mem.set_ylabel("driver peak traced heap (MiB)")
    wall.bar(names, [r["seconds"] for r in rows], color="tab:orange", label="whole training")
    wall.bar(names, [r["first_stage_s"] for r in rows], color="tab:green", label="to first stage")
    wall.set_ylabel("seconds (median)")
    wall.legend()
    for ax in (mem, wall):
        ax.tick_params(axis="x", rotation=15)
    save_figure(fig, path, title)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write the table, JSON and PNG; non-zero when modes disagree on bytes."""
    args = parse_args(argv)
    cores = usable_cpus()
    overrides = [f"shards={args.shards}", f"slices={args.slices}", f"train.epochs={args.epochs}"]
    cfg = load_config(args.config, overrides)
    train = head(load_split(cfg.data, "train"), args.samples)
    info = machine_info()
    with run_folder(args.workdir, "bench-shipping-") as workdir:
        ens = Ensemble.create(workdir / "store", cfg)
        ens.ingest(train)
        with ens.store.read() as txn:
            sizes = [ens.planner.shard_job(txn, s).sizes() for s in range(cfg.shards)]
        sample_bytes = int(train.x[0].nbytes + 8 + 8)  # float32 features + int64 label + int64 id
        orchestrator.connect(None, num_cpus=cores)
        print(f"{len(train)} samples, S={cfg.shards} R={cfg.slices}, {cores} cores; warm-up ...", flush=True)
        run_mode(ens, mode_config(cfg, "lazy", cores), "lazy", trace=False)  # start the workers, import torch
        memory = []
        for mode in MODES:
            memory.append(run_mode(ens, mode_config(cfg, mode, cores), mode, trace=True))
            print(f"  traced {mode:>15}: driver heap peak {memory[-1]['driver_peak_mb']:.1f} MiB", flush=True)
        runs = []
        for rep in range(args.repeats):
            for i in range(len(MODES)):
                mode = MODES[(i + rep) % len(MODES)]
                run = run_mode(ens, mode_config(cfg, mode, cores), mode, trace=False)
                print(f"  repeat {rep + 1} {mode:>15}: {run['seconds']:.2f} s", flush=True)
                runs.append(run)
        ens.close()
    info["loadavg_end"] = loadavg()
    same = all(r["sha"] == runs[0]["sha"] for r in memory + runs)
    rows = summarise(memory, runs)
    shard_mb = [sum(s) * sample_bytes / MB for s in sizes]
    result = {
        "script": "scripts/bench_shipping.py",
        "command": " ".join([".venv/bin/python", "scripts/bench_shipping.py", *(argv or sys.argv[1:])]),
        "config": args.config,
        "overrides": overrides,
        "samples": len(train),
        "cores": cores,
        "repeats": args.repeats,
        "shard_data_mb": {"max": max(shard_mb), "total": sum(shard_mb)},
        "slice_data_mb_max": max(max(s) for s in sizes) * sample_bytes / MB,
        "identical_checkpoints": same,
        "stages": len(runs[0]["sha"]),
        "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "sha"} for r in memory + runs],
        "machine": info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    title = f"{args.config} n={len(train)} S={cfg.shards} R={cfg.slices} epochs={args.epochs} | {cores} cores"
    plot(rows, title, args.out.with_suffix(".png"))
    print(f"shard data: {max(shard_mb):.1f} MiB per shard, {sum(shard_mb):.1f} MiB in all")
    print(f"{'mode':>15} {'wall s':>8} {'x eager':>8} {'first s':>8} {'driver MiB':>11} {'x eager':>8}")
    for r in rows:
        print(
            f"{r['mode']:>15} {r['seconds']:8.2f} {r['seconds_vs_eager']:8.2f} {r['first_stage_s']:8.2f} "
            f"{r['driver_peak_mb']:11.1f} {r['driver_peak_mb_vs_eager']:8.3f}"
        )
    print(f"identical checkpoints across modes: {same}; wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
