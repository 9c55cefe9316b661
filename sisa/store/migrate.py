"""Migration of a format-2 store (float32 samples in the clear) into a new format-3 directory.

Format 3 encrypts samples and checkpoints under keys in ``keys/`` and keeps samples in
their own dtype. A format-2 store is read as it is (never written) and copied record by
record into a new directory: every sample checked against its old digest and encrypted
under a new slice key, in the narrowest dtype that gives training the very same float32
values (uint8 for images ingested as bytes, or as pixels scaled to [0, 1]); every checkpoint re-encrypted under a fresh
key; the config, assignments, stage and live records, journal, tombstones and audit log
copied as they are, with the store's HMAC secret, so audit MACs and keyed id hashes stay
valid. The models are the same bytes, so ``verify`` passes on the new store as it did on
the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from sisa.data.inputs import model_inputs
from sisa.errors import IntegrityError, StoreError
from sisa.store.database import FORMAT_VERSION, Store
from sisa.store.records import DBS

__all__ = ["MigrationReport", "migrate"]

log = logging.getLogger(__name__)

_OLD_FORMAT = 2
_OLD_DIGEST = 16  # format 2: BLAKE2b-128 over the id key and the body
_BATCH = 10_000
# Copied as they are: everything but the samples (re-encoded), their assignment (written with
# them), the checkpoints (re-encrypted) and the staged marks (an unfinished ingest is left out).
_VERBATIM = ("stages", "live", "requests", "deleted", "audit")
# Narrowest first: the first (dtype, scale) that gives back every stored float32 value exactly is
# kept. (uint8, 255) is pixels a loader scaled to [0, 1]: stored raw, divided again when loaded.
_CANDIDATES: tuple[tuple[str, float | None], ...] = (
    ("|u1", None),
    ("|u1", 255.0),
    ("|i1", None),
    ("<u2", None),
    ("<i2", None),
    ("<f4", None),
)


@dataclass
class MigrationReport:
    """What a migration copied.

    Attributes:
        source: The format-2 store (unchanged).
        target: The new format-3 store.
        samples: Samples copied.
        feature_dtype: The dtype the new store keeps its samples in.
        feature_scale: What the stored values are divided by when loaded (255: pixels), or None.
        checkpoints: Checkpoints re-encrypted.
        bytes_before: Size of the old store's data file.
        bytes_after: Size of the new store's data and key files.
        skipped_staged: Samples of an unfinished ingest, left out (never part of the store).
    """

    source: str
    target: str
    samples: int
    feature_dtype: str
    feature_scale: float | None
    checkpoints: int
    bytes_before: int
    bytes_after: int
    skipped_staged: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _old_records(txn: lmdb.Transaction, dbs: dict[str, Any], width: int, staged: set[bytes]) -> Iterator[tuple]:
    """(id, label, features as float32, shard, slice) of every published sample, each checked."""
    body_len = 8 + 4 * width
    for key, raw in txn.cursor(db=dbs["samples"]):
        key = bytes(key)
        if key in staged:
            continue
        sid = struct.unpack(">Q", key)[0]
        view = memoryview(raw)
        h = hashlib.blake2b(key, digest_size=_OLD_DIGEST)
        h.update(view[:body_len])
        if len(view) != body_len + _OLD_DIGEST or view[body_len:] != h.digest():
            raise IntegrityError(f"sample {sid} of the format-2 store does not match its digest; nothing was migrated")
        place = txn.get(key, db=dbs["assign"])
        if place is None:
            raise IntegrityError(f"sample {sid} of the format-2 store has no assignment; nothing was migrated")
        shard, slice_ = struct.unpack(">II", bytes(place))
        label = struct.unpack_from("<q", view)[0]
        yield sid, label, np.frombuffer(view, dtype="<f4", offset=8, count=width), shard, slice_


def _raw(x: np.ndarray, dtype: str, scale: float | None) -> np.ndarray:
    """Stored float32 features back in a candidate form (exact only where :func:`_fits` says so)."""
    with np.errstate(all="ignore"):
        return (np.round(x * scale) if scale else x).astype(dtype)


def _fits(x: np.ndarray, dtype: str, scale: float | None) -> bool:
    """Whether ``(dtype, scale)`` gives back exactly the float32 values training sees."""
    back = model_inputs(_raw(x, dtype, scale), scale)  # what a store in that form gives a model
    return bool(np.array_equal(back, x))


def _narrowest(
    txn: lmdb.Transaction, dbs: dict[str, Any], width: int, staged: set[bytes]
) -> tuple[np.dtype[Any], float | None]:
    """The narrowest form that holds every stored feature value exactly (one pass over the samples)."""
    fits = list(_CANDIDATES[:-1])
    for _, _, x, _, _ in _old_records(txn, dbs, width, staged):
        fits = [c for c in fits if _fits(x, *c)]
        if not fits:
            break
    dtype, scale = fits[0] if fits else _CANDIDATES[-1]
    return np.dtype(dtype), scale


def migrate(source: str | Path, target: str | Path) -> MigrationReport:
    """Copy a format-2 store into a new format-3 directory; the source is only read.

    Args:
        source: The format-2 store directory.
        target: A new (or empty) directory for the format-3 store.

    Returns:
        What was copied.

    Raises:
        StoreError: If ``source`` is not a format-2 store, or ``target`` is not new; a
            failed migration removes what it wrote under ``target``.
        IntegrityError: If a record of the source does not match its digest.
    """
    src, dst = Path(source), Path(target)
    if not (src / "data.mdb").is_file():
        raise StoreError(f"{src} is not a sisa store (no data.mdb); point --store at the store to migrate")
    if dst.exists() and any(dst.iterdir()):
        raise StoreError(
            f"{dst} exists and is not empty; name a new directory for the migrated store (--to). A migration "
            "that was killed leaves a partial one there: delete it and run the command again"
        )
    env = lmdb.open(str(src), readonly=True, lock=False, max_dbs=len(DBS) + 8, subdir=True)
    try:
        dbs: dict[str, Any] = {name: env.open_db(name.encode(), create=False) for name in DBS}
        try:
            dbs["staged"] = env.open_db(b"staged", create=False)
        except lmdb.NotFoundError:
            dbs["staged"] = None
        with env.begin() as txn:
            meta = {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=dbs["meta"])}
            if meta.get("format") != _OLD_FORMAT:
                version = meta.get("format")
                hint = "it is already in this format" if version == FORMAT_VERSION else "this sisa cannot read it"
                raise StoreError(f"{src} has store format {version!r}, not {_OLD_FORMAT}; {hint}")
            staged = set() if dbs["staged"] is None else {bytes(k) for k, _ in txn.cursor(db=dbs["staged"])}
            shape = tuple(meta.get("feature_shape") or ())
            width = int(np.prod(shape)) if shape else 0
            dtype, scale = _narrowest(txn, dbs, width, staged) if width else (np.dtype("<f4"), None)
            created = not dst.exists()
            try:
                report = _copy(src, dst, txn, dbs, meta, (dtype, scale), width, staged)
            except BaseException:
                if created:
                    shutil.rmtree(dst, ignore_errors=True)
                else:
                    for child in dst.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                raise
    finally:
        env.close()
    log.info("migrated %s -> %s: %d samples as %s", src, dst, report.samples, report.feature_dtype)
    return report


def _copy(
    src: Path,
    dst: Path,
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    meta: dict[str, Any],
    form: tuple[np.dtype[Any], float | None],
    width: int,
    staged: set[bytes],
) -> MigrationReport:
    """Write the new store from the old one's read transaction (see :func:`migrate`)."""
    dtype, scale = form
    fields = {k: v for k, v in meta.items() if k != "format"}
    if width:
        fields["feature_dtype"] = dtype.str
    if scale:
        fields["feature_scale"] = scale
    store = Store.create(dst, fields, secret=(src / "hmac.key").read_bytes())
    try:
        samples = 0
        batch: list[tuple] = []

        def flush() -> None:
            ids = np.asarray([b[0] for b in batch], dtype=np.int64)
            y = np.asarray([b[1] for b in batch], dtype=np.int64)
            x = _raw(np.stack([b[2] for b in batch]), dtype.str, scale)
            shard = np.asarray([b[3] for b in batch], dtype=np.int64)
            slice_ = np.asarray([b[4] for b in batch], dtype=np.int64)
            store.write(lambda t: store.put_samples(t, ids, x, y, shard, slice_, dtype=dtype))

        for record in _old_records(txn, dbs, width, staged):
            batch.append(record)
            samples += 1
            if len(batch) >= _BATCH:
                flush()
                batch = []
        if batch:
            flush()
        checkpoints = 0
        for key, blob in txn.cursor(db=dbs["ckpt"]):
            sealed = store.seal_checkpoint(bytes(blob))

            def put_checkpoint(t: lmdb.Transaction, k: bytes = bytes(key), v: bytes = sealed) -> None:
                t.put(k, v, db=store.db("ckpt"))

            store.write(put_checkpoint)
            checkpoints += 1
        for name in _VERBATIM:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=dbs[name])]
            if name == "requests":  # format 3 records the runs a request touched; nothing to erase here
                rows = [(k, _with_runs(v)) for k, v in rows]

            def put_rows(t: lmdb.Transaction, name: str = name, rows: list = rows) -> None:
                for k, v in rows:
                    t.put(k, v, db=store.db(name))

            store.write(put_rows)
    finally:
        store.close()
    after = sum(f.stat().st_size for f in (dst / "data.mdb", dst / "keys" / "data.mdb"))
    return MigrationReport(
        source=str(src),
        target=str(dst),
        samples=samples,
        feature_dtype=dtype.name,
        feature_scale=scale,
        checkpoints=checkpoints,
        bytes_before=(src / "data.mdb").stat().st_size,
        bytes_after=after,
        skipped_staged=len(staged),
    )


def _with_runs(raw: bytes) -> bytes:
    """A journaled request with ``runs`` on every shard (empty: the new store never held its ids)."""
    request = json.loads(raw)
    for info in request.get("shards", {}).values():
        info.setdefault("runs", [])
    return json.dumps(request, sort_keys=True).encode()
