"""The Ray layer: a worker killed mid-task is resubmitted from the last stage received, with identical bytes."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from sisa.ensemble import Ensemble, FitReport
from sisa.errors import StoreFullError, TrainingError
from sisa.train.jobs import ShardJob, SliceData, StageResult
from sisa.train.orchestrator import run_jobs
from tests.conftest import blobs, live_state, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is in the parent chain of ``pid`` (read from /proc)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False


def shard_workers() -> list[int]:
    """Pids of this test session's Ray workers running a shard task (titled ``ray::sisa-shard-<k>``)."""
    # Only workers of this session's Ray (descendants of this process): another Ray instance on
    # the machine must never be touched.
    pids = subprocess.run(["pgrep", "-f", "ray::sisa-shard"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in pids if descends_from(int(p), os.getpid())]


def kill_shard_worker() -> int | None:
    """SIGKILL one running shard worker of this test session's own Ray; its pid, or None."""
    # Ray titles a worker process after the task it runs: "ray::sisa-shard-<k>".
    ours = shard_workers()
    if not ours:
        return None
    os.kill(ours[0], signal.SIGKILL)
    return ours[0]


X3, Y3 = blobs(3000, d=10)


Live = dict[int, tuple[str, str]]


def fit_killing(tmp_path: Path, cfg, kill_when) -> tuple[FitReport, Live, Live]:
    """Train ``cfg`` undisturbed, then again killing one shard worker at the first stage where ``kill_when``.

    Returns:
        The disturbed fit's report, its live state and the undisturbed live state.
    """
    with Ensemble.create(tmp_path / "ref", cfg) as ref:
        ref.ingest(X3, Y3)
        ref.fit()
        expected = live_state(ref)
    killed: list[int] = []

    def progress(result: StageResult) -> None:
        if not killed and kill_when(result):
            pid = kill_shard_worker()
            if pid is not None:
                killed.append(pid)

    with Ensemble.create(tmp_path / "killed", cfg) as ens:
        ens.ingest(X3, Y3)
        report = ens.fit(progress=progress)
        got = live_state(ens)
    assert killed, "no shard task was running to kill"
    return report, got, expected


def test_killed_worker_is_retried_with_identical_bytes(tmp_path: Path) -> None:
    cfg = small_config("shards=2", "train.epochs=12")  # a few seconds per shard: time to kill mid-task
    report, got, expected = fit_killing(tmp_path, cfg, lambda _result: True)
    assert sorted(report.trained) == [0, 1]
    assert len(report.retries) == 1 and report.retries[0]["error"] == "WorkerCrashedError"
    assert got == expected


def test_a_lost_worker_resumes_from_the_last_stage_received(tmp_path: Path) -> None:
    cfg = small_config("shards=1", "train.epochs=12")  # one shard: the running worker is its own
    # Killed right after stage 1 arrives, while it trains stage 2.
    report, got, expected = fit_killing(tmp_path, cfg, lambda result: result.stage == 1)
    # Resubmitted from stage 1's checkpoint, which the driver held: only stages 2 and 3 ran again,
    # every stage was committed once, and the bytes are those of the undisturbed training.
    assert report.retries == [{"shard": 0, "after_stage": 1, "attempt": 1, "error": "WorkerCrashedError"}]
    assert report.trained == {0: [1, 2, 3]}
    assert got == expected


def test_a_worker_lost_more_often_than_max_retries_fails_and_keeps_what_was_committed(tmp_path: Path) -> None:
    cfg = small_config("shards=1", "train.epochs=12", "resources.max_retries=0")
    with Ensemble.create(tmp_path / "st", cfg) as ens:
        ens.ingest(X3, Y3)
        with pytest.raises(TrainingError, match=r"shard 0 lost its worker 1 times \(resources.max_retries=0\)"):
            ens.fit(progress=lambda r: kill_shard_worker() if r.stage == 1 else None)
        assert ens.status()["per_shard"][0]["stages_done"] == 1  # stage 1 stays committed
        report = ens.fit()  # and the next fit resumes from it
        assert report.trained == {0: [2, 3]} and ens.verify()["ok"]


def test_a_commit_that_raises_cancels_the_task_whose_stage_it_was_committing() -> None:
    # Stage 1 trains on 32 rows, stage 2 on 60,000 for 1,000 epochs (a quarter of an hour): when the commit of
    # stage 1 fails, the task is busy with stage 2 and only a cancel stops it.
    rng = np.random.default_rng(0)
    sizes = (32, 60_000)
    starts = np.cumsum((0, *sizes))
    slices = tuple(
        SliceData(
            ids=np.arange(starts[i], starts[i + 1], dtype=np.int64),
            x=rng.normal(size=(n, 10)).astype(np.float32),
            y=rng.integers(0, 3, size=n).astype(np.int64),
        )
        for i, n in enumerate(sizes)
    )
    cfg = small_config("shards=1", "slices=2", "train.epochs=1000", "train.epoch_schedule=constant")
    job = ShardJob(cfg, 0, slices, 0, None, None, (10,), 3)
    committed: list[int] = []

    def commit(result: StageResult) -> None:
        committed.append(result.stage)
        raise StoreFullError("the disk is full")

    try:
        with pytest.raises(StoreFullError, match="the disk is full"):
            run_jobs([job], commit)
        assert committed == [1]
        # Cancelled (force: its worker process is killed), so no shard worker is left. Waiting only
        # for Ray to deliver the kill; an uncancelled task would run stage 2 for many minutes.
        deadline = time.monotonic() + 30
        while shard_workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert shard_workers() == [], "the task whose commit failed is still running"
    finally:
        for pid in shard_workers():  # leave no busy worker behind for the next test
            os.kill(pid, signal.SIGKILL)


@pytest.mark.kernels
def test_local_address_trains_in_process_with_the_same_bytes_as_ray(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    states = []
    for name, address in (("ray", None), ("local", "local")):
        with Ensemble.create(tmp_path / name, small_config(), address=address) as ens:
            ens.ingest(x, y)
            report = ens.fit()
            assert sorted(report.trained) == [0, 1, 2]
            states.append(live_state(ens))
    assert states[0] == states[1]
