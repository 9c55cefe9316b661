r"""Serving benchmark: Ray Serve replicas under closed-loop HTTP load while deletions stream in; time-to-forget.

One trained store, one local Ray instance, one Ray Serve (HTTP on loopback), side by side in one run:

* **in-process**: ``Ensemble.predict_proba`` on the same batch, back to back (no HTTP, no Ray);
* **plain**: one plain torch model of one shard's size (the same network, untrained weights do
  not matter for timing) served by Ray Serve, under the same closed-loop HTTP load: the floor of
  Serve + HTTP + JSON, so ``ensemble / plain`` is what the ensemble and its store-following cost;
* **steady**: the sisa application (``sisa.serve.app``), same load, no deletions;
* **stream, per policy** (``exclude``, then ``serve-clean``): the same load while ``--events``
  deletion requests of ``--ids-per-request`` ids arrive every ``--every`` seconds. Each request
  is ``delete(ids, defer=True)`` (durable, erased: the acknowledgement), then ``apply()`` (the
  retrain), from a writable handle in a child process (a deleting client is not the HTTP
  clients' process), warmed up by one deletion before the load starts (its training runner is
  a Python child that imports torch: seconds of CPU that a running deleter paid long before);
  each policy runs twice, the deleting process at niceness 0 (``--nice 0``: the caller's priority)
  and at ``--nice`` (default: none given, so what ``sisa delete`` gets on this node, 10 while a sisa
  replica runs here, :mod:`sisa.train.serving_node`; the process and its training child, as
  ``sisa delete`` runs, :mod:`sisa.train.priority`);
* **exclude again, deletions in the clients' process**: the first runs' setup, for comparison.

Every client sends the same ``--batch`` images as JSON (``--body json``, the default) or as an
``.npy`` body of float32 (``--body npy``); the plain model takes either.

Where the time goes: each response carries the replica's ``Server-Timing`` (``body``: receiving
it from Serve's proxy, ``predict``: the models, ``replica``: the whole handler); ``outside`` is
client latency minus ``replica`` (proxy, routing, loopback, the client's own process). Besides
the steady arm's p99, each stream arm's p99 during swaps is set against the same arm's p99
outside deletions (responses that overlap no request's acknowledgement-to-retrained-models
window: the same minutes, so the same load from everything else on the machine); the p99 of the
responses that overlap such a whole window (both swaps of an ``exclude`` request, and ``apply``)
is reported too.

**Time-to-forget** of a request: from ``delete`` returning until no replica answers with a model
that saw the ids. Under ``exclude`` that is when every replica has dropped the affected shards;
under ``serve-clean`` when every replica serves the retrained models (it includes ``apply``'s
retrain). Each is measured two ways: **confirmed**, when ``GET /await`` returned (the publisher
read the store after the step and every replica in contact acknowledged that version: an upper
bound, what ``sisa serve --await-replicas`` gives a deleting client), and **observed**, the start
of the last response that still named a retired checkpoint (a lower bound; 0 when none did).

Reports throughput, p50/p99 latency (overall, steady, and during swaps: responses that overlap a
request's acknowledgement-to-confirmation window), errors (non-200 other than 503 while every
shard is out of service), time-to-forget p50/p99 per policy, ``delete`` latency alone and with
the wait for the replicas, and the provenance check of ``scripts/soak.py`` (``served_retired``):
no response that started after a request's confirmation used a checkpoint it retired.
JSON plus a PNG beside it.

Full run (Fashion-MNIST, MLP 784-128-10, S=8, R=4, 6,000 training images; about 5 minutes each)::

    .venv/bin/python scripts/bench_serving.py --out docs/bench/bench_serving.json
    .venv/bin/python scripts/bench_serving.py --body npy --out docs/bench/bench_serving_npy.json

Quick smoke run (``configs/tiny.yaml``)::

    .venv/bin/python scripts/bench_serving.py --quick --out results/bench_serving_quick.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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
from soak import keys_retired_by, percentiles, retired_keys, served_retired  # noqa: E402

from sisa.config import load_config  # noqa: E402
from sisa.data.loaders import load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from tests.serve.service import Load, free_port, get  # noqa: E402

FULL_CONFIG = Path("configs/fashion_mnist.yaml")
FULL_OVERRIDES = ("data.train_limit=6000", "data.test_limit=1000")
QUICK_CONFIG = Path("configs/tiny.yaml")


def parse_args(argv: list[str] | None = None) -> Any:
    """The command line; trailing ``key=value`` are config overrides."""
    parser = script_parser(__doc__)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=4, help="closed-loop HTTP clients (concurrency)")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--phase", type=float, default=None, help="seconds of each steady phase (default 20; quick 8)")
    parser.add_argument("--events", type=int, default=None, help="deletion requests per policy (default 8; quick 3)")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between deletion requests")
    parser.add_argument("--ids-per-request", type=int, default=2)
    parser.add_argument(
        "--body", choices=("json", "npy"), default="json", help="request body of every client: JSON or .npy (float32)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="training niceness of the extra arms (the deleting process and its retrains, sisa.train.priority; "
        "default: none given, what `sisa delete` gets on this node: 10 while a sisa replica runs here); the "
        "first arms train at 0 (`--nice 0`)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/bench_serving.json"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--series", type=Path, default=None, help="also write every response (start, end, status, timing) as JSON here"
    )
    parser.add_argument(
        "--arms", default=None, help="';'-separated names of the deletion arms to run (default all; for exploring)"
    )
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def split(ok: list[tuple[float, float, dict[str, float]]]) -> dict[str, Any]:
    """Latency percentiles of ``ok`` (start, end, Server-Timing), and where it went.

    ``latency_ms`` is what the client measured; ``replica_ms`` the replica's handler (its
    ``Server-Timing``), ``body_ms`` its wait for the body from Serve's proxy, ``predict_ms`` the
    model work; ``outside_ms`` (client minus
    replica) is Serve's proxy and routing, the loopback network, and the client's own process.
    """
    return {
        "latency_ms": percentiles([(e - s) * 1e3 for s, e, _ in ok]),
        "replica_ms": percentiles([t["replica"] for _, _, t in ok if "replica" in t]),
        "body_ms": percentiles([t["body"] for _, _, t in ok if "body" in t]),
        "predict_ms": percentiles([t["predict"] for _, _, t in ok if "predict" in t]),
        "outside_ms": percentiles([(e - s) * 1e3 - t["replica"] for s, e, t in ok if "replica" in t]),
    }


def summary(
    load: Load,
    t_from: float,
    t_to: float,
    windows: list[tuple[float, float]] | None = None,
    busy: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Throughput, latency percentiles and errors of the records in [t_from, t_to].

    With ``windows`` (each request's acknowledgement to its time-to-forget confirmation) also the
    latency of the responses that overlap one; with ``busy`` (acknowledgement to the retrained
    models' confirmation: every swap a request causes, and its retrain) the latency of those that
    overlap one, and of those that overlap none ("outside swaps").
    """
    rows = [r for r in load.records if t_from <= r[0] <= t_to]
    ok = [(r[0], r[1], r[4]) for r in rows if r[2] == 200]
    parts = split(ok)
    out: dict[str, Any] = {
        "seconds": t_to - t_from,
        "requests": len(rows),
        "ok": len(ok),
        "unavailable_503": sum(1 for r in rows if r[2] == 503),
        "errors": sum(1 for r in rows if r[2] not in (200, 503)),
        "throughput_rps": len(ok) / (t_to - t_from) if t_to > t_from else None,
        "latency_ms": parts.pop("latency_ms"),
        "parts": parts,
    }
    if windows is not None:
        during = [any(s < b and e > a for a, b in windows) for s, e, _ in ok]
        inside = split([r for r, d in zip(ok, during, strict=True) if d])
        out["latency_ms_during_swaps"] = inside.pop("latency_ms")
        out["parts_during_swaps"] = inside
    if busy is not None:
        # Under exclude a request swaps twice (its shards out, then their retrained models in after apply): the
        # second swap and the retrain fall outside its time-to-forget window but are no quieter for that.
        touched = [any(s < b and e > a for a, b in busy) for s, e, _ in ok]
        out["latency_ms_during_deletions"] = split([r for r, d in zip(ok, touched, strict=True) if d])["latency_ms"]
        # The same arm's responses that overlap no deletion at all: the same minutes, so the same load from
        # everything else on the machine (the steady arm ran minutes earlier, and this machine's load drifts).
        out["latency_ms_outside_swaps"] = split([r for r, d in zip(ok, touched, strict=True) if not d])["latency_ms"]
    return out


def in_process(store: Path, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """``Ensemble.predict_proba`` back to back for ``seconds`` (one thread, no HTTP)."""
    lat = []
    with Ensemble.open(store, readonly=True) as ens:
        ens.predict_proba(x)  # models loaded
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            ens.predict_proba(x)
            lat.append((time.perf_counter() - t) * 1e3)
    return {"requests": len(lat), "throughput_rps": len(lat) / seconds, "latency_ms": percentiles(lat)}


def plain_deployment(cfg: Any, shape: tuple[int, ...]) -> Any:
    """One plain torch model of one shard's size as a Ray Serve deployment (JSON in, labels out)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from sisa.train.adapters import build_shard_model

    @serve.deployment(name="plain", ray_actor_options={"num_cpus": 0.5})
    class Plain:
        def __init__(self) -> None:
            import torch

            torch.set_num_threads(1)
            self.model = build_shard_model(cfg, shape, cfg.data.num_classes).eval()

        async def __call__(self, request: Request) -> JSONResponse:
            import io

            import torch

            raw = await request.body()
            if request.headers.get("content-type", "").startswith("application/x-npy"):
                x = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
            else:
                x = torch.tensor(json.loads(raw)["features"], dtype=torch.float32)
            with torch.inference_mode():
                p = torch.softmax(self.model(x), dim=1)
            return JSONResponse({"labels": p.argmax(1).tolist(), "probabilities": p.tolist()})

    return Plain.bind()


def stream(
    store: Path, base: str, t0: float, events: int, every: float, per: int, pool: list[int]
) -> list[dict[str, Any]]:
    """``events`` requests: defer-delete (acknowledged), confirm, apply, confirm; one every ``every`` seconds.

    Times are seconds since ``t0`` (``time.monotonic``, one clock for every process of the machine),
    so this runs in the clients' process or in another one alike.
    """

    def now() -> float:
        return time.monotonic() - t0

    records = []
    for i in range(events):
        started = time.monotonic()
        ids = [pool.pop() for _ in range(per)]
        with Ensemble.open(store, address="local", lock_timeout=120) as ens:
            before = retired_keys(ens)
            t_sent = now()
            req = ens.delete(ids, defer=True)
            t_ack = now()
            status, c1 = get(f"{base}/await?timeout=60", timeout=120)
            t_out = now()  # every replica in contact serves the state with the shards excluded or interim
            t_apply = now()
            ens.apply()
            t_applied = now()
        status2, c2 = get(f"{base}/await?timeout=60", timeout=120)
        t_clean = now()  # every replica serves the retrained models
        records.append(
            {
                "event": i,
                "ids": ids,
                "shards": sorted(int(s) for s in req["shards"]),
                "retired": keys_retired_by(before, req["shards"]),
                "sent_at": t_sent,
                "acked_at": t_ack,
                "confirmed_out_at": t_out,
                "apply_start": t_apply,
                "applied_at": t_applied,
                "confirmed_clean_at": t_clean,
                "confirm_ok": bool(c1.get("ok") and c2.get("ok") and status == status2 == 200),
                "delete_s": t_ack - t_sent,
                "delete_and_wait_s": t_out - t_sent,
            }
        )
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    return records


def _stream_child(store: Path, base: str, warm_ids: list[int], nice: int | None, inbox: Any, outbox: Any) -> None:
    """:func:`stream` in a child process (a deleting client is not the HTTP clients' process).

    It warms up first, before the load starts: one deletion of ``warm_ids`` and its ``apply``
    start the process's training runner (a Python child that imports torch: seconds of CPU), as
    a deleting service that has been running has done long before. Then it waits for the
    stream's arguments. It runs at niceness ``nice``, its training child too, as a ``sisa delete --nice``
    command does (:mod:`sisa.train.priority`): the journal and the erasure as well as the retrain;
    ``nice`` None: at the niceness ``sisa delete`` without ``--nice`` takes on this node.
    """
    from sisa.train.priority import apply_here, niceness, set_training_nice, training_nice

    apply_here(training_nice() if nice is None else nice)  # what sisa.cli.dispatch does for a command
    if nice is not None:
        set_training_nice(nice)
    with Ensemble.open(store, address="local", lock_timeout=120) as ens:
        ens.delete(warm_ids, defer=True)
        ens.apply()
    get(f"{base}/await?timeout=60", timeout=120)
    outbox.put(("ready", niceness()))
    outbox.put(stream(store, base, *inbox.get()))


class Deleter:
    """The deletion stream of one arm: in this process (``inline``) or in a warmed-up child process."""

    def __init__(self, inline: bool, store: Path, base: str, warm_ids: list[int], nice: int | None) -> None:
        self.inline, self.store, self.base, self.nice = inline, store, base, nice
        self.niceness = nice  # the niceness the deleting process runs at (a child's, once it said)
        if inline:  # this process's runner is warm from the fit
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Ray and client threads
        self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
        self._child = ctx.Process(
            target=_stream_child, args=(store, base, warm_ids, nice, self._inbox, self._outbox), name="bench-deleter"
        )
        self._child.start()
        ready = self._outbox.get(timeout=600)
        if not (isinstance(ready, tuple) and ready[0] == "ready"):
            raise RuntimeError("the deleting child process did not warm up")
        self.niceness = int(ready[1])

    def run(self, t0: float, events: int, every: float, per: int, pool: list[int]) -> list[dict[str, Any]]:
        """:func:`stream`'s records."""
        if self.inline:
            from sisa.train.priority import training_nice_as

            with training_nice_as(self.nice):
                return stream(self.store, self.base, t0, events, every, per, pool)
        self._inbox.put((t0, events, every, per, pool))
        records: list[dict[str, Any]] = self._outbox.get(timeout=1800)
        self._child.join(60)
        return records


def forget_times(records: list[dict[str, Any]], reader: dict[str, Any], policy: str) -> dict[str, Any]:
    """Time-to-forget per request (confirmed and observed) and the provenance check."""
    done = "confirmed_out_at" if policy == "exclude" else "confirmed_clean_at"
    confirmed = [r[done] - r["acked_at"] for r in records]
    observed = []
    sets = [{k for _, k in ks} for ks in reader["key_sets"]]
    for r in records:
        retired = set(r["retired"])
        last = max(
            (
                s
                for s, idx, st in zip(reader["start"], reader["key_set"], reader["status"], strict=True)
                if st == 0 and s > r["acked_at"] and sets[idx] & retired
            ),
            default=None,
        )
        observed.append(0.0 if last is None else last - r["acked_at"])
    bad = served_retired([{**r, "at": r[done]} for r in records], reader, "at")
    return {
        "ttf_confirmed_s": percentiles(confirmed),
        "ttf_observed_s": percentiles(observed),
        "provenance_check": {"ok": not bad, "violations": len(bad), "examples": bad[:3]},
        "delete_s": percentiles([r["delete_s"] for r in records]),
        "delete_and_wait_for_replicas_s": percentiles([r["delete_and_wait_s"] for r in records]),
        "apply_s": percentiles([r["applied_at"] - r["apply_start"] for r in records]),
        "all_confirmed": all(r["confirm_ok"] for r in records),
    }


def run(args: Any) -> dict[str, Any]:
    """Train, serve, load, stream; return everything measured."""
    from sisa.serve.deps import require_serve

    require_serve(workers=True)
    from ray import serve

    from sisa.serve.app import ServeOptions, build_app
    from sisa.train import orchestrator

    config = args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG)
    overrides = [*(() if args.quick or args.config else FULL_OVERRIDES), *args.overrides]
    cfg = load_config(config, overrides)
    phase = args.phase or (8.0 if args.quick else 20.0)
    events = args.events or (3 if args.quick else 8)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    x = np.asarray(test.x[: args.batch], dtype=np.float32)
    features = x.tolist()
    out: dict[str, Any] = {**run_header(config, overrides, args.quick, cfg), "machine": machine_info()}
    out["body"] = args.body
    with run_folder(args.workdir, "bench_serving-") as work:
        store = work / "store"
        t = time.perf_counter()
        with Ensemble.create(store, cfg, address="local") as ens:
            ens.ingest(train)
            ens.fit()
            shape = ens.feature_shape
        out["fit_s"] = time.perf_counter() - t
        print(f"trained S={cfg.shards} R={cfg.slices} on {len(train)} samples in {out['fit_s']:.1f}s", flush=True)
        out["in_process"] = in_process(store, x, phase)
        print(f"in-process: {out['in_process']['throughput_rps']:.1f} predictions/s", flush=True)

        orchestrator.connect(None)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        # Fractional CPUs: 2 replicas and the plain model must all fit a 2-core machine
        options = ServeOptions(store=str(store), replicas=args.replicas, num_cpus=0.5)
        serve.run(build_app(options), name="sisa", route_prefix="/")
        serve.run(plain_deployment(cfg, tuple(shape or ())), name="plain", route_prefix="/plain")
        base = f"http://127.0.0.1:{port}"

        def loaded(url: str, seconds: float) -> dict[str, Any]:
            load = Load(url, features, clients=args.clients, body=args.body).start()
            time.sleep(seconds)
            load.stop()
            return summary(load, 1.0, seconds)  # the first second warms up

        out["plain_serve"] = loaded(f"{base}/plain", phase)
        out["steady"] = loaded(f"{base}/predict", phase)
        print(f"plain: {out['plain_serve']['throughput_rps']:.1f}/s, ensemble: {out['steady']['throughput_rps']:.1f}/s")

        rng = np.random.default_rng(0)
        out["policies"] = {}
        series: dict[str, Any] = {}
        # The policies' arms delete from a child process, as a deleting client would; the last arm repeats
        # `exclude` with the deletions in this process, beside the HTTP clients' threads (the setup of the
        # first runs), to show what sharing the clients' process and GIL adds to their latency.
        # Each policy twice: the deleting process at niceness 0 (--nice 0) and at --nice (none given: the niceness
        # `sisa delete` takes on this node, where the replicas run; sisa.train.priority), side by side.
        extra = "default" if args.nice is None else str(args.nice)
        arms: list[tuple[str, str, bool, int | None]] = [
            ("exclude", "exclude", False, 0),
            (f"exclude, training at nice {extra}", "exclude", False, args.nice),
            ("serve-clean", "serve-clean", False, 0),
            (f"serve-clean, training at nice {extra}", "serve-clean", False, args.nice),
            ("exclude, deletions in the clients' process", "exclude", True, 0),
        ]
        if args.nice == 0:
            arms = [a for a in arms if a[0] == a[1] or a[2]]
        wanted = args.arms.split(";") if args.arms else [a[0] for a in arms]
        size = len(arms) * (events + 1) * args.ids_per_request
        pool = rng.choice(np.asarray(train.ids), size=size, replace=False).tolist()
        for arm, policy, inline, nice in (a for a in arms if a[0] in wanted):
            with Ensemble.open(store, address="local", lock_timeout=120) as ens:
                ens.reconfigure(load_config(config, [*overrides, f"unlearn.policy={policy}"]))
            get(f"{base}/await?timeout=60", timeout=120)
            deleter = Deleter(inline, store, base, [pool.pop() for _ in range(args.ids_per_request)], nice)
            load = Load(f"{base}/predict", features, clients=args.clients, body=args.body).start()
            time.sleep(2.0)
            chunk = [pool.pop() for _ in range(events * args.ids_per_request)]
            records = deleter.run(load.t0, events, args.every, args.ids_per_request, chunk)
            time.sleep(2.0)
            load.stop()
            reader = load.reader()
            last = "confirmed_out_at" if policy == "exclude" else "confirmed_clean_at"
            windows = [(r["acked_at"], r[last]) for r in records]
            busy = [(r["acked_at"], r["confirmed_clean_at"]) for r in records]
            result = {"load": summary(load, 0.0, load.now(), windows, busy), **forget_times(records, reader, policy)}
            result["policy"] = policy
            result["deleter"] = "the clients' process" if inline else "a child process"
            result["train_nice"] = deleter.niceness
            result["requests"] = records
            out["policies"][arm] = result
            series[arm] = {
                "records": load.records,
                "windows": windows,
                "busy": busy,
                "requests": records,
                "t0": load.t0,
            }
            f = result
            swaps, steady = f["load"]["latency_ms_during_swaps"], out["steady"]["latency_ms"]
            calm = f["load"]["latency_ms_outside_swaps"]
            ratio = swaps["p99"] / steady["p99"] if swaps["p99"] and steady["p99"] else None
            f["load"]["p99_swaps_over_steady"] = ratio
            f["load"]["p99_swaps_over_outside"] = swaps["p99"] / calm["p99"] if swaps["p99"] and calm["p99"] else None
            f["load"]["p99_deletions_over_outside"] = (
                f["load"]["latency_ms_during_deletions"]["p99"] / calm["p99"]
                if f["load"]["latency_ms_during_deletions"]["p99"] and calm["p99"]
                else None
            )
            print(
                f"{arm} (training nice {deleter.niceness}): p99 during swaps {swaps['p99'] or float('nan'):.1f} ms "
                f"({ratio or float('nan'):.2f}x steady, n={swaps['n']}; "
                f"{f['load']['p99_swaps_over_outside'] or float('nan'):.2f}x this arm's p99 outside deletions; "
                f"whole deletions incl. apply {f['load']['p99_deletions_over_outside'] or float('nan'):.2f}x); "
                f"ttf confirmed p50 {f['ttf_confirmed_s']['p50']:.3f}s "
                f"p99 {f['ttf_confirmed_s']['p99']:.3f}s, "
                f"observed p99 {f['ttf_observed_s']['p99']:.3f}s; errors {f['load']['errors']}; provenance "
                f"{'ok' if f['provenance_check']['ok'] else 'VIOLATED'}",
                flush=True,
            )
        serve.shutdown()
    out["machine"]["loadavg_end"] = loadavg()
    out["_series"] = series
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """Latency over time per policy (swap windows shaded) and the side-by-side throughput/latency bars."""
    plt = pyplot()
    series = [arm for arm, p in res["policies"].items() if p["deleter"] == "a child process"]
    rows = (len(series) + 1) // 2
    fig = plt.figure(figsize=(14, 3.6 * rows + 4))
    grid = fig.add_gridspec(rows + 1, 2)
    axes = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(len(series))]
    bars = fig.add_subplot(grid[rows, :])
    top = max((r[1] - r[0]) * 1e3 for arm in series for r in res["_series"][arm]["records"] if r[2] == 200)
    for ax, policy in zip(axes, series, strict=True):
        s = res["_series"][policy]
        for a, b in s["windows"]:
            ax.axvspan(a, b, color="tab:orange", alpha=0.2, lw=0)
        ok = [(r[0], (r[1] - r[0]) * 1e3) for r in s["records"] if r[2] == 200]
        bad = [r[0] for r in s["records"] if r[2] != 200]
        ax.plot([o[0] for o in ok], [o[1] for o in ok], ".", ms=2, label="response (200)")
        if bad:
            ax.plot(bad, [1.0] * len(bad), "x", color="red", label="non-200")
        ax.set_yscale("log")
        ax.set_ylim(10, top * 1.2)  # one scale for every arm
        ttf = res["policies"][policy]["ttf_confirmed_s"]
        ax.set_title(
            f"{policy}: latency; shaded = delete returned -> confirmed (ttf p99 {ttf['p99']:.2f}s)", fontsize=9
        )
        ax.set_xlabel("seconds")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    short = {"deletions in the clients' process": "inline deleter", "training at ": ""}
    labels = []
    for arm in res["policies"]:
        for old, new in short.items():
            arm = arm.replace(old, new)
        labels.append(arm.replace(", ", ",\n"))
    names = ["in-process", "plain Serve", "sisa steady", *labels]
    arms = [
        res["in_process"],
        res["plain_serve"],
        res["steady"],
        *(p["load"] for p in res["policies"].values()),
    ]
    p50 = [a["latency_ms"]["p50"] for a in arms]
    p99 = [a["latency_ms"]["p99"] for a in arms]
    swaps = [0.0] * 3 + [a["latency_ms_during_swaps"]["p99"] or 0.0 for a in arms[3:]]
    pos = np.arange(len(names))
    bars.bar(pos - 0.27, p50, 0.27, label="p50")
    bars.bar(pos, p99, 0.27, label="p99")
    bars.bar(pos + 0.27, swaps, 0.27, label="p99 during swaps")
    bars.set_xticks(pos, names, fontsize=8)
    bars.set_ylabel("latency (ms)")
    bars.legend()
    save_figure(fig, path, f"bench_serving: latency side by side, one run ({res['body']} request bodies)")


def main(argv: list[str] | None = None) -> int:
    """Run, print, write JSON + PNG; exit 1 if a target check failed (errors, provenance)."""
    args = parse_args(argv)
    res = run(args)
    ok = all(
        p["load"]["errors"] == 0 and p["provenance_check"]["ok"] and p["all_confirmed"]
        for p in res["policies"].values()
    )
    res["ok"] = ok

    if args.series is not None:
        args.series.parent.mkdir(parents=True, exist_ok=True)
        args.series.write_text(json.dumps(res["_series"]))
    draw = None if args.arms else lambda png: plot(res, png)  # the figure shows every arm
    write_results(args.out, {k: v for k, v in res.items() if k != "_series"}, draw)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
