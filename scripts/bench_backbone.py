r"""Benchmark a frozen shared backbone with per-shard heads or LoRA adapters against SISA from scratch.

Side by side in one run (one Ray instance with all cores, 1 torch thread per shard), on
Fashion-MNIST with the CNN recipe of ``configs/fashion_mnist_cnn.yaml`` (R=4, 10 epochs,
recalibrated):

1. **Monolithic**: the config with ``shards=1 slices=1`` trained through the Ensemble API
   (a) on 1 torch thread (the compute one shard gets) and (b) on every usable core. Test
   accuracy, ``fit()`` wall seconds and pure compute (``FitReport.stage_seconds``): the
   cost of retraining one model after a deletion.
2. **SISA from scratch** at each S in ``--shards``: every shard trains ``model`` whole.
3. **Backbone + heads**: a ``--core-fraction`` core set (seeded draw, declared with
   ``ingest(..., core=ids)``, never deletable) trains the backbone once, in the driver
   (``backbone.source=core``, the model's network without its output layer, ``backbone.epochs``
   = ``train.epochs``); each shard trains only a head (``model.adapter=head``,
   ``model.hidden=[128]``) on its features. Each store trains its own backbone.
4. **Backbone + LoRA**: as 3 with ``model.adapter=lora`` (default rank 4, alpha 8, every
   Linear/Conv2d of the backbone) plus the head.

Per method and S: test accuracy (argmax of ``predict_proba``, what ``predict``/``score`` give)
and its difference to the monolithic in percentage points; full fit wall and compute;
one single deletion of a random non-core id (seeded, the same id for every method and S):
``delete()`` wall seconds and retrain compute (the certificate's, checked against the
store by ``benchlib.retrain_cost``), speedups over the monolithic retrain (wall: 1 thread
and whole machine; compute: 1 thread) and, for backbone methods, over retraining that
backbone setup from scratch (backbone core training + per-shard fit: the store's ``fit()``
wall, which includes the core training, and its compute ``backbone seconds +
stage_seconds``); mean bytes per stored (sealed) checkpoint over the stage records, the
backbone's stored bytes and core training seconds (``store.meta()["backbone"]``);
ensemble inference seconds on the test set (``predict_proba``, cold: models loaded from
the store; warm: second call) and the warm ratio against SISA from scratch at the same S
("S heads on shared features vs S full models"). For backbone stores, deleting a core id
must raise ``CoreSetError`` (checked, nothing changes).

Feature caching (head setup at S=16, or the middle S given): the head jobs compute the
backbone's features of every slice inside the job and never store them. The feature pass of
the deletion's retrain is estimated by timing ``sisa.train.backbone.extract_features`` on 1
thread over the affected shard's samples (after the deletion), against the deletion's
retrain compute: the share a stored-feature cache could save.

Targets (reported met / not met from the measured numbers, never assumed): at S=16 the
best-accuracy backbone method within 1 pp of the monolithic accuracy, and its single
deletion at least 50x faster than the monolithic retrain (wall, 1 thread each).

Writes a table to stdout, everything to a JSON file, and a three-panel PNG beside it
(accuracy vs S per method with the monolithic line; deletion speedup vs S, log scale;
bytes per checkpoint vs S, log scale).

Full run (CNN, 60k train / 10k test, S in 8,16,32, 6000 core ids). Estimated runtime, at
~45 s per one-thread CNN epoch over 60k samples (~1300 samples/s per thread): monolithic 1
thread ~8 min and whole machine ~5 min; SISA from scratch ~4.5 min fit per S (same compute as
the monolithic, on 2 cores) plus its deletion and inference (S full CNNs on 10k, cold and
warm); each backbone store ~45 s of core training in the driver; heads ~1 min more per S;
LoRA a little more than from scratch per S (the whole backbone runs forward and backward);
plus ingest of 60k samples into 11 stores: about 60 minutes on 2 idle cores (55-75), longer
when another job shares them::

    .venv/bin/python scripts/bench_backbone.py

Quick smoke run (MLP backbone and model, 3000 train / 1000 test samples, 2 epochs, S in 4,8;
about 20-30 s on 2 cores, measured)::

    .venv/bin/python scripts/bench_backbone.py --quick --out results/bench_backbone_quick.json

``--shards 8,16`` chooses the S values; trailing ``key=value`` arguments are config overrides
applied to every store, e.g. ``train.epochs=5``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Let `python scripts/bench_backbone.py` find the package without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib  # noqa: E402

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.errors import CoreSetError  # noqa: E402
from sisa.train.backbone import extract_features  # noqa: E402

QUICK_OVERRIDES = ("data.train_limit=3000", "data.test_limit=1000", "train.epochs=2", "model.name=mlp")
QUICK_SHARDS = "4,8"
FULL_SHARDS = "8,16,32"
METHODS = ("scratch", "head", "lora")
BACKBONE_METHODS = ("head", "lora")
HEAD_HIDDEN = 128
FEATURE_S = 16  # the S whose head deletion gets the feature-pass estimate (else the middle S given)
TARGET_S = 16
TARGET_ACC_PP = 1.0
TARGET_SPEEDUP = 50.0


# --------------------------------------------------------------------------- options
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): shard counts, core fraction, seed, run options, overrides."""
    parser = benchlib.script_parser(__doc__, config=Path("configs/fashion_mnist_cnn.yaml"))
    benchlib.add_mode_option(
        parser, "--shards", kind=str, what="comma-separated shard counts S", full=FULL_SHARDS, quick=QUICK_SHARDS
    )
    parser.add_argument(
        "--core-fraction", type=float, default=0.1, help="fraction of the training ids in the core set (default 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the core set and of the id to delete")
    quick = f"smoke run: adds {' '.join(QUICK_OVERRIDES)} (MLP backbone), shards {QUICK_SHARDS}"
    benchlib.add_run_options(parser, out=Path("docs/bench/backbone.json"), quick_help=quick)
    return parser.parse_args(argv)


def backbone_overrides(base: SisaConfig, adapter: str) -> list[str]:
    """Overrides that turn ``base`` into its backbone variant: the model's network, frozen, trained on the core set."""
    m = base.model
    return [
        "backbone.source=core",
        f"backbone.name={m.name}",
        f"backbone.channels={list(m.channels)}",
        f"backbone.hidden={list(m.hidden)}",
        f"backbone.epochs={base.train.epochs}",
        f"model.adapter={adapter}",
        f"model.hidden=[{HEAD_HIDDEN}]",
    ]


def store_config(
    config: Path, overrides: Sequence[str], shards: int, slices: int, extra: Sequence[str] = ()
) -> SisaConfig:
    """The config of one store: ``config`` with ``overrides``, S, R, one torch thread per shard, then ``extra``."""
    return load_config(
        config, [*overrides, f"shards={shards}", f"slices={slices}", "resources.threads_per_shard=1", *extra]
    )


# --------------------------------------------------------------------------- measurements
def checkpoint_bytes(ens: Ensemble) -> dict[str, Any]:
    """Sealed (stored, encrypted) bytes of every stage checkpoint of the store now: mean, total, count."""
    with ens.store.read() as txn:
        sizes = []
        for record in (r for s in range(ens.config.shards) for r in ens.store.stage_records(txn, s)):
            sealed = ens.store.sealed_checkpoint(txn, record)
            if sealed is None:
                raise RuntimeError(f"stage record {record['key']} has no stored checkpoint")
            sizes.append(len(sealed))
    return {"mean": statistics.fmean(sizes) if sizes else math.nan, "total": sum(sizes), "count": len(sizes)}


def inference(ens: Ensemble, test: LabeledArrays) -> dict[str, Any]:
    """Accuracy on the test set, and ``predict_proba`` seconds cold (models loaded) and warm (second call)."""
    ens.forget_cached_models()
    t0 = time.perf_counter()
    ens.predict_proba(test.x)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    proba = ens.predict_proba(test.x)
    warm = time.perf_counter() - t0
    accuracy = float((proba.argmax(axis=1) == np.asarray(test.y)).mean())
    params = {s: sum(p.numel() for p in m.parameters()) for s, m in ens.live_models().items()}
    return {
        "accuracy": accuracy,
        "infer_cold_s": cold,
        "infer_s": warm,
        "trainable_params_per_shard": statistics.fmean(params.values()) if params else math.nan,
    }


def shard_samples(ens: Ensemble, shard: int) -> np.ndarray:
    """Model inputs (float32) of every sample ``shard`` holds now, in slice order."""
    with ens.store.read() as txn:
        ids = np.concatenate(ens.planner.shard_slices(txn, shard))
        shape = tuple(ens.store.meta(txn)["feature_shape"])
        x, _ = ens.store.load_samples(txn, ids, shape, f"shard {shard}")
    return x.reshape(len(ids), *shape)


def feature_pass(ens: Ensemble, shard: int, threads: int) -> dict[str, Any]:
    """Seconds of the backbone's feature pass over ``shard``'s samples, on ``threads`` torch threads (best of 2)."""
    with ens.store.read() as txn:
        backbone = ens.planner.backbone(txn)
    if backbone is None:
        raise RuntimeError("the store shares no backbone")
    x = torch.from_numpy(shard_samples(ens, shard))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            extract_features(backbone.module, x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {"shard": shard, "samples": int(x.shape[0]), "threads": threads, "seconds": min(times)}


@contextmanager
def fitted_store(
    method: str,
    cfg: SisaConfig,
    train: LabeledArrays,
    test: LabeledArrays,
    path: Path,
    *,
    core: np.ndarray | None = None,
) -> Iterator[tuple[Ensemble, dict[str, Any]]]:
    """Build, fit and measure one store; yield it open with its row; close and remove it after.

    Args:
        method: The row's name (for the printout and the row), e.g. ``scratch`` or ``head``.
        cfg: The store's config.
        train: Training samples.
        test: Test samples.
        path: Store directory (new).
        core: Core ids (backbone methods), declared at ingest.

    Yields:
        The open ensemble and what was measured: fit wall and compute, training work, checkpoint
        bytes, the backbone record (backbone methods) and :func:`inference`.
    """
    print(f"[{method} S={cfg.shards}] ingest + fit ...", flush=True)
    ens = Ensemble.create(path, cfg)
    try:
        t0 = time.perf_counter()
        if core is None:
            ens.ingest(train)
        else:
            ens.ingest(train.x, train.y, train.ids, core=core)
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = ens.fit()
        fit_s = time.perf_counter() - t0
        row: dict[str, Any] = {
            "method": method,
            "shards": cfg.shards,
            "slices": cfg.slices,
            "threads_per_shard": cfg.resources.threads_per_shard,
            "epochs_per_stage": cfg.train.stage_epochs(cfg.slices),
            "ingest_s": ingest_s,
            "fit_s": fit_s,
            "compute_s": report.stage_seconds,
            "work": benchlib.sample_epochs(benchlib.stage_records(ens)),
            "checkpoint_bytes": checkpoint_bytes(ens),
        }
        record = ens.store.meta().get("backbone")
        if record is not None:
            row["backbone"] = {k: record.get(k) for k in ("digest", "bytes", "seconds", "core", "name", "source")}
            # fit() trains the backbone first (in the driver), then the shards: a setup from scratch is its wall.
            row["setup_from_scratch_wall_s"] = fit_s
            row["setup_from_scratch_compute_s"] = float(record["seconds"]) + report.stage_seconds
            row["shards_fit_s"] = fit_s - float(record["seconds"])
        row.update(inference(ens, test))
        print(
            f"  fit {fit_s:.1f}s wall / {report.stage_seconds:.1f}s compute, accuracy {row['accuracy']:.4f}, "
            f"{row['checkpoint_bytes']['mean'] / 1024:.1f} KiB per checkpoint, inference {row['infer_s']:.2f}s"
            + (f", backbone {record['seconds']:.1f}s / {record['bytes'] / 1024:.0f} KiB" if record else ""),
            flush=True,
        )
        yield ens, row
    finally:
        ens.close()
        shutil.rmtree(path, ignore_errors=True)


def delete_one(ens: Ensemble, delete_id: int, tag: str) -> dict[str, Any]:
    """Delete one id, timed; what it retrained, from its certificate checked against the store.

    Args:
        ens: An open, fitted ensemble holding ``delete_id`` (not in its core set).
        delete_id: The id to delete.
        tag: Prefix of the error message, e.g. ``[head S=16]``.

    Returns:
        ``delete()`` wall seconds, the retrain's compute, work (sample-epochs) and stages, the
        shard that held the id, the shards retrained and each one's restart slice.

    Raises:
        RuntimeError: The deletion was not applied.
    """
    shard = ens.locate([delete_id])[delete_id][0]
    cert, wall, cost = benchlib.applied_delete(ens, delete_id, f"{tag} ")
    print(
        f"  delete id {delete_id} (shard {shard}): {wall:.2f}s wall, {cost['compute_s']:.2f}s compute, "
        f"work {cost['work']}",
        flush=True,
    )
    return {
        "id": delete_id,
        "shard": shard,
        "wall_s": wall,
        "retrain_s": float(cert["batch"]["retrain_seconds"]),
        "compute_s": cost["compute_s"],
        "work": cost["work"],
        "stages": cost["stages"],
        "retrained_samples": cost["samples"],
        "new_checkpoints_match": cost["new_checkpoints_match"],
        "retrained_shards": cert["retrained_shards"],
        "from_slice": {int(k): int(v["from_slice"]) for k, v in cert["shards"].items()},
    }


def run_store(
    method: str,
    cfg: SisaConfig,
    train: LabeledArrays,
    test: LabeledArrays,
    path: Path,
    *,
    core: np.ndarray | None = None,
    delete_id: int | None = None,
    probe_features: bool = False,
) -> dict[str, Any]:
    """Build, fit, measure and (with ``delete_id``) delete one id from one store; the store is removed after.

    Args:
        method: ``monolithic``, ``scratch``, ``head`` or ``lora`` (for the printout and the row).
        cfg: The store's config.
        train: Training samples.
        test: Test samples.
        path: Store directory (new).
        core: Core ids (backbone methods).
        delete_id: A non-core id to delete once; ``None``: no deletion.
        probe_features: Time the feature pass of the deleted id's shard (head stores).

    Returns:
        Everything measured for this store.
    """
    with fitted_store(method, cfg, train, test, path, core=core) as (ens, row):
        if core is not None and len(core):
            try:
                ens.delete([int(core[0])])
                row["core_delete_refused"] = False
            except CoreSetError:
                row["core_delete_refused"] = True
        if delete_id is not None:
            row["delete"] = d = delete_one(ens, delete_id, f"[{method} S={cfg.shards}]")
            if probe_features:
                probe = feature_pass(ens, d["shard"], cfg.resources.threads_per_shard)
                compute = d["compute_s"]
                probe["retrain_compute_s"] = compute
                probe["share_of_retrain_compute"] = probe["seconds"] / compute if compute > 0 else math.nan
                row["feature_pass"] = probe
                print(
                    f"  feature pass over shard {d['shard']} ({probe['samples']} samples, {probe['threads']} "
                    f"thread): {probe['seconds']:.2f}s = {probe['share_of_retrain_compute']:.0%} of the retrain "
                    "compute",
                    flush=True,
                )
    return row


# --------------------------------------------------------------------------- derived numbers
def ratio(a: float, b: float) -> float:
    """``a / b``, or inf when ``b`` is 0 (and nan when either is nan)."""
    return a / b if b > 0 else math.inf


def derive(rows: list[dict[str, Any]], mono: dict[str, dict[str, Any]]) -> None:
    """Add to every row: accuracy gap to the monolithic, speedups, inference ratio vs SISA from scratch."""
    a, b = mono["same_threads"], mono["whole_machine"]
    scratch = {r["shards"]: r for r in rows if r["method"] == "scratch"}
    for r in rows:
        r["accuracy_diff_pp"] = 100.0 * (r["accuracy"] - a["accuracy"])
        d = r.get("delete")
        if d is not None:
            d["speedup_wall_vs_monolithic"] = ratio(a["fit_s"], d["wall_s"])
            d["speedup_compute_vs_monolithic"] = ratio(a["compute_s"], d["compute_s"])
            d["speedup_wall_vs_monolithic_whole_machine"] = ratio(b["fit_s"], d["wall_s"])
            if "backbone" in r:
                d["speedup_wall_vs_setup_from_scratch"] = ratio(r["setup_from_scratch_wall_s"], d["wall_s"])
                d["speedup_compute_vs_setup_from_scratch"] = ratio(r["setup_from_scratch_compute_s"], d["compute_s"])
        ref = scratch.get(r["shards"])
        if ref is not None:
            r["infer_ratio_vs_scratch"] = r["infer_s"] / ref["infer_s"]
            r["checkpoint_bytes_ratio_vs_scratch"] = r["checkpoint_bytes"]["mean"] / ref["checkpoint_bytes"]["mean"]


def targets(rows: list[dict[str, Any]], mono: dict[str, Any]) -> dict[str, Any]:
    """The targets at S=16 for the best-accuracy backbone method: met / not met, or None where S=16 was not run."""
    at = [r for r in rows if r["shards"] == TARGET_S and r["method"] in BACKBONE_METHODS]
    out: dict[str, Any] = {
        "shards": TARGET_S,
        "accuracy_within_pp": TARGET_ACC_PP,
        "deletion_speedup_at_least": TARGET_SPEEDUP,
        "speedup_measure": "monolithic 1-thread fit wall / delete() wall (compute speedup reported beside it)",
        "best_method": None,
        "accuracy_diff_pp": None,
        "accuracy_met": None,
        "deletion_speedup_wall": None,
        "deletion_speedup_compute": None,
        "speedup_met": None,
    }
    if not at:
        return out
    best = max(at, key=lambda r: r["accuracy"])
    d = best["delete"]
    out.update(
        best_method=best["method"],
        monolithic_accuracy=mono["accuracy"],
        accuracy=best["accuracy"],
        accuracy_diff_pp=best["accuracy_diff_pp"],
        accuracy_met=best["accuracy_diff_pp"] >= -TARGET_ACC_PP,
        deletion_speedup_wall=d["speedup_wall_vs_monolithic"],
        deletion_speedup_compute=d["speedup_compute_vs_monolithic"],
        speedup_met=d["speedup_wall_vs_monolithic"] >= TARGET_SPEEDUP,
    )
    return out


# --------------------------------------------------------------------------- report
def print_table(rows: list[dict[str, Any]], mono: dict[str, dict[str, Any]]) -> None:
    """One line per method and S, under the monolithic baselines."""
    a, b = mono["same_threads"], mono["whole_machine"]
    print(
        f"\nmonolithic: accuracy {a['accuracy']:.4f}; retrain 1 thread {a['fit_s']:.1f}s wall / {a['compute_s']:.1f}s "
        f"compute; {b['threads_per_shard']} threads {b['fit_s']:.1f}s wall (accuracy {b['accuracy']:.4f})"
    )
    header = (
        f"{'method':<8} {'S':>3} {'acc':>7} {'d_pp':>6} {'fit_s':>7} {'del_s':>6} {'del_cs':>6} {'sp_wall':>8} "
        f"{'sp_comp':>8} {'sp_setup':>8} {'KiB/ckpt':>9} {'bb_KiB':>7} {'bb_s':>6} {'inf_s':>6} {'inf/scr':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        d = r["delete"]
        bb = r.get("backbone")
        setup = d.get("speedup_wall_vs_setup_from_scratch")
        print(
            f"{r['method']:<8} {r['shards']:>3} {r['accuracy']:>7.4f} {r['accuracy_diff_pp']:>+6.2f} "
            f"{r['fit_s']:>7.1f} {d['wall_s']:>6.2f} {d['compute_s']:>6.2f} {d['speedup_wall_vs_monolithic']:>7.1f}x "
            f"{d['speedup_compute_vs_monolithic']:>7.1f}x "
            + (f"{setup:>7.1f}x " if setup is not None else f"{'':>8} ")
            + f"{r['checkpoint_bytes']['mean'] / 1024:>9.1f} "
            + (f"{bb['bytes'] / 1024:>7.0f} {bb['seconds']:>6.1f} " if bb else f"{'':>7} {'':>6} ")
            + f"{r['infer_s']:>6.2f} {r.get('infer_ratio_vs_scratch', math.nan):>7.2f}"
        )
    print(
        "columns: d_pp = accuracy - monolithic (percentage points); fit_s = fit() wall (backbone core training\n"
        "  included); del_s / del_cs = delete() wall / retrain compute; sp_wall, sp_comp = monolithic 1-thread\n"
        "  retrain wall / del_s, compute / del_cs; sp_setup = this backbone setup's fit() wall from scratch / del_s;\n"
        "  KiB/ckpt = mean sealed checkpoint; bb_KiB, bb_s = backbone bytes, core training seconds;\n"
        "  inf_s = warm predict_proba on the test set; inf/scr = inf_s / SISA-from-scratch inf_s at the same S"
    )


def plot(rows: list[dict[str, Any]], mono: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Three panels: accuracy vs S (monolithic line), deletion speedup vs S (log), bytes per checkpoint vs S (log)."""
    plt = benchlib.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(METHODS):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["shards"])
        if not mine:
            continue
        c, s = colors[i % len(colors)], [r["shards"] for r in mine]
        ax1.plot(s, [100 * r["accuracy"] for r in mine], "o-", color=c, label=method)
        ax2.plot(s, [r["delete"]["speedup_wall_vs_monolithic"] for r in mine], "o-", color=c, label=f"{method} wall")
        ax2.plot(
            s, [r["delete"]["speedup_compute_vs_monolithic"] for r in mine], "s:", color=c, label=f"{method} compute"
        )
        ax3.plot(s, [r["checkpoint_bytes"]["mean"] for r in mine], "o-", color=c, label=f"{method} per checkpoint")
        if method in BACKBONE_METHODS:
            ax3.plot(s, [r["backbone"]["bytes"] for r in mine], "^--", color=c, label=f"{method}: backbone (once)")
    a = mono["same_threads"]
    ax1.axhline(100 * a["accuracy"], color="black", linewidth=1.2, label=f"monolithic ({100 * a['accuracy']:.2f}%)")
    low = 100 * a["accuracy"] - TARGET_ACC_PP
    ax1.axhline(low, color="gray", linestyle="--", linewidth=1, label=f"monolithic - {TARGET_ACC_PP:g} pp")
    ax2.axhline(TARGET_SPEEDUP, color="gray", linestyle="--", linewidth=1, label=f"target {TARGET_SPEEDUP:.0f}x")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Accuracy vs shards")
    ax2.set_ylabel("monolithic retrain / single deletion")
    ax2.set_yscale("log")
    ax2.set_title("Single-deletion speedup (1 thread)")
    ax3.set_ylabel("bytes")
    ax3.set_yscale("log")
    ax3.set_title("Stored bytes per checkpoint")
    ticks = sorted({r["shards"] for r in rows})
    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_xlabel("shards S")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    benchlib.save_figure(fig, path, title)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    """Run the monolithic baselines and every method at every S; write the table, JSON and PNG."""
    args = parse_args(argv)
    shard_counts = benchlib.parse_ints(benchlib.by_mode(args.shards, args.quick, QUICK_SHARDS, FULL_SHARDS), "shards")
    if not 0 < args.core_fraction < 1:
        raise SystemExit(f"--core-fraction={args.core_fraction} must be in (0, 1)")
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    base = load_config(args.config, overrides)
    info = benchlib.machine_info()
    cores = benchlib.usable_cpus()
    print(f"config {args.config} overrides {overrides or '(none)'}; shards {shard_counts}", flush=True)
    print(f"machine: {info['nproc']} cores ({cores} usable), torch {info['torch']}, ray {info['ray']}", flush=True)
    train, test = load_split(base.data, "train"), load_split(base.data, "test")
    print(f"data: {len(train)} train / {len(test)} test samples of shape {train.feature_shape}", flush=True)

    rng = np.random.default_rng(args.seed)
    n_core = max(1, round(args.core_fraction * len(train)))
    core = np.sort(rng.choice(train.ids, size=n_core, replace=False))
    delete_id = int(rng.choice(np.setdiff1d(train.ids, core)))
    print(f"core set: {n_core} ids (seed {args.seed}); id to delete: {delete_id}", flush=True)
    feature_s = FEATURE_S if FEATURE_S in shard_counts else shard_counts[len(shard_counts) // 2]

    def cfg_for(shards: int, slices: int | None = None, extra: Sequence[str] = ()) -> SisaConfig:
        return store_config(args.config, overrides, shards, base.slices if slices is None else slices, extra)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with benchlib.run_folder(args.workdir, "bench_backbone-") as workdir:
        ray_cpus = benchlib.start_ray()
        warm = benchlib.warm_up(cfg_for(max(shard_counts)), train, workdir / "warmup")
        print(f"\nRay: {ray_cpus} CPUs; warm-up fit {warm:.2f}s", flush=True)
        mono = {"same_threads": run_store("monolithic", cfg_for(1, 1), train, test, workdir / "mono-1")}
        whole = [f"resources.threads_per_shard={cores}", f"resources.cpus_per_shard={cores}"]
        mono["whole_machine"] = run_store("monolithic", cfg_for(1, 1, whole), train, test, workdir / "mono-all")
        for shards in shard_counts:
            for method in METHODS:
                extra = backbone_overrides(base, method) if method in BACKBONE_METHODS else []
                rows.append(
                    run_store(
                        method,
                        cfg_for(shards, extra=extra),
                        train,
                        test,
                        workdir / f"{method}-s{shards}",
                        core=core if method in BACKBONE_METHODS else None,
                        delete_id=delete_id,
                        probe_features=method == "head" and shards == feature_s,
                    )
                )
    total_s = time.perf_counter() - started

    derive(rows, mono)
    print_table(rows, mono)
    feature = next((r["feature_pass"] for r in rows if "feature_pass" in r), None)
    if feature is not None:
        print(
            f"feature caching (not stored), head S={feature_s}: the feature pass over the affected shard "
            f"({feature['samples']} samples) takes {feature['seconds']:.2f}s of the deletion's "
            f"{feature['retrain_compute_s']:.2f}s retrain compute = {feature['share_of_retrain_compute']:.0%}: "
            "the share a stored-feature cache could save"
        )
    goal = targets(rows, mono["same_threads"])
    if goal["best_method"] is None:
        print(f"targets: S={TARGET_S} not run (--shards {shard_counts}): not measured")
    else:
        print(
            f"target S={TARGET_S}, best backbone method {goal['best_method']}: accuracy "
            f"{goal['accuracy_diff_pp']:+.2f} pp vs monolithic (target >= -{TARGET_ACC_PP:g} pp): "
            f"{'met' if goal['accuracy_met'] else 'NOT met'}; single deletion {goal['deletion_speedup_wall']:.1f}x "
            f"faster in wall ({goal['deletion_speedup_compute']:.1f}x in compute) than the monolithic retrain "
            f"(target >= {TARGET_SPEEDUP:g}x): {'met' if goal['speedup_met'] else 'NOT met'}"
        )
    print(f"total {total_s / 60:.1f} min")

    info["loadavg_end"] = benchlib.loadavg()
    info["ray_cpus"] = ray_cpus
    result = {
        **benchlib.run_header(args.config, overrides, args.quick, base),
        "shards": shard_counts,
        "methods": list(METHODS),
        "seed": args.seed,
        "core_fraction": args.core_fraction,
        "core_size": n_core,
        "delete_id": delete_id,
        "backbone_overrides": {m: backbone_overrides(base, m) for m in BACKBONE_METHODS},
        "data": {"train": len(train), "test": len(test), "feature_shape": list(train.feature_shape)},
        "machine": info,
        "total_s": total_s,
        "warmup_fit_s": warm,
        "monolithic": mono,
        "results": rows,
        "feature_caching": {"shards": feature_s, **feature} if feature is not None else None,
        "targets": goal,
        "notes": {
            "accuracy": "argmax of Ensemble.predict_proba on the test set (what predict and score give)",
            "fit_s": "wall seconds of Ensemble.fit(); for backbone methods it includes the core training "
            "(fit trains the backbone first, in the driver)",
            "compute_s": "FitReport.stage_seconds: summed training seconds of the stages (backbone not included)",
            "delete": "one Ensemble.delete([id]) of the same non-core id in every store: wall_s around delete(), "
            "compute_s the retrained stages' seconds (certificate, checked against the store)",
            "speedup_wall_vs_monolithic": "monolithic 1-thread fit wall / delete wall",
            "speedup_compute_vs_monolithic": "monolithic 1-thread compute / delete compute",
            "speedup_wall_vs_setup_from_scratch": "this store's fit wall (backbone core training + per-shard fit) / "
            "delete wall",
            "speedup_compute_vs_setup_from_scratch": "(backbone seconds + stage_seconds) / delete compute",
            "checkpoint_bytes": "len(store.sealed_checkpoint(txn, record)) over every stage record after fit",
            "infer_s": "second (warm) predict_proba call on the test set; infer_cold_s: the first, loading models",
            "infer_ratio_vs_scratch": "infer_s / infer_s of SISA from scratch at the same S: S heads on shared "
            "features vs S full models",
            "feature_pass": "extract_features(backbone, affected shard's samples after the deletion) on the shard's "
            "threads, best of 2, vs the deletion's retrain compute: the share a stored-feature cache could save "
            "(features are computed once per slice inside the job and never stored)",
        },
    }
    title = (
        f"{args.config.name} {' '.join(overrides)} | n={len(train)} | core {n_core} | e={base.train.epochs} | "
        f"{info['nproc']} cores, {info['date']}"
    )
    benchlib.write_results(args.out, result, lambda png: plot(rows, mono, title, png))


if __name__ == "__main__":
    main()
