"""The store-side publisher as a real Ray actor on a real store: how fast ``confirm`` sees a replica catch up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import trained_blobs_store

pytestmark = pytest.mark.usefixtures("ray_session")


def test_confirm_returns_as_soon_as_the_last_replica_reports_the_version(tmp_path: Path) -> None:
    """A replica's poll that reports the awaited version wakes ``confirm`` at once, not at its one-second check.

    Without that wake-up a waiting ``/await`` (and so every confirmed time-to-forget) took up to a
    second longer than the replicas' swap: the confirm loop slept until its next periodic check.
    """
    import ray

    from sisa.serve.publisher import start_publisher

    store = trained_blobs_store(tmp_path / "store", "shards=2", "slices=1")
    publisher = start_publisher(store)
    try:
        version = ray.get(publisher.info.remote())["version"]
        # A replica that serves nothing yet polls: it gets the publication and counts as lagging.
        reply = ray.get(publisher.poll.remote("replica-a", 0, 0.0, []))
        assert reply["version"] == version
        waiting = publisher.confirm.remote(version, 30.0)
        time.sleep(0.1)  # confirm is waiting on the lagging replica now
        # The replica swapped and polls again, reporting the version: confirm must see it now.
        ray.get(publisher.poll.remote("replica-a", version, 0.0, sorted(reply["refs"])))
        result = ray.get(waiting, timeout=60)
        assert result["ok"] and result["replicas"] == {"replica-a": version} and result["lagging"] == []
        # Its periodic check comes after a full second: well under that means the poll woke it.
        assert result["seconds"] < 0.9, result
    finally:
        ray.kill(publisher)
