"""Joining Ray from the CLI: a wrong address fails fast with nothing changed; Ctrl-C says how to resume.

Each command runs in its own process: this test process has no Ray (stores train with
``address="local"``), so the child's connection is really attempted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sisa.ensemble import Ensemble
from tests.conftest import blobs, default_sigint, npz_config, small_config, store_digest


def sisa(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sisa.cli ARGS`` (a hang fails by ``timeout``)."""
    return subprocess.run(
        [sys.executable, "-m", "sisa.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_delete_with_an_unreachable_address_fails_fast_and_changes_nothing(
    tmp_path: Path, env_python: dict[str, str]
) -> None:
    x, y = blobs(300, d=6)
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(x, y)
        ens.fit()
    before = store_digest(tmp_path / "st")
    env = {k: v for k, v in env_python.items() if k != "RAY_ADDRESS"}
    # Port 1 refuses at once: before the fix Ray retried it for ten minutes and more, holding the
    # writer lock, with the request already journaled and its shard out of service.
    out = sisa(["delete", "--store", str(tmp_path / "st"), "--ids", "17", "--address", "127.0.0.1:1"], env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1"), out.stderr
    assert "Traceback" not in out.stderr
    assert store_digest(tmp_path / "st") == before
    with Ensemble.open(tmp_path / "st", readonly=True) as ens:
        assert ens.pending() == []
    # The lock was released: a writer opens it at once, and the id is still there to delete.
    with Ensemble.open(tmp_path / "st", address="local") as ens:
        assert ens.delete([17])["state"] == "applied"


def test_train_with_an_unreachable_address_creates_no_store(tmp_path: Path, env_python: dict[str, str]) -> None:
    config = npz_config(tmp_path)
    env = {k: v for k, v in env_python.items() if k != "RAY_ADDRESS"}
    out = sisa(["train", "--config", str(config), "--store", str(tmp_path / "st"), "--address", "127.0.0.1:1"], env)
    assert out.returncode == 2 and out.stderr.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "st").exists()  # a run refused before any work leaves no store behind


def test_ctrl_c_during_train_says_how_to_resume(tmp_path: Path, env_python: dict[str, str]) -> None:
    x, y = blobs(4200, d=10)
    np.savez(tmp_path / "train.npz", x=x[:4000], y=y[:4000])
    np.savez(tmp_path / "test.npz", x=x[4000:], y=y[4000:])
    config = tmp_path / "config.yaml"
    config.write_text(
        "shards: 2\nslices: 2\n"
        f"data: {{dataset: npz, train: {tmp_path / 'train.npz'}, test: {tmp_path / 'test.npz'}, num_classes: 3}}\n"
        "model: {hidden: [16]}\ntrain: {epochs: 200, batch_size: 32, lr: 0.01}\n"
    )
    store = tmp_path / "st"
    child = subprocess.Popen(
        [sys.executable, "-m", "sisa.cli", "train", "--config", str(config), "--store", str(store)]
        + ["--address", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_python,
        preexec_fn=default_sigint,
    )
    try:
        # The store exists once the samples are ingested; training (minutes of it) follows.
        while not (store / "data.mdb").exists() and child.poll() is None:
            time.sleep(0.1)
        time.sleep(1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"interrupted: every stage committed so far is kept in {store}" in err
    assert f"`sisa resume --store {store}` (or the same `sisa train` command)" in err
    with Ensemble.open(store, readonly=True) as ens:  # what was written is a consistent store
        assert ens.status()["samples"] == 4000


CHILD_RAY_WONT_START = """
import sys
import ray
from sisa.cli.main import main

def node_timed_out(*args, **kwargs):  # what Ray raises when its node does not come up in time
    raise Exception("The current node timed out during startup. The GCS has become overloaded.")

ray.init = node_timed_out
sys.exit(main(sys.argv[1:]))
"""


def test_a_local_ray_that_will_not_start_is_a_clear_error_and_the_same_command_finishes(
    tmp_path: Path, env_python: dict[str, str]
) -> None:
    x, y = blobs(300, d=6)
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(x, y)
        ens.fit()
    env = {**env_python, "SISA_RUNNER": "ray"}  # SISA_WORKER=0 comes from conftest
    env.pop("RAY_ADDRESS", None)
    args = ["delete", "--store", str(tmp_path / "st"), "--ids", "5"]
    failed = subprocess.run(
        [sys.executable, "-c", CHILD_RAY_WONT_START, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert failed.returncode == 2, failed.stderr  # as every ClusterConnectionError
    assert "could not start a local Ray instance (The current node timed out" in failed.stderr
    assert "Traceback" not in failed.stderr and "the same command finishes them" in failed.stderr
    with Ensemble.open(tmp_path / "st", readonly=True) as ens:
        assert [r["deleted"] for r in ens.pending()] == [1]  # journaled, not applied, not reported done
    again = sisa(args, {**env, "SISA_RUNNER": "local"})
    assert again.returncode == 0, again.stderr
    with Ensemble.open(tmp_path / "st", readonly=True) as ens:
        assert ens.pending() == [] and len(ens.certificates()) == 1


SIGTERM_CHILD = r"""
import os, signal, sys, threading, time
import psutil
from sisa.train import orchestrator

class Ended(BaseException):
    pass

calls = []

def handler(signum, frame):
    calls.append(signum)
    raise Ended

signal.signal(signal.SIGTERM, handler)
seen = {}

def signal_mid_init():
    # Once Ray's first process is up, ray.init is still running: the moment Ray's own handler
    # (sys.exit) was in force, and a SIGTERM could be swallowed as an "ignored" SystemExit.
    while not any(c.name().startswith("gcs_server") for c in psutil.Process().children(recursive=True)):
        time.sleep(0.01)
    seen["handler during ray.init"] = signal.getsignal(signal.SIGTERM) is handler
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=signal_mid_init, daemon=True).start()
outcome = "connected"
try:
    orchestrator.connect(None, num_cpus=1)
    time.sleep(60)  # a signal delivered late still lands here
except Ended:
    outcome = "Ended"
except SystemExit as exc:
    outcome = f"SystemExit({exc.code})"
orchestrator.connect(None, num_cpus=1)
orchestrator.shutdown()
status = open("/proc/self/status").read()
caught = int(next(l for l in status.splitlines() if l.startswith("SigCgt")).split()[1], 16)
print(outcome, calls, seen, signal.getsignal(signal.SIGTERM) is handler, bool(caught & (1 << (signal.SIGTERM - 1))))
"""


def test_a_sigterm_during_ray_init_reaches_the_application_and_its_handler_outlives_ray(
    env_python: dict[str, str],
) -> None:
    """Ray's own SIGTERM handlers never take over, and ``ray.shutdown`` leaves the application's in force.

    The worker's handler ends a command with exit 143 and the worker after it; a SIGTERM caught
    by Ray's ``sys.exit`` handler inside ``ray.init`` was once swallowed as an "ignored"
    ``SystemExit``, and after ``ray.shutdown`` SIGTERM's action below Python was the default
    (the process would die without a word) while Python still reported the handler.
    """
    env = {k: v for k, v in env_python.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SIGTERM_CHILD], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "Ended [15] {'handler during ray.init': True} True True", out.stdout + out.stderr[-3000:]
