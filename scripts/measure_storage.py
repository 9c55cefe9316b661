r"""Measure what a SISA store holds per checkpoint and per sample, and how fast it compacts.

For ``docs/scaling.md``: storage of S x R checkpoints and of N samples, and the erasure step
(compaction rewrites the whole LMDB file on every applied deletion batch).

1. **Checkpoint bytes** per model config (MLP ``configs/fashion_mnist.yaml``, CNN
   ``configs/fashion_mnist_cnn.yaml``): a tiny store (``--ckpt-samples`` Fashion-MNIST
   images, S=2, R=2, 1 epoch) is trained on Ray and the stored checkpoint blobs (model +
   Adam state + RNG state + metadata, as committed) are read back and measured. Beside
   them: the parameter count and ``3 x 4 x params`` (float32 weights + Adam's two moments),
   to show what the size is made of. Checkpoint size does not depend on the data size:
   the manifest inside is a digest, not the id list.
2. **Sample bytes**: Fashion-MNIST images ingested (no training) into stores of
   ``--sizes`` samples, each compacted; the marginal ``data.mdb`` bytes per sample is the
   slope between the two largest sizes (record = int64 label + float32 features + 16-byte
   digest, plus the id/assignment/membership entries and B-tree pages).
3. **Compaction speed**: ``Store.compact()`` timed on the largest of those stores
   (``--compact-repeats`` times, median), in bytes per second of the compacted file.

Run (about a minute on 2 cores)::

    .venv/bin/python scripts/measure_storage.py --out docs/bench/storage.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import head, machine_info, run_folder, script_parser, stage_records, start_ray  # noqa: E402

from sisa.config.settings import load_config  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.train.models import build_model  # noqa: E402

CONFIGS = {"mlp": "configs/fashion_mnist.yaml", "cnn": "configs/fashion_mnist_cnn.yaml"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--ckpt-samples", type=int, default=400, help="images in the checkpoint-size stores")
    parser.add_argument("--sizes", default="20000,60000", help="sample counts of the ingest-only stores")
    parser.add_argument("--compact-repeats", type=int, default=3, help="timed compactions of the largest store")
    parser.add_argument("--out", type=Path, default=Path("results/storage.json"), help="JSON output")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary stores")
    return parser.parse_args(argv)


def checkpoint_sizes(name: str, config: str, n: int, workdir: Path) -> dict[str, Any]:
    """Train a tiny store with ``config`` and measure its committed checkpoints."""
    cfg = load_config(config, ["shards=2", "slices=2", "train.epochs=1", f"data.train_limit={n}"])
    train = load_split(cfg.data, "train")
    path = workdir / f"ckpt-{name}"
    ens = Ensemble.create(path, cfg)
    try:
        ens.ingest(train)
        ens.fit()
        records = stage_records(ens)
        with ens.store.read() as txn:
            blobs = [len(ens.store.checkpoint(txn, r)) for r in records]
    finally:
        ens.close()
    shutil.rmtree(path, ignore_errors=True)
    model = build_model(cfg.model, train.feature_shape, cfg.data.num_classes)
    params = sum(p.numel() for p in model.parameters())
    return {
        "config": config,
        "model": {"name": cfg.model.name, "hidden": list(cfg.model.hidden), "channels": list(cfg.model.channels)},
        "optimizer": cfg.train.optimizer,
        "checkpoints": len(blobs),
        "bytes": blobs,
        "bytes_mean": statistics.fmean(blobs),
        "parameters": params,
        "float32_weights_plus_adam_moments_bytes": 3 * 4 * params,
    }


def sample_storage(sizes: Sequence[int], repeats: int, workdir: Path) -> dict[str, Any]:
    """Ingest Fashion-MNIST into stores of each size, compact, measure; time compaction of the largest."""
    cfg = load_config(CONFIGS["mlp"], [f"data.train_limit={max(sizes)}"])
    train = load_split(cfg.data, "train")
    rows = []
    compact_s: list[float] = []
    for n in sizes:
        path = workdir / f"samples-{n}"
        ens = Ensemble.create(path, cfg)
        try:
            t0 = time.perf_counter()
            ens.ingest(head(train, n))
            ingest_s = time.perf_counter() - t0
            ens.store.compact()
            size = (path / "data.mdb").stat().st_size
            if n == max(sizes):
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    ens.store.compact()
                    compact_s.append(time.perf_counter() - t0)
        finally:
            ens.close()
        shutil.rmtree(path, ignore_errors=True)
        rows.append({"samples": n, "data_mdb_bytes": size, "ingest_s": ingest_s})
    a, b = rows[-2], rows[-1]
    per_sample = (b["data_mdb_bytes"] - a["data_mdb_bytes"]) / (b["samples"] - a["samples"])
    width = int(train.x[0].size)
    median = statistics.median(compact_s)
    return {
        "feature_values": width,
        "record_bytes": 8 + 4 * width + 16,
        "stores": rows,
        "bytes_per_sample_marginal": per_sample,
        "compact_seconds": compact_s,
        "compact_seconds_median": median,
        "compact_bytes_per_second": rows[-1]["data_mdb_bytes"] / median,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print, write the JSON."""
    args = parse_args(argv)
    sizes = sorted({int(v) for v in args.sizes.split(",") if v.strip()})
    if len(sizes) < 2:
        raise SystemExit("--sizes needs two sample counts (the slope between them is the per-sample size)")
    info = machine_info()
    started = time.perf_counter()
    with run_folder(args.workdir, "measure_storage-") as workdir:
        start_ray()
        ckpt = {name: checkpoint_sizes(name, path, args.ckpt_samples, workdir) for name, path in CONFIGS.items()}
        samples = sample_storage(sizes, args.compact_repeats, workdir)
    for name, row in ckpt.items():
        print(
            f"{name}: {row['parameters']:,} parameters; checkpoint {row['bytes_mean']:,.0f} bytes "
            f"(min {min(row['bytes']):,}, max {max(row['bytes']):,}; 3 x 4 x params = "
            f"{row['float32_weights_plus_adam_moments_bytes']:,})"
        )
    print(
        f"samples: {samples['bytes_per_sample_marginal']:,.0f} bytes each in data.mdb (record "
        f"{samples['record_bytes']:,}); compaction of {samples['stores'][-1]['data_mdb_bytes']:,} bytes: "
        f"{samples['compact_seconds_median']:.2f}s median = {samples['compact_bytes_per_second'] / 1e6:,.0f} MB/s"
    )
    info["loadavg_end"] = machine_info()["loadavg_start"]
    result = {
        "command": ".venv/bin/python scripts/measure_storage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "seconds": time.perf_counter() - started,
        "checkpoints": ckpt,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
