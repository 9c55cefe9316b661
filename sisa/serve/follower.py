"""The replica side: follow the store's publisher and keep the current :class:`~sisa.serve.modelset.ModelView`.

A background thread long-polls the publisher actor (found by name, so a restarted publisher
is found again); on a new version it fetches only the weights it does not hold yet from Ray's
object store, builds the new view, and swaps it in with one assignment. Requests in flight
keep the view they started with. If the publisher cannot be reached for longer than the
lease, :meth:`Follower.view` refuses to answer: a replica cut off from the store cannot know
whether a deletion retired the models it holds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from sisa.errors import SisaError
from sisa.serve.modelset import ModelView

__all__ = ["Follower", "StaleReplicaError"]

log = logging.getLogger(__name__)


class StaleReplicaError(SisaError):
    """The replica lost contact with the store's publisher for longer than its lease: it does not answer."""


class Follower:
    """Follows one publisher; :meth:`view` is the model set every response must use."""

    def __init__(
        self,
        publisher: str,
        namespace: str,
        *,
        lease: float = 15.0,
        first_timeout: float = 120.0,
        device: str = "cpu",
    ) -> None:
        """Fetch the current models (blocking, up to ``first_timeout`` s), then follow in the background.

        Args:
            publisher: The publisher actor's name.
            namespace: Its Ray namespace.
            lease: Seconds without a successful poll after which this replica stops answering.
            first_timeout: Seconds to wait for the first model set.
            device: Where the models run (``cpu``, or ``cuda`` when Ray assigned this replica a GPU).

        Raises:
            SisaError: If no model set arrives in time (the publisher is missing or failing).
        """
        self.id = f"replica-{uuid.uuid4().hex[:12]}"
        self._name, self._namespace, self._lease = publisher, namespace, lease
        self.device = device
        self._handle: Any = None
        self._view: ModelView | None = None
        self._heard = 0.0  # monotonic send time of the last poll that was answered
        self._closed = threading.Event()
        self.swaps = 0
        self.publisher_pid = 0  # the process of the publisher that sent the current view
        deadline = time.monotonic() + first_timeout
        error: Exception | None = None
        while self._view is None:
            try:
                self._step(timeout=0.0)
            except Exception as exc:  # the publisher may still be starting
                error = exc
                if time.monotonic() > deadline:
                    raise SisaError(f"no model set from the store's publisher {publisher!r}: {exc}") from exc
                time.sleep(0.5)
        del error
        threading.Thread(target=self._run, name="sisa-follower", daemon=True).start()

    def _publisher(self) -> Any:
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self._name, namespace=self._namespace)
        return self._handle

    def _step(self, timeout: float) -> None:
        import ray

        have = self._view.version if self._view is not None else 0
        held = sorted(self._view.models) if self._view is not None else []
        sent = time.monotonic()
        reply = ray.get(self._publisher().poll.remote(self.id, have, timeout, held), timeout=timeout + 30)
        if reply["version"] != have:
            self._swap(reply)
        self._heard = sent

    def _swap(self, reply: dict[str, Any]) -> None:
        import ray

        old = self._view
        cache = old.models if old is not None else {}
        # The publisher sends refs only for the keys this replica did not hold when it polled.
        missing = {key: ref for key, ref in reply["refs"].items() if key not in cache}
        blobs = dict(zip(missing, ray.get(list(missing.values())), strict=True)) if missing else {}
        view = ModelView(reply["version"], reply["digest"], reply["state"], blobs, cache, self.device, previous=old)
        self._view = view  # the swap: one assignment, after the build
        self.swaps += 1
        self.publisher_pid = int(reply.get("pid", 0))
        log.info("%s serves version %d (state %s)", self.id, reply["version"], reply["digest"])

    def _run(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                self._step(timeout=2.0)
                backoff = 0.1
            except Exception as exc:  # the publisher died or restarts: find it again by name
                log.warning("%s: polling the store's publisher failed (%s); retrying", self.id, exc)
                self._handle = None
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def view(self) -> ModelView:
        """The current model set.

        Raises:
            StaleReplicaError: If the publisher has not answered for longer than the lease.
        """
        silent = time.monotonic() - self._heard
        if silent > self._lease or self._view is None:
            raise StaleReplicaError(
                f"this replica has not reached the store's publisher for {silent:.1f}s (lease {self._lease:g}s): it "
                "does not answer, since a deletion may have retired its models; it answers again once it reconnects"
            )
        return self._view

    def confirm(self, timeout: float) -> dict[str, Any]:
        """Ask the publisher to read the store now and wait until every replica serves that state.

        See :meth:`sisa.serve.publisher.StorePublisher.confirm` for the result.
        """
        import ray

        publisher = self._publisher()
        version = ray.get(publisher.refresh.remote(), timeout=timeout + 30)
        return dict(ray.get(publisher.confirm.remote(version, timeout), timeout=timeout + 30))

    def close(self) -> None:
        """Stop following and tell the publisher this replica left."""
        self._closed.set()
        try:
            self._publisher().leave.remote(self.id)
        except Exception:  # the publisher may be gone already
            pass
