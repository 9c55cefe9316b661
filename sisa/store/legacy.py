"""Readers of the older store formats (2 and 3), for ``sisa migrate`` only: nothing here writes a store.

- Format 2: float32 features and an int64 label in the clear, with a BLAKE2b-128 digest;
  checkpoints as plain bytes; assignment id -> (shard, slice).
- Format 3: records under a SHAKE-256 keystream with 128-bit keys in ``keys/`` (one per
  membership run and generation, one per checkpoint), each sample's plaintext ending in an
  unkeyed BLAKE2b-64 digest of its id and body; assignment id -> (shard, slice, run).

Format 3's check values are unkeyed, so a digest match here proves the bytes were not damaged,
not that nobody edited them: someone who knew a sample's plaintext could have forged it. That is
why format 4 exists; a migration can only carry over what the old store says.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from sisa.errors import IntegrityError, StoreError

__all__ = ["LegacyRecord", "V2Reader", "V3Reader", "open_legacy"]

LegacyRecord = tuple[int, int, np.ndarray, int, int]  # id, label, features, shard, slice

# The named databases every format-2 or -3 store has, and those that came later (may be absent).
_FIXED = ("meta", "samples", "assign", "members", "ckpt", "stages", "live", "requests", "deleted", "audit")
_LATER = ("staged", "core")


def _tables(env: lmdb.Environment, names: tuple[str, ...], optional: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if not optional:
                raise StoreError(f"{env.path()} has no table {name!r}; it is damaged or not a sisa store") from None
    return out


class _Reader:
    """A read-only view of an old store's bulk environment (one read transaction, held until :meth:`close`)."""

    version = 0

    def __init__(self, path: Path, env: lmdb.Environment, meta: dict[str, Any]) -> None:
        self.path, self.env, self.meta = path, env, meta
        self.dbs = {**_tables(env, _FIXED, optional=False), **_tables(env, _LATER, optional=True)}
        self.txn = env.begin(buffers=True)
        staged = self.dbs.get("staged")
        self.staged = set() if staged is None else {bytes(k) for k in self.txn.cursor(db=staged).iternext(values=False)}
        shape = meta.get("feature_shape") or ()
        self.shape = tuple(int(d) for d in shape)
        self.width = int(np.prod(self.shape)) if self.shape else 0

    def close(self) -> None:
        """Release the read transaction and the environment."""
        self.txn.abort()
        self.env.close()

    def rows(self, name: str) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a table, as bytes (empty if the store predates it)."""
        db = self.dbs.get(name)
        return [] if db is None else [(bytes(k), bytes(v)) for k, v in self.txn.cursor(db=db)]

    def checkpoint_digests(self) -> dict[str, str]:
        """``ckpt`` key -> the sha256 its stage, live or backbone record gives it."""
        out: dict[str, str] = {}
        for name in ("stages", "live"):
            for _, raw in self.rows(name):
                record = json.loads(raw)
                out[record["key"]] = record["sha256"]
        backbone = self.meta.get("backbone")
        if backbone:
            out[backbone["key"]] = backbone["sha256"]
        return out

    def records(self) -> Iterator[LegacyRecord]:  # pragma: no cover - each format has its own
        """Every published sample, checked."""
        raise NotImplementedError

    def checkpoints(self) -> Iterator[tuple[str, bytes]]:  # pragma: no cover - each format has its own
        """Every checkpoint's name and plaintext bytes, checked against its record's sha256."""
        raise NotImplementedError

    def _checked(self, name: str, blob: bytes, digests: dict[str, str]) -> bytes:
        want = digests.get(name)
        if want is not None and hashlib.sha256(blob).hexdigest() != want:
            raise IntegrityError(
                f"checkpoint {name} of the format-{self.version} store {self.path} does not match its record's "
                "sha256; nothing was migrated"
            )
        return blob


class V2Reader(_Reader):
    """Format 2: clear float32 records with a BLAKE2b-128 digest."""

    version = 2
    _DIGEST = 16

    def records(self) -> Iterator[LegacyRecord]:
        """(id, label, float32 features, shard, slice) of every published sample, each checked."""
        body_len = 8 + 4 * self.width
        for k, raw in self.txn.cursor(db=self.dbs["samples"]):
            key = bytes(k)
            if key in self.staged:
                continue
            sid = struct.unpack(">Q", key)[0]
            view = memoryview(raw)
            h = hashlib.blake2b(key, digest_size=self._DIGEST)
            h.update(view[:body_len])
            if len(view) != body_len + self._DIGEST or view[body_len:] != h.digest():
                raise IntegrityError(
                    f"sample {sid} of the format-2 store does not match its digest; nothing was migrated"
                )
            place = self.txn.get(key, db=self.dbs["assign"])
            if place is None:
                raise IntegrityError(f"sample {sid} of the format-2 store has no assignment; nothing was migrated")
            shard, slice_ = struct.unpack(">II", bytes(place)[:8])
            label = struct.unpack_from("<q", view)[0]
            yield sid, label, np.frombuffer(view, dtype="<f4", offset=8, count=self.width), shard, slice_

    def checkpoints(self) -> Iterator[tuple[str, bytes]]:
        """Every checkpoint (plain bytes in format 2)."""
        digests = self.checkpoint_digests()
        for key, blob in self.txn.cursor(db=self.dbs["ckpt"]):
            name = bytes(key).decode()
            yield name, self._checked(name, bytes(blob), digests)


def _keystream(key: bytes, tag: bytes, name: bytes | memoryview, data: bytes | memoryview) -> bytes:
    """Format 3's cipher: ``data`` XOR SHAKE-256(b"sisa-" + tag + b"|" + key + name) (its own inverse)."""
    n = len(data)
    stream = hashlib.shake_256(b"sisa-" + tag + b"|" + key + name).digest(n)
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


class V3Reader(_Reader):
    """Format 3: keystream-encrypted records, keys in ``keys/`` (read-only here)."""

    version = 3
    _DIGEST = 8  # BLAKE2b-64 over the id key and the body, inside the encrypted record
    _KEY = 16
    _SLICE = struct.Struct(">IIQI")  # shard, slice, run, generation

    def __init__(self, path: Path, env: lmdb.Environment, meta: dict[str, Any]) -> None:
        super().__init__(path, env, meta)
        keys_dir = path / "keys"
        if not (keys_dir / "data.mdb").is_file():
            raise StoreError(f"format-3 store {path} has no key environment ({keys_dir}); it cannot be read")
        self.key_env = lmdb.open(str(keys_dir), readonly=True, lock=False, max_dbs=8, subdir=True)
        kdbs = _tables(self.key_env, ("slice", "ckpt"), optional=False)
        with self.key_env.begin() as ktxn:
            self.run_keys: dict[tuple[int, int, int], list[bytes]] = {}
            for k, v in ktxn.cursor(db=kdbs["slice"]):
                shard, slice_, run, _ = self._SLICE.unpack(bytes(k))
                self.run_keys.setdefault((shard, slice_, run), []).insert(0, bytes(v[: self._KEY]))  # newest first
            self.ckpt_keys = {bytes(k): bytes(v[: self._KEY]) for k, v in ktxn.cursor(db=kdbs["ckpt"])}
        self.dtype = np.dtype(meta.get("feature_dtype", "<f4")).newbyteorder("<")

    def close(self) -> None:
        """Release both environments."""
        self.key_env.close()
        super().close()

    def records(self) -> Iterator[LegacyRecord]:
        """(id, label, features in the store's dtype, shard, slice) of every published sample, each checked."""
        body_len = 4 + self.dtype.itemsize * self.width
        for k, raw in self.txn.cursor(db=self.dbs["samples"]):
            key = bytes(k)
            if key in self.staged:
                continue
            sid = struct.unpack(">Q", key)[0]
            place = self.txn.get(key, db=self.dbs["assign"])
            if place is None:
                raise IntegrityError(f"sample {sid} of the format-3 store has no assignment; nothing was migrated")
            shard, slice_, run = struct.unpack(">IIQ", bytes(place))
            plain = None
            if len(raw) == body_len + self._DIGEST:
                for key_bytes in self.run_keys.get((shard, slice_, run), []):
                    candidate = _keystream(key_bytes, b"sample", key, raw)
                    check = hashlib.blake2b(key, digest_size=self._DIGEST)
                    check.update(candidate[:body_len])
                    if candidate[body_len:] == check.digest():
                        plain = candidate
                        break
            if plain is None:
                raise IntegrityError(
                    f"sample {sid} (shard {shard} slice {slice_} run {run}) of the format-3 store {self.path} does "
                    "not decrypt to its digest under its run's keys; nothing was migrated"
                )
            label = struct.unpack_from("<i", plain)[0]
            yield sid, label, np.frombuffer(plain, dtype=self.dtype, offset=4, count=self.width), shard, slice_

    def checkpoints(self) -> Iterator[tuple[str, bytes]]:
        """Every checkpoint (and the backbone), decrypted and checked against its record's sha256."""
        digests = self.checkpoint_digests()
        for k, raw in self.txn.cursor(db=self.dbs["ckpt"]):
            name = bytes(k).decode()
            token = bytes(raw[:16])
            key = self.ckpt_keys.get(token)
            if key is None:
                raise IntegrityError(
                    f"checkpoint {name} of the format-3 store {self.path} has no key in keys/; nothing was migrated"
                )
            yield name, self._checked(name, _keystream(key, b"ckpt", token, memoryview(raw)[16:]), digests)


def open_legacy(path: Path) -> V2Reader | V3Reader:
    """A reader of the format-2 or format-3 store at ``path`` (never written).

    Raises:
        StoreError: If ``path`` is not a store, or has another format (naming it).
    """
    if not (path / "data.mdb").is_file():
        raise StoreError(f"{path} is not a sisa store (no data.mdb); point --store at the store to migrate")
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=len(_FIXED) + len(_LATER) + 8, subdir=True)
    try:
        meta_db = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            meta = {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=meta_db)}
        version = meta.get("format")
        if version == 2:
            return V2Reader(path, env, meta)
        if version == 3:
            return V3Reader(path, env, meta)
    except BaseException:
        env.close()
        raise
    env.close()
    raise StoreError(f"{path} has store format {version!r}; sisa migrate converts formats 2 and 3")
