"""The Ray Serve application: HTTP ``POST /predict`` and a ``DeploymentHandle`` over replicas that follow the store.

Import path for ``serve run`` / ``serve deploy`` configs: ``sisa.serve.app:build`` (an application
builder; its arguments are the keys of :class:`ServeOptions`)::

    serve run sisa.serve.app:build store=/data/runs/fm replicas=2

Run that on the node that holds the store: the builder starts the store-side publisher
(:mod:`sisa.serve.publisher`) there; replicas may run on any node and get the models through
Ray's object store. ``sisa serve`` does the same from the ``sisa`` command.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from sisa.errors import ConfigError, DataError, NotTrainedError
from sisa.serve.deps import require_serve

require_serve()  # the sisa[serve] extra, or the folder setup_env.sh installs it in: else a ConfigError naming it

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from sisa.serve.follower import Follower, StaleReplicaError  # noqa: E402
from sisa.serve.modelset import POLICIES  # noqa: E402
from sisa.serve.publisher import NAMESPACE, publisher_name, start_publisher  # noqa: E402
from sisa.train import serving_node  # noqa: E402

__all__ = ["SisaEnsemble", "ServeOptions", "build", "build_app"]

log = logging.getLogger(__name__)

NPY_TYPES = ("application/x-npy", "application/octet-stream")


@dataclass
class ServeOptions:
    """What a served application is made of (the ``serve run`` builder's arguments, ``sisa serve``'s flags).

    Attributes:
        store: The store directory, on the node where the application is built.
        policy: Serving policy when a request names none: ``exclude``, ``serve-clean``,
            ``serve-stale``, or None for what the store serves (the deleting process's policy).
        replicas: Fixed number of replicas (ignored with ``autoscaling``).
        num_cpus: CPUs per replica.
        num_gpus: GPUs per replica; a replica given one runs its models on it (CUDA), else on CPU
            (``GET /info`` says which). Only the CPU path is tested here (no GPU on the test machine).
        autoscaling: Ray Serve's ``autoscaling_config`` (e.g. ``{"min_replicas": 1, "max_replicas": 4}``).
        resources: Custom Ray resources per replica (placement, e.g. ``{"sisa_worker": 0.01}``).
        max_body_mb: Largest request body accepted; larger ones get 413.
        poll_interval: Seconds between two reads of the store by the publisher.
        lease: Seconds a replica keeps answering without reaching the publisher.
        max_ongoing_requests: Requests one replica takes at once.
    """

    store: str
    policy: str | None = None
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    autoscaling: dict[str, Any] | None = None
    resources: dict[str, float] = field(default_factory=dict)
    max_body_mb: float = 16.0
    poll_interval: float = 0.05
    lease: float = 15.0
    max_ongoing_requests: int = 16

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"unknown serving policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if int(self.replicas) < 1:
            raise ConfigError(f"replicas must be at least 1, got {self.replicas}")
        for name in ("max_body_mb", "poll_interval", "lease"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if float(self.lease) <= 2.0:
            raise ConfigError(f"lease must be longer than the replicas' 2 s poll, got {self.lease}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="sisa-ensemble")
class SisaEnsemble:
    """One replica: answers from the newest model set the store's publisher sent it."""

    def __init__(self, publisher: str, policy: str | None, max_body: int, lease: float) -> None:
        """Follow ``publisher`` (blocks until the first model set arrives: a replica never answers without one)."""
        import ray
        import torch

        torch.set_num_threads(1)
        self._policy = policy
        self._max_body = max_body
        # A replica that Ray gave a GPU (num_gpus > 0) runs its models there; Ray sets CUDA_VISIBLE_DEVICES to it.
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self._follower = Follower(publisher, NAMESPACE, lease=lease, device=device)
        # While this replica lives, training on its node (a `sisa delete` beside it) yields to it by default.
        self._mark = serving_node.register("replica")

    def predict(self, features: Any, policy: str | None = None, method: str | None = None) -> dict[str, Any]:
        """Labels, probabilities and provenance (shard -> checkpoint key) of ``features``; for DeploymentHandles.

        Raises:
            DataError: On bad features, an unknown policy or method.
            NotTrainedError: If no shard may answer under the policy.
            StaleReplicaError: If this replica lost contact with the store's publisher.
        """
        view = self._follower.view()  # one model set for the whole response
        return view.predict(features, policy or self._policy, method)

    def info(self) -> dict[str, Any]:
        """The version and state this replica serves, its id and how many swaps it made."""
        import os

        import ray

        view = self._follower.view()
        return {
            "replica": self._follower.id,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "publisher_pid": self._follower.publisher_pid,
            "version": view.version,
            "state": view.digest,
            "swaps": self._follower.swaps,
            "device": view.device,
            "shards": {str(e.shard): {"key": e.key, "status": e.status} for e in view.entries},
        }

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP: ``POST /predict`` (JSON or npy body), ``GET /info``; every refusal is a 4xx naming the problem."""
        started = time.perf_counter()
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if path == "info" and request.method == "GET":
            try:
                return JSONResponse(self.info())
            except StaleReplicaError as exc:
                return _error(503, str(exc))
        if path == "await" and request.method == "GET":
            return await self._await(request.query_params.get("timeout", "30"))
        if path != "predict":
            return _error(404, f"no such endpoint {request.url.path!r}; POST /predict, GET /info or GET /await")
        if request.method != "POST":
            return _error(405, f"/predict takes POST, not {request.method}")
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        received = (time.perf_counter() - started) * 1e3  # the body streams in from Serve's proxy
        parsed = self._parse(body, request.headers.get("content-type", ""), dict(request.query_params))
        if isinstance(parsed, JSONResponse):
            return parsed
        features, policy, method = parsed
        try:
            result, compute = await asyncio.get_running_loop().run_in_executor(
                None, self._timed_predict, features, policy, method
            )
        except DataError as exc:
            return _error(400, str(exc))
        except (NotTrainedError, StaleReplicaError) as exc:
            return _error(503, str(exc))
        response = JSONResponse(result)
        # Where a response's time goes, in the standard header (W3C Server-Timing): "body" is receiving the body
        # from Serve's proxy, "predict" the model work in the executor, "replica" all of this handler (body, parse,
        # executor queue, predict, JSON encoding). The serving benchmark splits client latency with it.
        replica = (time.perf_counter() - started) * 1e3
        timing = f"body;dur={received:.3f}, predict;dur={compute:.3f}, replica;dur={replica:.3f}"
        response.headers["Server-Timing"] = timing
        return response

    def _timed_predict(self, features: Any, policy: str | None, method: str | None) -> tuple[dict[str, Any], float]:
        """:meth:`predict` and its duration in milliseconds (run in the executor)."""
        started = time.perf_counter()
        result = self.predict(features, policy, method)
        return result, (time.perf_counter() - started) * 1e3

    async def _await(self, timeout: str) -> JSONResponse:
        """``GET /await?timeout=S``: 200 once every replica serves the store as it is now, 504 if not within S."""
        try:
            seconds = float(timeout)
        except ValueError:
            return _error(400, f"timeout must be a number of seconds, got {timeout!r}")
        if not 0 < seconds <= 600:
            return _error(400, f"timeout must be in (0, 600] seconds, got {seconds:g}")
        result = await asyncio.get_running_loop().run_in_executor(None, self._follower.confirm, seconds)
        return JSONResponse(result, status_code=200 if result["ok"] else 504)

    async def _body(self, request: Request) -> bytes | JSONResponse:
        """The body, or 413 as soon as it is known to exceed the limit (never read whole into memory)."""
        limit = self._max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(
                413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes (max_body_mb)"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, f"request body is over the limit of {limit} bytes (max_body_mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse(body: bytes, content_type: str, query: dict[str, str]) -> tuple[Any, Any, Any] | JSONResponse:
        """``(features, policy, method)`` from a JSON body ``{"features": ...}`` or an npy body (+ query string)."""
        if content_type.split(";")[0].strip() in NPY_TYPES:
            try:
                features = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                return _error(
                    400, f"body is not an .npy array ({exc}); send JSON {{'features': [[...]]}} or np.save output"
                )
            return features, query.get("policy"), query.get("method")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f'body is not JSON ({exc}); send {{"features": [[...], ...]}}')
        if not isinstance(payload, dict) or "features" not in payload:
            return _error(400, 'body must be a JSON object with "features": a list of samples, each a list of numbers')
        unknown = sorted(set(payload) - {"features", "policy", "method"})
        if unknown:
            return _error(400, f"unknown field(s) {unknown}; a request has features, and optionally policy and method")
        for name in ("policy", "method"):
            if payload.get(name) is not None and not isinstance(payload[name], str):
                return _error(400, f"{name} must be a string, got {payload[name]!r}")
        return payload["features"], payload.get("policy"), payload.get("method")

    def __del__(self) -> None:
        serving_node.unregister(getattr(self, "_mark", None))
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.close()


def build_app(options: ServeOptions) -> Any:
    """The application for ``options``: starts the publisher on this node and binds the deployment.

    Raises:
        ConfigError: On a bad option.
        SisaError: If the store is not on this node.
    """
    import ray

    runtime_env = ray.get_runtime_context().runtime_env or None
    start_publisher(options.store, poll_interval=options.poll_interval, lease=options.lease, runtime_env=runtime_env)
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    if options.resources:
        actor_options["resources"] = dict(options.resources)
    if runtime_env:  # replicas import sisa as the driver does (a job's working_dir, say)
        actor_options["runtime_env"] = runtime_env
    deployment_options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests,
    }
    if options.autoscaling:
        deployment_options["autoscaling_config"] = dict(options.autoscaling)
    else:
        deployment_options["num_replicas"] = int(options.replicas)
    return SisaEnsemble.options(**deployment_options).bind(  # type: ignore[attr-defined]
        publisher_name(options.store), options.policy, int(options.max_body_mb * 2**20), float(options.lease)
    )


def build(args: dict[str, Any]) -> Any:
    """The ``serve run`` / ``serve deploy`` application builder: ``args`` are :class:`ServeOptions` fields.

    Raises:
        ConfigError: On an unknown argument or a bad value.
    """
    names = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(args) - names)
    if unknown or "store" not in args:
        raise ConfigError(
            f"sisa.serve.app:build takes store= and optionally {sorted(names - {'store'})}; got {unknown}"
        )
    values = dict(args)
    for name in ("autoscaling", "resources"):
        if isinstance(values.get(name), str):  # `serve run ... autoscaling='{"min_replicas": 1}'`
            values[name] = json.loads(values[name])
    for name, kind in (("replicas", int), ("num_cpus", float), ("num_gpus", float), ("max_body_mb", float)):
        if name in values:
            values[name] = kind(values[name])
    for name, kind in (("poll_interval", float), ("lease", float), ("max_ongoing_requests", int)):
        if name in values:
            values[name] = kind(values[name])
    options = ServeOptions(**values)
    log.info("building the sisa application: %s", asdict(options))
    return build_app(options)
