r"""Scale plan for SISA deletion: the cost model's retrain work per request and per day, in time and storage.

Everything here is arithmetic on three kinds of inputs, kept apart in the output:

* **model**: ``sisa.partition.cost_model.expected_work_layout`` on the uniform partitioner's expected
  layout (``N / (S R)`` per slice), exact for K distinct ids, work counted after the
  deletion; per-stage epochs from ``TrainConfig.stage_epochs`` (``--epochs`` recalibrated).
* **measured**: per-worker training throughput (sample-epochs per second of retraining
  compute, 1 torch thread per shard task, both cores of the 2-core machine busy) from the
  committed benchmark JSONs: the CNN from ``docs/bench/bench_unlearn.json`` (all deletions,
  both settings: sum of retrained work / sum of retrain compute) and the MLP from
  ``docs/bench/sharding.json`` (the uniform store's 26 deletions, same ratio); checkpoint
  and per-sample bytes, the re-keying rate (records re-encrypted per second) and the key file's
  compaction time from ``docs/bench/storage.json`` (``scripts/measure_storage.py``).
* **simulated**: the summary table of ``docs/bench/simulate_requests.json``
  (``scripts/simulate_requests.py``), which checks the model against the planner.

Wall time assumes throughput scales linearly with workers (one shard task per worker, as
the orchestrator runs them) and that one request's retrain can use at most as many workers
as it touches shards. "Workers needed" = retrain work per day / (throughput x 86,400 s).

Erasure (store format 3, ``sisa/store/erasure.py``): samples are encrypted under one key per
membership run (up to 508 ids of one slice); an apply re-keys every run that held a deleted id,
re-encrypting the samples left in it, then compacts the key file (one entry per run, about N/508).
Its time is model x measured rates: a slice of ``n = N / (S R)`` samples has ``m = ceil(n / 508)`` runs
of ``n / m``; a batch of K ids touches ``M (1 - (1 - 1/M)^K)`` of the ``M = S R m`` runs in
expectation, so ``erasure_s(K) = c + runs(K) x n / m / rekey_rate + key_compact_s(M)``, with the
bulk rate measured on whole runs (their key-file commits included), ``c`` the measured fixed cost of
one ``rotate`` call (one per apply) and ``key_compact_s(M)`` the measured
compaction of a 60,000-sample store's key file plus M x the measured per-entry compaction time of a
run-key LMDB file.

Run (seconds; rewrites the tables between the markers in docs/scaling.md)::

    .venv/bin/python scripts/scaling_plan.py --doc docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sisa.config.settings import TrainConfig  # noqa: E402
from sisa.partition import cost_model as cm  # noqa: E402

NS = (10**6, 10**8, 10**9)
RATES = (10, 1000)  # deletion requests per hour
SHARDS = (8, 32, 128, 512)
SLICES = (4, 16, 64)
KS = (1, 10, 100, 1000)
WINDOWS = ("immediate", "hourly", "daily")
AVAILABILITY_KS = (10, 100, 240, 1000, 24000)
R_SWEEP = (2, 3, 4, 5, 6, 8, 9, 12, 13, 16, 19, 20, 32, 64)
RECOMMENDED = {10**6: (32, 4), 10**8: (128, 4), 10**9: (512, 4)}  # (S, R) per N; see docs/scaling.md
BEGIN, END = "<!-- scaling_plan:begin -->", "<!-- scaling_plan:end -->"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bench", type=Path, default=Path("docs/bench"), help="folder of the benchmark JSONs")
    parser.add_argument("--epochs", type=int, default=10, help="train.epochs e (recalibrated schedule)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/scaling_plan.json"), help="JSON output")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose marked block gets the tables")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- inputs
def throughputs(bench: Path) -> dict[str, dict[str, Any]]:
    """Measured sample-epochs per second of retraining compute per worker, from the benchmark JSONs."""
    unlearn = json.loads((bench / "bench_unlearn.json").read_text())
    rows = [r for res in unlearn["results"] for r in [*res["singles"], *res["batches"]]]
    cnn_work, cnn_s = sum(r["work"] for r in rows), sum(r["compute_s"] for r in rows)
    sharding = json.loads((bench / "sharding.json").read_text())
    uni = sharding["results"]["uniform"]
    mlp_rows = [*uni["requests"], *uni["cold_requests"]]
    mlp_work, mlp_s = sum(r["work"] for r in mlp_rows), sum(r["compute_s"] for r in mlp_rows)
    return {
        "cnn": {
            "sample_epochs_per_s": cnn_work / cnn_s,
            "source": "docs/bench/bench_unlearn.json: all deletions (S=8 R=4 and S=16 R=8), sum(work) / sum(compute_s)",
            "work": cnn_work,
            "compute_s": cnn_s,
            "deletions": len(rows),
            "date": unlearn["machine"]["date"],
        },
        "mlp": {
            "sample_epochs_per_s": mlp_work / mlp_s,
            "source": "docs/bench/sharding.json: uniform store, all 26 deletions, sum(work) / sum(compute_s)",
            "work": mlp_work,
            "compute_s": mlp_s,
            "deletions": len(mlp_rows),
            "date": sharding["machine"]["date"],
        },
    }


# --------------------------------------------------------------------------- model
def window_sizes(rate: int) -> dict[str, int]:
    """Ids per applied batch when requests arriving at ``rate`` per hour are applied at once, hourly or daily."""
    return {"immediate": 1, "hourly": rate, "daily": 24 * rate}


def cells_touched(cells: int, k: int) -> float:
    """Expected distinct cells (of ``cells`` equally likely) that ``k`` uniform ids fall in."""
    return cells * -math.expm1(k * math.log1p(-1.0 / cells)) if cells > 1 else 1.0


def runs(storage: dict[str, Any], n: int, s: int, r: int) -> tuple[int, float]:
    """Runs in the store (each slice of N/(S R) samples cut into runs of at most RUN_MAX) and samples per run."""
    per_slice = n / (s * r)
    m = max(1, math.ceil(per_slice / storage["samples"]["rekey"]["run_max"]))
    return s * r * m, per_slice / m


def key_file(storage: dict[str, Any], n: int, s: int, r: int) -> dict[str, float]:
    """The run-key file at N: entries, bytes and compaction seconds (measured per-entry costs x entries)."""
    total, _ = runs(storage, n, s, r)
    rk, lm = storage["samples"]["rekey"], storage["run_key_file"]
    return {
        "entries": total,
        "bytes": max(rk["key_file_bytes"], total * lm["bytes_per_entry"]),
        "compact_s": rk["key_file_compact_seconds_median"] + total * lm["compact_seconds_per_entry"],
    }


def erasure_s(storage: dict[str, Any], n: int, s: int, r: int, k: int) -> float:
    """Expected seconds of one apply's erasure: overhead + touched runs x samples per run / rate + key compaction.

    Args:
        storage: ``docs/bench/storage.json``.
        n: Samples in the store.
        s: Shards.
        r: Slices per shard.
        k: Distinct ids in the applied batch.

    Returns:
        Seconds (model x measured rate).
    """
    rekey = storage["samples"]["rekey"]
    total, per_run = runs(storage, n, s, r)
    reencrypt = cells_touched(total, k) * per_run / rekey["all_runs_records_per_second_median"]
    return rekey["per_call_overhead_s"] + reencrypt + key_file(storage, n, s, r)["compact_s"]


def plan(train: TrainConfig, thr: dict[str, dict[str, Any]], storage: dict[str, Any]) -> dict[str, Any]:
    """Per (S, R, K): model work per id as a fraction of e*N (N-free), then absolute per N and rate."""
    settings = []
    for s in SHARDS:
        for r in SLICES:
            stage = train.stage_epochs(r)
            row: dict[str, Any] = {
                "shards": s,
                "slices": r,
                "stage_epochs": stage,
                "full_sisa_over_monolithic": cm.full_sisa_work(cm.equal_layout(1.0, s, r), stage) / train.epochs,
                "checkpoints": s * r,
                "checkpoint_bytes": {m: s * r * storage["checkpoints"][m]["bytes_mean"] for m in ("mlp", "cnn")},
                "per_n": {},
            }
            for n in NS:
                layout = cm.equal_layout(n, s, r)
                mono = cm.monolithic_work(n, train.epochs)
                per_k = {}
                for k in KS:
                    erase = erasure_s(storage, n, s, r, k)
                    work = cm.expected_work_layout(layout, stage, k, replacement=False, exclude_deleted=True)
                    per_k[str(k)] = {
                        "work_per_batch": work,
                        "work_per_id": work / k,
                        "fraction_of_monolithic_per_id": work / k / mono,
                        "shards_touched": cm.expected_shards_touched(layout, k, replacement=False),
                        "retrain_s_one_worker": {m: work / thr[m]["sample_epochs_per_s"] for m in thr},
                        "runs_touched": cells_touched(runs(storage, n, s, r)[0], k),
                        "erasure_s": erase,
                        "per_day": {
                            str(rate): {
                                "work": rate * 24 * work / k,
                                "workers_needed": {
                                    m: rate * 24 * work / k / (thr[m]["sample_epochs_per_s"] * 86400) for m in thr
                                },
                            }
                            for rate in RATES
                        },
                    }
                windows = {}
                for rate in RATES:
                    for name, k in window_sizes(rate).items():
                        work = cm.expected_work_layout(layout, stage, k, replacement=False, exclude_deleted=True)
                        per_day = rate * 24 * work / k
                        windows[f"{rate}/{name}"] = {
                            "k": k,
                            "erasure_s": erasure_s(storage, n, s, r, k),
                            "work_per_batch": work,
                            "work_per_day": per_day,
                            "workers_needed": {m: per_day / (thr[m]["sample_epochs_per_s"] * 86400) for m in thr},
                            # One task per touched shard: the most workers one batch can use at once.
                            "parallel_tasks": cm.expected_shards_touched(layout, k, replacement=False),
                            "shards_out_of_service_fraction": cm.expected_shards_touched(layout, k, replacement=False)
                            / s,
                        }
                shard_scratch = cm.full_sisa_work(layout, stage) / s  # one shard retrained from slice 1
                row["per_n"][str(n)] = {
                    "monolithic_work": mono,
                    "per_k": per_k,
                    "windows": windows,
                    "one_shard_from_scratch_work": shard_scratch,
                    "one_shard_from_scratch_s": {m: shard_scratch / thr[m]["sample_epochs_per_s"] for m in thr},
                }
            settings.append(row)
    smp, keys = storage["samples"], storage["per_sample_keys"]
    per_sample, rekey = smp["bytes_per_sample_marginal"], smp["rekey"]
    stores = {
        str(n): {
            "sample_bytes": n * per_sample,
            "sample_bytes_over_raw": per_sample / smp["raw_bytes_per_sample"],
            # A batch touching every run re-encrypts every sample: the most one apply's erasure costs.
            "rekey_all_s": n / rekey["all_runs_records_per_second_median"]
            + key_file(storage, n, *RECOMMENDED[n])["compact_s"],
            "run_key_file": key_file(storage, n, *RECOMMENDED[n]),
            "space_reclamation_compact_s": n * per_sample / smp["compact_bytes_per_second"],
            "per_sample_keys": {
                "key_file_bytes": n * keys["bytes_per_entry"],
                "bytes_over_raw": (per_sample + keys["bytes_per_entry"]) / smp["raw_bytes_per_sample"],
                "compact_s": n * keys["compact_seconds_per_entry"],
            },
        }
        for n in NS
    }
    return {"settings": settings, "stores": stores, "recommended": recommended(train, thr, storage)}


def recommended(train: TrainConfig, thr: dict[str, dict[str, Any]], storage: dict[str, Any]) -> list[dict[str, Any]]:
    """Operating points of the recommended (S, R) per N: apply immediately when one worker keeps up, else continuously.

    Every apply also erases (re-keys the runs its ids touched, :func:`erasure_s`, model x measured
    rate). Immediate: one request at a time, busy for its retrain plus the re-keying of one run;
    chosen when fewer than one request arrives, on average, during the longest apply. Continuous
    apply: each ``apply()`` takes every request that arrived during the previous one; its duration
    ``T`` is bounded by the critical path (one shard retrained from slice 1 on one worker) plus the
    batch's erasure, so a batch holds about ``K = rate * T`` ids (a fixed point, since the erasure
    grows with K); it needs ``E[work(K)] / (thr * T)`` workers on average, usable only up to the
    shards the batch touches.
    """
    rows = []
    for n, (s, r) in RECOMMENDED.items():
        stage = train.stage_epochs(r)
        layout = cm.equal_layout(n, s, r)
        single = cm.expected_work_layout(layout, stage, 1, replacement=False, exclude_deleted=True)
        scratch = cm.full_sisa_work(layout, stage) / s
        for rate in RATES:
            for m in thr:
                speed = thr[m]["sample_epochs_per_s"]
                need_immediate = rate * 24 * single / (speed * 86400)
                store_bytes = (
                    n * storage["samples"]["bytes_per_sample_marginal"]
                    + s * r * storage["checkpoints"][m]["bytes_mean"]
                )
                erase1 = erasure_s(storage, n, s, r, 1)
                busy = rate / 3600 * (single / speed + erase1)
                row: dict[str, Any] = {
                    "n": n,
                    "shards": s,
                    "slices": r,
                    "rate_per_hour": rate,
                    "model": m,
                    "samples_per_shard": n / s,
                    "single_s": single / speed,
                    "one_shard_from_scratch_s": scratch / speed,
                    "storage_bytes": store_bytes,
                    "erasure_s_one_id": erase1,
                    "immediate_utilisation": busy,
                }
                k = 1
                for _ in range(100):  # T = scratch + erasure(K), K = rate T: increasing in K, converges
                    window = scratch / speed + erasure_s(storage, n, s, r, k)
                    k_next = max(1, round(rate * window / 3600))
                    if k_next == k:
                        break
                    k = k_next
                if k == 1:
                    row.update(
                        mode="immediate",
                        k=1,
                        workers=need_immediate,
                        out_of_service=1 / s,
                        window_s=0.0,
                        erasure_s=erase1,
                    )
                else:
                    work = cm.expected_work_layout(layout, stage, k, replacement=False, exclude_deleted=True)
                    touched = cm.expected_shards_touched(layout, k, replacement=False)
                    row.update(
                        mode="continuous",
                        k=k,
                        workers=work / (speed * window),
                        parallel_tasks=touched,
                        out_of_service=touched / s,
                        window_s=window,
                        erasure_s=erasure_s(storage, n, s, r, k),
                    )
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- markdown
def duration(seconds: float) -> str:
    """Seconds as a short human duration."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d" if seconds >= 10 * 86400 else f"{seconds / 86400:.1f} d"


def size(nbytes: float) -> str:
    """Bytes with a decimal unit."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes / 1e3:.3g} kB"


def percent(x: float) -> str:
    """A fraction as a percentage, one decimal below 10%."""
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def sig(x: float) -> str:
    """Two significant digits, plain for mid-size numbers."""
    if x == 0:
        return "0"
    if 0.01 <= abs(x) < 10_000:
        return f"{x:.2g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x:.1e}"


def flagged(window: dict[str, Any], model: str) -> str:
    """Workers needed, with a dagger when they exceed what the apply can run at once."""
    need = window["workers_needed"][model]
    cap = 1.0 if window["k"] == 1 else window["parallel_tasks"]
    return sig(need) + (" †" if need > cap else "")


def table_head(columns: Sequence[str]) -> list[str]:
    """The header row and the separator row of a markdown table with these column titles."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/scaling.md."""
    thr, settings, stores = result["throughput"], result["plan"]["settings"], result["plan"]["stores"]
    e = result["epochs"]
    out: list[str] = []
    out.append(f"Generated by `{result['command']}`.\n")
    out.append(
        f"Measured throughput per worker (1 torch thread, both cores of the 2-core machine busy): "
        f"CNN **{thr['cnn']['sample_epochs_per_s']:,.0f}** sample-epochs/s ({thr['cnn']['deletions']} deletions, "
        f"{thr['cnn']['work']:,} sample-epochs in {thr['cnn']['compute_s']:,.0f} s of retrain compute; "
        f"{thr['cnn']['source'].split(':')[0]}), MLP **{thr['mlp']['sample_epochs_per_s']:,.0f}** sample-epochs/s "
        f"({thr['mlp']['deletions']} deletions, {thr['mlp']['work']:,} in {thr['mlp']['compute_s']:.1f} s; "
        f"{thr['mlp']['source'].split(':')[0]}).\n"
    )
    # Table 1: N-independent work fractions.
    out.append(
        f"**Table 1 (model).** Retrain work per deleted id as a fraction of retraining one model on all N "
        f"(e*N, e={e}), when requests are applied in batches of K ids; shown for N=10^8, within 0.2% of it "
        f"at N=10^6 and 10^9. `e'` = epochs per stage; `full SISA` = training every shard from scratch "
        f"/ e*N; `shards@K=100` = shards one batch of 100 retrains.\n"
    )
    out.append("| S | R | e' | full SISA | K=1 | K=10 | K=100 | K=1000 | shards@K=100 |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for row in settings:
        pk = row["per_n"][str(10**8)]["per_k"]
        out.append(
            f"| {row['shards']} | {row['slices']} | {row['stage_epochs']} | {row['full_sisa_over_monolithic']:.2f} | "
            + " | ".join(f"{pk[str(k)]['fraction_of_monolithic_per_id']:.2e}" for k in KS)
            + f" | {pk['100']['shards_touched']:.1f} |"
        )
    # Table 1b: the slice count under the rounded recalibration.
    out.append(
        f"\n**Table 1b (model).** Slices R under `epoch_schedule: recalibrated` with e={e}: the per-stage epochs "
        f"e' are rounded (`TrainConfig.stage_epochs`), so training compute and deletion work move with the "
        f"rounding; the exact recalibration 2e/(R+1) would keep training at e x N and make R buy at most "
        f"(0.75 - 0.67) / 0.75 = 11% beyond R=4. `S x work` = work of one deletion (K=1, equal shards) x S / "
        f"(e N), N- and S-free.\n"
    )
    out.append("| R | e' | exact 2e/(R+1) | full training / (e N) | S x work, rounded e' | S x work, exact |")
    out.append("|---|---|---|---|---|---|")
    for r in R_SWEEP:
        stage = result["train"].stage_epochs(r)
        exact = 2 * e / (r + 1)
        out.append(
            f"| {r} | {stage} | {exact:.2f} | {stage * (r + 1) / 2 / e:.2f} | "
            f"{cm.single_request_work(1.0, 1, r, stage) / e:.3f} | {cm.single_request_work(1.0, 1, r, exact) / e:.3f} |"
        )
    # Table 2: one deletion alone, one worker.
    out.append(
        "\n**Table 2 (model x measured throughput).** Retraining compute of one deletion applied on its own "
        "(K=1), on one worker: it retrains one shard, so more workers do not shorten it. Cells: expected "
        "(worst case, the shard from slice 1, which is also the critical path of any large batch), MLP / CNN.\n"
    )
    out += table_head(["S", "R", *(f"N=10^{int(math.log10(n))}" for n in NS)])
    for row in settings:
        cells = []
        for n in NS:
            t = row["per_n"][str(n)]["per_k"]["1"]["retrain_s_one_worker"]
            w = row["per_n"][str(n)]["one_shard_from_scratch_s"]
            cells.append(f"{duration(t['mlp'])} ({duration(w['mlp'])}) / {duration(t['cnn'])} ({duration(w['cnn'])})")
        out.append(f"| {row['shards']} | {row['slices']} | " + " | ".join(cells) + " |")
    # Table 3: workers to keep up, per model.
    for m, label in (("mlp", "MLP"), ("cnn", "CNN")):
        out.append(
            f"\n**Table 3{'a' if m == 'mlp' else 'b'} (model x measured throughput), {label}.** Workers needed to "
            f"keep up (retrain work per day / one worker-day) when requests are applied immediately (K=1), "
            f"hourly (K = rate: 10 or 1,000 ids per batch) or daily (K = 24 x rate: 240 or 24,000). "
            f"Cells: immediate / hourly / daily; † = more workers than the apply can use at once (one request at "
            f"a time retrains one shard, so immediate needs <= 1; a batch runs one task per shard it touches).\n"
        )
        out += table_head(["S", "R", *(f"N=10^{int(math.log10(n))}, {rate}/h" for n in NS for rate in RATES)])
        for row in settings:
            cells = []
            for n in NS:
                win = row["per_n"][str(n)]["windows"]
                for rate in RATES:
                    cells.append(" / ".join(flagged(win[f"{rate}/{w}"], m) for w in WINDOWS))
            out.append(f"| {row['shards']} | {row['slices']} | " + " | ".join(cells) + " |")
    # Table 3c: availability cost of deferring under the exclude policy.
    out.append(
        "\n**Table 3c (model).** Fraction of shards out of service when K deferred ids are waiting, under the "
        "default `exclude` policy (a journaled, not yet applied deletion takes its shards out of the ensemble "
        "until their retrain is done): expected shards the K ids touch / S, the same for every R and N. A window "
        "of T hours at a rate of r requests/h collects K = r T ids: hourly at 10/h is K=10, daily 240; hourly "
        "at 1000/h is 1,000, daily 24,000. Applied immediately, one shard (1/S) is out while it retrains.\n"
    )
    out += table_head(["S", *(f"K={k:,}" for k in AVAILABILITY_KS)])
    for s in SHARDS:
        layout = cm.equal_layout(10**8, s, SLICES[0])
        cells = [f"{cm.expected_shards_touched(layout, k, replacement=False) / s:.0%}" for k in AVAILABILITY_KS]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    # Table 4: storage.
    st = result["storage"]
    out.append(
        f"\n**Table 4 (measured sizes x counts).** Storage. Checkpoints: S x R of them (every stage is kept, so a "
        f"deletion can restart from any slice), {st['checkpoints']['mlp']['bytes_mean'] / 1e6:.2f} MB each for "
        f"the MLP and {st['checkpoints']['cnn']['bytes_mean'] / 1e6:.2f} MB for the CNN (measured blobs: weights + "
        f"Adam moments + RNG + metadata; 3 x 4 bytes x {st['checkpoints']['mlp']['parameters']:,} / "
        f"{st['checkpoints']['cnn']['parameters']:,} parameters = "
        f"{st['checkpoints']['mlp']['float32_weights_plus_adam_moments_bytes'] / 1e6:.2f} / "
        f"{st['checkpoints']['cnn']['float32_weights_plus_adam_moments_bytes'] / 1e6:.2f} MB of it); "
        f"independent of N.\n"
    )
    out.append("| S | R | checkpoints | MLP | CNN |")
    out.append("|---|---|---|---|---|")
    for row in settings:
        out.append(
            f"| {row['shards']} | {row['slices']} | {row['checkpoints']:,} | {size(row['checkpoint_bytes']['mlp'])} | "
            f"{size(row['checkpoint_bytes']['cnn'])} |"
        )
    smp, psk, rkf = st["samples"], st["per_sample_keys"], st["run_key_file"]
    rk = smp["rekey"]
    out.append(
        f"\nSamples in LMDB: {smp['bytes_per_sample_marginal']:,.0f} bytes per Fashion-MNIST image in `data.mdb` "
        f"(measured slope, ingested raw: {smp['dtype']} pixels, scale {smp['scale']:g}; the encrypted record is "
        f"{smp['record_bytes']:,} bytes: int32 label, pixels, 8-byte digest; the IDX files hold "
        f"{smp['raw_bytes_per_sample']:,} per image). Erasure re-keys the runs (up to {rk['run_max']} ids of one "
        f"slice, one key each) a batch touched: measured {rk['all_runs_records_per_second_median']:,.0f} records "
        f"re-encrypted per second (all {rk['cells']} runs of a {smp['stores'][-1]['samples']:,}-sample store at "
        f"once, median of {len(rk['all_runs'])}; each run's key commits included), plus "
        f"{rk['per_call_overhead_s'] * 1e3:.1f} ms per apply (median over {len(rk['runs'])} runs re-keyed alone, "
        f"~{rk['runs'][0]['records']:,} records each, at "
        f"{rk['records_per_second_median']:,.0f} records/s), plus {rk['key_file_compact_seconds_median'] * 1e3:.0f} "
        f"ms to compact that store's {rk['key_file_bytes'] / 1e3:.0f} kB key file. The key file has one entry per "
        f"run, about N/{rk['run_max']}: {rkf['bytes_per_entry']:.1f} bytes and "
        f"{rkf['compact_seconds_per_entry'] * 1e9:.0f} ns of compaction per entry (measured on a bare LMDB file "
        f"of {rkf['rows'][-1]['entries']:,} entries of that layout). Per-sample keys (the alternative not "
        f"taken): {psk['bytes_per_entry']:.1f} bytes per sample in the key file (measured the same way, ids "
        f"appended in order, pages full), compacted at {psk['compact_seconds_per_entry'] * 1e9:.0f} ns per entry. "
        f"Space reclamation (not erasure; `Store.compact()` on request): a rewrite of `data.mdb` at "
        f"{smp['compact_bytes_per_second'] / 1e6:,.0f} MB/s on a {smp['stores'][-1]['data_mdb_bytes'] / 1e6:,.0f} MB "
        f"store. All page-cached; a store larger than memory is bounded by the disk. Rows: measured sizes and "
        f"rates x N, the run-key file at the recommended S x R of Table 6.\n"
    )
    out.append(
        "| N | samples in `data.mdb` | run-key file: entries, bytes, compaction per apply | erasure, batch "
        "touching every run (re-key all N) | per-sample keys: key file, its compaction per apply, samples + "
        "keys / raw | space reclamation: `Store.compact()` |"
    )
    out.append("|---|---|---|---|---|---|")
    for n in NS:
        s = stores[str(n)]
        p, kf = s["per_sample_keys"], s["run_key_file"]
        out.append(
            f"| 10^{int(math.log10(n))} | {size(s['sample_bytes'])} ({s['sample_bytes_over_raw']:.3f}x raw) | "
            f"{kf['entries']:,.0f}, {size(kf['bytes'])}, {duration(kf['compact_s'])} | "
            f"{duration(s['rekey_all_s'])} | {size(p['key_file_bytes'])}, {duration(p['compact_s'])}, "
            f"{p['bytes_over_raw']:.3f}x | {duration(s['space_reclamation_compact_s'])} |"
        )
    # Table 4b: erasure per apply.
    out.append(
        "\n**Table 4b (model x measured re-keying rate).** Erasure time of one apply: each slice of N/(S R) "
        f"samples is cut into m = ceil(N/(S R)/{rk['run_max']}) runs; a batch of K ids touches M (1 - (1 - 1/M)^K) "
        "of the M = S R m runs in expectation, each re-encrypting N/(S R m) samples, at "
        f"{rk['all_runs_records_per_second_median']:,.0f} records/s on the driver, plus "
        f"{rk['per_call_overhead_s'] * 1e3:.1f} ms per apply and the key file's compaction (M entries). Cells: "
        "K=1 / K=100 / K=24,000 (a day at 1,000/h). One process does it, whatever the workers.\n"
    )
    out += table_head(["S", "R", *(f"N=10^{int(math.log10(n))}" for n in NS)])
    for row in settings:
        cells = []
        for n in NS:
            cells.append(
                " / ".join(duration(erasure_s(st, n, row["shards"], row["slices"], k)) for k in (1, 100, 24000))
            )
        out.append(f"| {row['shards']} | {row['slices']} | " + " | ".join(cells) + " |")
    # Table 6: recommended operating points.
    out.append(
        "\n**Table 6 (model x measured throughput and sizes).** The recommended (S, R) per N (reasons in the "
        "text), operated *immediately* (each request applied on its own) where one worker keeps up, otherwise "
        "by *continuous apply* (each `apply()` takes every request that arrived during the previous one; its "
        "duration T is bounded by the critical path, one shard retrained from slice 1 on one worker, plus the "
        "batch's erasure, so a batch holds K = rate x T ids). Immediate where K rounds to 1; `busy` "
        "= rate x (expected retrain + erasure of one id), the single writer's load if every request were applied "
        "on its own (above 1 it cannot keep up). `workers`: average busy "
        "workers; `out`: shards out of service under `exclude` while a batch waits or retrains; `latency`: "
        "request to certificate, up to about 2T; `erasure`: re-keying the runs of one batch of K ids (model x "
        "measured re-keying rate, Table 4b).\n"
    )
    out.append(
        "| N | S x R | samples/shard | rate | model | busy | mode | K | workers | out | latency | storage | erasure |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["plan"]["recommended"]:
        latency = (
            f"{duration(r['single_s'] + r['erasure_s'])} "
            f"({duration(r['one_shard_from_scratch_s'] + r['erasure_s'])} worst)"
            if r["mode"] == "immediate"
            else f"<= {duration(2 * r['window_s'])}"
        )
        out.append(
            f"| 10^{int(math.log10(r['n']))} | {r['shards']} x {r['slices']} | {r['samples_per_shard']:,.0f} | "
            f"{r['rate_per_hour']}/h | {r['model'].upper()} | {sig(r['immediate_utilisation'])} | {r['mode']} | "
            f"{r['k']:,} | {sig(r['workers'])} | {percent(r['out_of_service'])} | {latency} | "
            f"{size(r['storage_bytes'])} | {duration(r['erasure_s'])} |"
        )
    # Table 5: simulation check.
    simres = result.get("simulation")
    if simres:
        out.append(
            f"\n**Table 5 (simulated vs model).** `{simres['command']}` ({simres['summary']['configurations']} "
            f"streams, {simres['summary']['seconds']:.0f} s): mean planned work per request of the simulated stream "
            f"over the model on the layout before each request, ± one standard error; ids = real partitioner on "
            f"N=10^6 ids, counts = multinomial layout of N=10^9. Over all streams: ratio "
            f"{simres['summary']['ratio_min']:.3f}..{simres['summary']['ratio_max']:.3f}, pooled "
            f"{simres['summary']['pooled_ratio']:.4f}; sum of z^2 = {simres['summary']['chi2_z']:.1f} on "
            f"{simres['summary']['chi2_dof']} streams (expected {simres['summary']['chi2_dof']} ± "
            f"{math.sqrt(2 * simres['summary']['chi2_dof']):.0f} if the model is right).\n"
        )
        out.append(
            "| S | R | K | requests | work per id / e*N, simulated (ids) | model | ratio, ids N=10^6 | "
            "ratio, counts N=10^9 |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        runs = simres["runs"]
        keyed = {(r["engine"], r["shards"], r["slices"], r["k"]): r for r in runs}
        for s in SHARDS:
            for r in SLICES:
                for k in (1, 10, 100):
                    a, b = keyed.get(("ids", s, r, k)), keyed.get(("counts", s, r, k))
                    if a is None:
                        continue
                    model_frac = a["mean_model"] / k / a["monolithic_work"]
                    cb = f"{b['ratio']:.3f} ± {b['se']:.3f}" if b else "-"
                    out.append(
                        f"| {s} | {r} | {k} | {a['requests']} | {a['fraction_of_monolithic_per_id']:.3e} | "
                        f"{model_frac:.3e} | {a['ratio']:.3f} ± {a['se']:.3f} | {cb} |"
                    )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Compute the plan, write the JSON, print (and optionally splice) the markdown."""
    args = parse_args(argv)
    train = TrainConfig(epochs=args.epochs)
    thr = throughputs(args.bench)
    storage = json.loads((args.bench / "storage.json").read_text())
    sim_path = args.bench / "simulate_requests.json"
    simulation = json.loads(sim_path.read_text()) if sim_path.is_file() else None
    command = ".venv/bin/python scripts/scaling_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": command.strip(),
        "epochs": args.epochs,
        "grid": {"n": NS, "rates_per_hour": RATES, "shards": SHARDS, "slices": SLICES, "k": KS},
        "throughput": thr,
        "storage": {
            "source": "docs/bench/storage.json",
            "checkpoints": storage["checkpoints"],
            "samples": storage["samples"],
            "per_sample_keys": storage["per_sample_keys"],
            "run_key_file": storage["run_key_file"],
        },
        "plan": plan(train, thr, storage),
        "simulation": {"command": simulation["command"], "summary": simulation["summary"], "runs": simulation["runs"]}
        if simulation
        else None,
        "assumptions": [
            "uniform partition, expected layout N/(S R) per slice; requests uniform over live samples",
            "throughput per worker as measured (1 thread, 2-core machine), scaling linearly with workers",
            "wall time of retraining only: journal, dispatch and certificate are extra; erasure (re-keying) is "
            "modelled separately and added to each apply in Table 6",
            "erasure re-encrypts on one driver process at the measured rate, linear in the samples re-encrypted",
        ],
    }
    text = markdown({**result, "train": train})
    print(text)
    result.pop("simulation")  # already in simulate_requests.json; only its summary is repeated here
    result["simulation_summary"] = simulation["summary"] if simulation else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if args.doc is not None:
        doc = args.doc.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{args.doc} has no {BEGIN} ... {END} block to fill")
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.doc.write_text(f"{head}{BEGIN}\n\n{text}\n{END}{tail}")
        print(f"updated the tables in {args.doc}")


if __name__ == "__main__":
    main()
