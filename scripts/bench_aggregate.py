"""Benchmark sisa.serve.aggregate: vmap vs loop shard forwards on CPU.

Times ``shard_logits`` for S=16 MLP and CNN ensembles over several batch sizes and
writes a table, a JSON file and a PNG plot; used to set ``CPU_VMAP_MAX_BATCH``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Let `python scripts/bench_aggregate.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.func import functional_call, stack_module_state, vmap  # noqa: E402

from sisa.serve.aggregate import CPU_VMAP_MAX_BATCH, shard_logits  # noqa: E402

logger = logging.getLogger("bench_aggregate")

BATCH_SIZES = (1, 16, 64, 256, 1000)


def make_mlp() -> nn.Module:
    """784-128-10 MLP on flattened 28x28 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def make_cnn() -> nn.Module:
    """conv32-conv64 (3x3), maxpool, fc128, 10 classes on 1x28x28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def measure(models: list[nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call: loop, vmap end to end, and vmap forward on pre-stacked weights.

    The last one isolates what stacking the weights (done on every shard_logits call)
    costs, i.e. what a cache of stacked weights could save. The three are timed in
    turn within each repeat so that load from other processes hits them alike.
    """
    with torch.inference_mode():
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
    fwd = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))

    def vmap_fwd() -> object:
        with torch.inference_mode():
            return fwd(params, buffers, x)

    calls: dict[str, Callable[[], object]] = {
        "loop": lambda: shard_logits(models, x, backend="loop", batch_size=len(x)),
        "vmap": lambda: shard_logits(models, x, backend="vmap", batch_size=len(x)),
        "vmap_fwd": vmap_fwd,
    }
    # Warm-up only where a call is cheap; for second-long calls it changes nothing.
    if len(x) <= 64:
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Plot loop/vmap speed ratios against batch size, per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in sorted({str(r["arch"]) for r in rows}):
        sel = [r for r in rows if r["arch"] == arch]
        batches = [r["batch"] for r in sel]
        line = ax.plot(batches, [r["ratio"] for r in sel], marker="o", label=f"{arch} vmap end to end")
        ax.plot(
            batches,
            [r["ratio_fwd"] for r in sel],
            marker="x",
            linestyle=":",
            color=line[0].get_color(),
            label=f"{arch} vmap, weights pre-stacked",
        )
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("loop time / vmap time (>1: vmap faster)")
    ax.set_title("sisa.serve.aggregate, S=16, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run the benchmark and write the table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/bench_aggregate.json"))
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = {1: 100, 16: 50, 64: 20, 256: 7, 1000: 3}
    quick = {1: 21, 16: 11, 64: 5, 256: 3, 1000: 1}
    rows: list[dict[str, Any]] = []
    head = ("arch", "batch", "loop_ms", "vmap_ms", "vmap_fwd_ms", "loop/vmap", "loop/vfwd")
    logger.info("%-5s %6s %10s %10s %12s %10s %10s", *head)
    for arch, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        models = [make().eval() for _ in range(args.shards)]
        for batch in BATCH_SIZES:
            repeats = (quick if args.quick else full)[batch]
            x = torch.randn(batch, 1, 28, 28)
            t = measure(models, x, repeats)
            if not args.quick:
                # A second pass, keeping the best median, damps drifting machine load.
                t = {k: min(v, w) for (k, v), w in zip(t.items(), measure(models, x, repeats).values(), strict=True)}
            row = {
                "arch": arch,
                "batch": batch,
                "repeats": repeats,
                "loop_ms": t["loop"] * 1e3,
                "vmap_ms": t["vmap"] * 1e3,
                "vmap_fwd_ms": t["vmap_fwd"] * 1e3,
                "ratio": t["loop"] / t["vmap"],
                "ratio_fwd": t["loop"] / t["vmap_fwd"],
            }
            rows.append(row)
            logger.info(
                "%-5s %6d %10.2f %10.2f %12.2f %10.2f %10.2f",
                arch,
                batch,
                row["loop_ms"],
                row["vmap_ms"],
                row["vmap_fwd_ms"],
                row["ratio"],
                row["ratio_fwd"],
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "shards": args.shards,
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        # Other processes share this machine; the load average says how much.
        "loadavg_after": os.getloadavg(),
        "cpu_vmap_max_batch": CPU_VMAP_MAX_BATCH,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    png = args.out.with_suffix(".png")
    plot(rows, png)
    logger.info("wrote %s and %s", args.out, png)


if __name__ == "__main__":
    main()
