"""Training at a lower CPU priority (``SISA_TRAIN_NICE``, ``set_training_nice``, ``--nice``): real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sisa.errors import ConfigError
from sisa.train import priority
from sisa.train.local_runner import LocalRunner
from tests.conftest import ROOT, trained_blobs_store


def thread_niceness(pid: int) -> set[int]:
    """The niceness of every thread of process ``pid`` (Linux keeps one per thread)."""
    tasks = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    return {os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}


def test_the_training_child_runs_at_the_set_niceness_follows_changes_and_trains_the_same_bytes() -> None:
    from tests.train.test_trainer import make_job

    if priority.niceness() > 0:
        pytest.skip(f"this test process runs at niceness {priority.niceness()}: its children may not run at 0")
    job = make_job()
    with LocalRunner("avx2", 1, "cpu") as runner:
        if runner.in_process:
            pytest.skip("this test process started with the avx2 pins: it trains in place, no child to test")
        with priority.training_nice_as(3):
            niced = list(runner.train(job))
            assert runner.pid is not None
            first = runner.pid
            # Every thread of the child, torch's included, runs at 3; this process is left alone.
            assert thread_niceness(first) == {3}
        assert priority.niceness() == 0
        with priority.training_nice_as(7):
            list(runner.train(job))
            assert runner.pid == first and thread_niceness(first) == {7}  # raised in place
        with priority.training_nice_as(0):
            plain = list(runner.train(job))
            assert runner.pid is not None
            # Back to this process's priority: reniced, or (unprivileged, who may not lower it) a fresh child.
            assert thread_niceness(runner.pid) == {0}
    # Priority is not part of the determinism domain: the same stages, bit for bit.
    assert [(r.key, r.sha256) for r in niced] == [(r.key, r.sha256) for r in plain]


def test_the_setting_comes_from_the_call_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no serving mark of this machine's (test_serving_node)
    monkeypatch.delenv(priority.ENV, raising=False)
    assert priority.training_nice() == priority.DEFAULT_NICE
    monkeypatch.setenv(priority.ENV, "12")
    assert priority.training_nice() == 12
    with priority.training_nice_as(4):
        assert priority.training_nice() == 4
        with priority.training_nice_as(None):  # None leaves the current setting
            assert priority.training_nice() == 4
    assert priority.training_nice() == 12
    monkeypatch.setenv(priority.ENV, "high")
    with pytest.raises(ConfigError, match=r"\$SISA_TRAIN_NICE must be a whole number from 0 .* to 19 .*, got 'high'"):
        priority.training_nice()
    for bad in (-1, 20, 2.5, True, "3.5"):
        with pytest.raises(ConfigError, match="from 0"):
            priority.set_training_nice(bad)  # type: ignore[arg-type]
    assert priority.target_niceness(priority.MAX_NICE) == priority.MAX_NICE
    assert priority.target_niceness(0) == priority.niceness()  # never below this process's own


def run_sisa(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop(priority.ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "sisa.cli", *argv], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_sisa_commands_that_train_run_at_their_nice(tmp_path: Path) -> None:
    if priority.niceness() > 6:
        pytest.skip(f"this test process runs at niceness {priority.niceness()}, above 6")
    store = trained_blobs_store(tmp_path / "store", "shards=2", "slices=2")
    done = run_sisa("delete", "--store", str(store), "--ids", "3", "--nice", "6", "-v")
    assert done.returncode == 0, done.stderr[-3000:]
    # The command measured its own niceness after setting it (it trains in place, or in a child at the same).
    assert "runs at niceness 6 (--nice 6)" in done.stderr
    bad = run_sisa("apply", "--store", str(store), "--nice", "20")
    assert bad.returncode == 2 and "--nice must be a whole number from 0" in bad.stderr
