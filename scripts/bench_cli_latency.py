r"""Benchmark the latency of one small deletion: the ``sisa delete`` command against the warm API.

Trains one store once (``sisa train`` on the config, default ``configs/fashion_mnist.yaml``:
Fashion-MNIST, MLP, S=8, R=4), then for ``--repeats`` rounds picks one id (seeded) and
deletes it on a fresh copy of that store in each of these ways, in turn within the round
(so load from other work on the machine hits them alike):

* ``api_local``: the warm in-process API, ``Ensemble.open(copy, address="local").delete([id])``
  in this process (which restarted itself with the store's determinism pins, so it trains
  in place); the imports, the model code and the kernels are warm from a warm-up deletion.
* ``api_ray``: the same through a warm Ray instance this process started (``address=None``
  with Ray up uses it).
* ``cli``: ``sisa delete --store COPY --ids ID --json`` as a subprocess, the default path
  (no ``--address``, no ``RAY_ADDRESS``): the command hands the deletion to the user's warm
  worker (:mod:`sisa.cli.worker`, started by the warm-up command), where the plan, one shard,
  trains without Ray.
* ``cli_cold``: the same with ``SISA_WORKER=0``: the command trains in its own new process.
* ``cli_local``: the same with ``--address local`` (and ``SISA_WORKER=0``).
* ``cli_ray``: the same forced onto a new local Ray instance (``SISA_RUNNER=ray``): the
  path every deletion took before.

The command-line runs get an environment without the pins (as a shell would give them).
Times are wall seconds: for the API, ``Ensemble.open`` + ``delete`` + ``close``
(``api_*_delete``: the ``delete`` call alone); for the CLI, the whole process. Every round
checks that all six ways leave the same live weights digest on the shard (bit-identical,
one determinism domain), and that no process of a Ray instance started by ``cli_ray`` is
left running; the first round runs ``sisa verify --shard K`` on the ``cli`` copy, once
as it comes (no Ray) and once forced onto Ray (a Ray replay of a shard the local runner
retrained). The script exits 1 if any check fails. Reported: per way the median and all
times, and the ratio of the ``cli`` median to the warm API's (target: at most 2).

Full run (the default config, 5 rounds; about 10 minutes on 2 busy cores)::

    .venv/bin/python scripts/bench_cli_latency.py --out docs/bench/cli_latency.json

Smoke run (6,000 training images, 2 rounds)::

    .venv/bin/python scripts/bench_cli_latency.py --train-limit 6000 --repeats 2 --out /tmp/cli_latency.json
"""

from __future__ import annotations

import os
import sys

# Restart pinned to the config's cpu_isa before torch loads, so the warm API trains in this
# process (the way a long-lived service started with the pins would): light imports only here.
if __name__ == "__main__" and not os.environ.get("SISA_BENCH_PINNED"):
    import argparse as _argparse

    from sisa.config.settings import load_config as _load_config
    from sisa.train.domain import pin_env as _pin_env

    _pre = _argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--config", default="configs/fashion_mnist.yaml")
    _known, _ = _pre.parse_known_args()
    _pins = _pin_env(_load_config(_known.config).resources.cpu_isa)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **_pins, "SISA_BENCH_PINNED": "1"})

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import loadavg, machine_info, pyplot, save_figure, script_parser, write_results  # noqa: E402

from sisa.cli.worker import ENABLE_ENV  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.train import orchestrator  # noqa: E402
from sisa.train.domain import PIN_VARS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SISA = [sys.executable, "-m", "sisa.cli"]
WAYS = ("api_local", "api_ray", "cli", "cli_cold", "cli_local", "cli_ray")
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
    return sum(p.read_text().count(" ran [") for p in tmp.glob("sisa-*/worker-*.log"))


def start_worker(store: Path, sample: int, tmp: Path) -> None:
    """One deletion through the command starts the worker; wait until it listens."""
    sisa_cli(["delete", "--store", str(store), "--ids", str(sample)], plain_env())
    deadline = time.monotonic() + 180
    while not list(tmp.glob("sisa-*/worker-*.sock")):
        if time.monotonic() > deadline:
            raise SystemExit("the warm worker did not start within 180 s; see its log in " + str(tmp))
        time.sleep(0.2)


def stop_worker(tmp: Path) -> None:
    """End this run's worker (SIGTERM: it stops as when idle)."""
    for lock in tmp.glob("sisa-*/worker-*.lock"):
        subprocess.run(["pkill", "-f", str(lock)], check=False)


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
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and pattern.search(cmd):
            found.append(f"{entry} {cmd[:80]}")
    return found


def cli_ray_delete(store: Path, sample: int) -> tuple[float, dict[str, Any], list[str]]:
    """``sisa delete`` forced onto Ray; its time, certificate and the Ray processes it left running."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*SISA, "delete", "--store", str(store), "--ids", str(sample), "--json"],
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


def api_delete(store: Path, sample: int, address: str | None) -> tuple[float, float, dict[str, Any]]:
    """Open, delete, close in this process: (wall seconds of all three, of ``delete`` alone, certificate)."""
    started = time.perf_counter()
    with Ensemble.open(store, address=address) as ens:
        begun = time.perf_counter()
        cert = ens.delete([sample])
        alone = time.perf_counter() - begun
    return time.perf_counter() - started, alone, cert


def shard_weights(cert: dict[str, Any]) -> tuple[str, str | None]:
    """The one retrained shard of a certificate and its live weights digest."""
    (key,) = cert["shards"]
    return key, cert["shards"][key]["live_weights"]


def draw(result: dict[str, Any], png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [w for w in WAYS if result["seconds"].get(w)]
    for i, name in enumerate(names):
        times = result["seconds"][name]
        ax.scatter([i] * len(times), times, s=14, color="tab:gray", zorder=3)
        ax.bar(i, result["median_seconds"][name], color="tab:blue" if name.startswith("api") else "tab:orange")
    ax.axhline(TARGET_RATIO * result["median_seconds"]["api_local"], ls="--", color="tab:red", lw=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("wall seconds (median bars, runs as dots)")
    save_figure(
        fig,
        png,
        f"one deletion, S={result['shards']} R={result['slices']}; dashed: {TARGET_RATIO:g}x the warm API "
        f"(cli/api_local = {result['ratio_cli_to_api_local']:.2f})",
    )


def main() -> int:
    parser = script_parser(__doc__, ROOT / "configs" / "fashion_mnist.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_cli_latency.json", help="JSON output")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each deletes one id in every way)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images (smoke runs)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the stores (default: a tempdir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ids picked")
    args = parser.parse_args()
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
            ids = sorted(
                int(i) for k in range(cfg.shards) for r in range(counts[k]) for i in ens.store.slice_ids(txn, k, r)
            )
        picks = random.Random(args.seed).sample(ids, args.repeats + 2)

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
        start_worker(fresh("warm"), picks[0], worker_tmp)
        orchestrator.connect(None)
        api_delete(fresh("warm"), picks[0], "local")
        api_delete(fresh("warm"), picks[1], None)
        shutil.rmtree(work / "warm", ignore_errors=True)

        seconds: dict[str, list[float]] = {w: [] for w in WAYS}
        alone: dict[str, list[float]] = {"api_local": [], "api_ray": []}
        rounds: list[dict[str, Any]] = []
        for n, sample in enumerate(picks[2:]):
            weights: dict[str, str | None] = {}
            runners: dict[str, str | None] = {}
            shard = stages = None
            for way in WAYS:
                store = fresh(way)
                leftovers: list[str] = []
                if way.startswith("api"):
                    t, t_alone, cert = api_delete(store, sample, "local" if way == "api_local" else None)
                    alone[way].append(t_alone)
                elif way == "cli_ray":
                    t, cert, leftovers = cli_ray_delete(store, sample)
                else:
                    extra = ["--address", "local"] if way == "cli_local" else []
                    env = plain_env() if way == "cli" else plain_env(**{ENABLE_ENV: "0"})
                    served = worker_commands(worker_tmp)
                    t, cert, _ = sisa_cli(["delete", "--store", str(store), "--ids", str(sample), *extra], env)
                    if way == "cli" and worker_commands(worker_tmp) != served + 1:
                        failures.append(f"round {n}: the cli deletion did not run in the warm worker")
                seconds[way].append(t)
                shard, weights[way] = shard_weights(cert)
                runners[way] = cert.get("runner")
                stages = len(cert["shards"][shard]["new_checkpoints"])
                if leftovers:
                    failures.append(
                        f"round {n}: {len(leftovers)} Ray process(es) left running after cli_ray: {leftovers}"
                    )
                if n == 0 and way == "cli":
                    for label, env in (("verify", plain_env()), ("verify_ray", plain_env(SISA_RUNNER="ray"))):
                        vt, verdict, _ = sisa_cli(["verify", "--store", str(store), "--shard", shard], env)
                        ok = verdict["ok"] and verdict["shards"][shard]["replay_weights"] == weights["cli"]
                        rounds_note = f"{label}: ok={ok} runner={verdict.get('runner')} in {vt:.1f}s"
                        print(f"  {rounds_note}")
                        if not ok:
                            failures.append(f"round 0: {label} failed: {verdict}")
                if way != "cli":
                    shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(work / "cli", ignore_errors=True)
            same = len(set(weights.values())) == 1 and None not in weights.values()
            if not same:
                failures.append(f"round {n}: live weights differ between the ways: {weights}")
            row: dict[str, Any] = {
                "id": sample,
                "shard": int(shard) if shard is not None else None,
                "stages_retrained": stages,
                "seconds": {w: round(seconds[w][-1], 3) for w in WAYS},
                "runner": runners,
                "weights_identical": same,
                "weights": next(iter(weights.values())),
            }
            rounds.append(row)
            print(
                f"round {n}: id {sample} (shard {shard}, {stages} stage(s)) "
                + " ".join(f"{w}={row['seconds'][w]:.2f}s" for w in WAYS)
                + f" identical={same}",
                flush=True,
            )
        med = {w: statistics.median(v) for w, v in seconds.items()}
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
            "seconds": seconds,
            "median_seconds": med,
            "api_delete_only_seconds": alone,
            "median_api_delete_only_seconds": {w: statistics.median(v) for w, v in alone.items()},
            "ratio_cli_to_api_local": med["cli"] / med["api_local"],
            "ratio_cli_cold_to_api_local": med["cli_cold"] / med["api_local"],
            "ratio_cli_to_api_ray": med["cli"] / med["api_ray"],
            "ratio_cli_ray_to_cli": med["cli_ray"] / med["cli"],
            "target_ratio": TARGET_RATIO,
            "rounds": rounds,
            "failures": failures,
        }
        write_results(args.out, result, lambda png: draw(result, png))
        print(
            "medians: " + " ".join(f"{w}={med[w]:.2f}s" for w in WAYS) + f"\ncli / api_local = "
            f"{result['ratio_cli_to_api_local']:.2f} (target <= {TARGET_RATIO:g}); cli_cold / api_local = "
            f"{result['ratio_cli_cold_to_api_local']:.2f}; cli / api_ray = "
            f"{result['ratio_cli_to_api_ray']:.2f}; cli_ray / cli = {result['ratio_cli_ray_to_cli']:.2f}"
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
