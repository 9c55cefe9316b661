"""The warm worker's rules: who it serves, what it runs, what it logs, and what no caller can do to it.

One command line means one thing to the launcher and to the command (abbreviations are refused);
the worker runs only the commands the launcher hands it, only for a caller of its own identity;
a malformed or silent caller never stops it; its log names no ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Client
from pathlib import Path

import psutil
import pytest

from sisa.cli import worker
from sisa.cli.exits import Terminated
from sisa.cli.worker import Kind
from sisa.cli.worker_identity import command_env, worker_key
from sisa.cli.worker_server import REQUEST_TIMEOUT, Worker, _Channel, _Stop
from sisa.ensemble import Ensemble
from sisa.train.domain import pin_env
from tests.cli.worker_helpers import sisa, wait_for_socket, wait_until, worker_env, worker_log, worker_processes
from tests.conftest import small_config, trained_blobs_store

pytestmark = pytest.mark.usefixtures("ray_session")
LOG_LINE = re.compile(r"^\S+ (pid \d+ ran [a-z]+: exit -?\d+ in [\d.]+s|refused a caller: [a-z ]+)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_blobs_store(tmp_path_factory.mktemp("protocol") / "st")


@pytest.fixture
def store(trained: Path, tmp_path: Path) -> str:
    shutil.copytree(trained, tmp_path / "st")
    return str(tmp_path / "st")


def warm(store: str, run_dir: Path, first_id: int = 5) -> Path:
    """Run one deletion in place (it starts the worker after it), and wait until the worker listens."""
    done = sisa(["delete", "--store", store, "--ids", str(first_id)], run_dir)
    assert done.returncode == 0, done.stderr
    return wait_for_socket(run_dir)


def ask(sock: Path, message: bytes) -> list[bytes]:
    """Send one raw message to the worker at ``sock``; every message it answers, until it closes."""
    answers = []
    with Client(str(sock), family="AF_UNIX") as conn:
        conn.send_bytes(message)
        while True:
            try:
                answers.append(conn.recv_bytes())
            except EOFError:
                return answers


def request(sock: Path, argv: list[str], run_dir: Path, key: str | None = None) -> bytes:
    """A well-formed request as a caller in ``run_dir`` would send it (``key``: the worker's own, its socket's)."""
    body = {
        "argv": argv,
        "cwd": os.getcwd(),
        "env": worker_env(run_dir),
        "tty": [False, False],
        "key": key or sock.stem.removeprefix("worker-"),
    }
    return Kind.REQUEST + json.dumps(body).encode()


def test_abbreviated_options_are_refused_and_equals_forms_mean_the_same(store: str, run_dir: Path) -> None:
    warm(store, run_dir)
    for argv in (["--addr", "127.0.0.1:1"], ["--stor", store], ["--id", "7"]):
        done = sisa(["delete", "--store", store, "--ids", "7", *argv], run_dir)
        assert done.returncode == 2 and f"unrecognized arguments: {argv[0]}" in done.stderr, done.stderr
    assert " ran " not in worker_log(run_dir)  # refused by the caller's own parser: never sent
    done = sisa(["delete", f"--store={store}", "--ids=7", "--json"], run_dir)
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"] == 1, done.stderr
    assert worker_log(run_dir).count("ran delete: exit 0") == 1  # the `=` form went to the worker


def test_the_worker_refuses_what_it_does_not_run_and_serves_on(store: str, run_dir: Path) -> None:
    sock = warm(store, run_dir)
    refused = [Kind.REFUSED]
    cases = {
        "another identity": request(sock, ["delete", "--store", store, "--ids", "7"], run_dir, key="0" * 16),
        "a reading command": request(sock, ["status", "--store", store], run_dir),
        "a command that creates stores": request(sock, ["train", "--store", store], run_dir),
        "a named cluster": request(sock, ["delete", "--store", store, "--ids", "7", "--address", "h:1"], run_dir),
        "bad JSON": Kind.REQUEST + b"{not json",
        "a missing field": Kind.REQUEST + json.dumps({"argv": ["delete"]}).encode(),
        "a wrong type": Kind.REQUEST
        + json.dumps({"argv": "delete", "cwd": 1, "env": {}, "tty": [], "key": 1}).encode(),
        "not a request": Kind.SIGINT,
    }
    for what, message in cases.items():
        answers = ask(sock, message)
        assert [a[:1] for a in answers] == refused, (what, answers)
    assert worker_processes(run_dir), "a caller's request ended the worker"
    with Ensemble.open(store, readonly=True) as ens:
        assert [c["request_id"] for c in ens.certificates()] == [1]  # none of them deleted anything
    done = sisa(["delete", "--store", store, "--ids", "7", "--json"], run_dir)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "applied", done.stderr
    assert worker_log(run_dir).count("ran delete: exit 0") == 1


def test_a_silent_caller_is_dropped_and_the_worker_serves_on(store: str, run_dir: Path) -> None:
    sock = warm(store, run_dir)
    with Client(str(sock), family="AF_UNIX") as silent:
        busy = sisa(["delete", "--store", store, "--ids", "7", "--json"], run_dir)  # the worker waits on it
        assert busy.returncode == 0, busy.stderr
        wait_until(lambda: "refused a caller: no request" in worker_log(run_dir), timeout=REQUEST_TIMEOUT + 30)
        assert silent.recv_bytes() == Kind.REFUSED + b"no request"  # told, then dropped
        with pytest.raises(EOFError):
            silent.recv_bytes()
    done = sisa(["delete", "--store", store, "--ids", "8", "--json"], run_dir)
    assert done.returncode == 0, done.stderr
    assert worker_log(run_dir).count("ran delete: exit 0") == 1  # the first ran in place (busy), this one there


def test_messages_from_two_threads_never_interleave() -> None:
    ours, theirs = Pipe()
    channel = _Channel(ours)
    size, count = 200_000, 20  # above 16 KiB a message is written in pieces: unguarded, they interleave

    def send(fill: bytes) -> None:
        for _ in range(count):
            channel.send(Kind.OUT, fill * size)

    threads = [threading.Thread(target=send, args=(fill,), daemon=True) for fill in (b"a", b"b")]
    for t in threads:
        t.start()
    received: list[bytes] = []

    def receive() -> None:
        with contextlib.suppress(OSError):  # a length read from the middle of another message
            for _ in range(2 * count):
                received.append(theirs.recv_bytes(maxlength=size + 1))

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert len(received) == 2 * count, "messages did not come whole: two writers' pieces interleaved"
    for t in threads:
        t.join()
    assert all(m[:1] == Kind.OUT and len(set(m[1:])) == 1 and len(m) == size + 1 for m in received)


def test_a_signal_that_comes_after_its_command_never_ends_the_worker(tmp_path: Path) -> None:
    w = Worker(tmp_path / "s.sock", "k", 1.0, lambda argv: 0)
    w.state.caller_signal = signal.SIGINT  # a caller's Ctrl-C, raised just after its command ended
    w._on_signal(signal.SIGINT, None)
    assert w.state.stop is None
    w.state.running = 1  # while a command runs, each signal ends it as that signal would
    with pytest.raises(KeyboardInterrupt):
        w._on_signal(signal.SIGINT, None)
    with pytest.raises(Terminated):
        w._on_signal(signal.SIGTERM, None)
    assert w.state.stop == signal.SIGTERM  # from outside: the worker ends after the command
    w.state.running = None
    with pytest.raises(_Stop):  # from outside while idle: at once
        w._on_signal(signal.SIGTERM, None)


def test_a_command_runs_with_the_workers_start_variables_only() -> None:
    caller = {"HOME": "/h", "RAY_ADDRESS": "", "LD_PRELOAD": "/x.so", "OMP_NUM_THREADS": "3", "SISA_RUNNER": "ray"}
    started = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "HOME": "/old"}
    env = command_env(caller, started)
    assert env == {
        "HOME": "/h",
        "RAY_ADDRESS": "",
        "SISA_RUNNER": "ray",
        "OMP_NUM_THREADS": "1",
        "ATEN_CPU_CAPABILITY": "avx2",
    }


def test_the_worker_key_follows_installed_distributions_and_start_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = tmp_path / "site-packages"
    (site_dir / "torch-2.13.0.dist-info").mkdir(parents=True)
    monkeypatch.setattr("site.getsitepackages", lambda: [str(site_dir)])
    monkeypatch.setattr("site.getusersitepackages", lambda: str(tmp_path / "user"))
    env = {"HOME": "/h", "ATEN_CPU_CAPABILITY": "avx2"}
    before = worker_key({}, env)
    assert worker_key({}, {**env, "HOME": "/other", "RAY_ADDRESS": "h:1"}) == before  # read later, per command
    for name in ("LD_PRELOAD", "MALLOC_ARENA_MAX", "PYTHONPATH", "KMP_AFFINITY", "TORCH_HOME"):
        assert worker_key({}, {**env, name: "x"}) != before, name
    (site_dir / "torch-2.13.0.dist-info").rename(site_dir / "torch-2.14.1.dist-info")  # pip install -U torch
    assert worker_key({}, env) != before


def test_duplicate_workers_are_reaped_and_one_serves(
    store: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(run_dir))
    for name, value in worker_env(run_dir).items():
        monkeypatch.setenv(name, value)
    pins = pin_env(small_config().resources.cpu_isa)
    started = [worker.ensure_started(pins) for _ in range(3)]
    assert started[0]
    wait_for_socket(run_dir)
    assert len(worker_processes(run_dir)) == 1
    me = psutil.Process()
    wait_until(
        lambda: not [c for c in me.children() if c.status() == psutil.STATUS_ZOMBIE], timeout=30, what="no zombie"
    )


def test_a_sisa_folder_in_the_callers_directory_never_reaches_the_worker(
    store: str, run_dir: Path, tmp_path: Path
) -> None:
    script = Path(sys.executable).parent / "sisa"  # the console script: its own folder is on its path, not cwd
    if not script.exists():
        pytest.skip("no sisa console script beside this interpreter")
    here = tmp_path / "here"
    (here / "sisa").mkdir(parents=True)
    marker = tmp_path / "shadow-ran"
    (here / "sisa" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    env = worker_env(run_dir)
    env.pop("PYTHONPATH")
    for n in (5, 6):
        done = subprocess.run(
            [str(script), "delete", "--store", store, "--ids", str(n)],
            cwd=here,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        if n == 5:
            wait_for_socket(run_dir)
    assert worker_log(run_dir).count("ran delete: exit 0") == 1  # the second ran in the worker
    assert not marker.exists()


def test_the_worker_log_names_no_ids_and_is_private(store: str, run_dir: Path, tmp_path: Path) -> None:
    warm(store, run_dir, first_id=587)
    (tmp_path / "ids").write_text("591\n")
    for argv in (["--ids", "593"], ["--ids-file", str(tmp_path / "ids")]):
        done = sisa(["delete", "--store", store, *argv], run_dir)
        assert done.returncode == 0, done.stderr
    bad = sisa(["delete", "--store", store, "--ids", "599999"], run_dir)
    assert bad.returncode == 2 and "599999" in bad.stderr  # the caller's own error names it, on its stderr only
    log = worker_log(run_dir)
    assert log.count(" ran delete") == 3, log
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    for path in run_dir.glob("sisa-*/*.log"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_the_worker_starts_after_the_command_that_starts_it(store: str, run_dir: Path) -> None:
    done = sisa(["delete", "--store", store, "--ids", "5", "--json"], run_dir)
    assert done.returncode == 0, done.stderr
    certified = json.loads(done.stdout)["applied_at"]
    wait_for_socket(run_dir)
    # The caller makes the lock file just before it starts the worker (process start times are
    # rounded to whole seconds of boot time; a file's are not).
    (lock,) = run_dir.glob("sisa-*/worker-*.lock")
    assert lock.stat().st_mtime >= certified  # after the command's work: never competing with it


def test_the_workers_side_by_side_children_stay_warm_between_commands(store: str, run_dir: Path) -> None:
    with Ensemble.open(store, readonly=True) as ens:
        where = ens.locate(list(range(60)))
    by_shard: dict[int, list[int]] = {}
    for sample, (shard, _) in sorted(where.items()):
        by_shard.setdefault(shard, []).append(sample)
    warm(store, run_dir, first_id=by_shard[0][0])
    env = worker_env(run_dir)
    env["SISA_RUNNER"] = "parallel"  # two shards a command, in the worker's pinned children
    for n in (1, 2):
        argv = ["delete", "--store", store, "--ids", str(by_shard[0][n]), str(by_shard[1][n]), "--json"]
        done = subprocess.run([sys.executable, "-m", "sisa.cli", *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["runner"] == "parallel"
    assert worker_log(run_dir).count("ran delete: exit 0") == 2  # the second found the children it left
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.pending() == [] and len(ens.certificates()) == 3


def test_a_worker_that_a_command_niced_ends_after_it(store: str, run_dir: Path) -> None:
    sock = warm(store, run_dir)  # a worker at niceness 0
    # A caller would take a --nice 5 command to a worker of its own (tests/cli/test_cli_worker.py); sent here
    # anyway, it runs niced, and the worker, which nothing unprivileged can un-nice, ends after it.
    answers = ask(sock, request(sock, ["delete", "--store", store, "--ids", "7", "--nice", "5"], run_dir))
    assert answers[-1] == Kind.EXIT + b"0", answers
    wait_until(lambda: not worker_processes(run_dir), what="the niced worker to end")
    assert "a command left it at niceness 5 (started at 0)" in worker_log(run_dir)
    done = sisa(["delete", "--store", store, "--ids", "8", "-v"], run_dir)
    assert done.returncode == 0 and "this command runs at niceness 0" in done.stderr, done.stderr
    wait_for_socket(run_dir)
    assert [p.nice() for p in worker_processes(run_dir)] == [0]
