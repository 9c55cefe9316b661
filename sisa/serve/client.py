"""Talk to a running application's store-side publisher: confirm that replicas serve the store as it is now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisa.errors import SisaError

__all__ = ["await_replicas", "stop_publisher"]


def _publisher(store: str | Path) -> Any:
    import ray

    from sisa.serve.publisher import NAMESPACE, publisher_name

    try:
        return ray.get_actor(publisher_name(store), namespace=NAMESPACE)
    except ValueError:
        raise SisaError(
            f"no application serves {store} on this Ray cluster (no publisher actor {publisher_name(store)!r}); "
            "start one with `sisa serve`, and give the same --address"
        ) from None


def await_replicas(store: str | Path, *, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until every replica in contact serves the store's serving state as of this call.

    Call it after ``delete`` returned: the publisher reads the store again first, so the version
    waited for reflects the deletion (the time-to-forget, confirmed). Ray must be connected.

    Returns:
        ``ok``, ``version``, ``seconds``, ``replicas`` (id -> version), ``lagging``.

    Raises:
        SisaError: If no application serves ``store`` on the connected cluster.
    """
    import ray

    publisher = _publisher(store)
    version = ray.get(publisher.refresh.remote())
    return dict(ray.get(publisher.confirm.remote(version, timeout)))


def stop_publisher(store: str | Path) -> bool:
    """Kill the publisher of ``store`` if one runs (it is detached: it outlives the process that started it)."""
    import ray

    try:
        ray.kill(_publisher(store), no_restart=True)
    except SisaError:
        return False
    return True
