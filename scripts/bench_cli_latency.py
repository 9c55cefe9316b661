r"""Benchmark the latency of small deletions: the ``sisa delete`` command against the warm API.

Trains one store once (``sisa train`` on the config, default ``configs/fashion_mnist.yaml``:
Fashion-MNIST, MLP, S=8, R=4), then for each number of touched shards in ``--touched``
(default 1, 2 and 8) and ``--repeats`` rounds picks that many ids in as many shards (seeded)
and deletes them on a fresh copy of that store in each of these ways, in turn within the round
(so load from other work on the machine hits them alike):

* ``api_local``: the warm in-process API, ``Ensemble.open(copy, address="local").delete(ids)``
  in this process (which restarted itself with the store's determinism pins, so it trains
  in place, one shard after another); imports, model code and kernels are warm.
* ``api_ray``: the same through a warm Ray instance this process started (``address=None``
  with Ray up uses it).
* ``cli_first``: ``sisa delete --store COPY --ids ... --json`` as a subprocess, the default
  path (no ``--address``, no ``RAY_ADDRESS``), as the first command: no worker runs (this run's
  worker is stopped before it), so the command runs itself and starts the worker.
* ``cli``: the same command a moment later: it hands the deletion to the warm worker
  (:mod:`sisa.cli.worker`), where the plan picks its runner from the store's measured costs
  (one process, pinned processes side by side, or Ray: :mod:`sisa.train.runner_choice`).
* ``cli_cold``: the same with ``SISA_WORKER=0``: the command trains in its own new process.
* ``cli_local``: the same with ``--address local`` (and ``SISA_WORKER=0``).
* ``cli_ray``: the same forced onto a new local Ray instance (``SISA_RUNNER=ray``): the
  path every multi-shard deletion took before.

The command-line runs get an environment without the pins (as a shell would give them).
Times are wall seconds: for the API, ``Ensemble.open`` + ``delete`` + ``close``
(``api_*_delete``: the ``delete`` call alone); for the CLI, the whole process. Every round
checks that all ways leave the same live weights digest on every retrained shard
(bit-identical, one determinism domain), that ``cli`` ran in the worker, and that no process
of a Ray instance started by ``cli_ray`` is left running; the first one-shard round runs
``sisa verify --shard K`` on the ``cli`` copy, once as it comes and once forced onto Ray. The
script exits 1 if any check fails. Reported: per number of touched shards and way the median
and all times, the runner each way used, and the ratio of the ``cli`` median to the warm API's.

Full run (the default config, 3 rounds of 1, 2 and 8 shards; about 15 minutes on 2 busy cores)::

    .venv/bin/python scripts/bench_cli_latency.py --out docs/bench/cli_latency.json

Smoke run (6,000 training images, 1 round)::

    .venv/bin/python scripts/bench_cli_latency.py --train-limit 6000 --repeats 1 --out /tmp/cli_latency.json
"""

from __future__ import annotations

import os
import sys

# Restart pinned to the config's cpu_isa before torch loads, so the warm API trains in this
# process (the way a long-lived service started with the pins would): light imports only here.
if __name__ == "__main__" and not os.environ.get("SISA_BENCH_PINNED"):
    import argparse as _argparse

    from sisa.config.loader import load_config as _load_config
    from sisa.train.domain import pin_env as _pin_env

    _pre = _argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--config", default="configs/fashion_mnist.yaml")
    _known, _ = _pre.parse_known_args()
    _pins = _pin_env(_load_config(_known.config).resources.cpu_isa)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **_pins, "SISA_BENCH_PINNED": "1"})

import contextlib
import json
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import loadavg, machine_info, pyplot, save_figure, script_parser, write_results  # noqa: E402

from sisa.cli.worker import ENABLE_ENV  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.train import orchestrator  # noqa: E402
from sisa.train.domain import PIN_VARS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SISA = [sys.executable, "-m", "sisa.cli"]
WAYS = ("api_local", "api_ray", "cli_first", "cli", "cli_cold", "cli_local", "cli_ray")
TARGET_RATIO = 2.0


WORKER_TMP: dict[str, str] = {}  # the private TMPDIR of this run's warm worker (set in main)


def plain_env(**extra: str) -> dict[str, str]:
    """The environment of a command run from a shell: no pins, no runner, no cluster; this run's worker."""
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    for name in ("SISA_BENCH_PINNED", "SISA_PINNED_EXEC", "SISA_RUNNER", "RAY_ADDRESS", ENABLE_ENV):
        env.pop(name, None)
    env.update(WORKER_TMP)
    env.update(extra)
    return env


def worker_commands(tmp: Path) -> int:
    """Commands the run's worker has served (one line each in its log)."""
    return sum(p.read_text().count(" ran ") for p in tmp.glob("sisa-*/worker-*.log"))


def wait_for_worker(tmp: Path) -> None:
    """Wait until this run's worker listens (the command that starts it may return first)."""
    deadline = time.monotonic() + 180
    while not list(tmp.glob("sisa-*/worker-*.sock")):
        if time.monotonic() > deadline:
            raise SystemExit("the warm worker did not start within 180 s; see its log in " + str(tmp))
        time.sleep(0.2)


def worker_processes(tmp: Path) -> list[psutil.Process]:
    """This run's worker processes: those whose command line names a lock file under ``tmp``."""
    locks = [str(p) for p in tmp.glob("sisa-*/worker-*.lock")]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "sisa.cli.worker_process" in cmd and any(lock in cmd for lock in locks):
            found.append(proc)
    return found


def stop_worker(tmp: Path) -> None:
    """End this run's worker by its pid (SIGTERM: it stops as when idle) and wait until it is gone."""
    procs = worker_processes(tmp)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    psutil.wait_procs(procs, timeout=30)
    for sock in tmp.glob("sisa-*/worker-*.sock"):
        sock.unlink(missing_ok=True)  # a socket a killed worker left; the next command must not find it


def sisa_cli(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any], int]:
    """Run ``sisa ARGS --json``; its wall seconds, JSON answer and pid."""
    started = time.perf_counter()
    proc = subprocess.run([*SISA, *args, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"sisa {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1]), 0


def ray_leftovers(session_pid: int) -> list[str]:
    """Processes still running that belong to the Ray session a driver of pid ``session_pid`` started."""
    pattern = re.compile(rf"session_[0-9_\-]+_{session_pid}\b")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and pattern.search(cmd):
            found.append(f"{proc.pid} {cmd[:80]}")
    return found


def cli_ray_delete(store: Path, ids: list[int]) -> tuple[float, dict[str, Any], list[str]]:
    """``sisa delete`` forced onto Ray; its time, certificate and the Ray processes it left running."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*SISA, "delete", "--store", str(store), "--ids", *map(str, ids), "--json"],
        cwd=ROOT,
        env=plain_env(SISA_RUNNER="ray"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"sisa delete (SISA_RUNNER=ray) failed ({proc.returncode}):\n{err[-3000:]}")
    time.sleep(1.0)  # what would still run a second after the command returned
    return seconds, json.loads(out.strip().splitlines()[-1]), ray_leftovers(proc.pid)


def api_delete(store: Path, ids: list[int], address: str | None) -> tuple[float, float, dict[str, Any]]:
    """Open, delete, close in this process: (wall seconds of all three, of ``delete`` alone, certificate)."""
    started = time.perf_counter()
    with Ensemble.open(store, address=address) as ens:
        begun = time.perf_counter()
        cert = ens.delete(ids)
        alone = time.perf_counter() - begun
    return time.perf_counter() - started, alone, cert


def live_weights(cert: dict[str, Any]) -> dict[str, str | None]:
    """Retrained shard -> its live weights digest, from a certificate."""
    return {key: info["live_weights"] for key, info in sorted(cert["shards"].items())}


def pick(placed: dict[int, list[int]], touched: int, rng: random.Random) -> list[int]:
    """One id from each of ``touched`` shards drawn at random."""
    shards = rng.sample(sorted(k for k, ids in placed.items() if ids), touched)
    return sorted(rng.choice(placed[k]) for k in shards)


def draw(result: dict[str, Any], png: Path) -> None:
    plt = pyplot()
    sizes = [str(k) for k in result["touched"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, k in zip(axes[0], sizes, strict=True):
        med, runs = result["median_seconds"][k], result["seconds"][k]
        names = [w for w in WAYS if runs.get(w)]
        for i, name in enumerate(names):
            ax.scatter([i] * len(runs[name]), runs[name], s=12, color="tab:gray", zorder=3)
            ax.bar(i, med[name], color="tab:blue" if name.startswith("api") else "tab:orange")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        runner = result["runners"][k].get("cli")
        ax.set_title(f"{k} shard(s) touched (cli ran on {runner})", fontsize=9)
    axes[0][0].set_ylabel("wall seconds (median bars, runs as dots)")
    save_figure(
        fig, png, f"deletions, S={result['shards']} R={result['slices']}, {result['machine'].get('nproc')} cores"
    )


def run_round(
    ids: list[int], fresh: Any, worker_tmp: Path, verify: bool, failures: list[str], label: str
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Delete ``ids`` in every way on fresh copies; (seconds per way, API delete-only seconds, round row)."""
    seconds: dict[str, float] = {}
    alone: dict[str, float] = {}
    weights: dict[str, dict[str, str | None]] = {}
    runners: dict[str, str | None] = {}
    for way in WAYS:
        store = fresh(way)
        leftovers: list[str] = []
        if way.startswith("api"):
            t, alone[way], cert = api_delete(store, ids, "local" if way == "api_local" else None)
        elif way == "cli_ray":
            t, cert, leftovers = cli_ray_delete(store, ids)
        else:
            extra = ["--address", "local"] if way == "cli_local" else []
            env = plain_env() if way in ("cli", "cli_first") else plain_env(**{ENABLE_ENV: "0"})
            if way == "cli_first":
                stop_worker(worker_tmp)  # the first command of a session: no worker yet
            served = worker_commands(worker_tmp)
            t, cert, _ = sisa_cli(["delete", "--store", str(store), "--ids", *map(str, ids), *extra], env)
            if way == "cli_first":
                wait_for_worker(worker_tmp)  # it started the worker the next command uses
            elif way == "cli" and worker_commands(worker_tmp) != served + 1:
                failures.append(f"{label}: the cli deletion did not run in the warm worker")
        seconds[way] = t
        weights[way] = live_weights(cert)
        runners[way] = cert.get("runner")
        if leftovers:
            failures.append(f"{label}: {len(leftovers)} Ray process(es) left running after cli_ray: {leftovers}")
        if verify and way == "cli":
            for name, env in (("verify", plain_env()), ("verify_ray", plain_env(SISA_RUNNER="ray"))):
                for shard, digest in weights["cli"].items():
                    vt, verdict, _ = sisa_cli(["verify", "--store", str(store), "--shard", shard], env)
                    ok = verdict["ok"] and verdict["shards"][shard]["replay_weights"] == digest
                    print(f"  {name}: ok={ok} runner={verdict.get('runner')} in {vt:.1f}s")
                    if not ok:
                        failures.append(f"{label}: {name} failed: {verdict}")
        shutil.rmtree(store, ignore_errors=True)
    first = next(iter(weights.values()))
    same = all(w == first for w in weights.values()) and None not in first.values() and len(first) == len(ids)
    if not same:
        failures.append(f"{label}: live weights differ between the ways: {weights}")
    row = {
        "ids": len(ids),
        "shards": sorted(int(k) for k in first),
        "seconds": {w: round(seconds[w], 3) for w in WAYS},
        "runner": runners,
        "weights_identical": same,
    }
    return seconds, alone, row


def main() -> int:
    parser = script_parser(__doc__, ROOT / "configs" / "fashion_mnist.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_cli_latency.json", help="JSON output")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per number of touched shards")
    parser.add_argument("--touched", default="1,2,8", help="numbers of shards a deletion touches (comma-separated)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images (smoke runs)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the stores (default: a tempdir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ids picked")
    args = parser.parse_args()
    touched_sizes = [int(k) for k in args.touched.split(",")]
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sisa-cli-latency-", dir=args.workdir))
    failures: list[str] = []
    try:
        base = work / "base"
        overrides = [f"data.train_limit={args.train_limit}"] if args.train_limit else []
        print(f"training {base} ...", flush=True)
        train_s, trained, _ = sisa_cli(
            ["train", "--config", str(args.config), "--store", str(base), *overrides], plain_env()
        )
        print(f"trained in {train_s:.1f}s (runner {trained.get('runner')}, accuracy {trained['accuracy']:.4f})")
        with Ensemble.open(base, readonly=True) as ens, ens.store.read() as txn:
            cfg = ens.config
            counts = ens.store.slice_counts(txn, cfg.shards, cfg.slices)
            placed = {
                k: sorted(int(i) for r in range(counts[k]) for i in ens.store.slice_ids(txn, k, r))
                for k in range(cfg.shards)
            }
        rng = random.Random(args.seed)

        def fresh(name: str) -> Path:
            path = work / name
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(base, path)
            return path

        # Warm-up: the warm API's process has its imports, model code, kernels and Ray workers warm;
        # the command's warm worker is started by one deletion through it.
        worker_tmp = work / "w"
        worker_tmp.mkdir()
        WORKER_TMP["TMPDIR"] = str(worker_tmp)
        warm_ids = pick(placed, 1, rng)
        sisa_cli(["delete", "--store", str(fresh("warm")), "--ids", *map(str, warm_ids)], plain_env())
        wait_for_worker(worker_tmp)
        orchestrator.connect(None)
        api_delete(fresh("warm"), warm_ids, "local")
        api_delete(fresh("warm"), warm_ids, None)
        shutil.rmtree(work / "warm", ignore_errors=True)

        seconds: dict[str, dict[str, list[float]]] = {}
        alone: dict[str, dict[str, list[float]]] = {}
        runners: dict[str, dict[str, str | None]] = {}
        rounds: list[dict[str, Any]] = []
        for k in touched_sizes:
            key = str(k)
            seconds[key] = {w: [] for w in WAYS}
            alone[key] = {"api_local": [], "api_ray": []}
            for n in range(args.repeats):
                ids = pick(placed, k, rng)
                label = f"{k} shard(s), round {n}"
                times, api_alone, row = run_round(ids, fresh, worker_tmp, k == 1 and n == 0, failures, label)
                for way, t in times.items():
                    seconds[key][way].append(t)
                for way, t in api_alone.items():
                    alone[key][way].append(t)
                runners[key] = row["runner"]
                rounds.append({"touched": k, **row})
                print(
                    f"{label}: "
                    + " ".join(f"{w}={row['seconds'][w]:.2f}s" for w in WAYS)
                    + f" cli runner={row['runner']['cli']} identical={row['weights_identical']}",
                    flush=True,
                )
        med = {k: {w: statistics.median(v) for w, v in ways.items()} for k, ways in seconds.items()}
        result: dict[str, Any] = {
            "machine": info,
            "loadavg_end": loadavg(),
            "config_path": str(args.config),
            "train_limit": args.train_limit,
            "shards": cfg.shards,
            "slices": cfg.slices,
            "train_seconds": train_s,
            "train_runner": trained.get("runner"),
            "repeats": args.repeats,
            "touched": touched_sizes,
            "seconds": seconds,
            "median_seconds": med,
            "runners": runners,
            "api_delete_only_seconds": alone,
            "ratio_cli_to_api_local": {k: m["cli"] / m["api_local"] for k, m in med.items()},
            "ratio_cli_ray_to_cli": {k: m["cli_ray"] / m["cli"] for k, m in med.items()},
            "ratio_cli_first_to_cli_cold": {k: m["cli_first"] / m["cli_cold"] for k, m in med.items()},
            "target_ratio": TARGET_RATIO,
            "rounds": rounds,
            "failures": failures,
        }
        write_results(args.out, result, lambda png: draw(result, png))
        for k, m in med.items():
            print(
                f"{k} shard(s): "
                + " ".join(f"{w}={m[w]:.2f}s" for w in WAYS)
                + f"; cli runner {runners[k].get('cli')}; cli / api_local = {m['cli'] / m['api_local']:.2f}"
                + f"; cli_ray / cli = {m['cli_ray'] / m['cli']:.2f}"
            )
        for failure in failures:
            print(f"FAILED: {failure}")
        return 1 if failures else 0
    finally:
        stop_worker(work / "w")
        orchestrator.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
