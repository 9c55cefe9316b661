"""Small jobs skip Ray: a one-shard deletion from the command line trains on this machine, in place.

Without ``--address`` (and ``RAY_ADDRESS``) the plan decides the runner from its measured costs
(:func:`sisa.train.orchestrator.plan_runner`): small retrains train without Ray, a store never
trained starts Ray for more than one shard, ``SISA_RUNNER`` forces a runner. The bytes must not
depend on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sisa.cli import launch
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from sisa.train import orchestrator
from sisa.train.domain import PIN_VARS
from tests.conftest import small_config, trained_blobs_store


def plain_env(env_python: dict[str, str], **extra: str) -> dict[str, str]:
    """A shell's environment: no pins, no runner, no cluster."""
    env = {k: v for k, v in env_python.items() if k not in PIN_VARS}
    for name in ("SISA_RUNNER", "RAY_ADDRESS", launch.REEXEC_ENV):
        env.pop(name, None)
    env.update(extra)
    return env


def sisa(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``python -m sisa.cli ARGS``; the result and the process id (its Ray session is named after it)."""
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sisa.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    _STARTED[proc.pid] = started
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


# When each process run by :func:`sisa` started: pids are reused, and a machine's /tmp/ray may keep the
# session folders of an earlier process with the same pid (seen on a long-lived dev machine).
_STARTED: dict[int, float] = {}


def ray_sessions(pid: int) -> list[Path]:
    """Ray session folders a driver of process ``pid`` created (Ray names them after the driver's pid)."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    since = _STARTED.get(pid, 0.0) - 1.0  # a second of slack for coarse file times
    return sorted(p for p in root.glob(f"session_*_{pid}") if p.stat().st_mtime >= since)


def still_running(pid: int, seconds: float = 15.0) -> list[str]:
    """:func:`running_in_session` once the SIGKILLed processes had time to die (they are gone in ms)."""
    deadline = time.monotonic() + seconds
    while (found := running_in_session(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def running_in_session(pid: int) -> list[str]:
    """Processes (not zombies) still running whose command line names that driver's Ray session."""
    pattern = re.compile(rf"session_[0-9_\-]+_{pid}\b")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and pattern.search(cmd):
            found.append(f"{entry}: {cmd[:100]}")
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained store (S=3, R=3), trained without Ray."""
    return trained_blobs_store(tmp_path_factory.mktemp("quick") / "st")


def test_one_shard_deletion_skips_ray_in_place_and_matches_ray_bit_for_bit(
    trained: Path, tmp_path: Path, env_python: dict[str, str]
) -> None:
    local, forced = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(trained, local)
    shutil.copytree(trained, forced)
    with Ensemble.open(trained, readonly=True) as ens:
        shard = str(ens.locate([17])[17][0])

    out, pid = sisa(["delete", "--store", str(local), "--ids", "17", "--json", "-v"], plain_env(env_python))
    assert out.returncode == 0, out.stderr
    cert = json.loads(out.stdout)
    assert cert["runner"] == "local" and cert["retrained_shards"] == [int(shard)]
    assert ray_sessions(pid) == []  # no Ray instance was started
    assert "on the local runner" in out.stderr
    # The command restarted itself with the store's pins and trained in place: no pinned child process.
    assert "child process" not in out.stderr, out.stderr

    out, pid = sisa(
        ["delete", "--store", str(forced), "--ids", "17", "--json"], plain_env(env_python, SISA_RUNNER="ray")
    )
    assert out.returncode == 0, out.stderr
    via_ray = json.loads(out.stdout)
    assert via_ray["runner"] == "ray" and ray_sessions(pid)  # it did start Ray ...
    time.sleep(1.0)
    assert still_running(pid) == []  # ... and left nothing of it running after exiting without ray.shutdown()

    assert cert["shards"][shard]["live_weights"] == via_ray["shards"][shard]["live_weights"]
    assert cert["shards"][shard]["new_checkpoints"] == via_ray["shards"][shard]["new_checkpoints"]

    # verify of every shard is a plan of 3 tiny shards: the measured costs keep it off Ray.
    out, pid = sisa(["verify", "--store", str(local), "--json"], plain_env(env_python))
    assert out.returncode == 0, out.stderr + out.stdout
    verdict = json.loads(out.stdout)
    assert verdict["ok"] and verdict["runner"] in ("local", "parallel") and ray_sessions(pid) == []
    # Forced onto Ray, it replays the shard trained in place to the same bytes.
    out, pid = sisa(["verify", "--store", str(local), "--json"], plain_env(env_python, SISA_RUNNER="ray"))
    assert out.returncode == 0, out.stderr + out.stdout
    verdict = json.loads(out.stdout)
    assert verdict["ok"] and verdict["runner"] == "ray"
    assert verdict["shards"][shard]["replay_weights"] == cert["shards"][shard]["live_weights"]
    time.sleep(1.0)
    assert still_running(pid) == []


def test_several_small_shards_skip_ray_and_the_override_forces_local(
    trained: Path, tmp_path: Path, env_python: dict[str, str]
) -> None:
    store = tmp_path / "st"
    shutil.copytree(trained, store)
    with Ensemble.open(trained, readonly=True) as ens:
        where = ens.locate(list(range(60)))
    by_shard: dict[int, int] = {}
    for sample, (shard, _) in where.items():
        by_shard.setdefault(shard, sample)
    two = [str(by_shard[k]) for k in sorted(by_shard)[:2]]
    out, pid = sisa(
        ["delete", "--store", str(store), "--ids", *two, "--json"], plain_env(env_python, SISA_RUNNER="local")
    )
    assert out.returncode == 0, out.stderr
    cert = json.loads(out.stdout)
    assert cert["runner"] == "local" and len(cert["retrained_shards"]) == 2
    assert ray_sessions(pid) == []
    # Without an override the measured costs decide: two tiny retrains never pay a Ray start.
    auto = tmp_path / "auto"
    shutil.copytree(trained, auto)
    out, pid = sisa(["delete", "--store", str(auto), "--ids", *two, "--json"], plain_env(env_python))
    assert out.returncode == 0, out.stderr
    chosen = json.loads(out.stdout)
    assert chosen["runner"] in ("local", "parallel") and ray_sessions(pid) == []
    assert {k: v["live_weights"] for k, v in chosen["shards"].items()} == {
        k: v["live_weights"] for k, v in cert["shards"].items()
    }


def test_choose_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(orchestrator.RUNNER_ENV, raising=False)
    monkeypatch.setattr(orchestrator.ray, "is_initialized", lambda: False)
    assert orchestrator.choose_runner(None, 1) == "local"
    assert orchestrator.choose_runner(None, 2) == "ray"
    assert orchestrator.choose_runner("local", 8) == "local"
    assert orchestrator.choose_runner("host:6379", 1) == "ray"  # a named cluster always
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "ray")
    assert orchestrator.choose_runner(None, 1) == "ray"
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "local")
    assert orchestrator.choose_runner(None, 8) == "local"
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "spark")
    with pytest.raises(ConfigError, match="SISA_RUNNER"):
        orchestrator.choose_runner(None, 1)
    monkeypatch.delenv(orchestrator.RUNNER_ENV)
    monkeypatch.setattr(orchestrator.ray, "is_initialized", lambda: True)
    assert orchestrator.choose_runner(None, 1) == "ray"  # Ray already up here: no start-up to save


def test_which_commands_restart_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SISA_RUNNER", raising=False)
    assert launch.training_command(["delete", "--store", "s", "--ids", "1"]) == "s"
    assert launch.training_command(["verify", "--store=s"]) == "s"
    assert launch.training_command(["delete", "--store", "s", "--ids", "1", "--address", "local"]) == "s"
    assert launch.training_command(["delete", "--store", "s", "--ids", "1", "--defer"]) is None
    assert launch.training_command(["delete", "--store", "s", "--ids", "1", "--address", "h:6379"]) is None
    assert launch.training_command(["status", "--store", "s"]) is None
    monkeypatch.setenv("SISA_RUNNER", "ray")
    assert launch.training_command(["delete", "--store", "s", "--ids", "1"]) is None
    assert not launch.command_line()  # pytest is not the sisa command: an import never restarts it


def test_store_cpu_isa_reads_the_stored_config(trained: Path, tmp_path: Path) -> None:
    assert launch.store_cpu_isa(str(trained)) == small_config().resources.cpu_isa
    assert launch.store_cpu_isa(str(tmp_path / "missing")) is None
