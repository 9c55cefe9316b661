"""A node that serves sisa predictions trains niced by default: real marks, real processes, the real command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sisa.train import priority, serving_node
from tests.cli.worker_helpers import sisa, wait_for_socket, worker_log, worker_processes
from tests.conftest import ROOT, trained_blobs_store

# A stand-in replica: registers as sisa's replicas do, says so, and lives until its stdin closes.
REPLICA = (
    "import sys\n"
    "from sisa.train import serving_node\n"
    "print(serving_node.register('replica', store='s'), flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp folder of this test's own, in this process and its children: no real `sisa serve` here counts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.delenv(priority.ENV, raising=False)
    return folder


def start_replica() -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", REPLICA], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    mark = Path(proc.stdout.readline().strip())
    assert mark.is_file(), mark
    return proc, mark


def test_a_live_replica_makes_training_here_niced_by_default_until_it_ends(temp: Path) -> None:
    assert serving_node.serving_processes() == []
    assert priority.training_nice() == priority.DEFAULT_NICE == 0
    replica, mark = start_replica()
    try:
        assert [p["pid"] for p in serving_node.serving_processes()] == [replica.pid]
        assert mark.parent == temp / f"sisa-{os.getuid()}" / "serving"
        assert priority.training_nice() == serving_node.SERVING_NICE == 10
        # What was set explicitly still decides: the environment, then the call.
        os.environ[priority.ENV] = "0"
        try:
            assert priority.training_nice() == 0
        finally:
            del os.environ[priority.ENV]
        with priority.training_nice_as(3):
            assert priority.training_nice() == 3
    finally:
        replica.kill()  # as a killed replica ends: its mark stays behind
        replica.wait()
    assert mark.exists()
    assert serving_node.serving_processes() == []  # its process is gone: the mark is stale, and removed
    assert not mark.exists()
    assert priority.training_nice() == 0


def test_a_replica_that_shuts_down_removes_its_mark(temp: Path) -> None:
    replica, mark = start_replica()
    serving_node.unregister(mark)  # what the replica's __del__ does
    assert serving_node.serving_processes() == []
    replica.kill()
    replica.wait()
    serving_node.unregister(mark)  # twice is fine


def test_a_mark_of_a_reused_pid_or_a_foreign_folder_does_not_count(temp: Path) -> None:
    folder = serving_node.marks_dir(create=True)
    assert folder is not None
    # This very process's pid, another start time: the pid was reused by a process that is no replica.
    fake = folder / f"{os.getpid()}-1"
    fake.write_text(f'{{"pid": {os.getpid()}}}')
    assert serving_node.serving_processes() == [] and not fake.exists()
    # A private folder anyone may write is not this user's only: neither read nor written.
    private = folder.parent
    private.chmod(0o777)
    try:
        (folder / f"{os.getpid()}-{serving_node._start_ms(os.getpid())}").write_text('{"pid": 1}')
        assert serving_node.serving_processes() == []
        assert serving_node.register("replica") is None
        assert priority.training_nice() == 0
    finally:
        private.chmod(0o700)
    assert [p["pid"] for p in serving_node.serving_processes()] == [1]  # the same mark, now in a private folder


def test_sisa_delete_beside_a_replica_runs_niced_in_a_worker_of_that_niceness(
    temp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if priority.niceness() > 0:
        pytest.skip(f"this test process runs at niceness {priority.niceness()}")
    store = str(trained_blobs_store(tmp_path / "store", "shards=2", "slices=2"))
    short = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))  # a unix socket's path is limited to 107 bytes
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    monkeypatch.setenv("TMPDIR", str(short))  # the replica's, the commands' and the workers' alike
    replica, _ = start_replica()
    try:
        first = sisa(["delete", "--store", store, "--ids", "3", "-v"], short)
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"this node serves sisa predictions (pid {replica.pid})" in first.stderr
        assert "this command runs at niceness 10 (--nice 10)" in first.stderr
        # The worker it started after itself runs at that niceness, and takes the next such command.
        wait_for_socket(short)
        assert [p.nice() for p in worker_processes(short)] == [10]
        second = sisa(["delete", "--store", store, "--ids", "4", "-v"], short)
        assert second.returncode == 0 and "runs at niceness 10" in second.stderr, second.stderr[-3000:]
        assert worker_log(short).count("ran delete: exit 0") == 1
        opted_out = sisa(["delete", "--store", store, "--ids", "5", "--nice", "0", "-v"], short, worker=False)
        assert opted_out.returncode == 0 and "runs at niceness 0 (--nice 0)" in opted_out.stderr
    finally:
        replica.send_signal(signal.SIGTERM)
        replica.wait()
        for proc in worker_processes(short):
            proc.kill()
        shutil.rmtree(short, ignore_errors=True)
