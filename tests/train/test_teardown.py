"""Ending the local Ray instance a process started: every process of its tree, and the flag reset.

The instance runs in a child process, so this test process never has Ray up (and the session's
shared instance, if another test started one, is never touched).
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from sisa.train import ray_session

# The child: starts a local Ray instance through sisa, runs a task whose worker starts a
# grandchild (a long sleep), prints every pid of its own tree, then abandons the instance.
_CHILD = r"""
import json, os, subprocess, sys
import psutil, ray
from sisa.train import ray_session

ray_session.connect(num_cpus=1)
assert ray_session.started_local_instance()

@ray.remote
def spawn():
    # A grandchild of the raylet: the worker's own child, which outlives the task.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return os.getpid(), child.pid

worker, grandchild = ray.get(spawn.remote())
tree = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"worker": worker, "grandchild": grandchild, "tree": tree}), flush=True)
assert ray_session.abandon_local_instance()
assert not ray_session.started_local_instance()
sys.stdout.flush()
os._exit(0)
"""


def _alive(pids: list[int]) -> list[str]:
    """The processes of ``pids`` still running (a zombie waiting for its reaper has ended)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    # Not a timing assert: SIGKILL is delivered asynchronously, so give the kernel a moment to end them.
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    return [f"{p.pid} {p.name()} {p.status()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_abandon_kills_every_descendant_of_the_local_instance(env_python: dict[str, str]) -> None:
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env_python, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["worker"] in seen["tree"] and seen["grandchild"] in seen["tree"]
    assert _alive(seen["tree"]) == []


def test_shutdown_forgets_the_local_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-ins for Ray: the real shutdown would stop the session's shared instance.
    stopped: list[bool] = []
    monkeypatch.setattr(ray_session, "_started_local", True)
    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray_session.ray, "shutdown", lambda: stopped.append(True))
    assert ray_session.started_local_instance()

    ray_session.shutdown()

    assert stopped == [True]
    # A cluster joined afterwards (Ray up again) is not an instance this process started.
    assert not ray_session.started_local_instance()
