"""Tests of sisa.data.loaders: validation in as_arrays and the npz/IDX/CSV/Fashion-MNIST loaders."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from sisa.config.settings import DataConfig
from sisa.data import loaders as sd
from sisa.data.loaders import (
    MAX_ID,
    LabeledArrays,
    as_arrays,
    load_csv,
    load_fashion_mnist,
    load_idx,
    load_npz,
    load_split,
)
from sisa.errors import DataError
from sisa.unlearn.ids import normalize_ids

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _xy(n: int = 6, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)), np.arange(n) % 3


# ---------------------------------------------------------------- as_arrays: good input


def test_defaults_ids_dtypes_and_shapes() -> None:
    x, y = _xy()
    d = as_arrays(x, y, num_classes=3)
    assert isinstance(d, LabeledArrays)
    assert d.x.dtype == np.float32 and d.x.flags["C_CONTIGUOUS"]
    assert d.y.dtype == np.int64 and d.ids.dtype == np.int64
    np.testing.assert_array_equal(d.ids, np.arange(6))
    np.testing.assert_array_equal(d.y, y)
    np.testing.assert_allclose(d.x, x.astype(np.float32))
    assert len(d) == 6 and d.feature_shape == (3,)


def test_returns_copies_not_views() -> None:
    x = np.ones((4, 2), dtype=np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.int64)
    ids = np.array([10, 11, 12, 13], dtype=np.int64)
    d = as_arrays(x, y, ids, num_classes=2)
    for mine, theirs in ((d.x, x), (d.y, y), (d.ids, ids)):
        assert not np.shares_memory(mine, theirs)
    x[0, 0], y[0], ids[0] = 99.0, 1, 99
    assert d.x[0, 0] == 1.0 and d.y[0] == 0 and d.ids[0] == 10
    t = torch.ones(4, 2)
    dt = as_arrays(t, torch.tensor([0, 1, 0, 1]), num_classes=2)
    t[0, 0] = 5.0
    assert dt.x[0, 0] == 1.0


def test_uint8_values_kept_lists_and_integral_floats_accepted() -> None:
    d = as_arrays(np.array([[0, 255], [7, 8]], dtype=np.uint8), [0.0, 1.0], ids=[5, 3.0], num_classes=2)
    np.testing.assert_array_equal(d.x, [[0, 255], [7, 8]])  # no scaling
    np.testing.assert_array_equal(d.y, [0, 1])
    np.testing.assert_array_equal(d.ids, [5, 3])
    assert as_arrays([[1, 2]], [0], ids=[MAX_ID], num_classes=1).ids[0] == MAX_ID
    big = as_arrays(np.zeros((2, 1)), [0, 0], ids=[2**62 + 1, 3.0], num_classes=1)  # no float rounding
    np.testing.assert_array_equal(big.ids, [2**62 + 1, 3])
    images = as_arrays(np.zeros((2, 1, 4, 4)), [0, 1], num_classes=2)
    assert images.feature_shape == (1, 4, 4)


def test_torch_dataset_matches_numpy_input() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    y = torch.tensor([2, 0, 1, 2])
    from_ds = as_arrays(TensorDataset(x, y), ids=[7, 8, 9, 10], num_classes=3)
    from_np = as_arrays(x.numpy(), y.numpy(), [7, 8, 9, 10], num_classes=3)
    for a, b in ((from_ds.x, from_np.x), (from_ds.y, from_np.y), (from_ds.ids, from_np.ids)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert from_ds.feature_shape == (2, 3)


# ---------------------------------------------------------------- as_arrays: bad input


class _Ragged(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3 if i < 2 else 4), 0


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((0, 3)), [], r"x is empty"),
        (np.zeros(4), [0, 0, 0, 0], r"shape \(n, features\.\.\.\).*reshape"),
        (np.array([["a", "b"]]), [0], r"must be numeric.*astype"),
        (np.array([[1, "b"]], dtype=object), [0], r"must be numeric"),
        (np.array([[True, False]]), [0], r"must be numeric"),
        ([[1.0, 2.0], [3.0]], [0, 1], r"equal-length rows"),
        (np.zeros((4, 2)), [0, 1, 2], r"len\(y\)=3 != len\(x\)=4"),
        (np.zeros((4, 2)), np.zeros((4, 1)), r"y must be 1-D.*ravel"),
        (np.zeros((4, 2)), [0, 1, 2, 3.5], r"labels must be integers in \[0, 10\); found 3\.5 at position 3"),
        (np.zeros((4, 2)), [0, 1, 12, 3], r"found 12 at position 2; check data\.num_classes"),
        (np.zeros((4, 2)), [0, -1, 2, 3], r"found -1 at position 1"),
        (np.zeros((4, 2)), [0, float("nan"), 2, 3], r"found nan at position 1"),
        (np.zeros((4, 2)), ["a", "b", "c", "d"], r"labels must be integers.*dtype"),
        (np.zeros((4, 2)), None, r"labels y are required"),
    ],
)
def test_bad_features_and_labels(x: object, y: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        as_arrays(x, y, num_classes=10)


def test_nan_and_inf_reported_with_count_and_position() -> None:
    x = np.zeros((5, 3))
    x[2, 1], x[4, 0] = np.nan, -np.inf
    with pytest.raises(DataError, match=r"2 NaN/inf value\(s\).*index \(2, 1\)"):
        as_arrays(x, [0] * 5, num_classes=2)
    with pytest.raises(DataError, match=r"1 NaN/inf.*float32"):  # overflows float32
        as_arrays(np.array([[1e300]]), [0], num_classes=2)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([0, 1, 2], r"len\(ids\)=3 != len\(x\)=4"),
        ([0, 1, 2, 3.5], r"ids must be integers.*found 3\.5 at position 3"),
        ([0, 1, 2, "3"], r"found '3' at position 3"),
        ([0, True, 2, 3], r"found True at position 1"),
        (np.array([True, False, True, False]), r"dtype bool"),
        (np.array(["a", "b", "c", "d"]), r"dtype <U1"),
        ([0, 1, None, 3], r"found None at position 2"),
        ([0, 1, 2, float("inf")], r"found inf at position 3"),
        ([0, -5, 2, 3], r"found -5 at position 1"),
        ([0, 1, 2, MAX_ID + 1], r"found 9223372036854775807 at position 3"),
        (np.array([0, 1, 2, MAX_ID + 1]), r"found 9223372036854775807 at position 3"),
        (np.array([0, 1, 2, 2**63], dtype=np.uint64), r"at position 3"),
        (np.array([0.0, 1.0, 2.0, 2.0**63]), r"at position 3"),
        ([0, 2**70, 2, 3], r"at position 1"),
        (np.zeros((4, 1), dtype=np.int64), r"ids must be 1-D"),
        ([4, 7, 4, 7], r"ids must be unique; id 4 appears at positions 0 and 2"),
        (np.array([9, 3, 5, 3]), r"id 3 appears at positions 1 and 3"),
        # Floats above the exact range of their type may already be rounded: refused, saying why.
        (
            np.array([0, 1, 2, 1152921504606846976], np.float64),
            r"found 1\.15\d*e\+18 at position 3: a float64 above 2\*\*53",
        ),
        ([0, 1, 2, float(2**53 + 2)], r"at position 3: a float64 above 2\*\*53"),
        (np.array([0, 1, 2**24 + 2, 3], np.float32), r"found 16777218\.0 at position 2: a float32 above 2\*\*24"),
    ],
)
def test_bad_ids(ids: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        as_arrays(np.zeros((4, 2)), [0, 1, 0, 1], ids, num_classes=2)


def test_float_ids_are_taken_only_when_exact() -> None:
    """One rule for ids from every source: integers, or floats that are whole numbers held exactly.

    Regression: float64 ids above 2**53 were stored rounded (1152921504606847976 as
    1152921504606848000, which a deletion could then not name), and float32 ids above 2**24
    collided under a message that did not say why.
    """
    x = np.zeros((3, 2))
    exact = as_arrays(x, [0, 1, 0], np.array([2.0**53, 17.0, 0.0]), num_classes=2)
    assert exact.ids.tolist() == [2**53, 17, 0] and exact.ids.dtype == np.int64
    assert as_arrays(x, [0, 1, 0], np.array([2.0**24, 3, 4], np.float32), num_classes=2).ids[0] == 2**24
    assert as_arrays(x, [0, 1, 0], [1e12, 5.0, 6], num_classes=2).ids.tolist() == [10**12, 5, 6]
    big = 1152921504606847976
    assert as_arrays(x, [0, 1, 0], np.array([big, 1, 2]), num_classes=2).ids[0] == big  # int64: kept as is
    with pytest.raises(DataError, match=r"a float64 above 2\*\*53.*may already have been rounded"):
        as_arrays(x, [0, 1, 0], np.array([big, 1, 2], np.float64), num_classes=2)
    with pytest.raises(DataError, match=r"a float32 above 2\*\*24.*two ids may have become one"):
        as_arrays(x, [0, 1, 0], np.array([2**24 + 1, 2**24 + 2, 5], np.float32), num_classes=2)
    # Deletion requests and lookups follow the same rule.
    assert normalize_ids([17.0, 17, np.float32(3.0)]) == [17, 3]
    assert normalize_ids(np.array([2.0**53])) == [2**53]
    with pytest.raises(DataError, match=r"a float64 above 2\*\*53"):
        normalize_ids(np.array([float(big)]))
    with pytest.raises(DataError, match=r"found 2\.5 at position 1: not a whole number"):
        normalize_ids([1, 2.5])


def test_bad_dataset_inputs() -> None:
    with pytest.raises(DataError, match=r"inconsistent feature shapes: item 0 is \(3,\), item 2 is \(4,\)"):
        as_arrays(_Ragged(), num_classes=2)
    ds = TensorDataset(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"pass y=None"):
        as_arrays(ds, [0, 1], num_classes=2)
    with pytest.raises(DataError, match=r"x is empty"):
        as_arrays(TensorDataset(torch.zeros(0, 3), torch.zeros(0)), num_classes=2)
    with pytest.raises(DataError, match=r"labels must be integers in \[0, 1\)"):
        as_arrays(ds, num_classes=1)


# ---------------------------------------------------------------- npz


def test_npz_round_trip_with_ids_and_alias_keys(tmp_path: Path) -> None:
    x, y = _xy()
    ids = np.array([50, 40, 30, 20, 10, 0])
    np.savez(tmp_path / "a.npz", x=x, y=y, ids=ids)
    d = load_npz(tmp_path / "a.npz", num_classes=3)
    np.testing.assert_allclose(d.x, x.astype(np.float32))
    np.testing.assert_array_equal(d.y, y)
    np.testing.assert_array_equal(d.ids, ids)
    np.savez_compressed(tmp_path / "b.npz", features=x, labels=y)
    np.testing.assert_array_equal(load_npz(tmp_path / "b.npz", num_classes=3).ids, np.arange(6))


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz", num_classes=3)
    np.savez(tmp_path / "keys.npz", data=np.zeros((2, 2)), target=np.zeros(2))
    with pytest.raises(DataError, match=r"holds keys \['data', 'target'\].*'x'"):
        load_npz(tmp_path / "keys.npz", num_classes=3)
    np.save(tmp_path / "plain.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="not an .npz"):
        load_npz(tmp_path / "plain.npy", num_classes=3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not an .npz"):
        load_npz(tmp_path / "junk.npz", num_classes=3)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 2)), y=np.array([0, 5]))
    with pytest.raises(DataError, match="found 5 at position 1"):
        load_npz(tmp_path / "bad.npz", num_classes=3)


# ---------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(tmp_path: Path, n: int = 5, gz: bool = False) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ip, lp = tmp_path / "images.idx", tmp_path / "labels.idx"  # names hide the gzip on purpose
    for path, arr in ((ip, images), (lp, labels)):
        blob = _idx_bytes(arr)
        path.write_bytes(gzip.compress(blob) if gz else blob)
    return ip, lp, images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    ip, lp, images, labels = _write_idx(tmp_path, gz=gz)
    d = load_idx(ip, lp, num_classes=10)
    assert d.x.shape == (5, 1, 4, 3) and d.x.dtype == np.float32
    np.testing.assert_allclose(d.x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y, labels)
    np.testing.assert_array_equal(d.ids, np.arange(5))
    raw = load_idx(ip, lp, num_classes=10, scale=False)
    np.testing.assert_array_equal(raw.x[:, 0], images)


def test_idx_errors(tmp_path: Path) -> None:
    ip, lp, images, labels = _write_idx(tmp_path)
    blob = ip.read_bytes()
    (tmp_path / "short.idx").write_bytes(blob[:-7])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx(tmp_path / "short.idx", lp, num_classes=10)
    (tmp_path / "short.gz").write_bytes(gzip.compress(blob)[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_idx(tmp_path / "short.gz", lp, num_classes=10)
    (tmp_path / "head.idx").write_bytes(blob[:9])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx(tmp_path / "head.idx", lp, num_classes=10)
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + blob[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(tmp_path / "magic.idx", lp, num_classes=10)
    with pytest.raises(DataError, match="dimensions, not 3"):
        load_idx(lp, ip, num_classes=10)
    (tmp_path / "few.idx").write_bytes(_idx_bytes(labels[:3]))
    with pytest.raises(DataError, match="has 5 images but .* has 3 labels"):
        load_idx(ip, tmp_path / "few.idx", num_classes=10)
    with pytest.raises(DataError, match="does not exist"):
        load_idx(tmp_path / "nope", lp, num_classes=10)


# ---------------------------------------------------------------- CSV


def test_csv_round_trip_with_id_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("f1,label,sample_id,f2\n0.5,1,100,2\n-1.25,0,7,3e2\n\n")
    d = load_csv(path, num_classes=2, id_column="sample_id")
    np.testing.assert_array_equal(d.x, np.array([[0.5, 2.0], [-1.25, 300.0]], dtype=np.float32))
    np.testing.assert_array_equal(d.y, [1, 0])
    np.testing.assert_array_equal(d.ids, [100, 7])
    with pytest.raises(DataError, match=r"column named 'sample_id' but data.id_column is not set"):
        load_csv(path, num_classes=2)  # it would be read as a feature and the rows numbered 0..n-1


def test_csv_id_column_is_read_exactly(tmp_path: Path) -> None:
    """Ids above 2**53 written as floats (``1000000006891.0``) keep every digit; one rule for every source.

    Regression: ``1000000006891.0`` was "not a whole number", and float ids above 2**53 were rounded.
    """
    big = 2**60 + 1  # float64 would read it as 2**60
    path = tmp_path / "d.csv"
    path.write_text(f"id,a,label\n1000000006891.0,1,0\n{big},2,1\n{big + 2}.00,3,0\n1.2e3,4,1\n")
    d = load_csv(path, num_classes=2, id_column="id")
    assert d.ids.tolist() == [1000000006891, big, big + 2, 1200]
    path.write_text("id,a,label\n1,1,0\n99999999999999999999,2,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'id': '99999999999999999999' is outside \[0, 2\*\*63 - 2\]"):
        load_csv(path, num_classes=2, id_column="id")
    for cell in ("nan", "inf", "12.5", "1e-3", "x"):
        path.write_text(f"id,a,label\n{cell},1,0\n")
        with pytest.raises(DataError, match=rf"line 2, column 'id': '{cell}' is not an integer id"):
            load_csv(path, num_classes=2, id_column="id")


def test_ids_written_as_text_follow_one_rule() -> None:
    """CSV cells, ``sisa delete --ids`` and ids files read ids alike: exact decimals, whole numbers only."""
    from sisa.data.arrays import parse_id_text
    from sisa.unlearn.ids import parse_id

    for text, value in (("17", 17), (" 17.0 ", 17), ("1.7e1", 17), ("1152921504606846977", 2**60 + 1), ("-3", -3)):
        assert parse_id_text(text) == parse_id(text) == value
    assert parse_id("1152921504606846977.00") == 2**60 + 1  # through a float it would be 2**60
    for bad in ("17.5", "1e-3", "0x10", "1_000", "+5", "nan", "inf", "\u0661\u0662", "", "1e999999999"):
        with pytest.raises(ValueError):
            parse_id(bad)


def test_csv_with_an_id_column_needs_data_id_column(tmp_path: Path) -> None:
    """Regression: an ``id`` column became a feature (values near 1e12) and the model trained to chance."""
    path = tmp_path / "d.csv"
    for name in ("id", "ID", "ids", "sample_id"):
        path.write_text(f"{name},a,label\n1000000000001,1,0\n1000000000002,2,1\n")
        with pytest.raises(
            DataError, match=rf"column named '{name}' but data.id_column is not set.*data.id_column={name}"
        ):
            load_csv(path, num_classes=2)
    assert load_csv(path, num_classes=2, id_column="sample_id").ids.tolist() == [1000000000001, 1000000000002]
    path.write_text("id,a\n1,5\n0,6\n")  # a label column that happens to be named id is fine
    labelled = load_csv(path, num_classes=2, label_column="id")
    assert labelled.y.tolist() == [1, 0] and labelled.x[:, 0].tolist() == [5.0, 6.0]


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'x' is not a number"):
        load_csv(path, num_classes=2)
    path.write_text("a,b,target\n1,2,0\n")
    with pytest.raises(DataError, match=r"no column 'label'; its columns are \['a', 'b', 'target'\]"):
        load_csv(path, num_classes=2)
    path.write_text("a,label,id\n1,0,1.5\n")
    with pytest.raises(DataError, match=r"line 2, column 'id': '1\.5' is not an integer id"):
        load_csv(path, num_classes=2, id_column="id")
    path.write_text("a,label\n1,0\n2\n")
    with pytest.raises(DataError, match=r"line 3 has 1 cells"):
        load_csv(path, num_classes=2)
    path.write_text("a,label\n1,0\n2,cat\n")
    with pytest.raises(DataError, match=r"column 'label': 'cat'"):
        load_csv(path, num_classes=2)
    path.write_text("")
    with pytest.raises(DataError, match="header row"):
        load_csv(path, num_classes=2)
    path.write_text("a,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_csv(path, num_classes=2)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_test_split() -> None:
    if not FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    d = load_fashion_mnist("test")
    assert len(d) == 10000 and d.feature_shape == (1, 28, 28)
    assert d.x.min() >= 0.0 and d.x.max() <= 1.0 and d.x.max() > 0.5
    np.testing.assert_array_equal(np.unique(d.y), np.arange(10))
    np.testing.assert_array_equal(d.ids, np.arange(10000))


def test_fashion_mnist_root_and_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_fashion_mnist("val")
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_download_checks_the_digest(tmp_path: Path) -> None:
    if not FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    name = "t10k-labels-idx1-ubyte.gz"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(gzip.compress(b"tampered"))
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(FASHION / name, good / name)
    dest = tmp_path / "cache" / name
    errors = sd._download(name, dest, [mirror.as_uri() + "/"])
    assert errors and "sha256" in errors[0] and not dest.exists()
    assert sd._download(name, dest, [mirror.as_uri() + "/", good.as_uri() + "/"]) == []
    assert dest.read_bytes() == (FASHION / name).read_bytes()


# ---------------------------------------------------------------- load_split


def test_load_split_with_limits(tmp_path: Path) -> None:
    x, y = _xy(n=10)
    np.savez(tmp_path / "train.npz", x=x, y=y, ids=np.arange(100, 110))
    np.savez(tmp_path / "test.npz", x=x[:4], y=y[:4])
    cfg = DataConfig(
        dataset="npz", train=str(tmp_path / "train.npz"), test=str(tmp_path / "test.npz"), num_classes=3, train_limit=6
    )
    train = load_split(cfg, "train")
    assert len(train) == 6
    np.testing.assert_array_equal(train.ids, np.arange(100, 106))
    assert train.x.base is None  # a copy, so the full array can be freed
    assert len(load_split(cfg, "test")) == 4  # no test_limit
    with pytest.raises(DataError, match=r"no test data configured: set data\.test=PATH"):
        load_split(DataConfig(dataset="npz", train=cfg.train, num_classes=3), "test")
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_split(cfg, "valid")
    # A file named while data.dataset stays at its default would be ignored: refused, naming the setting.
    with pytest.raises(
        DataError, match=r"data\.train=.*train\.npz is set, but data\.dataset is fashion-mnist.*data\.dataset=npz"
    ):
        load_split(DataConfig(train=cfg.train, num_classes=10), "train")


def test_load_split_idx_csv_and_fashion(tmp_path: Path) -> None:
    ip, lp, _, _ = _write_idx(tmp_path, n=8, gz=True)
    cfg = DataConfig(dataset="idx", train=str(ip), train_labels=str(lp), test=str(ip), train_limit=3)
    assert load_split(cfg, "train").x.shape == (3, 1, 4, 3)
    with pytest.raises(DataError, match=r"data\.test_labels=PATH"):
        load_split(cfg, "test")
    (tmp_path / "d.csv").write_text("a,y\n1,0\n2,1\n3,1\n")
    csv_cfg = DataConfig(dataset="csv", train=str(tmp_path / "d.csv"), num_classes=2, label_column="y")
    np.testing.assert_array_equal(load_split(csv_cfg, "train").y, [0, 1, 1])
    with pytest.raises(DataError, match="fashion-mnist has 10 classes"):
        load_split(DataConfig(num_classes=5), "test")
    if FASHION.is_dir():
        d = load_split(DataConfig(test_limit=50), "test")
        assert len(d) == 50 and d.feature_shape == (1, 28, 28)


def test_csv_errors_name_the_file_line_and_keep_a_wide_header_short(tmp_path: Path) -> None:
    names = [f"pixel{i}" for i in range(100)]
    rows = ["1.0"] * 100
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join([*names, "Label", "row"]) + "\n" + ",".join([*rows, "1", "5"]) + "\n")
    with pytest.raises(DataError) as err:
        load_csv(wide, num_classes=3)
    message = str(err.value)
    assert "has no column 'label'; did you mean 'Label'?" in message and "its 102 columns are" in message
    assert "pixel0" in message and "pixel50" not in message and len(message) < 300

    # A blank line and a quoted multi-line cell make row numbers and file lines differ.
    text = "a,b,label\n1,2,0\n\n3,4,1\n" + '"5\n",6,1\n' + "7,8,2\n"
    (tmp_path / "nan.csv").write_text(text.replace("7,8,2", "7,nan,2"))
    with pytest.raises(DataError, match=r"nan\.csv line 7, column 'b': 'nan' is NaN/inf"):
        load_csv(tmp_path / "nan.csv", num_classes=3)
    (tmp_path / "label.csv").write_text(text.replace("7,8,2", "7,8,3"))
    with pytest.raises(
        DataError, match=r"label\.csv line 7, column 'label': labels must be integers in \[0, 3\); found 3"
    ):
        load_csv(tmp_path / "label.csv", num_classes=3)
    (tmp_path / "half.csv").write_text(text.replace("3,4,1", "3,4,0.5"))
    with pytest.raises(DataError, match=r"half\.csv line 4, column 'label'.*found 0\.5"):
        load_csv(tmp_path / "half.csv", num_classes=3)
    assert len(load_csv(tmp_path / "label.csv", num_classes=4)) == 4  # the same file is fine with 4 classes
