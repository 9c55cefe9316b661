"""Helpers of the serving tests and the serving benchmark: a ``sisa serve`` process, HTTP on loopback, a load.

Everything here is real: the ``sisa serve`` command in its own session with its own local Ray
instance, HTTP through Ray Serve's proxy, and the closed-loop clients of
:class:`Load`, which record what each response's provenance named.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
SISA = [sys.executable, "-m", "sisa.cli"]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 60) -> tuple[int, Any]:
    """POST ``body``; returns ``(status, parsed JSON)`` for 2xx and error statuses alike."""
    status, out, _ = post_timed(url, body, content_type, timeout)
    return status, out


def server_timing(header: str | None) -> dict[str, float]:
    """``{"predict": ms, "replica": ms}`` from a ``Server-Timing`` header (empty when absent)."""
    out: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                out[name] = float(value)
    return out


def post_timed(
    url: str, body: bytes, content_type: str = "application/json", timeout: float = 60
) -> tuple[int, Any, dict[str, float]]:
    """:func:`post`, plus the replica's own timings (its ``Server-Timing`` header, in ms)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), server_timing(resp.headers.get("Server-Timing"))
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw), {}
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")}, {}


def post_large(url: str, size: int, chunk: int = 2**20) -> tuple[int, Any]:
    """POST a ``size``-byte body in chunks; the server may answer (413) and close before it has all of it."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        block = b"0" * chunk
        try:
            for _ in range(size // chunk):
                conn.send(block)
        except OSError:  # the server answered already and stopped reading
            pass
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def predict(url: str, features: Any, **extra: Any) -> tuple[int, Any]:
    return post(url, json.dumps({"features": features, **extra}).encode())


def get(url: str, timeout: float = 30) -> tuple[int, Any]:
    try:
        with OPENER.open(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a ``sisa serve`` we started with its own session, and its Ray)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue  # ended while we looked
    return members


@dataclass
class Service:
    """A running ``sisa serve`` process."""

    proc: subprocess.Popen[bytes]
    url: str
    ray_address: str
    store: Path
    log: Path
    ready: dict[str, Any]

    @property
    def base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def replicas(self, want: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
        """``GET /info`` until ``want`` distinct replicas answered (requests land on replicas at random)."""
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            status, info = get(self.base + "/info")
            if status == 200:
                found[info["replica"]] = info
        return found

    def confirm(self, timeout: float = 90) -> dict[str, Any]:
        """``GET /await``: every replica serves the store as it is now (no Ray connection needed)."""
        status, out = get(f"{self.base}/await?timeout={timeout:g}", timeout=timeout + 60)
        out["status"] = status
        return dict(out)

    def await_replicas(self, timeout: float = 90) -> dict[str, Any]:
        """``sisa serve --await-replicas``: every replica serves the store as it is now."""
        out = subprocess.run(
            [*SISA, "serve", "--store", str(self.store), "--address", self.ray_address, "--await-replicas"]
            + [str(timeout), "--json"],
            capture_output=True,
            text=True,
            timeout=timeout + 120,
            # Ray 2.60's local instance uses token auth (~/.ray/auth_token); joining it by address asks for the mode
            env={**serve_env(), "RAY_AUTH_MODE": "token"},
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"ok": False, "stderr": out.stderr[-3000:]}
        result["exit"] = out.returncode
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int | None:
        """Signal the command; wait for it; then kill whatever its session left. Returns its exit code."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            code = self.proc.returncode
        for _ in range(20):
            pids = session_members(self.proc.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        return code


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray, never another
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def start_service(store: Path, workdir: Path, *args: str, timeout: float = 300) -> Service:
    """Start ``sisa serve --store store`` in its own session; return once it printed its ready line."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    out = workdir / f"serve-{port}.out"
    argv = [*SISA, "serve", "--store", str(store), "--port", str(port), "--json", *args]
    with log.open("wb") as err, out.open("wb") as stdout:
        proc = subprocess.Popen(
            argv, stdout=stdout, stderr=err, stdin=subprocess.DEVNULL, env=serve_env(), start_new_session=True, cwd=ROOT
        )
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
        if lines:
            ready = json.loads(lines[0])
            return Service(proc, ready["serving"], ready["ray_address"], store, log, ready)
        if proc.poll() is not None or time.monotonic() > deadline:
            service = Service(proc, "", "", store, log, {})
            service.stop(signal.SIGKILL)
            raise RuntimeError(f"sisa serve did not start ({proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@dataclass
class Load:
    """Closed-loop HTTP clients at fixed concurrency, each recording every response it got."""

    url: str
    features: list[list[float]]
    clients: int = 2
    body: str = "json"  # or "npy": the features as np.save's float32 bytes (Content-Type: application/x-npy)
    t0: float = field(default_factory=time.monotonic)
    # start, end, status, provenance, the replica's Server-Timing (ms)
    records: list[tuple[float, float, int, dict[str, str], dict[str, float]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _encoded(self) -> tuple[bytes, str]:
        if self.body == "npy":
            import io

            import numpy as np

            buf = io.BytesIO()
            np.save(buf, np.asarray(self.features, dtype=np.float32), allow_pickle=False)
            return buf.getvalue(), "application/x-npy"
        return json.dumps({"features": self.features}).encode(), "application/json"

    def _client(self) -> None:
        body, content_type = self._encoded()
        while not self._stop.is_set():
            start = time.monotonic() - self.t0
            try:
                status, out, timing = post_timed(self.url, body, content_type, timeout=60)
            except OSError as exc:  # connection refused or reset: counted as an error
                status, out, timing = 0, {"error": str(exc)}, {}
            end = time.monotonic() - self.t0
            prov = out.get("provenance", {}) if status == 200 else {}
            self.records.append((start, end, status, prov, timing))
            if status != 200 and len(self.errors) < 20:
                self.errors.append(f"{status}: {out.get('error', out)}"[:300])

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def reader(self) -> dict[str, Any]:
        """The records in the shape ``scripts/soak.py``'s provenance checker (``served_retired``) reads."""
        key_sets: dict[tuple[tuple[int, str], ...], int] = {}
        used = []
        for _, _, status, prov, _ in self.records:
            live = tuple(sorted((int(s), k) for s, k in prov.items())) if status == 200 else ()
            used.append(key_sets.setdefault(live, len(key_sets)))
        return {
            "start": [r[0] for r in self.records],
            "end": [r[1] for r in self.records],
            # 503 with every shard out of service is the in-process "unavailable" (the soak's status 1)
            "status": [0 if r[2] == 200 else 1 if r[2] == 503 else 2 for r in self.records],
            "key_set": used,
            "key_sets": [[list(p) for p in k] for k in key_sets],
        }
