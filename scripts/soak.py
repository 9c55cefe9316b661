r"""Soak test: a stream of deletion requests against one store while another process serves predictions.

One trained store, two processes:

* **Writer** (this process, the store's one writer, retraining on Ray): ``--requests``
  deletion requests, each naming ``1 + Poisson(--extra-ids)`` ids never named before
  (seeded draws from the stored ids), arriving as a seeded mix of *events*: with
  probability ``--single-fraction`` one immediate ``delete(ids)``, otherwise a burst of
  ``Geometric(mean --mean-burst)`` requests, each ``delete(ids, defer=True)``, then one
  ``apply()``. Events follow one another with no pause (``--pause`` adds exponential
  gaps), so the stream measures how fast requests can be honoured. For every request the
  writer records when it was sent, journaled (deferred ones) and **acknowledged** (when
  ``delete()`` returned, or ``apply()`` for deferred ones), the shards that held its ids
  and the checkpoint keys it **retired**: every stage checkpoint of those shards that saw
  one of its ids, read from the store just before the request, which includes the live
  model of each affected shard. After each acknowledgement it probes the ids
  (``has_sample`` must be false).
* **Reader** (a subprocess, ``Ensemble.open(store, readonly=True)``, 1 torch thread):
  ``predict_proba`` on a fixed batch of test images in a loop (``--predict-rate`` per
  second; 0 = back to back), timing each call and recording the checkpoint key of every
  shard model the call used (the serving cache after the call holds exactly the live set
  of the snapshot that call read). A call that finds every shard out of service (all
  of them hit by not yet applied deferred requests: the ``exclude`` policy) is recorded
  as *unavailable*. At the end it probes every deleted id through its own long-lived
  handle, which has followed every compaction the writer made.

Checks at the end (``checks`` in the JSON; the script exits 1 if one fails):

* ``applied_exactly_once``: one certificate per request, request ids unique, none pending,
  audit log entries == requests and the log's request ids are exactly the requests';
* ``audit_chain``: the HMAC chain recomputes;
* ``verify``: every shard retrained from scratch is bit-identical to its live model;
* ``no_retired_model_served``: no prediction that *started* after a request's
  acknowledgement used a checkpoint that request retired (``after_journal`` counts the
  same against the journal time of deferred requests: under ``exclude`` an affected
  shard leaves service as soon as the request is journaled, so it must be 0 too);
* ``reader_follows``: the predictions started after the last acknowledgement used exactly
  the final live models;
* ``deleted_ids_absent``: after each acknowledgement (writer), at the end in the reader
  process, and in the final store: no deleted id is stored, every one is tombstoned;
* ``reader_errors``: no prediction failed other than *unavailable*.

Reports requests/s end to end and per apply event, apply latency percentiles (burst
``apply()`` and immediate ``delete()`` separately), request latency (sent to
acknowledged), prediction latency percentiles (p50/p90/p99/max; also inside and outside
apply windows) and the number of predictions. Writes everything to a JSON file and a
three-panel PNG beside it (prediction latency over time with apply windows shaded;
acknowledged requests over time; apply latency against requests per event).

Full run (``configs/fashion_mnist.yaml``, MLP 784-128-10, S=8, R=4, 10 epochs recalibrated
to 4 per stage, with ``data.train_limit=10000``: 1,000 requests; about 10 minutes on 2
cores)::

    .venv/bin/python scripts/soak.py

Quick smoke run (``configs/tiny.yaml``: 1,200 samples, S=3, R=2; 60 requests; under a minute)::

    .venv/bin/python scripts/soak.py --quick --out results/soak_quick.json

Trailing ``key=value`` arguments are config overrides, e.g. ``data.train_limit=20000``.
The core (:func:`run_soak`, :func:`check`) is importable; ``tests/behaviour/test_soak.py`` runs it
at small scale.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Let `python scripts/soak.py` find the package (and benchlib) without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    loadavg,
    machine_info,
    pyplot,
    run_folder,
    run_header,
    save_figure,
    script_parser,
    write_results,
)

from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import SisaConfig  # noqa: E402
from sisa.data.loaders import LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.errors import NotTrainedError  # noqa: E402

FULL_CONFIG = Path("configs/fashion_mnist.yaml")
FULL_OVERRIDES = ("data.train_limit=10000", "data.test_limit=2000")
FULL_REQUESTS = 1000
QUICK_CONFIG = Path("configs/tiny.yaml")
QUICK_REQUESTS = 60
READY_TIMEOUT_S = 180.0
PERCENTILES = (50, 90, 99)


@dataclass
class Workload:
    """The request stream's shape and the reader's load.

    Attributes:
        requests: Deletion requests in all.
        single_fraction: Probability that an event is one immediate ``delete()``.
        mean_burst: Mean requests of a burst (geometric, at least 1), applied by one ``apply()``.
        extra_ids: Mean extra ids per request (a request names ``1 + Poisson(extra_ids)``).
        pause: Mean seconds between events (exponential; 0 = back to back).
        predict_rate: Reader predictions per second (0 = back to back).
        predict_batch: Test images per prediction.
        reader_threads: Torch threads of the reader.
        settle: Seconds the reader keeps serving after the last acknowledgement.
        seed: Seed of the stream.
    """

    requests: int = FULL_REQUESTS
    single_fraction: float = 0.25
    mean_burst: float = 4.0
    extra_ids: float = 0.3
    pause: float = 0.0
    predict_rate: float = 20.0
    predict_batch: int = 256
    reader_threads: int = 1
    settle: float = 2.0
    seed: int = 0


@dataclass
class Event:
    """One arrival: ``single`` (an immediate ``delete``) or ``burst`` (deferred requests + ``apply``)."""

    kind: str
    sizes: list[int] = field(default_factory=list)  # ids per request


# --------------------------------------------------------------------------- the stream
def plan_stream(w: Workload) -> list[Event]:
    """Draw the seeded sequence of events holding exactly ``w.requests`` requests."""
    rng = np.random.default_rng(w.seed)
    events: list[Event] = []
    left = w.requests
    while left > 0:
        if rng.random() < w.single_fraction:
            kind, n = "single", 1
        else:
            kind, n = "burst", min(left, int(rng.geometric(1.0 / max(w.mean_burst, 1.0))))
        events.append(Event(kind, [1 + int(rng.poisson(w.extra_ids)) for _ in range(n)]))
        left -= n
    return events


def retired_keys(ens: Ensemble) -> dict[int, dict[int, str]]:
    """Shard -> stage -> checkpoint key of every stage record now, plus the live key as stage -1."""
    out: dict[int, dict[int, str]] = {}
    with ens.store.read() as txn:
        live = ens.store.live(txn)
        for shard in range(ens.config.shards):
            out[shard] = {r["stage"]: r["key"] for r in ens.store.stage_records(txn, shard)}
            if shard in live:
                out[shard][-1] = live[shard]["key"]
    return out


def keys_retired_by(before: dict[int, dict[int, str]], shards: dict[str, Any]) -> list[str]:
    """Keys a request retired: stages after its restart stage of each affected shard, and the live model."""
    keys = set()
    for key, info in shards.items():
        for stage, ckpt in before[int(key)].items():
            if stage == -1 or stage > info["restart_stage"]:
                keys.add(ckpt)
    return sorted(keys)


def still_stored(ens: Ensemble, ids: Sequence[int]) -> int:
    """How many of ``ids`` the store still holds (must be 0 after acknowledgement)."""
    with ens.store.read() as txn:
        return sum(ens.store.has_sample(txn, i) for i in ids)


def run_stream(
    ens: Ensemble, events: list[Event], pool: Sequence[int], w: Workload, t0: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Send every event's requests and record what happened; times are seconds since ``t0``.

    Returns:
        Per request records, per event records, and every id deleted (in order).
    """
    rng = np.random.default_rng(w.seed + 1)
    ids_iter = iter(pool)
    requests: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    deleted: list[int] = []

    def now() -> float:
        return time.monotonic() - t0

    for b, event in enumerate(events):
        if w.pause > 0:
            time.sleep(float(rng.exponential(w.pause)))
        sent: list[tuple[list[int], dict[int, dict[int, str]], dict[str, Any], float, float]] = []
        if event.kind == "single":
            ids = [next(ids_iter) for _ in range(event.sizes[0])]
            before = retired_keys(ens)
            start = now()
            cert = ens.delete(ids)
            end = now()
            sent.append((ids, before, cert, start, end))
            certs = {cert["request_id"]: [cert]}
            retrain = cert["batch"]["retrain_seconds"]
        else:
            first = now()
            for size in event.sizes:
                ids = [next(ids_iter) for _ in range(size)]
                before = retired_keys(ens)
                t_sent = now()
                req = ens.delete(ids, defer=True)
                sent.append((ids, before, req, t_sent, now()))
            start = now()
            applied = ens.apply()
            end = now()
            certs = {}
            for cert in applied:
                certs.setdefault(cert["request_id"], []).append(cert)
            retrain = applied[0]["batch"]["retrain_seconds"] if applied else 0.0
        event_ids = [i for ids, *_ in sent for i in ids]
        present = still_stored(ens, event_ids)
        probed = now()
        for ids, before, req, t_sent, t_journal in sent:
            mine = certs.get(req["request_id"], [])
            requests.append(
                {
                    "request_id": req["request_id"],
                    "event": b,
                    "kind": event.kind,
                    "ids": len(ids),
                    "shards": sorted(int(s) for s in req["shards"]),
                    "retired": keys_retired_by(before, req["shards"]),
                    "certificates": len(mine),
                    "sent_at": t_sent,
                    "journaled_at": t_journal,
                    "acked_at": end,
                    "latency_s": end - t_sent,
                }
            )
        batches.append(
            {
                "event": b,
                "kind": event.kind,
                "requests": len(sent),
                "ids": len(event_ids),
                "journal_start": sent[0][3] if event.kind == "single" else first,
                "start": start,
                "end": end,
                "seconds": end - start,
                "certificates": sum(len(c) for c in certs.values()),
                "stray_certificates": sorted(set(certs) - {r["request_id"] for _, _, r, _, _ in sent}),
                "retrain_seconds": retrain,
                "retrained_shards": sorted({s for c in certs.values() for s in c[0]["retrained_shards"]}),
                "present_after_ack": present,
                "probe_s": probed - end,
            }
        )
        deleted += event_ids
    return requests, batches, deleted


# --------------------------------------------------------------------------- the reader
def reader_main(exchange: Path) -> None:
    """The serving process: predict in a loop until told to stop, then probe the deleted ids."""
    import torch

    args = json.loads((exchange / "reader_args.json").read_text())
    torch.set_num_threads(int(args["threads"]))
    x, y = np.load(exchange / "x.npy"), np.load(exchange / "y.npy")
    interval = 1.0 / args["rate"] if args["rate"] > 0 else 0.0
    ens = Ensemble.open(args["store"], readonly=True)
    key_sets: dict[tuple[tuple[int, str], ...], int] = {}
    t0 = float(args["t0"])
    starts: list[float] = []
    ends: list[float] = []
    status: list[int] = []  # 0 ok, 1 unavailable (every shard out of service), 2 error
    used: list[int] = []
    accuracy: list[float | None] = []  # of the served labels on the fixed batch
    errors: list[str] = []
    stop = exchange / "stop"
    next_at = time.monotonic()
    while not stop.exists():
        start = time.monotonic()
        acc = None
        try:
            proba = ens.predict_proba(x)
            end = time.monotonic()
            code, acc = 0, round(float((proba.argmax(axis=1) == y).mean()), 5)
        except NotTrainedError:
            end, code = time.monotonic(), 1
        except Exception as exc:  # recorded, never fatal: the soak reports every failure
            end, code = time.monotonic(), 2
            if len(errors) < 20:
                errors.append(f"{type(exc).__name__}: {exc}")
        # After the call the serving cache holds exactly the live set of the snapshot it read.
        live = tuple(sorted(ens.provenance().items())) if code == 0 else ()
        starts.append(start - t0)
        ends.append(end - t0)
        status.append(code)
        accuracy.append(acc)
        used.append(key_sets.setdefault(live, len(key_sets)))
        if len(starts) == 1:
            (exchange / "ready").write_text("1")
        if interval:
            next_at = max(next_at + interval, end)
            time.sleep(max(0.0, next_at - time.monotonic()))
    probe = json.loads((exchange / "probe_ids.json").read_text())
    with ens.store.read() as txn:
        present = [i for i in probe if ens.store.has_sample(txn, i)]
    result = {
        "start": starts,
        "end": ends,
        "status": status,
        "accuracy": accuracy,
        "key_set": used,
        "key_sets": [[list(p) for p in k] for k in key_sets],
        "errors": errors,
        "probe": {"ids": len(probe), "present": len(present)},
    }
    ens.close()
    (exchange / "reader.json").write_text(json.dumps(result))


def start_reader(
    store: Path, x: np.ndarray, y: np.ndarray, exchange: Path, w: Workload, t0: float
) -> subprocess.Popen[bytes]:
    """Start the reader subprocess on the batch ``(x, y)``; wait until it has served its first prediction."""
    exchange.mkdir(parents=True, exist_ok=True)
    np.save(exchange / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
    np.save(exchange / "y.npy", np.asarray(y, dtype=np.int64))
    args = {"store": str(store), "rate": w.predict_rate, "threads": w.reader_threads, "t0": t0}
    (exchange / "reader_args.json").write_text(json.dumps(args))
    with open(exchange / "reader.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--reader", str(exchange)], stderr=err)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (exchange / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"reader did not start: {(exchange / 'reader.stderr').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop_reader(proc: subprocess.Popen[bytes], exchange: Path, deleted: Sequence[int]) -> dict[str, Any]:
    """Hand the reader the deleted ids, stop it, and read what it recorded."""
    (exchange / "probe_ids.json").write_text(json.dumps([int(i) for i in deleted]))
    (exchange / "stop").write_text("1")
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"reader failed ({proc.returncode}): {(exchange / 'reader.stderr').read_text()[-2000:]}")
    return dict(json.loads((exchange / "reader.json").read_text()))


# --------------------------------------------------------------------------- checks
def served_retired(requests: list[dict[str, Any]], reader: dict[str, Any], when: str) -> list[dict[str, Any]]:
    """Predictions that used a checkpoint key and started after ``when`` of a request that retired it.

    ``when`` is ``acked_at`` or ``journaled_at`` (an immediate ``delete`` is journaled and
    acknowledged inside one call, so its journal time is taken as its acknowledgement).
    """
    retired_at: dict[str, float] = {}
    for r in requests:
        for key in r["retired"]:
            retired_at[key] = min(retired_at.get(key, math.inf), r[when])
    sets = [[k for _, k in ks] for ks in reader["key_sets"]]
    bad = []
    for i, (start, idx) in enumerate(zip(reader["start"], reader["key_set"], strict=True)):
        for key in sets[idx]:
            if start > retired_at.get(key, math.inf):
                bad.append({"prediction": i, "start": start, "key": key, "retired_at": retired_at[key]})
    return bad


def check(
    requests: list[dict[str, Any]],
    batches: list[dict[str, Any]],
    reader: dict[str, Any],
    final: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Every end check of the soak; each is ``{"ok": bool, ...details}``."""
    ids = [r["request_id"] for r in requests]
    log_ids = final["audit_request_ids"]
    once = {
        "requests": len(requests),
        "unique_request_ids": len(set(ids)) == len(ids),
        "one_certificate_each": all(r["certificates"] == 1 for r in requests),
        "no_stray_certificates": all(not b["stray_certificates"] for b in batches),
        "pending": final["pending"],
        "audit_entries": final["audit_entries"],
        "audit_log_request_ids_unique": len(set(log_ids)) == len(log_ids),
        "audit_log_is_the_requests": sorted(log_ids) == sorted(ids),
    }
    once["ok"] = bool(
        once["unique_request_ids"]
        and once["one_certificate_each"]
        and once["no_stray_certificates"]
        and final["pending"] == 0
        and final["audit_entries"] == len(requests)
        and once["audit_log_request_ids_unique"]
        and once["audit_log_is_the_requests"]
    )
    after_ack = served_retired(requests, reader, "acked_at")
    after_journal = served_retired(requests, reader, "journaled_at")
    last_ack = max((r["acked_at"] for r in requests), default=0.0)
    final_keys = sorted(final["live_keys"])
    tail = [
        sorted(k for _, k in reader["key_sets"][idx])
        for start, idx, code in zip(reader["start"], reader["key_set"], reader["status"], strict=True)
        if start > last_ack and code == 0
    ]
    present_writer = sum(b["present_after_ack"] for b in batches)
    return {
        "applied_exactly_once": once,
        "audit_chain": {"ok": final["audit_ok"], "problems": final["audit_problems"][:5]},
        "verify": {"ok": final["verify_ok"], "failed_shards": final["verify_failed"]},
        "no_retired_model_served": {
            "ok": not after_ack and not after_journal,
            "after_ack": len(after_ack),
            "after_journal": len(after_journal),
            "examples": (after_ack or after_journal)[:5],
            "retired_keys": len({k for r in requests for k in r["retired"]}),
        },
        "reader_follows": {
            "ok": bool(tail) and all(k == final_keys for k in tail),
            "predictions_after_last_ack": len(tail),
        },
        "deleted_ids_absent": {
            "ok": present_writer == 0
            and reader["probe"]["present"] == 0
            and final["present"] == 0
            and final["tombstoned"] == final["deleted"]
            and reader["probe"]["ids"] == final["deleted"],
            "deleted": final["deleted"],
            "present_after_ack_writer": present_writer,
            "present_at_end_reader": reader["probe"]["present"],
            "present_at_end_store": final["present"],
            "tombstoned": final["tombstoned"],
        },
        "reader_errors": {
            "ok": 2 not in reader["status"],
            "errors": sum(1 for s in reader["status"] if s == 2),
            "examples": reader["errors"][:5],
        },
    }


def final_state(ens: Ensemble, deleted: Sequence[int]) -> dict[str, Any]:
    """Pending requests, audit chain and log, verify, and the deleted ids in the final store."""
    from sisa.receipt.entries import is_certificate
    from sisa.store.tombstones import deleted_ids
    from sisa.unlearn.audit import read_entries

    audit = ens.audit()
    with ens.store.read() as txn:
        # the certificates only: the log also holds a "model published" entry per retrained model
        entries = [r.get("entry", {}) for r in read_entries(ens.store, txn)]
        log_ids = [e.get("request_id") for e in entries if is_certificate(e)]
        present = sum(ens.store.has_sample(txn, i) for i in deleted)
        live = ens.store.live(txn)
    started = time.perf_counter()
    result = ens.verify()
    verify_s = time.perf_counter() - started
    return {
        "pending": len(ens.pending()),
        "audit_ok": audit.ok,
        "audit_entries": audit.entries,
        "audit_problems": audit.problems,
        "audit_request_ids": log_ids,
        "verify_ok": result["ok"],
        "verify_failed": [k for k, v in result["shards"].items() if not v["ok"]],
        "verify_s": verify_s,
        "live_keys": [rec["key"] for rec in live.values()],
        "deleted": len(deleted),
        "present": present,
        "tombstoned": len(deleted_ids(ens.store, deleted)),
        "samples": ens.status()["samples"],
    }


# --------------------------------------------------------------------------- summary
def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """``n``, ``p50``/``p90``/``p99``, ``max`` and ``mean`` of ``values`` (``None`` when empty)."""
    a = np.asarray(values, dtype=float)
    out: dict[str, float | int | None] = {"n": int(a.size)}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p)) if a.size else None
    out["max"] = float(a.max()) if a.size else None
    out["mean"] = float(a.mean()) if a.size else None
    return out


def summarize(
    requests: list[dict[str, Any]], batches: list[dict[str, Any]], reader: dict[str, Any], stream_s: float
) -> dict[str, Any]:
    """Throughput and latency figures of one soak."""
    bursts = [b for b in batches if b["kind"] == "burst"]
    singles = [b for b in batches if b["kind"] == "single"]
    start, end, status = (np.asarray(reader[k]) for k in ("start", "end", "status"))
    latency = end - start
    windows = [(b["start"], b["end"]) for b in batches]
    inside = np.zeros(len(start), dtype=bool)
    for a, b in windows:
        inside |= (start < b) & (end > a)
    ok = status == 0
    changed = np.zeros(len(start), dtype=bool)  # the live set differs from the previous prediction's: models reloaded
    keys = np.asarray(reader["key_set"])
    if len(keys) > 1:
        changed[1:] = keys[1:] != keys[:-1]
    in_stream = (start >= 0) & (start <= stream_s)
    return {
        "stream_s": stream_s,
        "requests": len(requests),
        "ids": sum(r["ids"] for r in requests),
        "events": {"bursts": len(bursts), "singles": len(singles)},
        "requests_per_s": len(requests) / stream_s if stream_s > 0 else None,
        "requests_per_s_per_apply_event": percentiles(
            [b["requests"] / b["seconds"] for b in batches if b["seconds"] > 0]
        ),
        "requests_per_burst": percentiles([b["requests"] for b in bursts]),
        "apply_latency_s": percentiles([b["seconds"] for b in bursts]),
        "single_delete_latency_s": percentiles([b["seconds"] for b in singles]),
        "request_latency_s": percentiles([r["latency_s"] for r in requests]),
        "retrain_s": percentiles([b["retrain_seconds"] for b in batches]),
        "shards_retrained_per_event": percentiles([len(b["retrained_shards"]) for b in batches]),
        "apply_busy_fraction": sum(b - a for a, b in windows) / stream_s if stream_s > 0 else None,
        "predictions": {
            "count": int(len(start)),
            "during_stream": int(in_stream.sum()),
            "per_s_during_stream": float(in_stream.sum() / stream_s) if stream_s > 0 else None,
            "ok": int(ok.sum()),
            "unavailable": int((status == 1).sum()),
            "errors": int((status == 2).sum()),
            "latency_ms": percentiles(latency[ok] * 1e3),
            "latency_ms_inside_apply": percentiles(latency[ok & inside] * 1e3),
            "latency_ms_outside_apply": percentiles(latency[ok & ~inside] * 1e3),
            "latency_ms_after_live_set_change": percentiles(latency[ok & changed] * 1e3),
            "live_sets_seen": len(reader["key_sets"]),
            "shards_in_service": percentiles([len(reader["key_sets"][i]) for i in keys[ok]]),
        },
    }


# --------------------------------------------------------------------------- one soak
def run_soak(
    cfg: SisaConfig, train: LabeledArrays, test_x: np.ndarray, test_y: np.ndarray, workdir: Path, w: Workload
) -> dict[str, Any]:
    """Train a store, run the request stream against it with a reader process, check everything.

    Ray must be up (or :func:`sisa.train.orchestrator.connect` starts a local instance). The
    reader predicts the first ``w.predict_batch`` test samples.

    Returns:
        ``train`` (fit figures), ``requests``, ``batches``, ``summary``, ``checks``, ``ok``
        and the reader's ``predictions`` time series (seconds since the first request).
    """
    store = workdir / "store"
    t_fit = time.perf_counter()
    ens = Ensemble.create(store, cfg)
    ens.ingest(train.x, train.y, ids=train.ids)
    report = ens.fit()
    fit_s = time.perf_counter() - t_fit
    events = plan_stream(w)
    n_ids = sum(sum(e.sizes) for e in events)
    if n_ids > len(train):
        raise SystemExit(f"the stream deletes {n_ids} ids but the store holds {len(train)}; ingest more data")
    pool = np.random.default_rng(w.seed + 2).choice(train.ids, size=n_ids, replace=False).tolist()
    batch, batch_y = test_x[: w.predict_batch], np.asarray(test_y)[: w.predict_batch]
    accuracy_before = ens.score(batch, batch_y)
    t0 = time.monotonic()
    exchange = workdir / "exchange"
    proc = start_reader(store, batch, batch_y, exchange, w, t0)
    try:
        stream_start = time.monotonic() - t0
        requests, batches, deleted = run_stream(ens, events, pool, w, t0)
        stream_end = time.monotonic() - t0
        time.sleep(w.settle)
        reader = stop_reader(proc, exchange, deleted)
    finally:
        if proc.poll() is None:  # the stream failed: do not leave the reader behind
            proc.kill()
            proc.wait()
    final = final_state(ens, deleted)
    accuracy_after = ens.score(batch, batch_y)
    ens.close()
    for r in requests:  # the stream's clock starts at its first request
        for k in ("sent_at", "journaled_at", "acked_at"):
            r[k] -= stream_start
    for b in batches:
        for k in ("journal_start", "start", "end"):
            b[k] -= stream_start
    reader["start"] = [t - stream_start for t in reader["start"]]
    reader["end"] = [t - stream_start for t in reader["end"]]
    checks = check(requests, batches, reader, final)
    summary = summarize(requests, batches, reader, stream_end - stream_start)
    summary["verify_s"] = final["verify_s"]
    served = [a for a in reader["accuracy"] if a is not None]
    summary["accuracy"] = {
        "full_ensemble_before": accuracy_before,
        "full_ensemble_after": accuracy_after,
        "served_mean": float(np.mean(served)) if served else None,
        "served_min": float(np.min(served)) if served else None,
        "served_p1": float(np.percentile(served, 1)) if served else None,
        "served_p50": float(np.median(served)) if served else None,
    }
    for r in requests:  # the checks are done: keep the JSON small
        r["retired"] = len(r["retired"])
    return {
        "train": {"samples": len(train), "fit_s": fit_s, "stage_seconds": report.stage_seconds},
        "final_samples": final["samples"],
        "requests": requests,
        "batches": batches,
        "summary": summary,
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "predictions": {
            "start": [round(t, 5) for t in reader["start"]],
            "end": [round(t, 5) for t in reader["end"]],
            "status": reader["status"],
            "accuracy": reader["accuracy"],
            "shards": [len(reader["key_sets"][i]) for i in reader["key_set"]],
        },
    }


# --------------------------------------------------------------------------- report
def print_report(res: dict[str, Any]) -> None:
    """Print the figures and the checks."""
    s, p = res["summary"], res["summary"]["predictions"]

    def pct(d: dict[str, Any], unit: str, scale: float = 1.0) -> str:
        if not d["n"]:
            return "n/a"
        return " ".join(f"{k} {d[k] * scale:.3g}{unit}" for k in ("p50", "p90", "p99", "max"))

    print(
        f"\n{s['requests']} requests ({s['ids']} ids) in {s['events']['bursts']} bursts + "
        f"{s['events']['singles']} immediate deletes, {s['stream_s']:.1f}s: {s['requests_per_s']:.2f} requests/s"
    )
    print(f"  requests/s per apply event: {pct(s['requests_per_s_per_apply_event'], '')}")
    print(
        f"  burst apply():       {pct(s['apply_latency_s'], 's')} (requests per burst: mean "
        f"{s['requests_per_burst']['mean'] or 0:.2f})"
    )
    print(f"  immediate delete():  {pct(s['single_delete_latency_s'], 's')}")
    print(f"  request sent->ack:   {pct(s['request_latency_s'], 's')}")
    print(
        f"predictions: {p['count']} ({p['per_s_during_stream']:.1f}/s during the stream), "
        f"{p['unavailable']} unavailable, {p['errors']} errors"
    )
    print(f"  latency:             {pct(p['latency_ms'], 'ms')}")
    print(f"  inside apply:        {pct(p['latency_ms_inside_apply'], 'ms')}")
    print(f"  outside apply:       {pct(p['latency_ms_outside_apply'], 'ms')}")
    print(f"  after a model swap:  {pct(p['latency_ms_after_live_set_change'], 'ms')}")
    a = s["accuracy"]
    print(
        f"  served accuracy on the batch: mean {a['served_mean']:.4f}, p1 {a['served_p1']:.4f}, min "
        f"{a['served_min']:.4f} (full ensemble {a['full_ensemble_before']:.4f} before, "
        f"{a['full_ensemble_after']:.4f} after); shards in service: mean {p['shards_in_service']['mean']:.2f}"
    )
    print("checks:")
    for name, c in res["checks"].items():
        detail = {k: v for k, v in c.items() if k not in ("ok", "examples")}
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {detail}")


def plot(res: dict[str, Any], title: str, path: Path) -> None:
    """Prediction latency over time (apply windows shaded); acknowledged requests; apply latency per burst size."""
    plt = pyplot()

    fig, (ax1, ax4, ax2, ax3) = plt.subplots(4, 1, figsize=(12, 13))
    pred = res["predictions"]
    start, end, status = (np.asarray(pred[k]) for k in ("start", "end", "status"))
    ok = status == 0
    for b in res["batches"]:
        if b["start"] > b["journal_start"]:  # deferred requests journaled, their shards out of service
            ax1.axvspan(b["journal_start"], b["start"], color="gray", alpha=0.15, lw=0)
        ax1.axvspan(b["start"], b["end"], color="tab:orange" if b["kind"] == "burst" else "tab:red", alpha=0.15, lw=0)
    ax1.plot(start[ok], (end - start)[ok] * 1e3, ".", ms=2, color="tab:blue", label="prediction (ok)")
    if (~ok).any():
        floor = max(float(((end - start)[ok] * 1e3).min()) if ok.any() else 1.0, 1e-3)
        ax1.plot(start[~ok], np.full((~ok).sum(), floor), "|", color="black", label="unavailable (no shard in service)")
    ax1.plot([], [], color="gray", alpha=0.3, lw=8, label="burst journaled (delete(defer=True) calls)")
    ax1.plot([], [], color="tab:orange", alpha=0.3, lw=8, label="burst apply()")
    ax1.plot([], [], color="tab:red", alpha=0.3, lw=8, label="immediate delete()")
    ax1.set_yscale("log")
    ax1.set_xlabel("seconds since the first request")
    ax1.set_ylabel("predict_proba latency (ms)")
    ax1.set_title("Reader process: prediction latency while deletions are applied")
    ax1.legend(fontsize=7, loc="upper right")
    shards = np.asarray(pred["shards"])
    ax4.plot(start, shards, drawstyle="steps-post", color="tab:purple", lw=0.8, label="shards in service")
    ax4.set_ylabel("shards in service")
    ax4.set_ylim(-0.3, max(int(shards.max()) if shards.size else 1, 1) + 0.3)
    acc = np.asarray([np.nan if a is None else a for a in pred["accuracy"]], dtype=float)
    ax4b = ax4.twinx()
    ax4b.plot(start, acc, ".", ms=2, color="tab:green", label="served accuracy (fixed batch)")
    ax4b.set_ylabel("accuracy on the batch")
    ax4.set_xlabel("seconds since the first request")
    ax4.set_title("What the reader served: live shard models per prediction (exclude policy), and its accuracy")
    lines = ax4.get_legend_handles_labels()[0] + ax4b.get_legend_handles_labels()[0]
    ax4.legend(lines, [str(h.get_label()) for h in lines], fontsize=7, loc="lower right")
    acks = np.sort([r["acked_at"] for r in res["requests"]])
    ax2.step(acks, np.arange(1, len(acks) + 1), where="post", color="tab:green", label="acknowledged requests")
    ax2.set_xlabel("seconds since the first request")
    ax2.set_ylabel("requests acknowledged")
    ax2.set_title(f"Throughput: {res['summary']['requests_per_s']:.2f} requests/s end to end")
    ax2.grid(True, alpha=0.3)
    for kind, color in (("burst", "tab:orange"), ("single", "tab:red")):
        rows = [b for b in res["batches"] if b["kind"] == kind]
        ax3.plot(
            [b["requests"] for b in rows],
            [b["seconds"] for b in rows],
            "o",
            color=color,
            alpha=0.5,
            label="apply() of a burst" if kind == "burst" else "immediate delete()",
        )
    ax3.set_xlabel("requests in the event")
    ax3.set_ylabel("seconds")
    ax3.set_title("Apply latency per event")
    ax3.grid(True, alpha=0.3)
    ax3.legend(fontsize=7)
    ax2.set_xlim(ax1.get_xlim())
    ax4.set_xlim(ax1.get_xlim())
    save_figure(fig, path, title, dpi=110)


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``overrides`` holds the trailing ``key=value`` strings."""
    d = Workload()
    parser = script_parser(__doc__)
    parser.add_argument("--config", type=Path, default=None, help=f"YAML config (default {FULL_CONFIG})")
    parser.add_argument("--requests", type=int, default=None, help=f"deletion requests (default {FULL_REQUESTS})")
    parser.add_argument("--single-fraction", type=float, default=d.single_fraction, help="share of immediate deletes")
    parser.add_argument("--mean-burst", type=float, default=d.mean_burst, help="mean requests per deferred burst")
    parser.add_argument("--extra-ids", type=float, default=d.extra_ids, help="mean extra ids per request (Poisson)")
    parser.add_argument("--pause", type=float, default=d.pause, help="mean seconds between events (0: none)")
    parser.add_argument("--predict-rate", type=float, default=d.predict_rate, help="reader predictions/s (0: no pause)")
    parser.add_argument("--predict-batch", type=int, default=d.predict_batch, help="test images per prediction")
    parser.add_argument("--reader-threads", type=int, default=d.reader_threads, help="torch threads of the reader")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the stream and the ids")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/soak.json"), help="JSON; the PNG goes beside it")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary store (removed after)")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_CONFIG}, {QUICK_REQUESTS} requests (under a minute)"
    )
    parser.add_argument("--reader", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the reader process
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.train_limit=20000")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one soak; write the JSON and the PNG; exit status 1 if a check failed."""
    args = parse_args(argv)
    if args.reader is not None:
        reader_main(args.reader)
        return 0
    from sisa.train import orchestrator

    config = args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG)
    overrides = [*(() if args.quick or args.config else FULL_OVERRIDES), *args.overrides]
    cfg = load_config(config, overrides)
    w = Workload(
        requests=args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS),
        single_fraction=args.single_fraction,
        mean_burst=args.mean_burst,
        extra_ids=args.extra_ids,
        pause=args.pause,
        predict_rate=args.predict_rate,
        predict_batch=args.predict_batch,
        reader_threads=args.reader_threads,
        seed=args.seed,
    )
    info = machine_info()
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    print(
        f"config {config} overrides {overrides or '(none)'}: {len(train)} train samples, S={cfg.shards} "
        f"R={cfg.slices}; {w.requests} requests; machine {info['nproc']} cores",
        flush=True,
    )
    started = time.perf_counter()
    with run_folder(args.workdir, "soak-") as workdir:
        orchestrator.connect(None)
        res = run_soak(cfg, train, test.x, test.y, workdir, w)
    total_s = time.perf_counter() - started
    print_report(res)
    print(
        f"total {total_s:.1f}s (fit {res['train']['fit_s']:.1f}s, stream {res['summary']['stream_s']:.1f}s, "
        f"verify {res['summary']['verify_s']:.1f}s)"
    )
    info["loadavg_end"] = loadavg()
    out = {
        **run_header(config, overrides, args.quick, cfg),
        "workload": w.__dict__,
        "machine": info,
        "total_s": total_s,
        **res,
    }
    title = (
        f"soak: {' '.join([config.name, *overrides])} | S={cfg.shards} R={cfg.slices} n={len(train)} | "
        f"{w.requests} requests | reader {w.predict_rate:g}/s x {w.predict_batch} images | "
        f"{info['nproc']} cores, {info['date']}"
    )
    note = f"; {'all checks passed' if res['ok'] else 'SOME CHECKS FAILED'}"
    write_results(args.out, out, lambda png: plot(res, title, png), indent=1, note=note)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
