"""Loaders: npz, IDX, CSV and Fashion-MNIST files into validated arrays, and the config's splits.

Validation itself lives in :mod:`sisa.data.arrays` (re-exported here); every bad input raises a
:class:`~sisa.errors.DataError` that names the problem and its fix.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import hashlib
import logging
import math
import os
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sisa.config.settings import DataConfig
from sisa.data.arrays import MAX_ID, LabeledArrays, as_arrays, parse_id_text, validated
from sisa.data.batches import Columns
from sisa.data.inputs import model_inputs
from sisa.errors import DataError

__all__ = [
    "load_parquet",
    "parquet_batches",
    "MAX_ID",
    "LabeledArrays",
    "as_arrays",
    "load_csv",
    "load_fashion_mnist",
    "load_idx",
    "load_npz",
    "load_split",
]

log = logging.getLogger(__name__)

PIXEL_SCALE = 255.0  # unsigned-byte pixels -> [0, 1]

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CACHE_DIR = Path.home() / ".cache" / "sisa" / "fashion-mnist"
# S3 website endpoints serve plain HTTP only, so after the documented https form the
# working forms follow; integrity comes from the digests below, not from TLS.
FASHION_MIRRORS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# SHA-256 of the *decompressed* IDX payloads. Debian's and upstream's .gz files hold the
# same deflate stream under different gzip headers (name, mtime), so hashing the .gz
# bytes would reject one or the other.
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_FASHION_HINT = "install it with `apt-get install -y dataset-fashion-mnist` or pass data.root"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_NPZ_FIX = "save it with np.savez(path, x=..., y=..., ids=...)"
# CSV column names taken for ids: refused as features unless data.id_column says which is which.
_ID_NAMES = frozenset({"id", "ids", "sample_id", "sample id"})


def _head(data: LabeledArrays, limit: int | None) -> LabeledArrays:
    """The first ``limit`` samples, copied so that the full arrays can be freed."""
    if limit is None or limit >= len(data):
        return data
    return LabeledArrays(
        data.x[:limit].copy(), data.y[:limit].copy(), data.ids[:limit].copy(), data.numbered, data.scale
    )


def load_npz(path: str | os.PathLike[str], *, num_classes: int) -> LabeledArrays:
    """Load an ``.npz`` holding features, labels and optionally ``ids``.

    Args:
        path: The archive; features under ``x``, ``X`` or ``features``, labels under
            ``y`` or ``labels``, ids (optional) under ``ids``.
        num_classes: Labels must lie in ``[0, num_classes)``.

    Returns:
        The validated arrays.

    Raises:
        DataError: If the file is missing, not an npz, lacks keys, or holds bad data.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist; check data.train / data.test")
    if not zipfile.is_zipfile(p):  # np.load would also accept .npy and pickles
        raise DataError(f"{p} is not an .npz archive; {_NPZ_FIX}")
    try:
        with np.load(p, allow_pickle=False) as f:
            keys = list(f.files)
            xk = next((k for k in ("x", "X", "features") if k in keys), None)
            yk = next((k for k in ("y", "labels") if k in keys), None)
            if xk is None or yk is None:
                raise DataError(
                    f"{p} holds keys {keys}; it needs features under 'x' (or 'X', "
                    "'features') and labels under 'y' (or 'labels'), optionally 'ids'"
                )
            x, y, ids = f[xk], f[yk], (f["ids"] if "ids" in keys else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {p} as .npz ({exc}); {_NPZ_FIX}") from exc
    return validated(x, y, ids, num_classes, copy=False)  # freshly loaded, nobody else holds them


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (names can lie)."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist; check the configured path")
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({exc}); fetch it again") from exc


def _parse_idx(data: bytes, path: Path, ndim: int) -> np.ndarray:
    """Parse IDX: two zero bytes, a type code, ndim, big-endian uint32 dims, then the data."""
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (magic {data[:4].hex()}); check the path")
    if data[3] != ndim:
        raise DataError(f"{path} has {data[3]} dimensions, not {ndim}; swapped images and labels?")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: no overflow on corrupt dims
    if len(data) != expected:  # also catches a header cut short (its dims read as too small)
        raise DataError(
            f"{path} holds {len(data)} bytes but its header {dims} needs {expected}; "
            "it is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def load_idx(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    num_classes: int,
    scale: bool = True,
    raw: bool = False,
) -> LabeledArrays:
    """Load an IDX image file ``(n, rows, cols)`` and its label file ``(n,)``, raw or gzipped.

    Args:
        images_path: The 3-D IDX images.
        labels_path: The 1-D IDX labels.
        num_classes: Labels must lie in ``[0, num_classes)``.
        scale: Divide unsigned-byte pixels by 255 into ``[0, 1]``.
        raw: With ``scale``, keep unsigned-byte pixels as uint8 and say so in the result's
            ``scale`` (255): what a store keeps at a quarter of float32's bytes, dividing when
            it loads (the model sees the same float32 values either way).

    Returns:
        Arrays with ``x`` of shape ``(n, 1, rows, cols)`` and ids ``0..n-1``.

    Raises:
        DataError: On missing, corrupt or truncated files, or unequal counts.
    """
    ipath, lpath = Path(images_path), Path(labels_path)
    images = _parse_idx(_read_maybe_gzip(ipath), ipath, 3)
    labels = _parse_idx(_read_maybe_gzip(lpath), lpath, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels; "
            "pair each image file with its own label file"
        )
    if raw and scale and images.dtype == np.uint8:
        data = validated(images[:, None], labels, None, num_classes, copy=False, native=True)
        return dataclasses.replace(data, scale=PIXEL_SCALE)
    # The very transform a store applies to raw pixels it loads: both give the same float32 bits.
    pixels = PIXEL_SCALE if scale and images.dtype == np.uint8 else None
    x = model_inputs(images[:, None].astype(np.float32), pixels, owned=True)
    return validated(x, labels, None, num_classes, copy=False)


def load_csv(
    path: str | os.PathLike[str], *, num_classes: int, label_column: str = "label", id_column: str | None = None
) -> LabeledArrays:
    """Load a CSV with a header row; every column but the label and id columns is a feature.

    Args:
        path: The CSV file.
        num_classes: Labels must lie in ``[0, num_classes)``.
        label_column: Column of integer labels.
        id_column: Column of integer sample ids (whole numbers, read exactly: ``17.0`` is 17,
            ``17.5`` is refused); ``None`` numbers the rows ``0..n-1``, and then a column
            named ``id``, ``ids`` or ``sample_id`` is refused rather than read as a feature.

    Returns:
        Arrays with ``x`` of shape ``(n, d)``.

    Raises:
        DataError: On a missing file or column, a ragged row, or a non-numeric cell.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file {p} does not exist; check data.train / data.test")
    header, rows = _read_csv(p, label_column, id_column)
    if id_column is None:
        named = [h for h in header if h.lower() in _ID_NAMES and h != label_column]
        if named:
            # Read as a feature, ids near 1e12 swamp the others and the model trains to chance.
            raise DataError(
                f"{p} has a column named {named[0]!r} but data.id_column is not set, so it would be "
                f"read as a feature and the rows numbered 0..n-1: set data.id_column={named[0]} to use "
                "it as the sample ids, or rename the column if it really is a feature"
            )
    feats = [i for i, h in enumerate(header) if h not in (label_column, id_column)]
    if not feats:
        raise DataError(f"{p} has no feature columns besides the label/id columns")
    x = _csv_numbers(p, rows, header, feats, float, np.float64)
    y = _csv_numbers(p, rows, header, [header.index(label_column)], float, np.float64)[:, 0]
    _check_csv_rows(p, rows, header, feats, x, y, label_column, num_classes)
    ids = None if id_column is None else _csv_ids(p, rows, header.index(id_column), id_column)
    return validated(x, y, ids, num_classes, copy=False)


def _read_csv(path: Path, label_column: str, id_column: str | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers) of a CSV file, checked for shape.

    Raises:
        DataError: On an empty file, a missing label or id column, repeated names, a ragged row,
            no data rows, or bytes that are not CSV text.
    """
    try:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path} is empty; a header row naming the columns is required")
            for col, key in ((label_column, "label_column"), (id_column, "id_column")):
                if col is not None and col not in header:
                    raise DataError(f"{path} has no column {col!r}; {_columns_hint(col, header)}; set data.{key}")
            if len(set(header)) != len(header):
                raise DataError(f"{path} repeats a column name in its header {header}; make names unique")
            rows: list[tuple[int, list[str]]] = []
            for row in reader:
                if row and len(row) != len(header):
                    raise DataError(
                        f"{path} line {reader.line_num} has {len(row)} cells, the header {len(header)}; fix that row"
                    )
                if row:  # blank lines (e.g. a trailing newline) carry no sample
                    rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as exc:  # a binary file, a NUL byte, a runaway quote
        raise DataError(
            f"{path} is not a readable CSV text file ({exc}); save it as UTF-8 CSV with a header row"
        ) from exc
    if not rows:
        raise DataError(f"{path} has a header but no data rows; give at least one sample")
    return header, rows


def _csv_numbers(
    path: Path,
    rows: Sequence[tuple[int, list[str]]],
    header: Sequence[str],
    cols: Sequence[int],
    parse: Callable[[str], Any],
    dtype: type,
) -> np.ndarray:
    """Columns ``cols`` of ``rows`` as a ``(rows, cols)`` array of ``dtype``.

    Raises:
        DataError: Naming the line and column of the first cell ``parse`` refuses.
    """
    try:  # numpy parses numeric strings in one pass; on failure, find the cell to blame
        return np.array([[row[c] for c in cols] for _, row in rows], dtype=dtype)
    except (ValueError, OverflowError) as exc:
        bad = next(((line, c, row[c]) for line, row in rows for c in cols if not _parses(parse, row[c])), None)
        if bad is not None:
            line, c, cell = bad
            what = "a whole number" if parse is int else "a number"
            raise DataError(
                f"{path} line {line}, column {header[c]!r}: {cell!r} is not {what}; fix or drop that row"
            ) from None
        names = [header[c] for c in cols]
        raise DataError(f"{path}: cannot read column(s) {names} as numbers ({exc}); check their range") from exc


def _parses(parse: Callable[[str], Any], cell: str) -> bool:
    """Whether ``parse`` accepts ``cell``."""
    try:
        parse(cell)
    except (ValueError, OverflowError):
        return False
    return True


def _csv_ids(path: Path, rows: Sequence[tuple[int, list[str]]], col: int, name: str) -> list[int]:
    """The id column read exactly: ``1000000006891``, ``1000000006891.0`` and ``1.000000006891e12`` are one id.

    Cells follow the one rule for ids written as text (:func:`sisa.data.arrays.parse_id_text`, as for
    ``sisa delete --ids``): decimals, never parsed through a float, so an id above 2**53 keeps
    every digit; a cell that is not a whole number is refused with its line. The range is then
    checked by :func:`sisa.data.arrays.check_id_values` when the arrays are validated.
    """
    ids: list[int] = []
    for line, row in rows:
        try:
            ids.append(parse_id_text(row[col]))
        except ValueError as exc:
            raise DataError(
                f"{path} line {line}, column {name!r}: {exc} (ids are whole numbers such as 17 or 17.0); "
                "fix or drop that row"
            ) from None
    return ids


def _columns_hint(wanted: str, header: Sequence[str]) -> str:
    """The header in a few words: the closest names to ``wanted``, and a short sample of a wide header."""
    close = difflib.get_close_matches(wanted, header, n=3, cutoff=0.6)
    close += [h for h in header if h.lower() == wanted.lower() and h not in close]
    near = f"did you mean {', '.join(repr(h) for h in close)}? " if close else ""
    if len(header) <= 8:
        return f"{near}its columns are {list(header)}"
    shown = ", ".join(repr(h) for h in [*header[:4], "...", *header[-2:]]).replace("'...'", "...")
    return f"{near}its {len(header)} columns are {shown}"


def _check_csv_rows(
    path: Path,
    rows: Sequence[tuple[int, list[str]]],
    header: Sequence[str],
    feats: Sequence[int],
    x: np.ndarray,
    y: np.ndarray,
    label_column: str,
    num_classes: int,
) -> None:
    """Name the file line of the first NaN/inf feature or bad label (the array checks know only row numbers).

    Raises:
        DataError: On a NaN/inf feature or a label that is not an integer in ``[0, num_classes)``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(x.astype(np.float32))
    if not finite.all():
        r, c = (int(v) for v in np.argwhere(~finite)[0])
        raise DataError(
            f"{path} line {rows[r][0]}, column {header[feats[c]]!r}: {rows[r][1][feats[c]]!r} is NaN/inf "
            f"(after float32 conversion; {int((~finite).sum())} NaN/inf value(s) in all); clean or impute them"
        )
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(y) | (y != np.floor(y)) | (y < 0) | (y >= num_classes)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path} line {rows[r][0]}, column {label_column!r}: labels must be integers in [0, {num_classes}); "
            f"found {rows[r][1][header.index(label_column)].strip()} ({int(bad.sum())} bad label(s) in all); "
            "fix the labels or data.num_classes"
        )


def _download(name: str, dest: Path, mirrors: Sequence[str] = FASHION_MIRRORS) -> list[str]:
    """Fetch ``name`` into ``dest`` from the first mirror serving the known payload.

    Returns:
        One line per failed mirror; empty on success.
    """
    errors: list[str] = []
    for url in (base + name for base in mirrors):
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                blob = resp.read()
            digest = hashlib.sha256(gzip.decompress(blob)).hexdigest()
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        if digest != FASHION_SHA256[name]:
            errors.append(f"{url}: sha256 {digest} != expected {FASHION_SHA256[name]}")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(blob)
        os.replace(tmp, dest)  # atomic, so a crash never leaves a half-written file
        log.info("downloaded %s to %s", url, dest)
        return []
    return errors


def load_fashion_mnist(split: str, *, root: str | None = None, raw: bool = False) -> LabeledArrays:
    """Load Fashion-MNIST: pixels scaled to ``[0, 1]``, shape ``(1, 28, 28)``, 10 classes.

    Looks in ``root`` if given; else in the directory of the Debian package
    ``dataset-fashion-mnist``; else in ``~/.cache/sisa/fashion-mnist``, downloading
    missing files and checking their sha256.

    Args:
        split: ``train`` (60000 samples) or ``test`` (10000 samples).
        root: Directory holding the ``*-ubyte.gz`` files.
        raw: Pixels as uint8 with ``scale`` 255 (what a store keeps; the model sees the same
            float32 values).

    Returns:
        Arrays with ids ``0..n-1``.

    Raises:
        DataError: If the split is unknown or the files can be neither found nor fetched.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} is unknown; use 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    if root is not None:
        folder = Path(root)
        if not all((folder / n).is_file() for n in names):
            raise DataError(f"data.root={root} lacks {names}; {_FASHION_HINT}")
    elif all((FASHION_DEBIAN_DIR / n).is_file() for n in names):
        folder = FASHION_DEBIAN_DIR
    else:
        folder = FASHION_CACHE_DIR
        for n in names:
            if not (folder / n).is_file() and (errors := _download(n, folder / n)):
                raise DataError(
                    f"Fashion-MNIST is in neither {FASHION_DEBIAN_DIR} nor {folder}, and downloading {n} "
                    f"failed ({'; '.join(errors)}); {_FASHION_HINT}"
                )
    return load_idx(folder / names[0], folder / names[1], num_classes=10, raw=raw)


def parquet_batches(
    path: str | os.PathLike[str],
    *,
    label_column: str = "label",
    id_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    batch_size: int = 8192,
) -> Iterator[dict[str, np.ndarray]]:
    """Read a Parquet file a record batch at a time, as dicts of numpy columns (bounded memory).

    Args:
        path: The Parquet file (or a directory of them, read as one dataset).
        label_column: The label column.
        id_column: The id column, or None to number the rows.
        feature_columns: The feature columns (default: every column but the label and id columns).
        batch_size: Rows per batch.

    Yields:
        ``{column: array}`` per batch, with exactly the label, id and feature columns.

    Raises:
        DataError: If pyarrow is missing, the file cannot be read, or a named column is missing.
    """
    try:
        import pyarrow.dataset as pads
    except ImportError:
        raise DataError("data.dataset: parquet needs pyarrow; install it with pip install 'sisa[data]'") from None
    p = Path(path)
    if not p.exists():
        raise DataError(f"Parquet file {p} does not exist; check data.train / data.test")
    try:
        dataset = pads.dataset(str(p), format="parquet")
    except Exception as exc:  # pyarrow raises its own error types for a bad file
        raise DataError(f"cannot read {p} as Parquet ({exc}); check data.train / data.test") from exc
    names = list(dataset.schema.names)
    for col, key in ((label_column, "label_column"), (id_column, "id_column")):
        if col is not None and col not in names:
            raise DataError(f"{p} has no column {col!r}; {_columns_hint(col, names)}; set data.{key}")
    features = list(feature_columns) if feature_columns else [c for c in names if c not in (label_column, id_column)]
    named = [c for c in features if c.lower() in _ID_NAMES] if id_column is None else []
    if named:  # read as a feature, an id column would silently ruin training (as for CSV)
        raise DataError(
            f"{p} has a column {named[0]!r} that looks like sample ids; set data.id_column: {named[0]} to use it "
            "as the ids, or list the feature columns in data.feature_columns"
        )
    for col in features:
        if col not in names:
            raise DataError(f"{p} has no column {col!r}; {_columns_hint(col, names)}; set data.feature_columns")
    wanted = [*features, label_column, *([id_column] if id_column else [])]
    for batch in dataset.to_batches(columns=wanted, batch_size=batch_size):
        yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}


def load_parquet(
    path: str | os.PathLike[str],
    *,
    num_classes: int,
    label_column: str = "label",
    id_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
) -> LabeledArrays:
    """Load a Parquet file into memory (``sisa.Ensemble.ingest`` streams one instead: pass a Ray Dataset).

    Args:
        path: The Parquet file.
        num_classes: Labels must lie in ``[0, num_classes)``.
        label_column: The label column.
        id_column: The id column (whole numbers); None numbers the rows ``0..n-1``.
        feature_columns: One column of arrays, or scalar columns stacked in this order
            (default: every column but the label and id columns).

    Raises:
        DataError: On a missing file or column, or bad values (as for any array input).
    """
    parts = []
    batches = parquet_batches(path, label_column=label_column, id_column=id_column, feature_columns=feature_columns)
    for k, batch in enumerate(batches):
        features = [c for c in batch if c not in (label_column, id_column)]
        parts.append(Columns(features, label_column, id_column).arrays(batch, f"{path} batch {k}"))
    if not parts:
        raise DataError(f"{path} holds no rows; give at least one sample")
    x = np.concatenate([x for x, _, _ in parts])
    y = np.concatenate([y for _, y, _ in parts])
    ids = None if id_column is None else np.concatenate([i for _, _, i in parts if i is not None])
    return validated(x, y, ids, num_classes, copy=False)


def load_split(cfg: DataConfig, split: str, *, raw: bool = False) -> LabeledArrays:
    """Load the ``train`` or ``test`` split that ``cfg`` describes, cut to its limit.

    Args:
        cfg: The data section of the config.
        split: ``train`` or ``test``.
        raw: Image pixels as uint8 with ``scale`` 255 (for a store) instead of float32 in [0, 1].

    Returns:
        The validated arrays: the first ``cfg.train_limit`` / ``cfg.test_limit`` samples.

    Raises:
        DataError: If the split is unknown or not configured, or its data is bad.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} is unknown; use 'train' or 'test'")
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    path = cfg.train if split == "train" else cfg.test
    k = cfg.num_classes
    if cfg.dataset == "fashion-mnist":
        if path is not None:
            # data.dataset defaults to fashion-mnist, which reads its own files: a user's data.train would be ignored.
            kind = Path(path).suffix.lstrip(".").lower()
            hint = kind if kind in ("csv", "npz", "parquet") else "csv, npz, parquet or idx"
            raise DataError(
                f"data.{split}={path} is set, but data.dataset is fashion-mnist (the default), which reads its own "
                f"files and would ignore it: set data.dataset={hint}"
            )
        if k != 10:
            raise DataError(f"fashion-mnist has 10 classes, not data.num_classes={k}; set it to 10")
        data = load_fashion_mnist(split, root=cfg.root, raw=raw)
    elif path is None:
        raise DataError(f"no {split} data configured: set data.{split}=PATH")
    elif cfg.dataset == "npz":
        data = load_npz(path, num_classes=k)
    elif cfg.dataset == "csv":
        data = load_csv(path, num_classes=k, label_column=cfg.label_column, id_column=cfg.id_column)
    elif cfg.dataset == "parquet":
        data = load_parquet(
            path,
            num_classes=k,
            label_column=cfg.label_column,
            id_column=cfg.id_column,
            feature_columns=cfg.feature_columns,
        )
    elif cfg.dataset == "idx":
        labels = cfg.train_labels if split == "train" else cfg.test_labels
        if labels is None:
            raise DataError(f"data.dataset='idx' needs data.{split}_labels=PATH")
        data = load_idx(path, labels, num_classes=k, raw=raw)
    else:  # DataConfig validates the name; this guards one built around its checks
        raise DataError(f"data.dataset={cfg.dataset!r} is unknown; use fashion-mnist, npz, csv, idx or parquet")
    return _head(data, limit)
