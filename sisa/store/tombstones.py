"""Tombstones: which ids earlier requests deleted, looked up by keyed hash (never stored in the clear).

The deletion journal writes them (:mod:`sisa.unlearn.journal`); ingest reads them so that
a deleted id is never reused, and a repeated deletion finds the request that took its ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from sisa.store.database import Store
from sisa.store.digests import keyed_hash

__all__ = ["deleted_ids", "deleting_requests"]


def deleting_requests(store: Store, ids: Iterable[int]) -> dict[int, int]:
    """Which request deleted each of ``ids``; ids never deleted are left out.

    Returns:
        Id -> the ``request_id`` of the request that deleted it.
    """
    secret = store.secret()
    out: dict[int, int] = {}
    with store.read() as txn:
        for i in ids:
            value = txn.get(keyed_hash(secret, int(i)).encode(), db=store.db("deleted"))
            if value is not None:
                out[int(i)] = int(bytes(value))
    return out


def deleted_ids(store: Store, ids: Iterable[int]) -> list[int]:
    """Which of ``ids`` were deleted by an earlier request, in the order given."""
    return list(deleting_requests(store, ids))
