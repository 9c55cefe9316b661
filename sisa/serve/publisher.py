"""The store-side actor: follows one store and publishes its live models to serving replicas through Ray.

It runs on the node that holds the store (LMDB must never be shared over a network
filesystem), reads the store's serving state every poll interval, and on a change puts the
new models' weights into Ray's object store. Replicas long-poll it (:meth:`StorePublisher.poll`)
and tell it, with each poll, which version they serve; :meth:`StorePublisher.confirm` waits
until every replica in contact serves a version at least as new as a given one.

A replica counts as in contact while its last poll is younger than the lease; a replica that
loses contact for longer stops answering by itself (:mod:`sisa.serve.follower`), so a version
confirmed here is what every replica that still answers serves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sisa.errors import SisaError, StoreChangedError

__all__ = ["NAMESPACE", "StorePublisher", "publisher_name", "start_publisher"]

log = logging.getLogger(__name__)

NAMESPACE = "sisa-serve"  # the named actors' Ray namespace: any job on the cluster finds them


def publisher_name(store: str | Path) -> str:
    """The Ray actor name of the publisher of ``store`` (its resolved path on the store's node)."""
    digest = hashlib.sha256(str(Path(store).resolve()).encode()).hexdigest()[:16]
    return f"sisa-store-{digest}"


class StorePublisher:
    """Publishes the live models of one store; a Ray actor (see :func:`start_publisher`)."""

    def __init__(self, store: str, poll_interval: float = 0.05, lease: float = 15.0) -> None:
        """Open ``store`` read-only and publish its current state before returning.

        Args:
            store: The store directory, on this node.
            poll_interval: Seconds between two reads of the store's serving state.
            lease: Seconds a replica counts as in contact after its last poll.
        """
        import torch

        from sisa.store.database import Store

        torch.set_num_threads(1)
        self._store = Store.open(store, readonly=True)
        self._poll_interval = poll_interval
        self._lease = lease
        self._cond = threading.Condition()
        self._version = 0
        self._digest = ""
        self._publication: dict[str, Any] = {}
        self._refs: dict[str, Any] = {}  # checkpoint key -> ObjectRef of its weights
        self._replicas: dict[str, dict[str, float]] = {}  # replica id -> {"seen": monotonic, "version": int}
        # One refresh at a time (the follow thread and /await's call): two overlapping ones could publish an
        # older read after a newer one, and replicas would go back to models a deletion had retired.
        self._refresh_lock = threading.Lock()
        self.refresh()
        threading.Thread(target=self._follow, name="sisa-publisher", daemon=True).start()

    # ------------------------------------------------------------------ the store side
    def _follow(self) -> None:
        while True:
            time.sleep(self._poll_interval)
            try:
                self.refresh()
            except Exception:  # logged, never fatal: the last published state stays served
                log.exception(
                    "reading the serving state of %s failed; the last published state stays", self._store.path
                )

    def refresh(self) -> int:
        """Read the store now; publish a new version if its serving state changed. Returns the current version."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> int:
        import ray

        from sisa.serve.modelset import read_models, read_state, wanted_keys

        for attempt in range(3):
            try:
                with self._store.read() as txn:
                    digest, state = read_state(self._store, txn)
                    if digest == self._digest:
                        return self._version
                    weights = read_models(self._store, txn, state, set(self._refs))
                break
            except StoreChangedError:  # a deletion retired a checkpoint mid-read: read the newer state
                if attempt == 2:
                    raise
        refs = {key: self._refs[key] for key in wanted_keys(state) if key in self._refs}
        refs.update({key: ray.put(blob) for key, blob in weights.items()})
        with self._cond:
            # Versions grow across restarts of this actor too: a replica's version from before a
            # restart compares lower than anything published after it.
            self._version = max(self._version + 1, time.time_ns())
            self._digest = digest
            self._refs = refs  # models no longer live are dropped here (their objects freed once unborrowed)
            self._publication = {
                "version": self._version,
                "digest": digest,
                "state": state,
                "refs": refs,
                "pid": os.getpid(),
            }
            self._cond.notify_all()
        log.info("published version %d (state %s, %d shards)", self._version, digest, len(state["shards"]))
        return self._version

    # ------------------------------------------------------------------ the replicas' side
    def poll(self, replica: str, have: int, timeout: float = 2.0, held: list[str] | None = None) -> dict[str, Any]:
        """Called by a replica serving version ``have``: returns at once if a newer one exists, else after ``timeout``.

        Args:
            replica: The replica's id.
            have: The version it serves.
            timeout: Seconds to wait for a newer version.
            held: Checkpoint keys whose models the replica holds already (None: send every ref).

        Returns:
            The publication (``version``, ``digest``, ``state``, ``refs``: checkpoint key ->
            ObjectRef of its weights, only for the keys not in ``held``) when it differs from
            ``have``; else ``{"version": have}``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            previous = self._replicas.get(replica)
            self._replicas[replica] = {"seen": time.monotonic(), "version": have}
            if previous is None or previous["version"] != have:
                # A replica that reports a version it did not serve before may be the one a confirm() waits for:
                # wake it now, not at its next one-second check (that second was most of time-to-forget).
                self._cond.notify_all()
            while self._version == have:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"version": have}
                self._cond.wait(left)
            reply = dict(self._publication)
        if held is not None:
            # Every ref in a reply makes the replica a borrower of that object (ownership messages to this actor
            # and back, on the shared cores, while requests are being answered): send only what it lacks.
            keep = set(held)
            reply["refs"] = {key: ref for key, ref in reply["refs"].items() if key not in keep}
        return reply

    def leave(self, replica: str) -> None:
        """A replica that shuts down stops counting (else it would count until its lease runs out)."""
        with self._cond:
            self._replicas.pop(replica, None)
            self._cond.notify_all()

    def confirm(self, version: int, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every replica in contact serves ``version`` or newer (at most ``timeout`` seconds).

        Returns:
            ``ok`` (all confirmed in time), ``version``, ``seconds`` waited, ``replicas`` (id ->
            version served) and ``lagging`` (the ids still serving an older version).
        """
        started = time.monotonic()
        deadline = started + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                current = {r: v for r, v in self._replicas.items() if now - v["seen"] <= self._lease}
                lagging = sorted(r for r, v in current.items() if v["version"] < version)
                if not lagging and current:
                    ok = True
                    break
                if now >= deadline:
                    ok = False
                    break
                # Woken by every publication and by every poll that reports a new version; a lapsing lease is
                # noticed within a second.
                self._cond.wait(min(1.0, deadline - now))
        return {
            "ok": ok,
            "version": version,
            "seconds": time.monotonic() - started,
            "replicas": {r: int(v["version"]) for r, v in current.items()},
            "lagging": lagging,
        }

    def info(self) -> dict[str, Any]:
        """The current version, its state digest, the shards it serves and the replicas in contact."""
        now = time.monotonic()
        with self._cond:
            return {
                "version": self._version,
                "digest": self._digest,
                "store": str(self._store.path),
                "pid": os.getpid(),
                "shards": [dict(e) for e in self._publication.get("state", {}).get("shards", [])],
                "replicas": {
                    r: {"version": int(v["version"]), "age_s": now - v["seen"]} for r, v in self._replicas.items()
                },
            }


def start_publisher(
    store: str | Path, *, poll_interval: float = 0.05, lease: float = 15.0, runtime_env: dict[str, Any] | None = None
) -> Any:
    """Start (or find) the publisher of ``store`` on this node; returns its actor handle.

    The actor is detached and named (:func:`publisher_name`, namespace :data:`NAMESPACE`) so that
    replicas and ``sisa serve --await-replicas`` find it from any job; Ray restarts it on this same
    node if it dies (the store is here), and replicas reconnect by name.

    Raises:
        SisaError: If ``store`` is not a store directory on this node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = Path(store).resolve()
    if not path.is_dir():
        raise SisaError(f"{path} is not a store directory on this node; run `sisa serve` where the store lives")
    actor_cls = ray.remote(StorePublisher)
    options: dict[str, Any] = {
        "name": publisher_name(path),
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
        "max_concurrency": 256,  # every replica holds a long poll open
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    }
    if runtime_env:
        options["runtime_env"] = runtime_env
    handle = actor_cls.options(**options).remote(str(path), poll_interval, lease)
    ray.get(handle.info.remote())  # type: ignore[union-attr]  # its first state is published (or its error raised) before serving starts
    return handle
