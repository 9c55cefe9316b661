"""The store's layout: named databases, big-endian keys, a sample's sealed format, what record code needs.

:class:`StoreHost` is what :mod:`sisa.store.samples` and :mod:`sisa.store.records` use of the store.

Keys are big-endian so LMDB's byte order is numeric order: a prefix scan of ``members``
lists one slice of one shard in id order, and of ``stages`` one shard's stages in order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import lmdb

from sisa.store.cipher import OVERHEAD
from sisa.store.environment import Tables

if TYPE_CHECKING:
    from sisa.store.keyring import KeyRing

__all__ = [
    "BACKBONE_PREFIX",
    "COMBINER_PREFIX",
    "DBS",
    "DEFAULT_DTYPE",
    "LABEL",
    "PLACE",
    "RUN_MAX",
    "SAMPLE_KIND",
    "SAMPLE_PLACE",
    "SEAL_OVERHEAD",
    "TABLES",
    "StoreHost",
    "checkpoint_ad",
    "id_key",
    "run_key",
    "sample_ad",
    "shard_key",
    "stage_key",
]

# samples: id -> sealed label + features; assign: id -> (shard, slice, run); members: (shard, slice, run) -> the
# run's ids, packed (a slice's membership in full pages; see RUN_MAX);
# ckpt: key -> checkpoint bytes; stages: (shard, stage) -> record; live: shard -> live record;
# requests: request id -> deletion request; deleted: keyed hash of an id -> request id; audit: seq -> entry.
DBS = ("meta", "samples", "assign", "members", "ckpt", "stages", "live", "requests", "deleted", "audit")
# Tables added after format 2 was fixed: a writable open creates them, a read-only open of an older
# store reads them as empty. ``staged``: ids an unfinished ingest wrote (invisible until it commits).
# The shared backbone's bytes live in ``ckpt`` under :data:`BACKBONE_PREFIX` + its digest (sealed like a
# checkpoint, so the key sweep keeps its key), described by the meta's ``backbone`` record.
# ``core``: ids of the core set (never deletable; they train the shared backbone), key -> b"".
# ``commits``: per shard, the cached bucketed manifest commitment (:mod:`sisa.unlearn.commitcache`).
LATER_DBS = ("staged", "core", "commits")
TABLES = Tables(fixed=DBS, later=LATER_DBS)
BACKBONE_PREFIX = "backbone-"
# The combiner (``aggregate.method: combiner``) lives in ``ckpt`` too, under this prefix + the digest of
# what it was fitted on, described by the meta's ``combiner`` record (:mod:`sisa.train.combiner`).
COMBINER_PREFIX = "combiner-"


def id_key(sample_id: int) -> bytes:
    """Big-endian key of a sample id, so LMDB's byte order is numeric order."""
    return struct.pack(">Q", sample_id)


# Ids per membership run: 508 little-endian u64 and LMDB's 16-byte header fill one 4 KiB overflow
# page. One key per id (the obvious index) cost 47 bytes a sample here, as ingest's inserts into the
# middle of the table split pages in half; full runs cost 8.
RUN_MAX = 508
PLACE = struct.Struct(">IIQ")  # shard, slice, run


def run_key(shard: int, slice_: int, run: int) -> bytes:
    """Key of one membership run of a slice; a prefix scan of (shard, slice) lists the slice."""
    return PLACE.pack(shard, slice_, run)


def stage_key(shard: int, stage: int) -> bytes:
    """Key of a stage record."""
    return struct.pack(">II", shard, stage)


def shard_key(shard: int) -> bytes:
    """Key of a shard's live-model record."""
    return struct.pack(">I", shard)


# A sample's plaintext body: int32 label, then its features in the store's dtype. Sealed, it is the
# body with AES-GCM's nonce in front and tag behind (28 bytes): 4 Fashion-MNIST records (816 bytes)
# fill a 4 KiB LMDB page. The keystream's 8-byte digest fitted 5, but it was unkeyed (forgeable).
SEAL_OVERHEAD = OVERHEAD
LABEL = struct.Struct("<i")
DEFAULT_DTYPE = "<f4"  # what a store without samples yet reports
# Associated data of a sealed sample: what it is and where it lives. The open of a record moved to
# another id, run (or slice or shard) or key generation, or of another kind, fails to authenticate.
SAMPLE_KIND = b"sisa-smp"  # then the id key (big-endian id), then SAMPLE_PLACE
SAMPLE_PLACE = struct.Struct(">IIQI")  # shard, slice, run, generation
_CKPT_KIND, _BACKBONE_KIND, _COMBINER_KIND = b"sisa-ckpt|", b"sisa-backbone|", b"sisa-combiner|"


def sample_ad(sid_key: bytes, place: tuple[int, int, int], generation: int) -> bytes:
    """The associated data a sample is sealed with: kind, id, shard, slice, run and key generation."""
    return SAMPLE_KIND + sid_key + SAMPLE_PLACE.pack(*place, generation)


def checkpoint_ad(token: bytes, name: str) -> bytes:
    """The associated data of a checkpoint (or the backbone, or the combiner): its token and its ``ckpt`` key."""
    kind = _CKPT_KIND
    if name.startswith(BACKBONE_PREFIX):
        kind = _BACKBONE_KIND
    elif name.startswith(COMBINER_PREFIX):
        kind = _COMBINER_KIND
    return kind + token + b"|" + name.encode()


T = TypeVar("T")


class StoreHost(Protocol):
    """What the record code (:mod:`sisa.store.samples`, :mod:`sisa.store.records`) needs of the store.

    :class:`~sisa.store.database.Store` provides it (environments, metadata, keys, transactions);
    the record classes name it as their base, so a type checker refuses a store that lacks a member.
    """

    path: Path

    @property
    def _dbs(self) -> dict[str, Any]:
        """The named databases, by name (a table added after format 2 is absent from an older store)."""
        ...

    @property
    def keys(self) -> KeyRing:
        """The store's key environment."""
        ...

    def db(self, name: str) -> Any:
        """Handle of a named database."""
        ...

    def meta(self, txn: lmdb.Transaction | None = None) -> dict[str, Any]:
        """The store's metadata."""
        ...

    def meta_value(self, txn: lmdb.Transaction, key: str, default: Any = None) -> Any:
        """One metadata key's value (``default`` when unset)."""
        ...

    def put_meta(self, txn: lmdb.Transaction, **values: Any) -> None:
        """Set metadata keys inside the caller's write transaction."""
        ...

    def checkpoint_tokens(self) -> set[bytes]:
        """The token of every stored checkpoint."""
        ...

    def changed_since(self, txn: lmdb.Transaction) -> bool:
        """Whether a write committed after ``txn``'s snapshot."""
        ...

    def key_snapshot(self, txn: lmdb.Transaction) -> AbstractContextManager[lmdb.Transaction]:
        """The key environment's snapshot paired with ``txn``."""
        ...

    def read(self) -> AbstractContextManager[lmdb.Transaction]:
        """A read transaction of the bulk environment."""
        ...

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction."""
        ...
