"""The CLI is quiet by default: Ray's own log lines go to a file, ``-v`` shows them, errors still print.

Each command runs in its own process with no Ray up, so its local Ray instance really starts
(and logs ``Started a local Ray instance``), with ``SISA_LOG_DIR`` pointing at the test's folder.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from tests.conftest import blobs, npz_config, small_config

# A line as Ray's driver logger writes it: "2026-01-01 12:00:00,123\tINFO worker.py:2038 -- ...".
RAY_LINE = re.compile(r"^\S+ \S+\t[A-Z]+ \S+\.py:\d+ -- ", re.MULTILINE)
STARTED = "Started a local Ray instance"


def sisa(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sisa.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_ray_lines_go_to_the_log_file_unless_verbose_and_errors_still_print(
    tmp_path: Path, env_python: dict[str, str]
) -> None:
    config = npz_config(tmp_path, "epochs: 2")
    logs = tmp_path / "logs"
    env = {k: v for k, v in env_python.items() if k != "RAY_ADDRESS"}
    env["SISA_LOG_DIR"] = str(logs)
    store = tmp_path / "st"

    # Default: only sisa's own output; Ray's start-up lines are in the log file.
    out = sisa(["train", "--config", str(config), "--store", str(store), "--json"], env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["trained"] == {"0": [1, 2], "1": [1, 2]}
    assert not RAY_LINE.search(out.stderr) and "worker.py:" not in out.stderr, out.stderr
    assert STARTED in (logs / "ray-train.log").read_text()
    assert not (store / "logs").exists()  # the store holds no log files

    # -v: Ray's lines on stderr as Ray writes them, none into the file.
    (logs / "ray-train.log").unlink()
    verbose = {**env, "SISA_RUNNER": "ray", "SISA_WORKER": "0"}
    out = sisa(["delete", "--store", str(store), "--ids", "5", "-v"], verbose)
    assert out.returncode == 0, out.stderr
    assert STARTED in out.stderr and RAY_LINE.search(out.stderr), out.stderr
    assert not list(logs.glob("ray-*.log"))

    # An error still prints with -v, exit 2: a store path that cannot be a store is refused before Ray starts.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a store")
    out = sisa(["train", "--config", str(config), "--store", str(taken), "-v"], env)
    assert out.returncode == 2, out.stderr
    assert re.search(r"^error: .*exists and is not empty", out.stderr, re.MULTILINE), out.stderr
    assert STARTED not in out.stderr and "Traceback" not in out.stderr
    assert not list(logs.glob("ray-*.log"))

    # An error before Ray is needed: the message alone, and no log file.
    out = sisa(["delete", "--store", str(store), "--ids", "999999"], env)
    assert out.returncode == 2
    assert out.stderr.startswith("error: 1 id(s) are not in the store") and len(out.stderr.splitlines()) == 1
    assert not (logs / "ray-delete.log").exists()


def test_the_cli_in_process_gives_ray_its_logging_back(tmp_path: Path) -> None:
    import ray  # noqa: F401  # installs Ray's own handler on the "ray" logger

    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate, ray_logger.level)
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--store", str(tmp_path / "st")]) == 2
    assert (list(ray_logger.handlers), ray_logger.propagate, ray_logger.level) == before


def test_a_reader_that_closes_stdout_gets_no_traceback(tmp_path: Path, env_python: dict[str, str]) -> None:
    # `sisa status | head -1` on a long table: the pipe closes before sisa is done writing.
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(*blobs())
    child = subprocess.Popen(
        [sys.executable, "-m", "sisa.cli", "status", "--store", str(tmp_path / "st")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_python,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # every write now fails with EPIPE
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and err == ""  # as a process killed by SIGPIPE, silently
