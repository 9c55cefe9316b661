"""A real Ray cluster on loopback: ``ray job submit`` trains, deletes and verifies with every shard on a worker node.

The cluster is started and torn down here: a head node (runs the job driver, the only process that
sees the store; it offers no ``sisa_worker`` resource) and two worker nodes offering ``sisa_worker``.
The config's ``resources.custom: {sisa_worker: 1}`` pins every shard task to a worker node. Each worker
node runs in its own mount namespace where the driver's directory (store, data, config) is an empty
tmpfs, so a shard task that tried to read the store would find nothing: shards get their data and
return their checkpoints through Ray's object store only; the deletion and verify jobs run with
``resources.stream_slices`` and one shard task in flight, so their slices are fetched one object at a
time from the head's object store. The second test SIGKILLs a worker node in
the middle of a training job: the driver resubmits the shard from the last stage it received, the
other worker node runs it, and the job ends with
the same bytes as an undisturbed training, which ``verify`` confirms.

Determinism domains: the second worker node runs with ``ATEN_CPU_CAPABILITY=default`` in its
environment, another CPU kernel level than the first. Under the default ``resources.cpu_isa: avx2``
both nodes' workers are pinned alike and form one domain (``sisa domains`` says so). A third test adds
a worker node of that other level and trains a ``native`` store on it and on the first worker: the two
shards land in two domains; the deletion's retrain and verify's replay of each shard run on a node of
its own domain; with that node killed, verify reports the shard as not checkable (exit 2) and a
deletion in it rebinds it from scratch onto the remaining domain, after which verify passes.

Ray rewrites ``--node-ip-address=127.0.0.1`` (and ``localhost``) to the machine's routable address, so
the nodes take other loopback addresses, which Ray uses literally: 127.0.0.2 (head), 127.0.0.3 and
127.0.0.4 (workers). Every port is picked free, the dashboard listens on 127.0.0.1 only, and the
cluster has its own auth token. Only what this module started is stopped: each node is its own
session (``setsid``) and teardown SIGKILLs the members of those sessions; never ``ray stop``, which
stops every Ray instance of the user on the machine (other test sessions may run one). A watchdog
does the same if pytest itself dies.
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from sisa.store.digests import recipe_digest
from sisa.train.domain import PIN_VARS
from tests.conftest import ROOT, blobs, live_state, store_digest

pytestmark = pytest.mark.cluster

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# Ray's dashboard and job server dependencies (what ray[default] adds), installed beside the venv by
# scripts/setup_env.sh so that the many local Ray starts of the rest of the suite stay minimal.
DASHBOARD_DEPS = Path(sys.prefix) / "ray-dashboard"
HEAD_IP = "127.0.0.2"
WORKER_IPS = ("127.0.0.3", "127.0.0.4")
MIXED_IP = "127.0.0.5"  # the node of another kernel level that the domain test adds
OTHER_LEVEL = {"ATEN_CPU_CAPABILITY": "default"}  # never the native level of an x86-64 machine
SHARDS, SLICES = 2, 3
DELETE_IDS = [5, 17, 123, 4000]


# ---------------------------------------------------------------------------------------------
# Unit checks of the placement knob (no cluster needed)


def test_custom_resources_knob_is_validated() -> None:
    assert load_config(None, ["resources.custom.sisa_worker=1"]).resources.custom == {"sisa_worker": 1}
    assert load_config(None, ["resources.custom={a: 0.5, b: 2}"]).resources.custom == {"a": 0.5, "b": 2}
    assert load_config(None).resources.custom == {}
    # Placement is not part of the recipe: the same weights wherever a shard runs.
    assert recipe_digest(load_config(None, ["resources.custom.x=1"])) == recipe_digest(load_config(None))
    for bad, message in [
        ("resources.custom.CPU=1", "built-in"),
        ("resources.custom.GPU=1", "built-in"),
        ("resources.custom.x=0", "fraction in (0, 1] or a whole number"),
        ("resources.custom.x=1.5", "fraction in (0, 1] or a whole number"),
        ("resources.custom.x=-1", "fraction in (0, 1] or a whole number"),
        ("resources.custom.x=.inf", "fraction in (0, 1] or a whole number"),
        ("resources.custom.x=true", "must be a number"),
        ("resources.custom.x=abc", "must be a number"),
        ("resources.custom=[1]", "must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [bad])


# ---------------------------------------------------------------------------------------------
# Processes: every node is its own session; only those sessions are ever signalled


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if pytest dies, so no node outlives the test run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL every process of session ``sid`` (a node we started); returns how many were signalled.

    A session id cannot be handed to another process while any member of the session lives
    (Linux keeps the pid reserved), so this never reaches a process that we did not start.
    """
    killed = 0
    for _ in range(20):  # a member may fork while we kill: repeat until the session is empty
        pids = session_members(sid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return killed


def start_reaper(base: Path) -> subprocess.Popen[str]:
    """A watchdog in its own session: when its stdin closes, it kills the node sessions listed there.

    Normally teardown has killed them already and the reaper finds nothing; if pytest itself is
    killed, its end of the pipe closes and the reaper stops whatever the nodes left (Ray's agents
    outlive a SIGKILLed ``ray start``) and removes ``base``.
    """
    code = "\n".join(
        [
            "import os, shutil, signal, sys, time",
            "from pathlib import Path",
            inspect.getsource(session_members),
            inspect.getsource(kill_session),
            "sids = [int(line) for line in sys.stdin]",  # blocks until the test process is gone
            "for sid in sids:",
            "    kill_session(sid)",
            "shutil.rmtree(sys.argv[1], ignore_errors=True)",
        ]
    )
    argv = [sys.executable, "-c", code, str(base)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, start_new_session=True)


_TAKEN: set[int] = set()  # ports handed out to this module's nodes, which bind them only later


def free_ports(n: int) -> list[int]:
    """``n`` ports that are free now, never handed out before, and outside the ephemeral range.

    A node binds its fixed ports only once its processes start, while Ray's other components
    take ephemeral ports (port 0) as they come up. A fixed port drawn from the ephemeral range
    (as ``bind(("", 0))`` draws) can therefore be taken by another node's component in between:
    a raylet then posted to a stranger's HTTP server and got "405 Method Not Allowed". Ports
    below the range are never assigned by the OS, so only another fixed port could clash, and
    ``_TAKEN`` rules that out.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = secrets.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, max(20001, low))
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _TAKEN.add(port)
        ports.append(port)
    return ports


def can_hide_directories() -> bool:
    """Whether ``unshare --mount`` works here (root, or user namespaces), to hide the store from workers."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def dashboard_pythonpath() -> str | None:
    """PYTHONPATH that gives Ray processes the dashboard's dependencies, '' if they are installed, else None."""
    if all(importlib.util.find_spec(m) for m in ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client")):
        return ""
    if any(DASHBOARD_DEPS.glob(".installed-ray-*")):
        return str(DASHBOARD_DEPS)
    return None


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen[bytes]
    log: Path
    hidden: Path | None  # the directory this node's processes see as an empty tmpfs

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        killed = kill_session(self.proc.pid)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent; should not happen
            pass
        return killed

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Cluster:
    """A head node and worker nodes started with ``ray start --block``, each in its own session."""

    def __init__(self, base: Path, pythonpath: str, hide: bool) -> None:
        self.base = base
        self.driver = base / "driver"  # store, data, config: the driver's side only
        self.driver.mkdir()
        self.hide = self.driver if hide else None  # hidden from the worker nodes
        self.token = secrets.token_hex(32)
        self.nodes: list[Node] = []
        # No RAY_ settings and no kernel pins of the test process: each node's level is its own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in PIN_VARS}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job entrypoint is ours
            PYTHONPATH=pythonpath,
            RAY_AUTH_MODE="token",  # this cluster's own token, never ~/.ray/auth_token
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # Notice a dead node within seconds rather than the default half minute.
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="3000",
            RAY_health_check_failure_threshold="5",
            NO_PROXY="127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,localhost",
            no_proxy="127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,localhost",
        )
        self.env = env
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.gcs = self.url = ""
        self.reaper = start_reaper(base)

    def start_head(self) -> None:
        gcs, dash, agent_http, agent_grpc, metrics, runtime_env, client = free_ports(7)
        self.gcs = f"{HEAD_IP}:{gcs}"
        self.url = f"http://127.0.0.1:{dash}"
        head = self._start(
            "head",
            HEAD_IP,
            [
                "--head",
                f"--port={gcs}",
                "--num-cpus=1",  # it could run a shard: only resources.custom keeps shards off it
                "--include-dashboard=true",  # the job server lives in the dashboard
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
            ],
            [agent_http, agent_grpc, metrics, runtime_env],
            hidden=None,
        )
        deadline = time.monotonic() + 120
        while not self._port_open(HEAD_IP, gcs):
            self._check_started(head, deadline)
            time.sleep(0.2)

    def _start(
        self,
        name: str,
        ip: str,
        args: list[str],
        ports: list[int],
        hidden: Path | None,
        env: dict[str, str] | None = None,
    ) -> Node:
        agent_http, agent_grpc, metrics, runtime_env = ports
        temp = self.base / name
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--temp-dir={temp}",
            *args,
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            "--min-worker-port=0",  # random worker ports, never the fixed default range
            "--max-worker-port=0",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]
        if hidden is not None:
            # A private mount namespace in which `hidden` is an empty tmpfs: this node cannot read it.
            cmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o size=1m sisa-hidden "$0" && exec "$@"',
                str(hidden),
                *cmd,
            ]
        log = self.base / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        node = Node(name, ip, proc, log, hidden)
        self.nodes.append(node)
        assert self.reaper.stdin is not None
        self.reaper.stdin.write(f"{proc.pid}\n")
        self.reaper.stdin.flush()
        return node

    def add_worker(
        self, name: str, ip: str, resources: dict[str, float] | None = None, env: dict[str, str] | None = None
    ) -> Node:
        """A worker node with 2 CPUs; ``env`` is added to its processes' environment (its workers inherit it)."""
        offers = resources if resources is not None else {"sisa_worker": 4}
        return self._start(
            name,
            ip,
            [f"--address={self.gcs}", "--num-cpus=2", "--resources", json.dumps(offers)],
            free_ports(4),
            hidden=self.hide,
            env=env,
        )

    @staticmethod
    def _port_open(host: str, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, port)) == 0

    @staticmethod
    def _check_started(node: Node, deadline: float) -> None:
        if not node.alive():
            pytest.fail(f"ray start for the {node.name} node exited:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the {node.name} node did not come up in time:\n{node.log_tail()}")

    def api(self, path: str) -> Any:
        """GET a dashboard REST endpoint (jobs, state API) with this cluster's token."""
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with self.opener.open(req, timeout=20) as resp:
            return json.load(resp)

    def alive_nodes(self) -> dict[str, dict[str, Any]]:
        """node_ip -> node record, for nodes the GCS holds alive."""
        nodes = self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        return {n["node_ip"]: n for n in nodes if n["state"] == "ALIVE"}

    def wait_for_nodes(self, ips: list[str], timeout: float = 180) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.ip in ips:
                    self._check_started(node, deadline)
            try:
                alive = self.alive_nodes()
                if set(ips) <= set(alive):
                    return alive
            except OSError:  # the dashboard is still starting
                pass
            time.sleep(0.5)

    def submit(
        self, workdir: Path, commands: list[list[str]], *, wait: bool, submission_id: str, exit_codes: bool = False
    ) -> str:
        """``ray job submit`` the sisa CLI commands (run one after another) with ``workdir`` shipped.

        With ``exit_codes`` every command runs whatever the one before returned, and prints
        ``sisa-exit=N`` after itself, for commands expected to fail.
        """
        lines = [shlex.join(["python", "-m", "sisa.cli", *cmd]) for cmd in commands]
        entry = "; ".join(f"{line}; echo sisa-exit=$?" for line in lines) if exit_codes else " && ".join(lines)
        argv = [RAY, "job", "submit", "--address", self.url, "--working-dir", str(workdir)]
        argv += ["--submission-id", submission_id, *(["--no-wait"] if not wait else []), "--", "sh", "-c", entry]
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"ray job submit failed ({out.returncode}):\n{out.stdout[-4000:]}{out.stderr}"
        return out.stdout

    def job(self, submission_id: str) -> dict[str, Any]:
        return dict(self.api(f"/api/jobs/{submission_id}"))

    def job_logs(self, submission_id: str) -> str:
        return str(self.api(f"/api/jobs/{submission_id}/logs")["logs"])

    def wait_job(self, submission_id: str, timeout: float = 400) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(submission_id)
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return job
            time.sleep(0.5)
        pytest.fail(f"job {submission_id} did not finish in {timeout} s:\n{self.job_logs(submission_id)[-4000:]}")

    def shard_tasks(self) -> list[dict[str, Any]]:
        """Every attempt of every ``sisa-shard-*`` task this cluster ran, from Ray's state API.

        (Filtering by job would miss some: each sisa command of a submission is its own Ray job,
        and the jobs API names only one driver per submission.)
        """
        tasks = self.api("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
        return [t for t in tasks if str(t.get("name", "")).startswith("sisa-shard-")]

    def new_shard_tasks(self, known: set[tuple[str, str]], expect: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Attempts of shard tasks not in ``known``, once ``expect`` of them have ended (events lag a little)."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = [t for t in self.shard_tasks() if (t["job_id"], t["task_id"]) not in known]
            ended = all(t["state"] in ("FINISHED", "FAILED") for t in tasks)
            if (len(task_keys(tasks)) >= expect and ended) or time.monotonic() > deadline:
                return tasks
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.kill()
        assert self.reaper.stdin is not None
        self.reaper.stdin.close()  # the reaper finds the sessions empty and exits
        self.reaper.wait(timeout=30)


def task_keys(tasks: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(t["job_id"], t["task_id"]) for t in tasks}


def json_lines(text: str) -> list[dict[str, Any]]:
    """The one-line JSON objects that ``sisa ... --json`` printed, in order, from a job's log."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def live_weights(store: Path) -> dict[int, tuple[str, str]]:
    with Ensemble.open(store, readonly=True) as ens:
        return live_state(ens)


# ---------------------------------------------------------------------------------------------
# Fixtures: one cluster and one workload for the module


@dataclass
class Workload:
    driver: Path  # store, data, config: on the driver's side only
    workdir: Path  # what `ray job submit --working-dir` ships (the sisa package)
    config: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    pythonpath = dashboard_pythonpath()
    if pythonpath is None:
        pytest.skip(
            "Ray's dashboard dependencies (ray[default]) are missing: "
            f"bash scripts/setup_env.sh puts them in {DASHBOARD_DEPS}"
        )
    serve_dir = Path(sys.prefix) / "ray-serve"  # Ray Serve's packages (setup_env.sh), for the serving test
    if serve_dir.is_dir():
        pythonpath = os.pathsep.join(p for p in (pythonpath, str(serve_dir)) if p)
    # Short paths: Ray's unix sockets live under the temp dirs and are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="sisa-cl-", dir="/tmp"))
    c: Cluster | None = None
    try:
        c = Cluster(base, pythonpath, hide=can_hide_directories())
        c.start_head()
        # worker1 also offers sisa_mixed, for the domain test; worker2 runs at another kernel level.
        c.add_worker("worker1", WORKER_IPS[0], {"sisa_worker": 4, "sisa_mixed": 4})
        c.add_worker("worker2", WORKER_IPS[1], env=OTHER_LEVEL)
        c.wait_for_nodes([HEAD_IP, *WORKER_IPS])
        yield c
    finally:
        if c is not None:
            c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def workload(cluster: Cluster) -> Workload:
    driver = cluster.driver
    x, y = blobs(6000, d=10)
    np.savez(driver / "train.npz", x=x, y=y)
    xt, yt = blobs(300, d=10, seed=0)
    np.savez(driver / "test.npz", x=xt, y=yt)
    config = driver / "cluster.yaml"
    config.write_text(
        f"""seed: 0
shards: {SHARDS}
slices: {SLICES}
data: {{dataset: npz, train: {driver / "train.npz"}, test: {driver / "test.npz"}, num_classes: 3}}
model: {{name: mlp, hidden: [16]}}
train: {{epochs: 24, batch_size: 32, lr: 0.01}}
resources: {{cpus_per_shard: 1, threads_per_shard: 1, max_retries: 3, custom: {{sisa_worker: 1}}}}
"""
    )
    workdir = cluster.base / "workdir"  # outside `driver`, which the workers cannot see
    shutil.copytree(ROOT / "sisa", workdir / "sisa", ignore=shutil.ignore_patterns("__pycache__"))
    return Workload(driver, workdir, config)


@pytest.fixture(scope="module")
def reference(cluster: Cluster, workload: Workload) -> dict[str, Any]:
    """An undisturbed training job; its live checkpoints are what every other run must reproduce."""
    store = workload.driver / "reference"
    sid = f"sisa-train-{secrets.token_hex(4)}"
    known = task_keys(cluster.shard_tasks())
    out = cluster.submit(
        workload.workdir,
        [["train", "--config", str(workload.config), "--store", str(store), "--json"]],
        wait=True,
        submission_id=sid,
    )
    job = cluster.job(sid)
    assert job["status"] == "SUCCEEDED", out[-4000:]
    results = json_lines(cluster.job_logs(sid))
    assert results and results[-1]["trained"] == {str(k): list(range(1, SLICES + 1)) for k in range(SHARDS)}
    tasks = cluster.new_shard_tasks(known, SHARDS)
    return {"store": store, "live": live_weights(store), "train": results[-1], "tasks": tasks}


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.cluster
def test_job_submit_runs_every_shard_on_a_worker_node(
    cluster: Cluster, workload: Workload, reference: dict[str, Any]
) -> None:
    store: Path = reference["store"]
    sid = f"sisa-delete-verify-{secrets.token_hex(4)}"
    known = task_keys(cluster.shard_tasks())
    cluster.submit(
        workload.workdir,
        [
            # From here on the slices travel one object each and one shard task at a time: the
            # deletion's retrain and verify's replay fetch them across nodes (no shared filesystem).
            ["train", "--store", str(store), "resources.stream_slices=true", "resources.max_shards_in_flight=1"],
            ["delete", "--store", str(store), "--ids", *map(str, DELETE_IDS), "--json"],
            ["verify", "--store", str(store), "--json"],
            ["domains", "--store", str(store), "--json"],
        ],
        wait=True,
        submission_id=sid,
    )
    job = cluster.job(sid)
    logs = cluster.job_logs(sid)
    assert job["status"] == "SUCCEEDED", logs[-4000:]
    certificate, verified, found = json_lines(logs)[-3:]
    assert certificate["deleted"] == len(DELETE_IDS) and certificate["retrained_shards"]
    assert verified["ok"] is True, verified

    # Pinned by default: worker2 runs at another kernel level (OTHER_LEVEL in its environment), yet
    # under resources.cpu_isa: avx2 both worker nodes' shard workers are in one determinism domain,
    # the one every shard was trained in.
    alive = cluster.alive_nodes()
    (domain,) = found["available"]
    assert sorted(domain["nodes"]) == sorted(alive[ip]["node_id"] for ip in WORKER_IPS), found
    assert domain["domain"]["cpu_kernels"] == "AVX2" and domain["domain"]["mkl_cbwr"] == "AVX2,STRICT"
    assert domain["shards"] == list(range(SHARDS)) and found["missing"] == []

    # Where the shard tasks ran, from Ray's state API: every attempt of every shard task of the
    # three jobs (train, the deletion's retrain, verify's replay) on a worker node, none on the head.
    workers = {alive[ip]["node_id"]: ip for ip in WORKER_IPS if ip in alive}
    head = alive[HEAD_IP]["node_id"]
    retrains_and_replays = len(certificate["retrained_shards"]) + SHARDS
    tasks = reference["tasks"] + cluster.new_shard_tasks(known, retrains_and_replays)
    assert len(task_keys(tasks)) == SHARDS + retrains_and_replays, tasks
    assert all(t["state"] == "FINISHED" for t in tasks), [(t["name"], t["state"]) for t in tasks]
    assert {t["node_id"] for t in tasks} <= set(workers), (tasks, workers, head)
    assert head not in {t["node_id"] for t in tasks}

    # The workers could not have read the store: in their mount namespace the driver's directory
    # (store, data, config) is an empty tmpfs. The driver (on the head) sees it as usual.
    if cluster.hide is None:
        warnings.warn("unshare --mount is not permitted here: worker nodes could see the store", stacklevel=1)
        return
    for node in cluster.nodes[1:]:
        if node.alive():
            mounts = Path(f"/proc/{node.proc.pid}/mountinfo").read_text().splitlines()
            assert any(m.split()[4] == str(cluster.hide) and "tmpfs" in m for m in mounts), node.name
    assert (store / "data.mdb").exists()


DOCS = ROOT / "docs" / "cluster.md"
CUSTOM_MODEL = """
from torch import nn


def build(input_shape, num_classes, **options):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
"""


def documented_job_commands() -> str:
    """The bash block of docs/cluster.md's ``ray job submit`` section, as written there."""
    text = DOCS.read_text()
    section = text[text.index("### `ray job submit` (recommended)") :]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.cluster
def test_documented_job_submit_commands_work_verbatim(cluster: Cluster, workload: Workload) -> None:
    # The docs' lines, with their placeholders filled: the cluster's dashboard, its token, a config
    # and a store on the driver's side. Only the `pip install` line is left out (this venv already
    # has what `.[cluster]` adds, on the PYTHONPATH of cluster.env).
    block = documented_job_commands()
    store = workload.driver / "documented"
    filled = {
        "http://HEAD:8265": cluster.url,
        "RAY_AUTH_TOKEN=TOKEN": f"RAY_AUTH_TOKEN={cluster.token}",
        "configs/fashion_mnist.yaml": str(workload.driver / "documented.yaml"),
        "/data/sisa/fm": str(store),
    }
    for placeholder, value in filled.items():
        assert placeholder in block, placeholder
        block = block.replace(placeholder, value)
    script = "set -e\n" + "\n".join(line for line in block.splitlines() if not line.startswith("pip install"))
    # Data with the ids the docs delete; a custom model that the workers can only get from the
    # shipped working directory (the worker nodes cannot see the driver's directory either).
    x, y = blobs(400, d=10)
    ids = np.arange(400, dtype=np.int64)
    ids[:3] = [17, 4242, 9001]
    ids[3:] = np.arange(10_000, 10_397)
    np.savez(workload.driver / "documented.npz", x=x, y=y, ids=ids)
    (workload.driver / "documented.yaml").write_text(
        workload.config.read_text()
        .replace(str(workload.driver / "train.npz"), str(workload.driver / "documented.npz"))
        .replace("model: {name: mlp, hidden: [16]}", "model: {name: 'mymodels:build'}")
        .replace("train: {epochs: 24,", "train: {epochs: 2,")
    )
    repo = cluster.base / "repo"  # "a checkout of this repository": sisa/ and the custom model
    shutil.copytree(workload.workdir, repo)
    (repo / "mymodels.py").write_text(CUSTOM_MODEL)
    # The docs' `export` is what authenticates: the environment has no RAY_ settings of its own.
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    out = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.count("succeeded") >= 3, out.stdout[-4000:]
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.config.model.name == "mymodels:build"
        assert ens.status()["samples"] == 397
        assert [c["deleted"] for c in ens.certificates()] == [3]
        assert ens.audit().ok


@pytest.mark.cluster
def test_an_unset_address_starts_a_new_local_instance_beside_a_cluster_on_the_machine(
    cluster: Cluster, workload: Workload, env_python: dict[str, str]
) -> None:
    # Where Ray looks for "the cluster started on this machine" (what `ray start` writes): a bare
    # ray.init() would join it. sisa without an address must start its own instance instead.
    tmp = cluster.base / "t"
    (tmp / "ray").mkdir(parents=True)
    (tmp / "ray" / "ray_current_cluster").write_text(cluster.gcs)
    config = workload.driver / "local.yaml"
    config.write_text(
        workload.config.read_text().replace(", custom: {sisa_worker: 1}", "").replace("epochs: 24", "epochs: 2")
    )
    env = {k: v for k, v in env_python.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
    store = workload.driver / "local"
    # -v: Ray's own lines on stderr (by default they go to a log file), which say which instance it used.
    cmd = [
        sys.executable,
        "-m",
        "sisa.cli",
        "train",
        "--config",
        str(config),
        "--store",
        str(store),
        "--json",
        "-v",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Started a local Ray instance" in out.stderr, out.stderr[-4000:]
    assert "Connecting to existing Ray cluster" not in out.stderr


@pytest.mark.cluster
def test_the_right_address_without_the_token_fails_with_a_clear_error_and_changes_nothing(
    cluster: Cluster, workload: Workload, reference: dict[str, Any], env_python: dict[str, str]
) -> None:
    store: Path = reference["store"]
    before = store_digest(store)
    env = {k: v for k, v in env_python.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token")  # token mode, but no token anywhere Ray looks
    env.update(HOME=str(cluster.base / "nohome"))  # so no ~/.ray/auth_token either
    cmd = [
        sys.executable,
        "-m",
        "sisa.cli",
        "delete",
        "--store",
        str(store),
        "--ids",
        "7",
        "--address",
        cluster.gcs,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-4000:]
    assert f"error: could not join the Ray cluster at {cluster.gcs}" in out.stderr, out.stderr[-4000:]
    assert "RAY_AUTH_TOKEN" in out.stderr and "Traceback" not in out.stderr
    assert store_digest(store) == before  # joined before journaling: nothing written
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.pending() == []


def shard_nodes(tasks: list[dict[str, Any]]) -> dict[int, set[str]]:
    """Shard -> the node ids its (finished) task attempts ran on."""
    out: dict[int, set[str]] = {}
    for t in tasks:
        if t["state"] == "FINISHED":
            out.setdefault(int(t["name"].rsplit("-", 1)[1]), set()).add(t["node_id"])
    return out


@pytest.mark.cluster
def test_mixed_domains_route_each_shard_home_then_verify_refuses_and_deletion_rebinds(
    cluster: Cluster, workload: Workload
) -> None:
    # A node of another kernel level joins; a native store's two shards train one on each node (a
    # shard needs both CPUs of a node, so two at once cannot share one), hence in two domains.
    mixed = cluster.add_worker("mixed", MIXED_IP, {"sisa_mixed": 4}, env=OTHER_LEVEL)
    alive = cluster.wait_for_nodes([MIXED_IP, WORKER_IPS[0]])
    home = {alive[WORKER_IPS[0]]["node_id"]: "worker1", alive[MIXED_IP]["node_id"]: "mixed"}
    store = workload.driver / "mixed"
    config = workload.driver / "mixed.yaml"
    config.write_text(
        workload.config.read_text().replace(
            "resources: {cpus_per_shard: 1, threads_per_shard: 1, max_retries: 3, custom: {sisa_worker: 1}}",
            "resources: {cpus_per_shard: 2, threads_per_shard: 1, cpu_isa: native, custom: {sisa_mixed: 1}}",
        )
    )
    assert "cpu_isa: native" in config.read_text()
    known = task_keys(cluster.shard_tasks())
    sid = f"sisa-mixed-train-{secrets.token_hex(4)}"
    cluster.submit(
        workload.workdir,
        [
            ["train", "--config", str(config), "--store", str(store), "--json"],
            ["domains", "--store", str(store), "--json"],
        ],
        wait=True,
        submission_id=sid,
    )
    logs = cluster.job_logs(sid)
    assert cluster.job(sid)["status"] == "SUCCEEDED", logs[-4000:]
    found = json_lines(logs)[-1]
    trained_on = shard_nodes(cluster.new_shard_tasks(known, SHARDS))
    assert {home[next(iter(n))] for n in trained_on.values()} == {"worker1", "mixed"}, trained_on
    nodes_of = {d["domain"]["id"]: set(d["nodes"]) for d in found["available"]}
    assert len(nodes_of) == 2 and found["missing"] == [], found
    with Ensemble.open(store, readonly=True) as ens:
        domain_of = {s["shard"]: s["domain"]["id"] for s in ens.status()["per_shard"]}
        with ens.store.read() as txn:  # a sample of each shard's second slice: a retrain from stage 1
            victims = [int(ens.store.slice_ids(txn, s, 1)[0]) for s in range(SHARDS)]
    for shard, nodes in trained_on.items():
        assert nodes <= nodes_of[domain_of[shard]]  # each shard records the domain of the node it ran on

    # A deletion in both shards: each retrain continues its own chain, on a node of its domain; so
    # does each replay of verify.
    known = task_keys(cluster.shard_tasks())
    sid = f"sisa-mixed-delete-{secrets.token_hex(4)}"
    cluster.submit(
        workload.workdir,
        [
            ["delete", "--store", str(store), "--ids", *map(str, victims), "--json"],
            ["verify", "--store", str(store), "--json"],
        ],
        wait=True,
        submission_id=sid,
    )
    logs = cluster.job_logs(sid)
    assert cluster.job(sid)["status"] == "SUCCEEDED", logs[-4000:]
    certificate, verified = json_lines(logs)[-2:]
    assert verified["ok"] is True, verified
    for shard in range(SHARDS):
        info = certificate["shards"][str(shard)]
        assert info["rebound"] is False and info["from_slice"] == 2, info
        assert info["domain"]["id"] == domain_of[shard]
        assert verified["shards"][str(shard)]["replay_domain"]["id"] == domain_of[shard]
    tasks = cluster.new_shard_tasks(known, 2 * SHARDS)  # the retrains and the replays
    for shard, nodes in shard_nodes(tasks).items():
        assert nodes <= nodes_of[domain_of[shard]], (shard, nodes)

    # The node of one domain goes away: verify cannot replay its shard (exit 2, not FAIL); a deletion
    # in that shard rebinds it from scratch onto the remaining domain, after which verify passes.
    lost = next(s for s in range(SHARDS) if nodes_of[domain_of[s]] == {alive[MIXED_IP]["node_id"]})
    kept = 1 - lost
    assert mixed.kill() > 0
    deadline = time.monotonic() + 60
    while MIXED_IP in cluster.alive_nodes():
        assert time.monotonic() < deadline, "the killed node stayed alive in the GCS"
        time.sleep(0.5)
    with Ensemble.open(store, readonly=True) as ens, ens.store.read() as txn:
        again = int(ens.store.slice_ids(txn, lost, 2)[0])  # third slice: without a rebind, stage 2 on
    sid = f"sisa-mixed-lost-{secrets.token_hex(4)}"
    cluster.submit(
        workload.workdir,
        [
            ["verify", "--store", str(store), "--json"],
            ["delete", "--store", str(store), "--ids", str(again), "--json"],
            ["verify", "--store", str(store), "--json"],
        ],
        wait=True,
        submission_id=sid,
        exit_codes=True,
    )
    logs = cluster.job_logs(sid)
    assert re.findall(r"sisa-exit=(\d+)", logs) == ["2", "0", "0"], logs[-4000:]
    refused, certificate, verified = json_lines(logs)[-3:]
    assert refused["ok"] is False and refused["reason"] == "domain_unavailable", refused
    assert refused["shards"][str(lost)]["reason"] == "domain_unavailable"
    assert refused["shards"][str(lost)]["needs"]["id"] == domain_of[lost]
    assert refused["shards"][str(kept)]["ok"] is True
    info = certificate["shards"][str(lost)]
    assert info["rebound"] is True and info["from_slice"] == 1 and info["restart_stage"] == 0, info
    assert info["domain"]["id"] == domain_of[kept] and domain_of[lost] in info["rebind_reason"]
    assert verified["ok"] is True, verified
    assert {v["replay_domain"]["id"] for v in verified["shards"].values()} == {domain_of[kept]}


@pytest.mark.cluster
def test_worker_node_killed_mid_training_job_finishes_bit_identical(
    cluster: Cluster, workload: Workload, reference: dict[str, Any]
) -> None:
    store = workload.driver / "killed"
    sid = f"sisa-train-kill-{secrets.token_hex(4)}"
    known = task_keys(cluster.shard_tasks())
    cluster.submit(
        workload.workdir,
        [
            ["train", "--config", str(workload.config), "--store", str(store), "--json"],
            ["verify", "--store", str(store), "--json"],
        ],
        wait=False,
        submission_id=sid,
    )
    # Wait until a shard task runs on a worker node and has committed a stage but not its last:
    # then SIGKILL that node's whole process tree (raylet, workers, agents).
    alive = cluster.alive_nodes()
    by_id = {alive[ip]["node_id"]: ip for ip in WORKER_IPS if ip in alive}
    victim: Node | None = None
    killed_shard = -1
    deadline = time.monotonic() + 240
    while victim is None:
        assert time.monotonic() < deadline, f"no shard was ever mid-run:\n{cluster.job_logs(sid)[-4000:]}"
        job = cluster.job(sid)
        assert job["status"] in ("PENDING", "RUNNING"), cluster.job_logs(sid)[-4000:]
        if not (store / "data.mdb").exists():
            time.sleep(0.3)
            continue
        try:
            with Ensemble.open(store, readonly=True) as ens:
                done = {s["shard"]: s["stages_done"] for s in ens.status()["per_shard"]}
        except Exception:  # the store is being created
            time.sleep(0.3)
            continue
        for task in cluster.shard_tasks():
            if (task["job_id"], task["task_id"]) in known:
                continue
            shard = int(task["name"].rsplit("-", 1)[1])
            if task["state"] == "RUNNING" and task["node_id"] in by_id and 1 <= done.get(shard, 0) < SLICES:
                victim = next(n for n in cluster.nodes if n.ip == by_id[task["node_id"]])
                killed_shard = shard
                break
        else:
            time.sleep(0.3)
    assert victim.kill() > 0

    job = cluster.wait_job(sid)
    logs = cluster.job_logs(sid)
    assert job["status"] == "SUCCEEDED", logs[-6000:]
    trained, verified = json_lines(logs)[-2:]
    assert trained["trained"] == {str(k): list(range(1, SLICES + 1)) for k in range(SHARDS)}
    assert verified["ok"] is True, verified
    # Same checkpoint bytes and weights as the undisturbed reference training.
    assert live_weights(store) == reference["live"]

    # The driver resubmitted every shard that ran on the dead node (a worker node runs two at once)
    # from the last stage it had received; for the shard seen mid-run, at least the stage committed
    # when the node was killed, so only its later stages ran again.
    retries = trained["retries"]
    mid_run = [r for r in retries if r["shard"] == killed_shard]
    assert len(mid_run) == 1 and mid_run[0]["after_stage"] >= 1, retries
    assert all(r["attempt"] == 1 for r in retries), retries
    assert all(r["error"] in ("NodeDiedError", "WorkerCrashedError", "ObjectLostError") for r in retries), retries

    # Each killed task ran on the dead node; its resubmission (a new task of the same name) finished
    # on the other worker node.
    new = cluster.new_shard_tasks(known, 2 * SHARDS + len(retries))  # train's, resubmissions, verify's
    assert all(t["node_id"] in by_id for t in new), new  # worker nodes only, never the head
    on_victim = [t for t in new if by_id.get(t["node_id"]) == victim.ip]
    assert on_victim and all(t["state"] == "FAILED" for t in on_victim), on_victim
    for retry in retries:
        mine = [t for t in new if t["name"] == f"sisa-shard-{retry['shard']}"]
        assert any(t in on_victim for t in mine), mine
        assert any(t["state"] == "FINISHED" and by_id.get(t["node_id"]) not in (None, victim.ip) for t in mine), mine
    assert victim.ip not in cluster.alive_nodes()


RAY_DATA_DRIVER = """
import json, sys
import numpy as np
import ray
from sisa.config.loader import load_config
from sisa.ensemble import Ensemble

address, config, streamed, in_memory = sys.argv[1:5]
ray.init(address=address)


def features(batch):
    ids = batch["id"].astype(np.int64)
    x = np.sin(ids[:, None] * np.arange(1, 11) / 97.0).astype(np.float32)
    return {"x": x, "y": ids % 3, "id": ids}


# Produced by Ray Data tasks on the cluster's nodes and streamed to this driver batch by batch.
ds = ray.data.range(3000, override_num_blocks=6).map_batches(features)
cfg = load_config(config)
with Ensemble.create(streamed, cfg, address=address) as ens:
    n = ens.ingest(ds, features="x", label="y", id="id", batch_size=256)
whole = features({"id": np.arange(3000)})
with Ensemble.create(in_memory, cfg, address=address) as ens:
    ens.ingest(whole["x"], whole["y"], whole["id"])
print(json.dumps({"ingested": n}))
"""


@pytest.mark.cluster
def test_a_ray_dataset_computed_on_the_cluster_streams_into_the_driver_store(
    cluster: Cluster, workload: Workload
) -> None:
    streamed, in_memory = workload.driver / "ray-data", workload.driver / "ray-data-arrays"
    env = {**cluster.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{cluster.env['PYTHONPATH']}"}
    args = [cluster.gcs, str(workload.config), str(streamed), str(in_memory)]
    out = subprocess.run(
        [sys.executable, "-c", RAY_DATA_DRIVER, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert json_lines(out.stdout)[-1] == {"ingested": 3000}
    ids = list(range(3000))
    with Ensemble.open(streamed, readonly=True) as a, Ensemble.open(in_memory, readonly=True) as b:
        assert a.status()["per_shard"] == b.status()["per_shard"]
        assert a.locate(ids) == b.locate(ids)
        with a.store.read() as ta, b.store.read() as tb:
            sample = np.asarray(ids[::7], np.int64)
            xa, ya = a.store.load_samples(ta, sample, (10,))
            xb, yb = b.store.load_samples(tb, sample, (10,))
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


@pytest.mark.cluster
def test_serve_replicas_on_the_nodes_without_the_store_serve_the_retrained_model_after_a_deletion(
    cluster: Cluster, workload: Workload, reference: dict[str, Any]
) -> None:
    """``sisa serve`` as a job on the head (the store's node); its replicas on worker nodes, which cannot see it."""
    if not (Path(sys.prefix) / "ray-serve").is_dir() and importlib.util.find_spec("starlette") is None:
        pytest.skip("Ray Serve missing: bash scripts/setup_env.sh installs it")
    from tests.serve.service import free_port, get, predict

    store = workload.driver / "served"
    shutil.copytree(reference["store"], store)
    port = free_port()
    sid = f"sisa-serve-{secrets.token_hex(4)}"
    serve = ["serve", "--store", str(store), "--port", str(port), "--replicas", "2", "--num-cpus", "0.5", "--json"]
    cluster.submit(workload.workdir, [[*serve, "--resources", '{"sisa_worker": 0.01}']], wait=False, submission_id=sid)
    url = f"http://127.0.0.1:{port}"
    x = np.load(workload.driver / "test.npz")["x"][:16].tolist()
    try:
        deadline = time.monotonic() + 300
        while not any("serving" in line for line in json_lines(cluster.job_logs(sid))):
            job = cluster.job(sid)
            assert job["status"] in ("PENDING", "RUNNING"), cluster.job_logs(sid)[-4000:]
            assert time.monotonic() < deadline, cluster.job_logs(sid)[-4000:]
            time.sleep(1.0)

        def live_keys() -> dict[str, str]:
            with Ensemble.open(store, readonly=True) as ens, ens.store.read() as txn:
                return {str(s): r["key"] for s, r in ens.store.live(txn).items()}

        before = live_keys()
        status, out = predict(url + "/predict", x)
        assert status == 200 and out["provenance"] == before, out
        alive = cluster.alive_nodes()
        head = alive[HEAD_IP]["node_id"]
        replicas: dict[str, Any] = {}
        for _ in range(200):  # requests land on replicas at random
            status, info = get(url + "/info")
            if status == 200:
                replicas[info["replica"]] = info
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
        assert all(r["node"] != head for r in replicas.values()), (replicas, head)

        # A deletion from another process on the store's node: the replicas get the retrained model through Ray.
        with Ensemble.open(store, address="local", lock_timeout=60) as ens:
            cert = ens.delete([33, 2001])
        status, confirm = get(url + "/await?timeout=120", timeout=200)
        assert status == 200 and confirm["ok"] and len(confirm["replicas"]) == 2, confirm
        after = live_keys()
        assert after != before
        for _ in range(8):  # answers from both replicas (requests land at random)
            status, out = predict(url + "/predict", x)
            assert status == 200 and out["provenance"] == after, out
        for shard in cert["retrained_shards"]:
            assert after[str(shard)] != before[str(shard)]
    finally:
        subprocess.run([RAY, "job", "stop", "--address", cluster.url, sid], env=cluster.env, capture_output=True)
    job = cluster.wait_job(sid, timeout=120)
    assert job["status"] == "STOPPED", job
