"""Turn user data (arrays, tensors, Datasets, npz/IDX/CSV files, Fashion-MNIST) into validated arrays.

Every bad input raises a :class:`~sisa.errors.DataError` that names the problem and its fix.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import math
import os
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sisa.config import DataConfig
from sisa.errors import DataError

__all__ = [
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

# 2**63 - 1 stays free so callers may use it as a sentinel next to int64 ids.
MAX_ID = 2**63 - 2

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


# eq=False: the generated __eq__ would compare arrays elementwise and raise.
@dataclass(frozen=True, eq=False)
class LabeledArrays:
    """Validated samples: features, labels and stable sample ids.

    Attributes:
        x: float32, C-contiguous, shape ``(n, *feature_shape)``, ``n >= 1``.
        y: int64 labels, shape ``(n,)``.
        ids: int64 ids, shape ``(n,)``, unique, each in ``[0, MAX_ID]``.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_numpy(value: Any) -> np.ndarray:
    """Arrays, nested lists or torch tensors as numpy, without importing torch."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return np.asarray((t.float() if t.dtype == torch.bfloat16 else t).numpy())
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise DataError(f"cannot make an array of the input ({exc}); give equal-length rows") from exc


def _from_dataset(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stack a map-style Dataset of ``(features, label)`` items into x and y."""
    if not hasattr(ds, "__len__"):
        raise DataError("a Dataset passed as x needs len(); use a map-style Dataset")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"Dataset item {i} must be a (features, label) pair, not {item!r:.60}")
        feats, label = _to_numpy(item[0]), _to_numpy(item[1])
        if xs and feats.shape != xs[0].shape:
            raise DataError(
                f"Dataset items have inconsistent feature shapes: item 0 is {xs[0].shape}, "
                f"item {i} is {feats.shape}; pad or resize the features to one shape"
            )
        if label.size != 1:
            raise DataError(f"Dataset item {i} has a label of shape {label.shape}; use scalar labels")
        xs.append(feats)
        ys.append(label.reshape(()))
    if not xs:
        raise DataError("x is empty (0 samples); give at least one sample")
    return np.stack(xs), np.stack(ys)


def _check_x(x: np.ndarray, copy: bool) -> np.ndarray:
    """Float32, C-contiguous, finite features of shape ``(n, ...)``."""
    if x.ndim >= 1 and x.shape[0] == 0:
        raise DataError("x is empty (0 samples); give at least one sample")
    if x.dtype.kind not in "iuf":  # bool, complex, str, object
        raise DataError(f"features x must be numeric, not {x.dtype}; convert them first (e.g. x.astype(np.float32))")
    if x.ndim < 2:
        raise DataError(
            f"x must have shape (n, features...), not {x.shape}; reshape it, "
            "e.g. x.reshape(-1, 1) for one feature per sample"
        )
    with np.errstate(over="ignore"):  # overflow becomes inf and is reported below
        out = np.array(x, np.float32, order="C", copy=True) if copy else np.ascontiguousarray(x, np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"x holds {int(bad.sum())} NaN/inf value(s) (after float32 conversion), "
            f"the first at index {first}; clean or impute them before training"
        )
    return out


def _int_vector(a: np.ndarray, n: int, name: str, hi: int, rule: str, fix: str) -> np.ndarray:
    """A fresh int64 copy of ``a`` after checking: 1-D, length n, integral, in [0, hi]."""
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D of shape (n,), not {a.shape}; try {name}.ravel()")
    if len(a) != n:
        raise DataError(f"len({name})={len(a)} != len(x)={n}; give one per sample")
    if a.dtype.kind not in "iuf":  # bool, str, object (mixed types) have no safe integer reading
        raise DataError(f"{rule}; got dtype {a.dtype}; {fix}")
    bad = (a < 0) | (a > hi)
    if a.dtype.kind == "f":
        # 2.0**63 is exact, whereas float(MAX_ID) rounds up to 2**63 and would let it pass.
        bad |= ~np.isfinite(a) | (a != np.floor(a)) | (a >= 2.0**63)
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise DataError(f"{rule}; found {a[p].item()!r} at position {p}; {fix}")
    return np.array(a, dtype=np.int64, copy=True)


def _check_ids(ids: Any, n: int) -> np.ndarray:
    """Unique int64 ids in ``[0, MAX_ID]``; ``None`` gives ``0..n-1``."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    rule, fix = "ids must be integers in [0, 2**63 - 2]", "give each sample a non-negative integer id"
    if isinstance(ids, (list, tuple)):
        # Check the Python values one by one: numpy would read True as 1, keep too-big ints
        # as objects, and round big ints that share a list with floats.
        clean: list[int] = []
        for p, v in enumerate(ids):
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            if ok and isinstance(v, (float, np.floating)):
                ok = math.isfinite(v) and float(v).is_integer()
            if not ok or not 0 <= int(v) <= MAX_ID:
                raise DataError(f"{rule}; found {v!r} at position {p}; {fix}")
            clean.append(int(v))
        ids = np.array(clean, dtype=np.int64)
    out = _int_vector(_to_numpy(ids), n, "ids", MAX_ID, rule, fix)
    order = np.argsort(out, kind="stable")
    dup = out[order[1:]] == out[order[:-1]]
    if dup.any():
        second = int(order[1:][dup].min())  # the earliest position that repeats an id
        first = int(np.flatnonzero(out == out[second])[0])
        raise DataError(
            f"ids must be unique; id {out[second]} appears at positions {first} and "
            f"{second}; drop or renumber the duplicates"
        )
    return out


def _build(x: Any, y: Any, ids: Any, num_classes: int, copy: bool) -> LabeledArrays:
    """as_arrays, with ``copy=False`` for arrays the loaders own (saves a full copy)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DataError(f"num_classes={num_classes!r} must be an integer >= 1; set data.num_classes")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.utils.data.Dataset):
        if y is not None:
            raise DataError("x is a Dataset of (features, label) pairs; pass y=None")
        xa, ya = _from_dataset(x)
        copy = False  # np.stack already made fresh arrays
    elif y is None:
        raise DataError("labels y are required unless x is a Dataset of (features, label) pairs")
    else:
        xa, ya = _to_numpy(x), _to_numpy(y)
    xf = _check_x(xa, copy)
    k = int(num_classes)
    yf = _int_vector(
        ya, len(xf), "y", k - 1, f"labels must be integers in [0, {k})", "check data.num_classes or your labels"
    )
    return LabeledArrays(xf, yf, _check_ids(ids, len(xf)))


def as_arrays(x: Any, y: Any = None, ids: Any = None, *, num_classes: int) -> LabeledArrays:
    """Validate user data and return fresh float32/int64 arrays.

    Args:
        x: Features of shape ``(n, ...)``: numpy array, nested list or torch tensor (cast
            to float32, never rescaled), or a map-style torch Dataset of
            ``(features, label)`` items with ``y=None``.
        y: Integer labels of shape ``(n,)``; integral floats such as ``3.0`` are accepted.
        ids: Unique sample ids in ``[0, MAX_ID]``; ``None`` means ``0..n-1``.
        num_classes: Labels must lie in ``[0, num_classes)``.

    Returns:
        LabeledArrays holding copies, never views of the caller's memory.

    Raises:
        DataError: On empty, ragged, non-numeric or non-finite features, bad labels or bad ids.
    """
    return _build(x, y, ids, num_classes, copy=True)


def _head(data: LabeledArrays, limit: int | None) -> LabeledArrays:
    """The first ``limit`` samples, copied so that the full arrays can be freed."""
    if limit is None or limit >= len(data):
        return data
    return LabeledArrays(data.x[:limit].copy(), data.y[:limit].copy(), data.ids[:limit].copy())


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
    return _build(x, y, ids, num_classes, copy=False)  # freshly loaded, nobody else holds them


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
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str], *, num_classes: int, scale: bool = True
) -> LabeledArrays:
    """Load an IDX image file ``(n, rows, cols)`` and its label file ``(n,)``, raw or gzipped.

    Args:
        images_path: The 3-D IDX images.
        labels_path: The 1-D IDX labels.
        num_classes: Labels must lie in ``[0, num_classes)``.
        scale: Divide unsigned-byte pixels by 255 into ``[0, 1]``.

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
    x = images[:, None].astype(np.float32)
    if scale and images.dtype == np.uint8:
        x /= 255.0
    return _build(x, labels, None, num_classes, copy=False)


def load_csv(
    path: str | os.PathLike[str], *, num_classes: int, label_column: str = "label", id_column: str | None = None
) -> LabeledArrays:
    """Load a CSV with a header row; every column but the label and id columns is a feature.

    Args:
        path: The CSV file.
        num_classes: Labels must lie in ``[0, num_classes)``.
        label_column: Column of integer labels.
        id_column: Column of integer sample ids; ``None`` numbers the rows ``0..n-1``.

    Returns:
        Arrays with ``x`` of shape ``(n, d)``.

    Raises:
        DataError: On a missing file or column, a ragged row, or a non-numeric cell.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file {p} does not exist; check data.train / data.test")
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise DataError(f"{p} is empty; a header row naming the columns is required")
        for col, key in ((label_column, "label_column"), (id_column, "id_column")):
            if col is not None and col not in header:
                raise DataError(f"{p} has no column {col!r}; its columns are {header}; set data.{key}")
        if len(set(header)) != len(header):
            raise DataError(f"{p} repeats a column name in its header {header}; make names unique")
        rows: list[tuple[int, list[str]]] = []
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(
                    f"{p} line {reader.line_num} has {len(row)} cells, the header {len(header)}; fix that row"
                )
            if row:  # blank lines (e.g. a trailing newline) carry no sample
                rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"{p} has a header but no data rows; give at least one sample")
    feats = [i for i, h in enumerate(header) if h not in (label_column, id_column)]
    if not feats:
        raise DataError(f"{p} has no feature columns besides the label/id columns")

    def column(cols: Sequence[int], parse: Callable[[str], Any], dtype: type) -> np.ndarray:
        try:  # numpy parses numeric strings in one pass; on failure, find the cell to blame
            return np.array([[row[c] for c in cols] for _, row in rows], dtype=dtype)
        except (ValueError, OverflowError) as exc:
            for line, row in rows:
                for c in cols:
                    try:
                        parse(row[c])
                    except (ValueError, OverflowError):
                        what = "a whole number" if parse is int else "a number"
                        raise DataError(
                            f"{p} line {line}, column {header[c]!r}: {row[c]!r} is not {what}; fix or drop that row"
                        ) from None
            names = [header[c] for c in cols]
            raise DataError(f"{p}: cannot read column(s) {names} as numbers ({exc}); check their range") from exc

    x = column(feats, float, np.float64)
    y = column([header.index(label_column)], float, np.float64)[:, 0]
    ids = None if id_column is None else column([header.index(id_column)], int, np.int64)[:, 0]
    return _build(x, y, ids, num_classes, copy=False)


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


def load_fashion_mnist(split: str, *, root: str | None = None) -> LabeledArrays:
    """Load Fashion-MNIST: pixels scaled to ``[0, 1]``, shape ``(1, 28, 28)``, 10 classes.

    Looks in ``root`` if given; else in the directory of the Debian package
    ``dataset-fashion-mnist``; else in ``~/.cache/sisa/fashion-mnist``, downloading
    missing files and checking their sha256.

    Args:
        split: ``train`` (60000 samples) or ``test`` (10000 samples).
        root: Directory holding the ``*-ubyte.gz`` files.

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
    return load_idx(folder / names[0], folder / names[1], num_classes=10)


def load_split(cfg: DataConfig, split: str) -> LabeledArrays:
    """Load the ``train`` or ``test`` split that ``cfg`` describes, cut to its limit.

    Args:
        cfg: The data section of the config.
        split: ``train`` or ``test``.

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
        if k != 10:
            raise DataError(f"fashion-mnist has 10 classes, not data.num_classes={k}; set it to 10")
        data = load_fashion_mnist(split, root=cfg.root)
    elif path is None:
        raise DataError(f"no {split} data configured: set data.{split}=PATH")
    elif cfg.dataset == "npz":
        data = load_npz(path, num_classes=k)
    elif cfg.dataset == "csv":
        data = load_csv(path, num_classes=k, label_column=cfg.label_column, id_column=cfg.id_column)
    elif cfg.dataset == "idx":
        labels = cfg.train_labels if split == "train" else cfg.test_labels
        if labels is None:
            raise DataError(f"data.dataset='idx' needs data.{split}_labels=PATH")
        data = load_idx(path, labels, num_classes=k)
    else:  # DataConfig validates the name; this guards one built around its checks
        raise DataError(f"data.dataset={cfg.dataset!r} is unknown; use fashion-mnist, npz, csv or idx")
    return _head(data, limit)
