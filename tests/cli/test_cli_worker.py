"""The warm worker behind small `sisa` commands: same output, same bytes, its own lifetime.

Each test gives its commands a private ``TMPDIR`` (where the worker's socket, lock and log
live) and a short idle time, and stops the worker it started.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sisa.cli.worker_identity import worker_key
from sisa.ensemble import Ensemble
from tests.cli.worker_helpers import sisa, start_sisa, wait_for_socket, wait_until, worker_log, worker_processes
from tests.conftest import blobs, live_state, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def start_delete(store: str, ids: list[int], tmp: Path) -> subprocess.Popen[str]:
    """`sisa delete` of ``ids`` in the background, through the worker in ``tmp``."""
    return start_sisa(["delete", "--store", store, "--ids", *map(str, ids)], tmp)


@pytest.fixture
def slow_store(tmp_path: Path, run_dir: Path) -> tuple[str, list[int]]:
    """A store whose deletions in the first slice take seconds, its worker up (after one deletion).

    Returns:
        The store, and the ids of every shard's first slice still in it.
    """
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "slow", small_config("train.epochs=150")) as ens:
        ens.ingest(x, y)
        ens.fit()
        first_slice = [i for i, (_, r) in ens.locate(list(range(600))).items() if r == 0]
    store = str(tmp_path / "slow")
    sisa(["delete", "--store", store, "--ids", str(first_slice[0])], run_dir)
    wait_for_socket(run_dir)
    return store, first_slice[1:]


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "a", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


def test_deletions_through_the_worker_give_the_same_bytes_and_output(stores: tuple[Path, Path], run_dir: Path) -> None:
    a, b = stores
    first = sisa(["delete", "--store", str(a), "--ids", "5", "--json"], run_dir)  # runs here, starts a worker
    assert first.returncode == 0, first.stderr
    wait_for_socket(run_dir)
    assert "ran" not in worker_log(run_dir)
    outputs = []
    for sample in (17, 240):
        done = sisa(["delete", "--store", str(a), "--ids", str(sample), "--json"], run_dir)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    log = worker_log(run_dir)
    assert log.count("ran delete:") == 2 and "exit 0" in log  # both ran in the worker
    in_place = []
    for sample in (5, 17, 240):
        done = sisa(["delete", "--store", str(b), "--ids", str(sample), "--json"], run_dir, worker=False)
        assert done.returncode == 0, done.stderr
        in_place.append(json.loads(done.stdout))
    with Ensemble.open(a, readonly=True) as ea, Ensemble.open(b, readonly=True) as eb:
        assert live_state(ea) == live_state(eb)  # bit-identical models either way

    def what_it_did(cert: dict) -> dict:  # the certificate without its timings
        kept = ("from_slice", "new_checkpoints", "live_weights", "removed_checkpoints", "sample_epochs")
        shards = {k: {f: v[f] for f in kept} for k, v in cert["shards"].items()}
        return {"request_id": cert["request_id"], "id_hashes": cert["id_hashes"], "shards": shards}

    assert [what_it_did(c) for c in outputs] == [what_it_did(c) for c in in_place[1:]]
    assert outputs[0]["runner"] == "local" and outputs[0]["state"] == "applied"
    verified = sisa(["verify", "--store", str(a), "--shard", "0"], run_dir)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr
    bad = sisa(["delete", "--store", str(a), "--ids", "999999"], run_dir)  # errors come back too
    assert bad.returncode == 2 and "not in the store" in bad.stderr
    # Every shard: whatever runner the plan picks (a Ray instance the worker starts for the command is
    # stopped after it, and so is any process it left).
    everything = sisa(["verify", "--store", str(a), "--json"], run_dir)
    assert everything.returncode == 0, everything.stderr
    assert json.loads(everything.stdout)["ok"]
    assert worker_log(run_dir).count(" ran ") == 5
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", f"raylet.*{run_dir}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the worker left the command's Ray instance running"
        time.sleep(0.5)


def test_the_worker_ends_when_idle_and_is_off_with_sisa_worker_0(stores: tuple[Path, Path], run_dir: Path) -> None:
    a, _ = stores
    off = sisa(["delete", "--store", str(a), "--ids", "5"], run_dir, worker=False)
    assert off.returncode == 0 and not list(run_dir.glob("sisa-*/worker-*"))
    sisa(["delete", "--store", str(a), "--ids", "6"], run_dir, idle=2)
    sock = wait_for_socket(run_dir)
    deadline = time.monotonic() + 60
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not sock.exists()  # gone after 2 s without a command
    lock = next(run_dir.glob("sisa-*/worker-*.lock"))
    while subprocess.run(["pgrep", "-f", str(lock)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the idle worker's process did not end"
        time.sleep(0.5)


def test_ctrl_c_interrupts_the_command_in_the_worker(slow_store: tuple[str, list[int]], run_dir: Path) -> None:
    store, first_slice = slow_store
    # A deletion in every shard's first slice: three whole shards to retrain, long enough to interrupt.
    proc = start_delete(store, first_slice[:39], run_dir)
    time.sleep(3.0)  # the request is journaled and the retrain under way in the worker
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "sisa resume" in err  # what the command in place says when interrupted
    assert "exit 130" in worker_log(run_dir)
    with Ensemble.open(store) as ens:  # the journaled request is finished by the next writable open
        assert ens.pending() == []
        assert ens.verify()["ok"]


def test_a_worker_killed_mid_command_hands_the_command_back(slow_store: tuple[str, list[int]], run_dir: Path) -> None:
    store, first_slice = slow_store
    proc = start_delete(store, first_slice[:39], run_dir)
    time.sleep(3.0)
    lock = next(run_dir.glob("sisa-*/worker-*.lock"))
    subprocess.run(["pkill", "-KILL", "-f", str(lock)], check=True)  # the worker dies mid-retrain
    out, err = proc.communicate(timeout=300)
    # Nothing had come back: the command ran again in place, which finished the journaled request.
    assert proc.returncode == 0 and "the sisa worker ended; running the command in this process" in err, (out, err)
    assert "request 2 applied: 39 sample(s) deleted" in out
    with Ensemble.open(store) as ens:
        assert ens.pending() == [] and ens.verify()["ok"]
        assert [c["request_id"] for c in ens.certificates()] == [1, 2]


def test_a_busy_worker_makes_the_caller_run_its_command_in_place(
    slow_store: tuple[str, list[int]], stores: tuple[Path, Path], run_dir: Path
) -> None:
    store, first_slice = slow_store
    long = start_delete(store, first_slice[:39], run_dir)
    time.sleep(3.0)  # the worker is busy with it
    other = sisa(["delete", "--store", str(stores[0]), "--ids", "7", "--json"], run_dir)
    assert other.returncode == 0 and json.loads(other.stdout)["state"] == "applied", other.stderr
    out, err = long.communicate(timeout=300)
    assert long.returncode == 0, err
    log = worker_log(run_dir)
    assert log.count("ran delete:") == 1 and str(stores[0]) not in log  # the second ran in its own process


def test_ids_read_from_this_process_stdin_never_go_to_the_worker(stores: tuple[Path, Path], run_dir: Path) -> None:
    a, _ = stores
    sisa(["delete", "--store", str(a), "--ids", "5"], run_dir)
    wait_for_socket(run_dir)
    # Every spelling of "this process's standard input": the worker's stdin is not this command's.
    for n, ids_file in enumerate((["--ids-file", "/dev/stdin"], ["--ids-file=/dev/stdin"], ["--ids-file", "-"])):
        done = sisa(["delete", "--store", str(a), *ids_file, "--json"], run_dir, input=f"{17 + n}\n")
        assert done.returncode == 0 and json.loads(done.stdout)["deleted"] == 1, done.stderr
    assert " ran " not in worker_log(run_dir)


def test_the_worker_key_follows_what_a_process_reads_at_start() -> None:
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert worker_key(avx2) == worker_key(dict(avx2))
    assert worker_key(avx2) != worker_key({**avx2, "ATEN_CPU_CAPABILITY": "default"})
    assert worker_key(avx2) != worker_key({**avx2, "OMP_NUM_THREADS": "3"})


def test_each_niceness_has_its_own_worker(stores: tuple[Path, Path], run_dir: Path) -> None:
    a, _ = stores
    sisa(["delete", "--store", str(a), "--ids", "5"], run_dir)  # runs here, starts a worker at niceness 0
    wait_for_socket(run_dir)
    niced = sisa(["delete", "--store", str(a), "--ids", "17", "--nice", "5", "-v"], run_dir)
    assert niced.returncode == 0, niced.stderr
    # Not the niceness-0 worker's (nothing unprivileged could un-nice it after): in place, then a worker of its own.
    assert "this command runs at niceness 5" in niced.stderr and " ran " not in worker_log(run_dir)
    wait_until(lambda: len(list(run_dir.glob("sisa-*/worker-*.sock"))) == 2, what="a second worker listening")
    assert sorted(p.nice() for p in worker_processes(run_dir)) == [0, 5]
    for nice, sample in (("5", 240), ("0", 300)):
        done = sisa(["delete", "--store", str(a), "--ids", str(sample), "--nice", nice, "-v"], run_dir)
        assert done.returncode == 0 and f"this command runs at niceness {nice}" in done.stderr, done.stderr
    assert worker_log(run_dir).count("ran delete: exit 0") == 2  # each went to the worker of its niceness
    assert sorted(p.nice() for p in worker_processes(run_dir)) == [0, 5]
