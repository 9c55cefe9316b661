"""The Ray session of this process: join a cluster or start a local instance, and end it.

A cluster is joined only when it is named (``--address`` / ``RAY_ADDRESS``), after its port
answered (``ray.init`` itself retries a silent address for minutes); without one a new local
instance starts. The application's own SIGTERM handler stays in force through ``ray.init`` and
``ray.shutdown`` (:func:`_keeping_sigterm_handler`). A command that is about to exit kills the
local instance it started at once (:func:`abandon_local_instance`) instead of waiting for a
graceful stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import ray

from sisa.errors import ClusterConnectionError
from sisa.train.process_tree import kill_trees

__all__ = [
    "CONNECT_TIMEOUT",
    "LOCAL",
    "abandon_local_instance",
    "connect",
    "connect_unless_local",
    "named_address",
    "shutdown",
    "started_local_instance",
]

# The address that trains in the calling process, one shard after another, without Ray.
LOCAL = "local"

# Set when this process started a local Ray instance itself (not when it joined a cluster).
_started_local = False

log = logging.getLogger(__name__)

# Seconds to wait for the cluster's port to answer before giving up (a wrong host or port).
CONNECT_TIMEOUT = 10.0

_TOKEN_ADVICE = (
    "if the cluster uses token authentication (Ray 2.60 clusters do by default), set RAY_AUTH_MODE=token "
    "and give the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
    "(a token alone is not used for an explicit address)"
)


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of a Ray address (``host:port``, ``ray://host[:port]``), or None if it names none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:  # ray://host: the Ray Client's default port
        return (rest, 10001) if address.startswith("ray://") and rest else None
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float) -> None:
    """Raise ClusterConnectionError unless ``address``'s port accepts a connection within ``timeout`` s.

    ``ray.init`` itself retries an address that does not answer for many minutes; this
    pre-check bounds that to ``timeout``.
    """
    if address == "auto":
        from ray._private import services

        try:
            address = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise ClusterConnectionError(
                f"--address auto found no running Ray cluster on this machine ({exc}); start one with "
                "`ray start --head`, or give its address (host:6379, printed by `ray start`)"
            ) from None
    where = _host_port(address)
    if where is None:
        return  # let ray.init judge the form
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise ClusterConnectionError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}, waited up to {timeout:g}s): check the "
            "address (the GCS address host:6379 that `ray start --head` prints, or ray://host:10001 for Ray Client; "
            "not the dashboard's http://host:8265) and that the cluster is running"
        ) from None


def connect(address: str | None = None, *, num_cpus: int | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Join a Ray cluster, or start a new local instance, unless Ray is already up.

    Without an address (nor ``RAY_ADDRESS``) this always starts a new local instance,
    also when a cluster was started on this machine with ``ray start`` (which a plain
    ``ray.init()`` would join): a cluster is joined only when it is named.

    Args:
        address: Ray address (``auto``, ``ray://host:10001``, ``host:6379``); falls
            back to ``RAY_ADDRESS`` and then to a new local instance. (``local``, no
            Ray at all, is handled by :func:`sisa.train.orchestrator.execute`.)
        num_cpus: CPUs of a new local instance (default: all cores).
        timeout: Seconds to wait for the cluster's port to answer.

    Raises:
        ClusterConnectionError: If the cluster does not answer within ``timeout`` seconds,
            or refuses to be joined (a missing auth token, say); the message names the
            address and the token settings.
    """
    global _started_local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        log.info("starting a local Ray instance")
        # Ray's own "local": a new instance, never a cluster `ray start` left on this machine.
        try:
            with _keeping_sigterm_handler():
                ray.init(address="local", num_cpus=num_cpus, **kwargs)
        # Ray raises a bare Exception when its node does not come up in time ("timed out during
        # startup ... GCS has become overloaded"): seen on a 2-core machine under load.
        except Exception as exc:
            raise ClusterConnectionError(
                f"could not start a local Ray instance ({exc}). The machine may be overloaded or short of "
                "shared memory (/dev/shm): retry when it is quieter, or train without Ray (--address local). "
                "Work already committed, and a deletion already journaled, are kept: the same command finishes them"
            ) from exc
        _started_local = True
        return
    _check_reachable(address, timeout)
    log.info("joining the Ray cluster at %s", address)
    try:
        with _keeping_sigterm_handler():
            ray.init(address=address, **kwargs)
    # ray.exceptions.RayError covers AuthenticationError: token mode without a token anywhere.
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, ray.exceptions.RayError) as exc:
        raise ClusterConnectionError(f"could not join the Ray cluster at {address} ({exc}); {_TOKEN_ADVICE}") from exc


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Keep the application's own SIGTERM handler in force through ``ray.init`` or ``ray.shutdown``.

    ``ray.init`` installs a SIGTERM handler that calls ``sys.exit(15)`` in the driver, and the
    local node it starts one that kills Ray's processes and calls ``sys.exit(1)``. Where the
    application has its own (the ``sisa`` command and its worker end a command with exit 143
    and say what was kept), Ray's would end the process silently in the middle of a deletion;
    worse, a SIGTERM landing while ``ray.init`` runs raises its ``SystemExit`` wherever the
    interpreter is, also inside a finaliser, where Python prints it as "ignored" and goes on:
    the signal was lost, and a worker told to end served on (seen under load). So, while the
    call runs, Ray's installer is turned into a no-op and the application's handler stays the
    one that runs. ``ray.shutdown`` resets SIGTERM to its default action below Python (Python
    still reports the old handler): the handler is installed again afterwards. A process
    without a handler of its own keeps Ray's.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    if not callable(before):
        yield
        return
    utils = ray._private.utils
    installer = getattr(utils, "set_sigterm_handler", None)
    if installer is not None:
        utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            # A Ray that installs its handler some other way turned SIGTERM into sys.exit(15):
            # deliver it to the application's handler instead, which raises what it expects.
            signal.signal(signal.SIGTERM, before)
            before(signal.SIGTERM, None)
        raise
    finally:
        if installer is not None:
            utils.set_sigterm_handler = installer
        signal.signal(signal.SIGTERM, before)


def named_address(address: str | None) -> str | None:
    """The address in force: ``address``, else ``RAY_ADDRESS``, else None (nothing named)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect_unless_local(address: str | None) -> None:
    """Join the cluster ``address`` (or ``RAY_ADDRESS``) names, unless it names ``local`` or nothing.

    Called before a change that will need the cluster (a deletion is journaled only once
    its retrain can start), so a wrong address or a missing token fails before anything is
    written. Without an address nothing is started here: the plan decides later whether it
    needs a local Ray instance at all (:func:`sisa.train.orchestrator.choose_runner`), and starting one cannot fail
    for a wrong address.

    Raises:
        ClusterConnectionError: As :func:`connect`.
    """
    named = named_address(address)
    if named is not None and named != LOCAL:
        connect(address)


def started_local_instance() -> bool:
    """Whether this process started a local Ray instance (not joined a cluster) that is still up."""
    return _started_local and ray.is_initialized()


def abandon_local_instance() -> bool:
    """Kill the local Ray instance this process started, at once, without waiting for it to stop.

    For a command-line process about to exit (``os._exit``): ``ray.shutdown()`` stops the
    instance gracefully and waits (docs/benchmarks.md, "Start-up costs the command line is shaped
    around"), which a finished command need not. Every
    process of the node (raylet, GCS, agents) and every descendant of theirs (workers, and
    whatever a task started) gets SIGKILL, so none is left running. Not for a library caller
    that goes on using Ray.

    Returns:
        Whether there was such an instance.
    """
    global _started_local
    if not started_local_instance():
        return False
    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public handle on the node
    if node is None:
        return False
    kill_trees({p.process.pid for procs in node.all_processes.values() for p in procs})
    _started_local = False
    return True


def shutdown() -> None:
    """Stop the Ray instance this process started or joined.

    Also forgets that this process started one, so a cluster joined later is never taken for
    a local instance of its own (which :func:`abandon_local_instance` would kill).
    """
    global _started_local
    if ray.is_initialized():
        with _keeping_sigterm_handler():
            ray.shutdown()
    _started_local = False
