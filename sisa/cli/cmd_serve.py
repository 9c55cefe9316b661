"""``sisa serve``: the ensemble as a Ray Serve application, in the foreground until SIGTERM or Ctrl-C.

With ``--await-replicas`` it starts nothing and waits until every replica of the running
application serves the store as it is now (what ``delete`` followed by it guarantees).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from sisa.cli.cmd_inspect import CheckFailed
from sisa.cli.exits import EXIT_FAILED_CHECK
from sisa.errors import ConfigError, SisaError

__all__ = ["cmd_serve"]


def _options(args: argparse.Namespace) -> Any:
    from sisa.serve.app import ServeOptions

    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
        if not 1 <= low <= high:
            raise ConfigError(f"--min-replicas {low} / --max-replicas {high}: need 1 <= min <= max")
        autoscaling = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, min(high, args.replicas)),
        }
    resources: dict[str, float] = {}
    if args.resources:
        import json

        try:
            resources = json.loads(args.resources)
        except ValueError as exc:
            raise ConfigError(f"--resources must be a JSON object of resource -> amount ({exc})") from None
        if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
            raise ConfigError(f"--resources must be a JSON object of resource -> amount, got {args.resources!r}")
    return ServeOptions(
        store=args.store,
        resources=resources,
        policy=args.policy,
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        autoscaling=autoscaling,
        max_body_mb=args.max_body_mb,
        lease=args.lease,
    )


def _await_replicas(args: argparse.Namespace) -> dict[str, Any]:
    """Confirm that every replica serves the store's state as of now; CheckFailed (exit 1) on timeout."""
    from sisa.serve.client import await_replicas

    result = await_replicas(args.store, timeout=args.await_replicas)
    if not args.json:
        state = "confirmed" if result["ok"] else "NOT confirmed"
        print(
            f"{state}: {len(result['replicas'])} replica(s) serve version {result['version']} or newer "
            f"after {result['seconds']:.2f}s"
            + (f"; lagging: {', '.join(result['lagging'])}" if result["lagging"] else "")
        )
    if not result["ok"]:
        raise CheckFailed(result, EXIT_FAILED_CHECK)
    return result


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Start the application and block until a signal; on the way out delete it (and its publisher)."""
    from sisa.serve.deps import require_serve
    from sisa.train import orchestrator

    require_serve(workers=True)
    orchestrator.connect(args.address)
    if args.await_replicas is not None:
        return _await_replicas(args)
    options = _options(args)
    from ray import serve

    from sisa.serve.app import build_app
    from sisa.serve.client import stop_publisher

    try:
        # One HTTP proxy, on the head node: --host/--port name one address (on a cluster of several
        # nodes on one machine, a proxy per node would contend for it).
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=args.name, route_prefix=args.route_prefix, blocking=False)
    except SisaError:
        stop_publisher(args.store)
        raise
    except Exception as exc:  # Serve's own errors (a replica that cannot start, a port in use)
        stop_publisher(args.store)
        raise SisaError(f"Ray Serve could not start the application: {exc}") from exc
    prefix = args.route_prefix.rstrip("/")
    url = f"http://{args.host}:{args.port}{prefix}/predict"
    import ray

    address = ray.get_runtime_context().gcs_address  # what `--await-replicas --address` needs
    ready = {"ok": True, "serving": url, "app": args.name, "store": str(args.store), "policy": args.policy or "store"}
    ready["ray_address"] = address
    from sisa.train.priority import training_nice

    # What a `sisa delete` on this node now trains at: 10 where a replica of this application runs (it marked the node).
    ready["training_nice_here"] = training_nice()
    if args.json:
        import json

        print(json.dumps(ready, sort_keys=True), flush=True)
    else:
        print(
            f"serving {args.store} at {url} (application {args.name!r}, Ray at {address}); SIGTERM or Ctrl-C stops it; "
            f"training on this node runs at niceness {ready['training_nice_here']} (`--nice` or SISA_TRAIN_NICE sets "
            "another)",
            flush=True,
        )
    try:
        while True:  # the signal (KeyboardInterrupt / Terminated) ends this
            time.sleep(0.5)
    finally:
        _shut_down(args.name, args.store)


def _shut_down(name: str, store: str, timeout: float = 60.0) -> None:
    """Delete the application and its publisher, waiting at most ``timeout`` s (a dead cluster must not hang us)."""
    import threading

    from ray import serve

    from sisa.serve.client import stop_publisher

    print(f"stopping application {name!r}", file=sys.stderr, flush=True)

    def work() -> None:
        try:
            serve.delete(name)
        finally:
            stop_publisher(store)

    worker = threading.Thread(target=work, name="sisa-serve-stop", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        print(f"application {name!r} did not stop within {timeout:g}s; Ray may be gone", file=sys.stderr, flush=True)
