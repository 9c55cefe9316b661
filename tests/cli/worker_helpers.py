"""Helpers of the warm-worker tests: a private ``TMPDIR`` per test, `sisa` commands in it, the worker's process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sisa.cli.worker import ENABLE_ENV, IDLE_ENV
from sisa.ensemble import Ensemble
from tests.conftest import ROOT, default_sigint


def worker_env(tmp: Path, *, worker: bool = True, idle: float = 60) -> dict[str, str]:
    """A shell's environment for a `sisa` command whose worker lives in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({ENABLE_ENV: "1" if worker else "0", IDLE_ENV: str(idle), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)})
    return env


def sisa(
    args: list[str], tmp: Path, *, worker: bool = True, idle: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `sisa ARGS` (``python -m sisa.cli``) to its end."""
    env = worker_env(tmp, worker=worker, idle=idle)
    return subprocess.run(
        [sys.executable, "-m", "sisa.cli", *args], env=env, capture_output=True, text=True, timeout=300, input=input
    )


def start_sisa(args: list[str], tmp: Path, *, worker: bool = True) -> subprocess.Popen[str]:
    """`sisa ARGS` in the background (SIGINT at its default action: the test may Ctrl-C it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sisa.cli", *args],
        env=worker_env(tmp, worker=worker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def worker_log(tmp: Path) -> str:
    """Everything the workers in ``tmp`` logged."""
    return "".join(p.read_text() for p in tmp.glob("sisa-*/worker-*.log"))


def wait_for_socket(tmp: Path, timeout: float = 120) -> Path:
    """The socket of the worker in ``tmp``, once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(tmp.glob("sisa-*/worker-*.sock"))
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no worker socket after {timeout} s; log:\n{worker_log(tmp)}")


def worker_processes(tmp: Path) -> list[psutil.Process]:
    """The live (not zombie) worker processes of ``tmp``: those whose command line names a lock there."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(tmp) in a and a.endswith(".lock") for a in cmdline):
            found.append(proc)
    return found


def wait_until(check: object, timeout: float = 120, what: str = "") -> None:
    """Poll ``check()`` until it is true, else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pending_requests(store: str) -> list[dict]:
    """The store's pending requests, read as another process reads them (no lock)."""
    with Ensemble.open(store, readonly=True) as ens:
        return ens.pending()
