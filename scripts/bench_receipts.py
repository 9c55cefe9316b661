"""What the transparency log, manifest commitments and receipts cost, at several store sizes side by side.

For each N, a store of N synthetic samples (784 ``uint8`` features, a pure function of the id; labels
``id % 10``; uniform partition, S=8 shards, R=4 slices, MLP 784-128-10, ``train.epochs=1``, the local
runner: no Ray) is ingested as a stream of 8192-sample batches and fitted; then ``--deletes`` single-id
deletions run one after another (ids from the last slice, so each retrain is one stage). It records:

* ``fit_commit_s``: the seconds the fit's "model published" step took (every shard's manifest
  commitments: an HMAC opening and a SHA-256 commitment per sample, sorted, and their Merkle tree),
  and the checkpoint signature; against ``fit_s``, the whole fit;
* per deletion: ``wall_s`` (the ``delete`` call), ``retrain_s`` (the certificate's
  ``batch.retrain_seconds``), ``non_retrain_s`` (wall - retrain: journal, erasure, compaction,
  certificate, and now the commitments and signature too), ``commit_s`` (the apply's "model published"
  step: the retrained shard's bucketed manifest commitment, read from the shard's cache, plus the
  journal transaction's update of that cache, :func:`sisa.unlearn.commitcache.follow`) and
  ``sign_s`` (the checkpoint: the operator key read from its file, the log index's right edge brought
  up to date, the tree head and an Ed25519 signature), ``buckets`` (the retrained shard's bucket count),
  and ``share`` = (commit_s + sign_s) / (non_retrain_s - commit_s - sign_s): what the receipts'
  machinery adds to a deletion's non-retrain time (target < 5%);
* per deletion, beside it (timed after the deletion on the same retrained shard's slices, not inside
  it): ``flat_commit_s``, the method before the cache (every id's opening and commitment, sorted, one
  RFC 6962 tree: what each deletion paid), ``flat_share`` the share with that instead of ``commit_s``,
  and ``scratch_commit_s``, the bucketed commitment computed whole (what a missing cache costs);
* per deletion: the receipt's ``issue_s``, ``bytes`` (its JSON, target < 64 KiB) and ``verify_s``
  (:func:`sisa.receipt.verify.verify_receipt`), and the log's growth: leaves added and bytes added to
  the ``audit`` table.

The timings of the published step and the signature come from wrapping
``sisa.unlearn.tlog.publish_models``, ``sisa.unlearn.tlog.sign_checkpoint`` (and the names the
deletion module imported), the deletion module's ``load_signer`` and ``log_index`` and
``sisa.unlearn.commitcache.follow`` with a timer; nothing else is changed.

Usage:
    python scripts/bench_receipts.py                      # N = 60k and 600k (600k takes minutes)
    python scripts/bench_receipts.py --sizes 3000000      # 3M (its fit alone takes many minutes)
    python scripts/bench_receipts.py --sizes 60000        # one size

Writes ``docs/bench/receipts.json`` and ``docs/bench/receipts.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sisa, before any installed one

import sisa  # noqa: E402
from sisa.receipt.keys import load_signer  # noqa: E402
from sisa.receipt.merkle import Tree, hash_leaf  # noqa: E402
from sisa.receipt.verify import verify_receipt  # noqa: E402
from sisa.unlearn import commitcache, deletion, tlog  # noqa: E402
from sisa.unlearn.audit import AUDIT_DB  # noqa: E402
from sisa.unlearn.commitcache import recompute  # noqa: E402
from sisa.unlearn.commitments import manifest_commitments  # noqa: E402

FEATURES = 784
BATCH = 8192
SIZES = [60_000, 600_000]
OVERRIDES = ["shards=8", "slices=4", "model.name=mlp", "model.hidden=[128]", "train.epochs=1"]
OVERRIDES += ["partition.strategy=uniform"]
TIMES: dict[str, list[float]] = {
    "publish_models": [],
    "sign_checkpoint": [],
    "follow": [],
    "load_signer": [],
    "log_index": [],
}


# The interpreter's garbage collections: how long they took in all, and inside each timed call (a collection
# runs in whatever code allocates when a generation's threshold is crossed, so it can land in the receipts'
# steps although the retrain's objects made it due).
GC = {"seconds": 0.0, "collections": 0, "started": 0.0}
GC_IN: dict[str, list[float]] = {name: [] for name in TIMES}


def _gc_timer(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        GC["started"] = time.perf_counter()
    else:
        GC["seconds"] += time.perf_counter() - GC["started"]
        GC["collections"] += 1


gc.callbacks.append(_gc_timer)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, appending each call's seconds to ``TIMES[name]`` and its collections' seconds to ``GC_IN[name]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, g0 = time.perf_counter(), GC["seconds"]
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t0)
            GC_IN[name].append(GC["seconds"] - g0)

    return wrapper


for _name in ("publish_models", "sign_checkpoint"):
    _wrapped = timed(_name, getattr(tlog, _name))
    setattr(tlog, _name, _wrapped)
    setattr(deletion, _name, _wrapped)
# The journal transaction takes the deleted ids out of the shard's commitment cache (and updates its buckets)
# before the retrain: part of the commitments' cost, counted in commit_s with the "model published" step.
commitcache.follow = timed("follow", commitcache.follow)
# Reading the operator's signing key, and the log index the certifying transaction reads once for
# publishing and signing, exist for the log only: counted with the checkpoint (the deletion module's
# names only, so the calls inside publish_models and sign_checkpoint are not counted twice).
deletion.load_signer = timed("load_signer", deletion.load_signer)
deletion.log_index = timed("log_index", deletion.log_index)


def batches(n: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Samples 0..n-1 in batches: uint8 features a pure function of the id, labels ``id % 10``."""
    for start in range(0, n, BATCH):
        ids = np.arange(start, min(n, start + BATCH), dtype=np.int64)
        x = ((ids[:, None] * 2654435761 + np.arange(FEATURES)) % 256).astype(np.uint8)
        yield x, (ids % 10).astype(np.int64), ids


def audit_bytes(ens: Any) -> tuple[int, int]:
    """Leaves of the log and bytes of its records."""
    with ens.store.read() as txn:
        values = [len(bytes(v)) for _, v in txn.cursor(db=ens.store.db(AUDIT_DB))]
    return len(values), sum(values)


def last_slice_ids(ens: Any, n: int, count: int, slices: int) -> list[int]:
    """``count`` ids of the last slice of their shards, spread over the id range."""
    picked: list[int] = []
    for sid in np.linspace(n // 7, n - 1, 40 * count).astype(int).tolist():
        where = ens.locate([sid]).get(sid)
        if where is not None and where[1] == slices - 1:
            picked.append(int(sid))
        if len(picked) == count:
            return picked
    raise RuntimeError("not enough ids in a last slice")


def beside(ens: Any, shard: int) -> tuple[float, float]:
    """Seconds of the flat (pre-cache) commitment and of the bucketed one from scratch, on a shard's live slices."""
    store = ens.store
    secret = store.secret()
    with store.read() as txn:
        stage = int(store.live(txn)[shard]["stage"])
        slices = [store.slice_ids(txn, shard, r) for r in range(stage)]
    t0 = time.perf_counter()
    Tree([hash_leaf(c) for c in manifest_commitments(secret, slices)]).root()
    flat = time.perf_counter() - t0
    t0 = time.perf_counter()
    recompute(secret, slices).root()
    return flat, time.perf_counter() - t0


def one_size(n: int, workdir: Path, deletes: int) -> dict[str, Any]:
    """Build, fit and delete at one size; the row of the JSON."""
    store = workdir / f"st{n}"
    cfg = sisa.load_config(None, OVERRIDES)
    row: dict[str, Any] = {"n": n}
    for times in TIMES.values():
        times.clear()
    with sisa.Ensemble.create(store, cfg, address="local") as ens:
        t0 = time.perf_counter()
        ens.ingest(batches(n), batch_size=BATCH)
        row["ingest_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ens.fit()
        row["fit_s"] = time.perf_counter() - t0
        row["fit_commit_s"] = sum(TIMES["publish_models"])
        row["fit_sign_s"] = sum(TIMES["sign_checkpoint"])
        row["deletions"] = []
        for sid in last_slice_ids(ens, n, deletes, cfg.slices):
            for times in (*TIMES.values(), *GC_IN.values()):
                times.clear()
            gc0, collections0 = GC["seconds"], GC["collections"]
            leaves0, bytes0 = audit_bytes(ens)
            t0 = time.perf_counter()
            cert = ens.delete([sid])
            wall = time.perf_counter() - t0
            gc_wall, collections = GC["seconds"] - gc0, GC["collections"] - collections0
            leaves1, bytes1 = audit_bytes(ens)
            retrain = float(cert["batch"]["retrain_seconds"])
            commit = sum(TIMES["publish_models"]) + sum(TIMES["follow"])
            sign = sum(TIMES["sign_checkpoint"]) + sum(TIMES["load_signer"]) + sum(TIMES["log_index"])
            t0 = time.perf_counter()
            receipt = ens.receipt(sid)
            issue = time.perf_counter() - t0
            key = load_signer(create=False).verifier
            t0 = time.perf_counter()
            verify_receipt(json.loads(json.dumps(receipt)), key)
            verify = time.perf_counter() - t0
            non_retrain = wall - retrain
            flat, scratch = beside(ens, int(cert["retrained_shards"][0]))
            row["deletions"].append(
                {
                    "id": sid,
                    "wall_s": wall,
                    "retrain_s": retrain,
                    "non_retrain_s": non_retrain,
                    "commit_s": commit,
                    "sign_s": sign,
                    "share": (commit + sign) / max(non_retrain - commit - sign, 1e-9),
                    "steps_s": {name: sum(times) for name, times in TIMES.items()},
                    "gc_s": gc_wall,
                    "gc_collections": collections,
                    "gc_in_receipts_s": sum(sum(v) for v in GC_IN.values()),
                    "flat_commit_s": flat,
                    "flat_share": (flat + sign) / max(non_retrain - commit - sign, 1e-9),
                    "scratch_commit_s": scratch,
                    "retrained_shards": cert["retrained_shards"],
                    "buckets": receipt["shards"][0]["absent"].get("buckets"),
                    "receipt_issue_s": issue,
                    "receipt_bytes": len(json.dumps(receipt, sort_keys=True).encode()),
                    "verify_s": verify,
                    "log_leaves_added": leaves1 - leaves0,
                    "log_bytes_added": bytes1 - bytes0,
                    "checkpoint_bytes": len(receipt["checkpoint"].encode()),
                }
            )
            print(json.dumps({"n": n, **row["deletions"][-1]}), flush=True)
    shutil.rmtree(store)
    dels = row["deletions"]
    keys = ("non_retrain_s", "commit_s", "sign_s", "share", "flat_commit_s", "flat_share", "scratch_commit_s")
    for key in (*keys, "receipt_bytes", "verify_s", "log_bytes_added"):
        row[f"median_{key}"] = float(np.median([d[key] for d in dels]))
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars per size: non-retrain time split (receipts' part vs the rest), receipt KiB, verify ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']:,}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    rest = [r["median_non_retrain_s"] - r["median_commit_s"] - r["median_sign_s"] for r in rows]
    ours = [r["median_commit_s"] + r["median_sign_s"] for r in rows]
    axes[0].bar(labels, rest, label="journal, erasure, certificate")
    axes[0].bar(labels, ours, bottom=rest, label="commitments (cached buckets) + signed checkpoint")
    flat = [r["median_flat_commit_s"] + r["median_sign_s"] for r in rows]
    axes[0].scatter(labels, [a + b for a, b in zip(rest, flat, strict=True)], color="red", marker="_", s=400, zorder=3)
    axes[0].plot([], [], color="red", label="top with the flat commitment (before)")
    axes[0].set_title("deletion: non-retrain seconds (median)")
    axes[0].legend(fontsize=7)
    axes[1].bar(labels, [r["median_receipt_bytes"] / 1024 for r in rows])
    axes[1].axhline(64, color="red", lw=1, ls="--")
    axes[1].set_title("receipt size, KiB (target < 64)")
    axes[2].bar(labels, [r["median_verify_s"] * 1000 for r in rows])
    axes[2].set_title("verify, ms")
    for ax in axes:
        ax.set_xlabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run the sizes and write the JSON and the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--deletes", type=int, default=5, help="single-id deletions per size")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-receipts-"))
    # a throwaway operator key, never the user's own (unless SISA_SIGNING_KEY_FILE names one)
    os.environ.setdefault("SISA_SIGNING_KEY_FILE", str(workdir / "signing.key"))
    rows = []
    try:
        for n in args.sizes:
            rows.append(one_size(n, workdir, args.deletes))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "command": "python scripts/bench_receipts.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": OVERRIDES,
        "runs": rows,
    }
    (args.out / "receipts.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "receipts.png")
    for r in rows:
        print(
            f"N={r['n']:,}: fit {r['fit_s']:.1f}s (commitments {r['fit_commit_s']:.2f}s, signature "
            f"{r['fit_sign_s'] * 1000:.1f} ms); deletion non-retrain {r['median_non_retrain_s']:.3f}s of which "
            f"commitments {r['median_commit_s']:.3f}s + checkpoint {r['median_sign_s'] * 1000:.1f} ms "
            f"(share {r['median_share']:.1%}; the flat method beside it {r['median_flat_commit_s']:.3f}s, share "
            f"{r['median_flat_share']:.1%}; bucketed from scratch {r['median_scratch_commit_s']:.3f}s); "
            f"receipt {r['median_receipt_bytes'] / 1024:.1f} KiB, verify "
            f"{r['median_verify_s'] * 1000:.1f} ms; log +{r['median_log_bytes_added']:.0f} B per deletion"
        )


if __name__ == "__main__":
    main()
