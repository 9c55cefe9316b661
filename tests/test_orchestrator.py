"""The Ray layer: a worker killed mid-task is retried and the result is bit-identical."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sisa.ensemble import Ensemble
from tests.conftest import blobs, small_config

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


def test_killed_worker_is_retried_with_identical_bytes(tmp_path: Path) -> None:
    x, y = blobs(3000, d=10)
    cfg = small_config("shards=2", "train.epochs=12")  # a few seconds per shard: time to kill mid-task
    with Ensemble.create(tmp_path / "ref", cfg) as ref:
        ref.ingest(x, y)
        ref.fit()
        expected = ref.status()["per_shard"]

    killed: list[int] = []

    def kill_a_running_shard(result) -> None:
        if killed:
            return
        # Ray titles a worker process after the task it runs: "ray::sisa-shard-<k>". Only
        # workers of this test session's own Ray (descendants of this process) are candidates:
        # another Ray instance on the machine must never be touched.
        pids = subprocess.run(["pgrep", "-f", "ray::sisa-shard"], capture_output=True, text=True).stdout.split()
        ours = [int(p) for p in pids if descends_from(int(p), os.getpid())]
        if ours:
            os.kill(ours[0], signal.SIGKILL)
            killed.append(ours[0])

    with Ensemble.create(tmp_path / "killed", cfg) as ens:
        ens.ingest(x, y)
        report = ens.fit(progress=kill_a_running_shard)
        got = ens.status()["per_shard"]
    assert killed, "no shard task was running to kill"
    assert sorted(report.trained) == [0, 1]
    assert [s["live_weights"] for s in got] == [s["live_weights"] for s in expected]
    assert [s["live_checkpoint"] for s in got] == [s["live_checkpoint"] for s in expected]


def test_local_address_trains_in_process_with_the_same_bytes_as_ray(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    states = []
    for name, address in (("ray", None), ("local", "local")):
        with Ensemble.create(tmp_path / name, small_config(), address=address) as ens:
            ens.ingest(x, y)
            report = ens.fit()
            assert sorted(report.trained) == [0, 1, 2]
            states.append([(s["live_checkpoint"], s["live_weights"]) for s in ens.status()["per_shard"]])
    assert states[0] == states[1]
