r"""Measure what a SISA store holds per checkpoint and per sample, and what its erasure costs.

For ``docs/scaling.md``: storage of S x R checkpoints and of N samples, and the erasure step of
store format 3 (samples are encrypted under one key per membership *run*, up to 508 ids of one
slice; an apply re-keys every run that held a deleted id: new key, the run's remaining samples
re-encrypted, old key deleted, then the key file ``keys/data.mdb`` compacted;
``sisa/store/erasure.py``).

1. **Checkpoint bytes** per model config (MLP ``configs/fashion_mnist.yaml``, CNN
   ``configs/fashion_mnist_cnn.yaml``): a tiny store (``--ckpt-samples`` Fashion-MNIST
   images, S=2, R=2, 1 epoch) is trained on Ray and the stored checkpoint blobs (model +
   Adam state + RNG state + metadata, as committed) are read back and measured. Beside
   them: the parameter count and ``3 x 4 x params`` (float32 weights + Adam's two moments),
   to show what the size is made of. Checkpoint size does not depend on the data size:
   the manifest inside is a digest, not the id list.
2. **Sample bytes**: Fashion-MNIST images ingested raw (``load_split(..., raw=True)``: uint8
   pixels with ``scale`` 255, what ``sisa train``/``sisa add`` store) into stores of
   ``--sizes`` samples (no training), each compacted; the marginal ``data.mdb`` bytes per
   sample is the slope between the two largest sizes (record = encrypted int32 label +
   uint8 features + 8-byte digest, plus the id/assignment/packed-membership entries and
   B-tree pages). Sizes below 12,000 are refused for the slope: small stores are noisy.
3. **Re-keying throughput** (the erasure step): on the largest of those stores (default
   config S=8, R=4), ``sisa.store.erasure.rotate(store, [(shard, slice, run)], fresh=True)``
   is timed on ``--rekey-runs`` runs spread over the store, one at a time (records
   re-encrypted per second, median); then every run at once (what a batch touching every run
   does), ``--compact-repeats`` times: the bulk rate (median; it includes each run's two
   key-file commits, and runs hold up to 508 samples at any N), and the fixed cost of one
   ``rotate`` call beyond that (median over the single runs of seconds - records / bulk
   rate; an apply makes one call). Then the key file's compaction
   (``store.keys.compact()``, fsync'd copy + rename), timed ``--compact-repeats`` times,
   median, with its size.
4. **Space reclamation, not erasure**: ``Store.compact()`` (a rewrite of the whole
   ``data.mdb``, which format 2 ran on every apply and format 3 runs only on request, to
   return free pages) timed on the largest store, ``--compact-repeats`` times, median, in
   bytes per second of the compacted file. Kept for comparison with the re-keying.
5. **Key files at scale**: a bare LMDB environment of ``--key-entries`` random entries,
   appended in key order, for two layouts: per-sample keys, the alternative not taken (8-byte
   id -> 16-byte key, N entries), and the store's run keys (20-byte shard/slice/run/generation
   -> 16-byte key + 8-byte request id, about N/508 entries). For each: the file size after a
   compacting copy (bytes per entry, slope between the two largest counts) and the time of
   that copy + fsync (what every apply pays to erase the deleted keys), median of
   ``--compact-repeats``.

Run (about a minute on 2 cores)::

    .venv/bin/python scripts/measure_storage.py --out docs/bench/storage.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import machine_info, run_folder, script_parser, stage_records, start_ray  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.data.arrays import LabeledArrays  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.store import erasure  # noqa: E402
from sisa.store.layout import RUN_MAX, SEAL_OVERHEAD  # noqa: E402
from sisa.train.models import build_model  # noqa: E402

CONFIGS = {"mlp": "configs/fashion_mnist.yaml", "cnn": "configs/fashion_mnist_cnn.yaml"}
MIN_SLOPE_SIZE = 12_000  # smaller stores give a noisy per-sample slope
LABEL_BYTES = 4  # int32 label in a sample record (sisa.store.layout.LABEL)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--ckpt-samples", type=int, default=400, help="images in the checkpoint-size stores")
    parser.add_argument("--sizes", default="20000,60000", help="sample counts of the ingest-only stores")
    parser.add_argument("--rekey-runs", type=int, default=9, help="runs re-keyed one at a time (median rate)")
    parser.add_argument("--compact-repeats", type=int, default=3, help="timed compactions (key file, store, LMDB)")
    parser.add_argument(
        "--key-entries", default="250000,1000000", help="entry counts of the per-sample-key LMDB experiment"
    )
    parser.add_argument("--out", type=Path, default=Path("results/storage.json"), help="JSON output")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary stores")
    parser.add_argument("--skip-checkpoints", action="store_true", help="do not train (development only)")
    parser.add_argument(
        "--allow-small", action="store_true", help="allow --sizes below 12,000 (development only: noisy slope)"
    )
    return parser.parse_args(argv)


def first(data: LabeledArrays, n: int) -> LabeledArrays:
    """The first ``n`` samples of ``data``, keeping its ``scale`` (views; the store copies what it ingests)."""
    return dataclasses.replace(data, x=data.x[:n], y=data.y[:n], ids=data.ids[:n])


def checkpoint_sizes(name: str, config: str, n: int, workdir: Path) -> dict[str, Any]:
    """Train a tiny store with ``config`` and measure its committed checkpoints.

    Args:
        name: Label of the model (folder name).
        config: The YAML config.
        n: Training samples.
        workdir: Folder for the temporary store.

    Returns:
        The checkpoints' sizes and what they are made of.
    """
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


def rekeying(ens: Ensemble, runs: int, repeats: int) -> dict[str, Any]:
    """Time re-keying on an ingested store: ``runs`` runs one at a time, then all, then the key file's compaction.

    Args:
        ens: A writable ensemble with ingested samples.
        runs: Runs to re-key one at a time (spread over the store's runs).
        repeats: Re-keyings of every run at once, and timed compactions of the key file.

    Returns:
        Per-run rows and their median rate; the all-runs rate (median of ``repeats``), which
        is the bulk rate, and the per-call overhead beyond it (median over the single runs of
        seconds - records / bulk rate); the key file's size and compaction time.
    """
    store = ens.store
    with store.keys.read(follow=False) as ktxn:
        cells = sorted(store.keys.all_runs(ktxn))
    rows = []
    for shard, slice_, run in cells[:: max(1, len(cells) // runs)][:runs]:
        t0 = time.perf_counter()
        report = erasure.rotate(store, [(shard, slice_, run)], fresh=True)
        seconds = time.perf_counter() - t0
        rows.append({"shard": shard, "slice": slice_, "run": run, "records": report.reencrypted, "seconds": seconds})
    rates = [r["records"] / r["seconds"] for r in rows]
    whole = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        everything = erasure.rotate(store, cells, fresh=True)
        whole.append({"records": everything.reencrypted, "seconds": time.perf_counter() - t0})
    rate_all = statistics.median(w["records"] / w["seconds"] for w in whole)
    # What one rotate() call costs beyond its records at the bulk rate (whose runs' key commits are
    # already in the bulk rate): reading the keys and memberships, starting the pass. Paid once per apply.
    overhead = statistics.median(max(0.0, r["seconds"] - r["records"] / rate_all) for r in rows)
    compact_s, sizes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sizes.append(list(store.keys.compact()))
        compact_s.append(time.perf_counter() - t0)
    return {
        "method": "sisa.store.erasure.rotate(store, [(shard, slice, run)], fresh=True) per run; then all runs at once",
        "key_unit": f"membership run (<= {RUN_MAX} samples of one slice)",
        "run_max": RUN_MAX,
        "cells": len(cells),
        "runs": rows,
        "records_per_second": rates,
        "records_per_second_median": statistics.median(rates),
        "all_runs": whole,
        "all_runs_records_per_second_median": rate_all,
        "per_call_overhead_s": overhead,
        "key_file_bytes": sizes[-1][1],
        "key_file_compact_seconds": compact_s,
        "key_file_compact_seconds_median": statistics.median(compact_s),
    }


def sample_storage(sizes: Sequence[int], rekey_runs: int, repeats: int, workdir: Path) -> dict[str, Any]:
    """Ingest raw Fashion-MNIST into stores of each size and measure; on the largest, time re-keying and compaction.

    Args:
        sizes: Sample counts, ascending.
        rekey_runs: Runs re-keyed one at a time on the largest store.
        repeats: Timed compactions.
        workdir: Folder for the temporary stores.

    Returns:
        Sizes, the marginal bytes per sample, the re-keying rates and the compaction speed.
    """
    cfg = load_config(CONFIGS["mlp"], [f"data.train_limit={max(sizes)}"])
    train = load_split(cfg.data, "train", raw=True)
    rows = []
    compact_s: list[float] = []
    rekey: dict[str, Any] = {}
    for n in sizes:
        path = workdir / f"samples-{n}"
        ens = Ensemble.create(path, cfg)
        try:
            t0 = time.perf_counter()
            ens.ingest(first(train, n))
            ingest_s = time.perf_counter() - t0
            ens.store.compact()
            size = (path / "data.mdb").stat().st_size
            if n == max(sizes):
                rekey = rekeying(ens, rekey_runs, repeats)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    ens.store.compact()
                    compact_s.append(time.perf_counter() - t0)
                compacted = (path / "data.mdb").stat().st_size
        finally:
            ens.close()
        shutil.rmtree(path, ignore_errors=True)
        rows.append({"samples": n, "data_mdb_bytes": size, "ingest_s": ingest_s})
    a, b = rows[-2], rows[-1]
    per_sample = (b["data_mdb_bytes"] - a["data_mdb_bytes"]) / (b["samples"] - a["samples"])
    width = int(train.x[0].size)
    median = statistics.median(compact_s)
    return {
        "ingest": "load_split(cfg.data, 'train', raw=True): uint8 pixels, scale 255",
        "dtype": str(train.x.dtype),
        "scale": train.scale,
        "feature_values": width,
        "raw_bytes_per_sample": width * train.x.dtype.itemsize + 1,  # the IDX files: pixels + a 1-byte label
        "record_bytes": LABEL_BYTES + width * train.x.dtype.itemsize + SEAL_OVERHEAD,
        "stores": rows,
        "bytes_per_sample_marginal": per_sample,
        "shards": cfg.shards,
        "slices": cfg.slices,
        "rekey": rekey,
        "compact_note": "space reclamation, not erasure: Store.compact() rewrites data.mdb (format 3 erases without)",
        "compact_seconds": compact_s,
        "compact_seconds_median": median,
        "compact_bytes_per_second": compacted / median,
    }


def key_file(
    counts: Sequence[int], repeats: int, workdir: Path, key_bytes: int = 8, value_bytes: int = 16
) -> dict[str, Any]:
    """A bare LMDB key file of ``key_bytes`` -> ``value_bytes`` random entries: its size and compaction time.

    Default: the per-sample-keys alternative (8-byte id -> 16-byte key). With 20 -> 24 bytes,
    the layout of the store's run keys (shard, slice, run, generation -> key + request id).

    Args:
        counts: Entry counts, ascending.
        repeats: Timed compacting copies per count.
        workdir: Folder for the temporary environments.
        key_bytes: Bytes of an entry's LMDB key (a big-endian counter, appended in order).
        value_bytes: Bytes of an entry's value (random).

    Returns:
        Per count: compacted file bytes and compaction seconds; bytes per entry (slope) and
        compaction seconds per entry (largest count).
    """
    rows: list[dict[str, Any]] = []
    for n in counts:
        path = workdir / f"keys-{key_bytes}-{n}"
        path.mkdir()
        env = lmdb.open(str(path), map_size=max(1 << 26, 200 * n), subdir=True, sync=False)
        try:
            with env.begin(write=True) as txn:
                for i in range(n):
                    txn.put(i.to_bytes(key_bytes, "big"), secrets.token_bytes(value_bytes), append=True)
            env.sync(True)
            times = []
            for rep in range(repeats):
                copy = workdir / f"keys-{key_bytes}-{n}-copy{rep}"
                copy.mkdir()
                t0 = time.perf_counter()
                env.copy(str(copy), compact=True)
                fd = os.open(copy / "data.mdb", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                times.append(time.perf_counter() - t0)
                size = (copy / "data.mdb").stat().st_size
                shutil.rmtree(copy)
        finally:
            env.close()
        shutil.rmtree(path, ignore_errors=True)
        rows.append(
            {
                "entries": n,
                "compacted_bytes": size,
                "compact_seconds": times,
                "compact_seconds_median": statistics.median(times),
            }
        )
    a, b = rows[-2], rows[-1]
    return {
        "method": f"lmdb env, {key_bytes}-byte big-endian counter -> secrets.token_bytes({value_bytes}), "
        "appended in order; env.copy(compact=True) + fsync",
        "key_bytes": value_bytes,
        "id_bytes": key_bytes,
        "rows": rows,
        "bytes_per_entry": (b["compacted_bytes"] - a["compacted_bytes"]) / (b["entries"] - a["entries"]),
        "compact_seconds_per_entry": b["compact_seconds_median"] / b["entries"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print, write the JSON."""
    args = parse_args(argv)
    sizes = sorted({int(v) for v in args.sizes.split(",") if v.strip()})
    counts = sorted({int(v) for v in args.key_entries.split(",") if v.strip()})
    if len(sizes) < 2 or len(counts) < 2:
        raise SystemExit("--sizes and --key-entries need two counts each (the slope between them is the size)")
    if sizes[-2] < MIN_SLOPE_SIZE and not args.allow_small:
        raise SystemExit(f"--sizes: the two largest must be >= {MIN_SLOPE_SIZE:,} (small stores give a noisy slope)")
    info = machine_info()
    started = time.perf_counter()
    with run_folder(args.workdir, "measure_storage-") as workdir:
        ckpt: dict[str, Any] = {}
        if not args.skip_checkpoints:
            start_ray()
            ckpt = {name: checkpoint_sizes(name, path, args.ckpt_samples, workdir) for name, path in CONFIGS.items()}
        samples = sample_storage(sizes, args.rekey_runs, args.compact_repeats, workdir)
        keys = key_file(counts, args.compact_repeats, workdir)
        run_keys = key_file(counts, args.compact_repeats, workdir, key_bytes=20, value_bytes=24)
    for name, row in ckpt.items():
        print(
            f"{name}: {row['parameters']:,} parameters; checkpoint {row['bytes_mean']:,.0f} bytes "
            f"(min {min(row['bytes']):,}, max {max(row['bytes']):,}; 3 x 4 x params = "
            f"{row['float32_weights_plus_adam_moments_bytes']:,})"
        )
    rk = samples["rekey"]
    print(
        f"samples ({samples['dtype']}, scale {samples['scale']}): {samples['bytes_per_sample_marginal']:,.0f} bytes "
        f"each in data.mdb (record {samples['record_bytes']:,}, raw {samples['raw_bytes_per_sample']:,})"
    )
    print(
        f"re-keying: {rk['records_per_second_median']:,.0f} records/s median over {len(rk['runs'])} runs of "
        f"~{rk['runs'][0]['records']:,}; all {rk['cells']} runs ({rk['all_runs'][0]['records']:,} records) "
        f"{rk['all_runs_records_per_second_median']:,.0f}/s median of {len(rk['all_runs'])}, "
        f"{rk['per_call_overhead_s'] * 1e3:.1f} ms per rotate() call beyond that; key file "
        f"{rk['key_file_bytes']:,} bytes, compaction {rk['key_file_compact_seconds_median'] * 1e3:.1f} ms median"
    )
    print(
        f"space reclamation (not erasure): Store.compact() of {samples['stores'][-1]['data_mdb_bytes']:,} bytes "
        f"{samples['compact_seconds_median']:.2f}s median = {samples['compact_bytes_per_second'] / 1e6:,.0f} MB/s"
    )
    print(
        f"per-sample keys: {keys['bytes_per_entry']:.1f} bytes per entry; compaction of "
        f"{keys['rows'][-1]['entries']:,} entries {keys['rows'][-1]['compact_seconds_median']:.3f}s "
        f"({keys['compact_seconds_per_entry'] * 1e9:.0f} ns per entry)"
    )
    print(
        f"run-key layout (20 -> 24 bytes): {run_keys['bytes_per_entry']:.1f} bytes per entry, compaction "
        f"{run_keys['compact_seconds_per_entry'] * 1e9:.0f} ns per entry"
    )
    info["loadavg_end"] = machine_info()["loadavg_start"]
    result = {
        "command": ".venv/bin/python scripts/measure_storage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "seconds": time.perf_counter() - started,
        "checkpoints": ckpt,
        "samples": samples,
        "per_sample_keys": keys,
        "run_key_file": run_keys,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
