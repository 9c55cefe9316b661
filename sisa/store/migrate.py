"""``sisa migrate``: copy a format-2 or format-3 store into a new format-4 directory.

Format 4 seals every sample, checkpoint and the backbone with AES-256-GCM, bound to what each
record is (:mod:`sisa.store.cipher`). The old store is read as it is (never written,
:mod:`sisa.store.legacy`) and copied record by record into a new directory: every sample
checked against its old digest and sealed under a new run key; every checkpoint checked
against its record's sha256 and sealed under a fresh key; the config, stage and live records,
journal, tombstones, core set and audit log copied as they are, with the store's HMAC secret,
so audit MACs and keyed id hashes stay valid. The models are the same bytes, so ``verify``
passes on the new store as it did on the old one.

Format 2 kept float32 samples in the clear; they are stored in the narrowest dtype that gives
training the very same float32 values (uint8 for images ingested as bytes, or as pixels scaled to
[0, 1]). Format 3 already kept each sample in its own dtype, which is kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from sisa.data.inputs import model_inputs
from sisa.errors import StoreError
from sisa.store.database import FORMAT_VERSION, Store
from sisa.store.layout import TABLES
from sisa.store.legacy import LegacyRecord, V2Reader, V3Reader, open_legacy

__all__ = ["MigrationReport", "migrate"]

log = logging.getLogger(__name__)

_BATCH = 10_000
# Not copied as they are: the samples (re-sealed), their assignment and membership (written with
# them), the checkpoints (re-sealed), the staged marks (an unfinished ingest is left out) and the meta
# (written by create).
_DERIVED = {"meta", "samples", "assign", "members", "ckpt", "staged"}
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
        source: The old store (unchanged).
        target: The new format-4 store.
        source_format: The old store's format (2 or 3).
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
    source_format: int
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


def _raw(x: np.ndarray, dtype: str, scale: float | None) -> np.ndarray:
    """Stored float32 features back in a candidate form (exact only where :func:`_fits` says so)."""
    with np.errstate(all="ignore"):
        return (np.round(x * scale) if scale else x).astype(dtype)


def _fits(x: np.ndarray, dtype: str, scale: float | None) -> bool:
    """Whether ``(dtype, scale)`` gives back exactly the float32 values training sees."""
    back = model_inputs(_raw(x, dtype, scale), scale)  # what a store in that form gives a model
    return bool(np.array_equal(back, x))


def _narrowest(reader: V2Reader) -> tuple[np.dtype[Any], float | None]:
    """The narrowest form that holds every stored feature value of a format-2 store exactly (one pass)."""
    fits = list(_CANDIDATES[:-1])
    for _, _, x, _, _ in reader.records():
        fits = [c for c in fits if _fits(x, *c)]
        if not fits:
            break
    dtype, scale = fits[0] if fits else _CANDIDATES[-1]
    return np.dtype(dtype), scale


def _form(reader: V2Reader | V3Reader) -> tuple[np.dtype[Any], float | None]:
    """The dtype and scale the new store keeps its samples in."""
    if not reader.width:
        return np.dtype("<f4"), None
    if isinstance(reader, V2Reader):
        return _narrowest(reader)
    scale = reader.meta.get("feature_scale")
    return reader.dtype, None if scale is None else float(scale)


def migrate(source: str | Path, target: str | Path) -> MigrationReport:
    """Copy a format-2 or format-3 store into a new format-4 directory; the source is only read.

    Args:
        source: The old store directory.
        target: A new (or empty) directory for the format-4 store.

    Returns:
        What was copied.

    Raises:
        StoreError: If ``source`` is not a format-2 or -3 store (one of this format is named as
            such), or ``target`` is not new; a failed migration removes what it wrote under ``target``.
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
    try:
        reader = open_legacy(src)
    except StoreError as exc:
        if f"format {FORMAT_VERSION}" in str(exc) or f"format {FORMAT_VERSION!r}" in str(exc):
            raise StoreError(f"{src} has store format {FORMAT_VERSION}: it is already in this format") from None
        raise
    try:
        form = _form(reader)
        created = not dst.exists()
        try:
            report = _copy(reader, dst, form)
        except BaseException:
            if created:
                shutil.rmtree(dst, ignore_errors=True)
            else:
                for child in dst.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
    finally:
        reader.close()
    log.info(
        "migrated %s (format %d) -> %s: %d samples as %s",
        src,
        reader.version,
        dst,
        report.samples,
        report.feature_dtype,
    )
    return report


def _batches(records: Iterator[LegacyRecord]) -> Iterator[list[LegacyRecord]]:
    batch: list[LegacyRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _put_batch(store: Store, batch: list[LegacyRecord], form: tuple[np.dtype[Any], float | None], clear: bool) -> None:
    """Seal one batch of old samples into the new store, in their (shard, slice), one write transaction."""
    dtype, scale = form
    ids = np.asarray([b[0] for b in batch], dtype=np.int64)
    y = np.asarray([b[1] for b in batch], dtype=np.int64)
    stacked = np.stack([b[2] for b in batch])
    x = _raw(stacked, dtype.str, scale) if clear else stacked  # format 2 kept float32; format 3 its own dtype
    shard = np.asarray([b[3] for b in batch], dtype=np.int64)
    slice_ = np.asarray([b[4] for b in batch], dtype=np.int64)
    store.write(lambda t: store.put_samples(t, ids, x, y, shard, slice_, dtype=dtype))


def _copy(reader: V2Reader | V3Reader, dst: Path, form: tuple[np.dtype[Any], float | None]) -> MigrationReport:
    """Write the new store from the old one's reader (see :func:`migrate`)."""
    dtype, scale = form
    fields = {k: v for k, v in reader.meta.items() if k != "format"}
    if reader.width:
        fields["feature_dtype"] = dtype.str
    if scale:
        fields["feature_scale"] = scale
    secret = reader.path / "hmac.key"
    store = Store.create(dst, fields, secret=secret.read_bytes())
    try:
        samples = 0
        for batch in _batches(reader.records()):
            _put_batch(store, batch, form, clear=reader.version == 2)
            samples += len(batch)
        checkpoints = 0
        for name, blob in reader.checkpoints():
            sealed = store.seal_checkpoint(blob, name)

            def put_checkpoint(t: lmdb.Transaction, k: bytes = name.encode(), v: bytes = sealed) -> None:
                t.put(k, v, db=store.db("ckpt"))

            store.write(put_checkpoint)
            checkpoints += 1
        for name in (*TABLES.fixed, *TABLES.later):
            if name in _DERIVED:
                continue
            rows = reader.rows(name)
            if name == "requests":  # the new store never held a deleted id's record: nothing to erase
                rows = [(k, _without_runs(v)) for k, v in rows]

            def put_rows(t: lmdb.Transaction, name: str = name, rows: list = rows) -> None:
                for k, v in rows:
                    t.put(k, v, db=store.db(name))

            store.write(put_rows)
    finally:
        store.close()
    after = sum(f.stat().st_size for f in (dst / "data.mdb", dst / "keys" / "data.mdb"))
    return MigrationReport(
        source=str(reader.path),
        target=str(dst),
        source_format=reader.version,
        samples=samples,
        feature_dtype=dtype.name,
        feature_scale=scale,
        checkpoints=checkpoints,
        bytes_before=(reader.path / "data.mdb").stat().st_size,
        bytes_after=after,
        skipped_staged=len(reader.staged),
    )


def _without_runs(raw: bytes) -> bytes:
    """A journaled request whose ``runs`` are empty on every shard: its ids were never in the new store."""
    request = json.loads(raw)
    for info in request.get("shards", {}).values():
        info["runs"] = []
    return json.dumps(request, sort_keys=True).encode()
