"""Signals never turn unfinished work into a success: SIGTERM, SIGINT and SIGKILL, to the caller and to the worker.

A `sisa delete` that retrains three whole shards (long enough to be caught mid-way) is signalled
at a given moment. The promise checked every time: the command exits non-zero unless its work
was done, says what was kept and how to finish it, the request stays pending, and running the
same command again finishes it (one certificate, nothing pending).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from sisa.ensemble import Ensemble
from tests.cli.worker_helpers import (
    pending_requests,
    sisa,
    start_sisa,
    wait_for_socket,
    wait_until,
    worker_log,
    worker_processes,
)
from tests.conftest import trained_blobs_store

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A store whose first-slice deletions retrain whole shards for seconds, and those ids."""
    store = trained_blobs_store(tmp_path_factory.mktemp("signals") / "slow", "train.epochs=150")
    with Ensemble.open(store, readonly=True) as ens:
        first_slice = [i for i, (_, r) in ens.locate(list(range(600))).items() if r == 0]
    return store, first_slice


@pytest.fixture
def store(trained: tuple[Path, list[int]], tmp_path: Path) -> str:
    shutil.copytree(trained[0], tmp_path / "st")
    return str(tmp_path / "st")


def warm_worker(store: str, ids: list[int], run_dir: Path) -> None:
    """One deletion in place, after which the worker starts; wait until it listens."""
    first = sisa(["delete", "--store", store, "--ids", str(ids[0])], run_dir)
    assert first.returncode == 0, first.stderr
    wait_for_socket(run_dir)


def finish_and_check(store: str, ids: list[int], run_dir: Path, certificates: int) -> None:
    """Re-running the command finishes the request: exit 0, nothing pending, ``certificates`` in the log."""
    again = sisa(["delete", "--store", store, "--ids", *map(str, ids), "--json"], run_dir)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["state"] == "applied"
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.pending() == []
        assert len(ens.certificates()) == certificates
        assert all(found["deleted"] for found in ens.lookup(ids))


def signal_mid_retrain(proc: psutil.Process | int, signum: int, store: str) -> None:
    """Send ``signum`` to ``proc`` once the deletion is journaled (its retrain is under way)."""
    wait_until(lambda: pending_requests(store), what="the request to be journaled")
    pid = proc if isinstance(proc, int) else proc.pid
    psutil.Process(pid).send_signal(signum)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)], ids=["term", "int", "kill"]
)
def test_a_signal_to_the_caller_ends_the_command_in_the_worker(
    store: str, trained: tuple[Path, list[int]], run_dir: Path, signum: int, code: int
) -> None:
    ids = trained[1]
    warm_worker(store, ids, run_dir)
    proc = start_sisa(["delete", "--store", store, "--ids", *map(str, ids[1:40])], run_dir)
    signal_mid_retrain(proc.pid, signum, store)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (out, err)
    if signum != signal.SIGKILL:  # a killed process prints nothing; the others say what is left
        assert f"sisa resume --store {store}" in err and f"sisa pending --store {store}" in err, err
    # The command in the worker ended as that signal would end it (a vanished caller: as SIGTERM).
    expected = 130 if signum == signal.SIGINT else 143
    wait_until(lambda: f"ran delete: exit {expected}" in worker_log(run_dir), what="the worker's log line")
    assert len(pending_requests(store)) == 1
    assert worker_processes(run_dir), "a caller's signal ends its command, never the worker"
    finish_and_check(store, ids[1:40], run_dir, certificates=2)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_a_signal_to_the_worker_ends_the_command_and_the_worker(
    store: str, trained: tuple[Path, list[int]], run_dir: Path, signum: int, code: int
) -> None:
    ids = trained[1]
    warm_worker(store, ids, run_dir)
    (worker,) = worker_processes(run_dir)
    proc = start_sisa(["delete", "--store", store, "--ids", *map(str, ids[1:40])], run_dir)
    signal_mid_retrain(worker, signum, store)
    out, err = proc.communicate(timeout=300)
    try:
        worker.wait(timeout=60)  # the worker ends after the command it was running
    except psutil.TimeoutExpired:
        worker.send_signal(signal.SIGUSR1)  # the worker writes every thread's stack to its log
        time.sleep(1)
        raise AssertionError(f"the worker did not end; its log:\n{worker_log(run_dir)}") from None
    if proc.returncode == 0:
        # The signal landed where Python swallows it (a finaliser as the command ended) and came
        # back only after the command had finished: then its work must really be done.
        assert "applied" in out and pending_requests(store) == [], (out, err)
        return
    assert proc.returncode == code, (out, err[-3000:])
    assert f"sisa resume --store {store}" in err, err
    assert len(pending_requests(store)) == 1
    finish_and_check(store, ids[1:40], run_dir, certificates=2)


def test_sigterm_to_a_command_in_place_says_what_is_pending(
    store: str, trained: tuple[Path, list[int]], run_dir: Path
) -> None:
    ids = trained[1]
    proc = start_sisa(["delete", "--store", store, "--ids", *map(str, ids[:39])], run_dir, worker=False)
    signal_mid_retrain(proc.pid, signal.SIGTERM, store)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out, err)
    assert "terminated (SIGTERM)" in err and f"sisa pending --store {store}" in err, err
    assert len(pending_requests(store)) == 1
    finish_and_check(store, ids[:39], run_dir, certificates=1)


@pytest.mark.parametrize("delay", [0.05, 0.5, 1.5], ids=["at-start", "early", "later"])
def test_sigterm_at_any_moment_never_reports_success_for_unfinished_work(
    store: str, trained: tuple[Path, list[int]], run_dir: Path, delay: float
) -> None:
    ids = trained[1]
    warm_worker(store, ids, run_dir)
    proc = start_sisa(["delete", "--store", store, "--ids", *map(str, ids[1:40])], run_dir)
    time.sleep(delay)  # before it reached the worker, while it journals, or while it retrains
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    pending = pending_requests(store)
    if proc.returncode == 0:  # it had finished before the signal: then nothing may be pending
        assert pending == [] and "applied" in out
    elif proc.returncode == -signal.SIGTERM:
        # On a loaded machine the signal can land before the interpreter installed its handler:
        # the process dies by SIGTERM's default action, before it read its arguments.
        assert out == "" and pending == [], (out, err)
    else:
        assert proc.returncode == 143, (out, err)
    finish_and_check(store, ids[1:40], run_dir, certificates=2)


def test_sigterm_to_an_idle_worker_ends_it_and_the_next_command_runs_in_place(
    store: str, trained: tuple[Path, list[int]], run_dir: Path
) -> None:
    ids = trained[1]
    warm_worker(store, ids, run_dir)
    (worker,) = worker_processes(run_dir)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)  # not our child: psutil cannot read its exit code, the log tells how it ended
    assert "Traceback" not in worker_log(run_dir)
    assert not list(run_dir.glob("sisa-*/worker-*.sock"))  # its socket is gone with it
    done = sisa(["delete", "--store", store, "--ids", str(ids[1]), "--json"], run_dir)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "applied", done.stderr
    assert worker_log(run_dir).count(" ran ") == 0  # ran in place


def test_an_interrupt_python_swallows_in_a_finaliser_is_delivered_again() -> None:
    from sisa.cli.exits import redeliver_swallowed_interrupts

    class Finaliser:
        def __del__(self) -> None:
            raise KeyboardInterrupt  # as a Ctrl-C landing while a finaliser runs: Python prints and drops it

    # A test run started in the background by a shell inherits SIGINT ignored, and Python then keeps
    # it so: nothing could be delivered. Ctrl-C's usual handler, for this test only.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), redeliver_swallowed_interrupts():
            Finaliser()  # collected at once: its KeyboardInterrupt goes to sys.unraisablehook
            # The redelivered signal lands at the next bytecodes once the delivering thread ran: on a
            # loaded machine that thread can wait its turn for over a second, so wait for it (a
            # swallowed interrupt that never comes back fails here after 60 s).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        signal.signal(signal.SIGINT, previous)
