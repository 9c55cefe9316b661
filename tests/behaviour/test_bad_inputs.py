"""Catalogue of hostile inputs across the Python API and the CLI (issue 5).

Every case must be refused with a specific sisa error whose message names the problem (and
mostly the fix), the CLI must exit with code 2, and no store may change: each case compares
``store_digest`` before and after, on one small store trained once per module through the
CLI itself (blobs data in .npz files, so it runs without Fashion-MNIST). A ``sisa train``
refused for bad input must not leave a store behind. docs/reliability_inputs.md lists the
cases by category.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import torch

from sisa.cli.main import main
from sisa.config.loader import config_from_dict, load_config
from sisa.data.arrays import LabeledArrays
from sisa.data.loaders import load_csv, load_idx, load_npz
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError, ModelError, SisaError, StoreError
from sisa.evaluate.settings import load_evaluate_config
from tests.conftest import blobs, small_config, store_digest

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.bad_inputs]

D = 6  # features per sample of the module's store
N = 300  # samples in it (ids 0..299), 3 classes, shards=3, slices=3


def _idx(dims: list[int], payload: bytes) -> bytes:
    """An unsigned-byte IDX file: magic, dims, data."""
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def _write_bad_files(d: Path) -> None:
    """Every malformed file the cases below point at, under ``d``."""
    (d / "not_yaml.yaml").write_text("shards: [1, 2\n")
    (d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" + os.urandom(64))
    (d / "list.yaml").write_text("- shards\n- 3\n")
    (d / "duplicate.yaml").write_text("shards: 3\nslices: 2\nshards: 4\n")
    (d / "python_tag.yaml").write_text("shards: !!python/object/apply:os.getpid []\n")
    (d / "date.yaml").write_text("seed: 2020-01-01\n")
    (d / "a_dir.yaml").mkdir()

    (d / "text.npz").write_text("x,y\n1,2\n")
    np.save(d / "array.npy", np.zeros((4, D), np.float32))
    x, y = blobs(40, d=D, seed=3)
    np.savez(d / "good.npz", x=x, y=y, ids=np.arange(5000, 5040))
    whole = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    flipped = bytearray(whole)
    flipped[100:120] = b"\xff" * 20  # inside x.npy's payload: the zip CRC no longer matches
    (d / "bad_crc.npz").write_bytes(bytes(flipped))
    np.savez(d / "wrong_keys.npz", features_=x, target=y)
    np.savez(d / "objects.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    np.savez(d / "wrong_shape.npz", x=np.zeros((2, D - 1), np.float32), y=[0, 1], ids=[5000, 5001])
    np.savez(d / "stored_ids.npz", x=np.zeros((2, D), np.float32), y=[0, 1], ids=[1, 5001])
    np.savez(d / "nan.npz", x=np.full((2, D), np.nan, np.float32), y=[0, 1], ids=[5000, 5001])
    np.savez(d / "bad_label.npz", x=np.zeros((2, D), np.float32), y=[0, 7], ids=[5000, 5001])

    (d / "images.idx").write_bytes(_idx([4, 2, 2], bytes(16)))
    (d / "labels.idx").write_bytes(_idx([4], bytes(4)))
    (d / "five_labels.idx").write_bytes(_idx([5], bytes(5)))
    (d / "truncated.idx").write_bytes(_idx([4, 2, 2], bytes(10)))
    (d / "magic.idx").write_bytes(b"PK\x03\x04" + bytes(28))
    (d / "truncated.idx.gz").write_bytes(gzip.compress(_idx([4, 2, 2], bytes(16)))[:20])

    header = ",".join([f"f{i}" for i in range(D)] + ["label"])
    row = ",".join(["0.5"] * D + ["1"])
    (d / "bad_cell.csv").write_text(f"{header}\n{row}\n{row.replace('0.5', 'abc', 1)}\n")
    (d / "ragged.csv").write_text(f"{header}\n{row}\n1,2\n")
    (d / "no_label.csv").write_text("a,b,c\n1,2,0\n")
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text(f"{header}\n")
    (d / "binary.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    (d / "label_7.csv").write_text(f"{header}\n{row[:-1]}7\n")
    (d / "nan_cell.csv").write_text(f"{header}\n{row.replace('0.5', 'nan', 1)}\n")
    (d / "fraction_id.csv").write_text("id,a,label\n1.5,2,0\n")

    for name, text in {
        "ids_garbage": "3\nx7\n",
        "ids_float": "1.5\n",
        "ids_hex": "0x10\n",
        "ids_underscore": "1_000\n",
        "ids_unicode_digits": "\u0661\u0662\n",
        "ids_two_per_line": "1 2\n",
        "ids_comments_only": "# nothing to delete\n\n   \n",
        "ids_empty": "",
        "ids_unknown": "1\n# a comment, then a blank line\n\n99999\n",
        "ids_duplicate_unknown": "99999\n99999\n",
        "ids_negative": "-4\n",
        "ids_too_big": f"{2**63 - 1}\n",
    }.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "ids_binary").write_bytes(b"\xff\xfe\x00\x01")

    (d / "a_file").write_text("not a directory\n")
    (d / "empty_dir").mkdir()
    (d / "random_files").mkdir()
    (d / "random_files" / "notes.txt").write_text("hello\n")
    (d / "random_files" / "blob.bin").write_bytes(os.urandom(256))
    (d / "random_mdb").mkdir()
    (d / "random_mdb" / "data.mdb").write_bytes(os.urandom(8192))
    (d / "empty_mdb").mkdir()
    (d / "empty_mdb" / "data.mdb").write_bytes(b"")
    env = lmdb.open(str(d / "foreign_lmdb"), max_dbs=2)  # a valid LMDB that is not a sisa store
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> dict[str, Path]:
    """One store trained by `sisa train` from .npz files, plus every bad file."""
    d = tmp_path_factory.mktemp("bad_inputs")
    x, y = blobs(N + 100, d=D)
    np.savez(d / "train.npz", x=x[:N], y=y[:N])
    np.savez(d / "test.npz", x=x[N:], y=y[N:])
    config = d / "config.yaml"
    config.write_text(
        "shards: 3\nslices: 3\n"
        f"data: {{dataset: npz, train: {d / 'train.npz'}, test: {d / 'test.npz'}, num_classes: 3}}\n"
        "model: {hidden: [16]}\ntrain: {epochs: 4, batch_size: 32, lr: 0.01}\n"
    )
    _write_bad_files(d)
    store = d / "store"
    assert main(["train", "--config", str(config), "--store", str(store), "--json"]) == 0
    return {"dir": d, "store": store, "config": config}


def _fill(arg: str, world: dict[str, Path]) -> str:
    return arg.format(dir=world["dir"], store=world["store"], config=world["config"])


# ------------------------------------------------------------------- configs (Python API)
CONFIG_OVERRIDES = [
    pytest.param(["bogus=1"], "unknown config key(s) bogus; allowed here: seed", id="unknown-top-level-key"),
    pytest.param(["train.lrr=0.1"], "unknown config key(s) train.lrr; allowed here: train.epochs", id="unknown-key"),
    pytest.param(["shards=0"], "shards=0 must be in [1, 4096]", id="zero-shards"),
    pytest.param(["shards=-2"], "shards=-2 must be in [1, 4096]", id="negative-shards"),
    pytest.param(["slices=0"], "slices=0 must be in [1, 1024]", id="zero-slices"),
    pytest.param(["train.epochs=0"], "train.epochs=0 must be >= 1", id="zero-epochs"),
    pytest.param(["train.batch_size=0"], "train.batch_size=0 must be >= 1", id="zero-batch-size"),
    pytest.param(["train.lr=-0.1"], "train.lr=-0.1 must be > 0", id="negative-lr"),
    pytest.param(["train.lr=.inf"], "train.lr=inf must be > 0 and finite", id="infinite-lr"),
    pytest.param(["train.lr=.nan"], "train.lr=nan must be > 0", id="nan-lr"),
    pytest.param(["train.weight_decay=-1"], "train.weight_decay=-1.0 must be >= 0", id="negative-weight-decay"),
    pytest.param(["resources.cpus_per_shard=.inf"], "cpus_per_shard=inf must be > 0 and finite", id="infinite-cpus"),
    pytest.param(["shards=eight"], "shards must be an integer, got 'eight'", id="string-for-int"),
    pytest.param(["shards=2.5"], "shards must be an integer, got 2.5", id="float-for-int"),
    pytest.param(["shards=true"], "shards must be an integer, got True", id="bool-for-int"),
    pytest.param(["seed=-1"], "seed=-1 must be in [0, 2**63)", id="negative-seed"),
    pytest.param(["data.num_classes=1"], "data.num_classes=1 must be >= 2", id="one-class"),
    pytest.param(["train.optimizer=lbfgs"], "choose one of adam, sgd", id="unknown-optimizer"),
    pytest.param(["model.name=resnet"], "use 'mlp', 'cnn' or 'package.module:callable'", id="unknown-model"),
    pytest.param(["model.dropout=1"], "model.dropout=1.0 must be in [0, 1)", id="dropout-one"),
    pytest.param(["train=3"], "train must be a mapping of keys, got 3", id="section-not-mapping"),
    pytest.param(["shards"], "must look like key=value", id="override-without-equals"),
    pytest.param(["data.dataset=npz"], "needs data.train=PATH", id="npz-without-path"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_OVERRIDES)
def test_bad_config_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


# The `evaluate:` section belongs to the harness: sisa.evaluate.settings loads and checks it.
EVALUATE_OVERRIDES = [
    pytest.param(
        ["evaluate.finetune.lr=.inf"], "evaluate.finetune.lr=inf must be > 0 and finite", id="evaluate-infinite-lr"
    ),
    pytest.param(["evaluate.prune.lr=.nan"], "evaluate.prune.lr=nan must be > 0 and finite", id="evaluate-nan-lr"),
    pytest.param(["evaluate.mia_folds=three"], "evaluate.mia_folds must be an integer", id="evaluate-string-for-int"),
]


@pytest.mark.parametrize(("overrides", "message"), EVALUATE_OVERRIDES)
def test_bad_evaluate_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_evaluate_config(None, overrides)


CONFIG_FILES = [
    pytest.param("not_yaml.yaml", "is not valid YAML", id="not-yaml"),
    pytest.param("binary.yaml", "is not UTF-8 text", id="binary-file"),
    pytest.param("list.yaml", "must hold a mapping at the top level", id="top-level-list"),
    pytest.param("duplicate.yaml", "found duplicate key 'shards'", id="duplicate-key"),
    pytest.param("python_tag.yaml", "could not determine a constructor", id="python-object-tag"),
    pytest.param("date.yaml", "is not plain data", id="date-value"),
    pytest.param("missing.yaml", "does not exist", id="missing-file"),
    pytest.param("a_dir.yaml", "is a directory, not a file", id="directory"),
]


@pytest.mark.parametrize(("name", "message"), CONFIG_FILES)
def test_bad_config_file(world: dict[str, Path], name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(world["dir"] / name)


def test_config_from_a_non_mapping() -> None:
    with pytest.raises(ConfigError, match="a config must be a mapping of keys"):
        config_from_dict([("shards", 3)])  # type: ignore[arg-type]


# ----------------------------------------------------------------------- data files
DATA_FILES = [
    pytest.param(lambda d: load_npz(d / "text.npz", num_classes=3), "is not an .npz archive", id="npz-text-file"),
    pytest.param(lambda d: load_npz(d / "array.npy", num_classes=3), "is not an .npz archive", id="npz-is-npy"),
    pytest.param(lambda d: load_npz(d / "truncated.npz", num_classes=3), "is not an .npz archive", id="npz-truncated"),
    pytest.param(lambda d: load_npz(d / "bad_crc.npz", num_classes=3), "Bad CRC-32", id="npz-corrupt-member"),
    pytest.param(lambda d: load_npz(d / "wrong_keys.npz", num_classes=3), "needs features under 'x'", id="npz-keys"),
    pytest.param(
        lambda d: load_npz(d / "objects.npz", num_classes=3), "Object arrays cannot be loaded", id="npz-pickle"
    ),
    pytest.param(lambda d: load_npz(d / "missing.npz", num_classes=3), "does not exist", id="npz-missing"),
    pytest.param(
        lambda d: load_idx(d / "truncated.idx", d / "labels.idx", num_classes=3),
        "it is truncated or corrupt",
        id="idx-truncated",
    ),
    pytest.param(
        lambda d: load_idx(d / "magic.idx", d / "labels.idx", num_classes=3), "is not an IDX file", id="idx-bad-magic"
    ),
    pytest.param(
        lambda d: load_idx(d / "truncated.idx.gz", d / "labels.idx", num_classes=3),
        "corrupt or truncated gzip",
        id="idx-gzip-truncated",
    ),
    pytest.param(
        lambda d: load_idx(d / "images.idx", d / "five_labels.idx", num_classes=3),
        "has 4 images but",
        id="idx-count-mismatch",
    ),
    pytest.param(
        lambda d: load_idx(d / "labels.idx", d / "images.idx", num_classes=3),
        "swapped images and labels?",
        id="idx-swapped",
    ),
    pytest.param(
        lambda d: load_csv(d / "bad_cell.csv", num_classes=3),
        "line 3, column 'f0': 'abc' is not a number",
        id="csv-bad-cell",
    ),
    pytest.param(lambda d: load_csv(d / "ragged.csv", num_classes=3), "line 3 has 2 cells", id="csv-ragged-row"),
    pytest.param(lambda d: load_csv(d / "no_label.csv", num_classes=3), "has no column 'label'", id="csv-no-label"),
    pytest.param(lambda d: load_csv(d / "empty.csv", num_classes=3), "a header row naming the columns", id="csv-empty"),
    pytest.param(lambda d: load_csv(d / "header_only.csv", num_classes=3), "no data rows", id="csv-header-only"),
    pytest.param(lambda d: load_csv(d / "binary.csv", num_classes=3), "not a readable CSV text file", id="csv-binary"),
    pytest.param(lambda d: load_csv(d / "label_7.csv", num_classes=3), "in [0, 3); found 7", id="csv-label-range"),
    pytest.param(lambda d: load_csv(d / "nan_cell.csv", num_classes=3), "NaN/inf value(s)", id="csv-nan-cell"),
    pytest.param(
        lambda d: load_csv(d / "fraction_id.csv", num_classes=3, id_column="id"),
        "line 2, column 'id': '1.5' is not an integer id",
        id="csv-fractional-id",
    ),
    pytest.param(
        lambda d: load_csv(d / "fraction_id.csv", num_classes=3),
        "has a column named 'id' but data.id_column is not set",
        id="csv-id-column-unset",
    ),
]


@pytest.mark.parametrize(("load", "message"), DATA_FILES)
def test_bad_data_file(world: dict[str, Path], load: Callable[[Path], Any], message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        load(world["dir"])


# ------------------------------------------------------- API calls on the trained store
X2 = np.zeros((2, D), np.float32)
NEW = [9000, 9001]  # ids the store does not hold
API_CALLS = [
    # ingest: features
    pytest.param(lambda e: e.ingest("hello", [0], ids=[9000]), DataError, "features x must be numeric", id="x-string"),
    pytest.param(
        lambda e: e.ingest([{"a": 1}], [0], ids=[9000]), DataError, "must be numeric, not object", id="x-dict"
    ),
    pytest.param(lambda e: e.ingest(X2.astype(complex), [0, 1], ids=NEW), DataError, "not complex128", id="x-complex"),
    pytest.param(lambda e: e.ingest(np.zeros(D), [0] * D), DataError, "must have shape (n, features...)", id="x-1d"),
    pytest.param(
        lambda e: e.ingest([[1.0] * D, [1.0]], [0, 1], ids=NEW), DataError, "equal-length rows", id="x-ragged"
    ),
    pytest.param(
        lambda e: e.ingest(np.zeros((2, D + 1)), [0, 1], ids=NEW),
        DataError,
        f"this store holds samples of shape ({D},)",
        id="x-wrong-feature-shape",
    ),
    pytest.param(lambda e: e.ingest(X2 + np.nan, [0, 1], ids=NEW), DataError, "NaN/inf value(s)", id="x-nan"),
    pytest.param(lambda e: e.ingest(X2 - np.inf, [0, 1], ids=NEW), DataError, "NaN/inf value(s)", id="x-inf"),
    pytest.param(
        lambda e: e.ingest(np.full((2, D), 1e300), [0, 1], ids=NEW),
        DataError,
        "(after float32 conversion)",
        id="x-overflows-float32",
    ),
    pytest.param(
        lambda e: e.ingest(torch.full((2, D), float("nan")), torch.tensor([0, 1]), ids=NEW),
        DataError,
        "NaN/inf value(s)",
        id="x-torch-nan",
    ),
    pytest.param(
        lambda e: e.ingest(np.zeros((0, D)), [], ids=[]), DataError, "x is empty (0 samples)", id="empty-data"
    ),
    pytest.param(
        lambda e: e.ingest(torch.utils.data.TensorDataset(torch.zeros(2, D), torch.tensor([0, 1])), [0, 1]),
        DataError,
        "pass y=None",
        id="dataset-with-y",
    ),
    pytest.param(
        lambda e: e.ingest(LabeledArrays(X2, np.array([0, 1]), np.array(NEW)), [1, 0], ids=[9002, 9003]),
        DataError,
        "y= and ids= given beside it would be ignored; pass the LabeledArrays alone, or its .x with y= and ids=",
        id="labeled-arrays-with-y-and-ids",
    ),
    pytest.param(
        lambda e: e.add(LabeledArrays(X2, np.array([0, 1]), np.array(NEW)), ids=[9002, 9003]),
        DataError,
        "ids= given beside it would be ignored",
        id="add-labeled-arrays-with-ids",
    ),
    # ingest: labels
    pytest.param(lambda e: e.ingest(X2, None, ids=NEW), DataError, "labels y are required", id="y-missing"),
    pytest.param(lambda e: e.ingest(X2, np.eye(2, 3), ids=NEW), DataError, "y must be 1-D", id="y-one-hot"),
    pytest.param(lambda e: e.ingest(X2, [0], ids=NEW), DataError, "len(y)=1 != len(x)=2", id="y-length"),
    pytest.param(lambda e: e.ingest(X2, [-1, 0], ids=NEW), DataError, "in [0, 3); found -1", id="y-negative"),
    pytest.param(lambda e: e.ingest(X2, [3, 0], ids=NEW), DataError, "in [0, 3); found 3", id="y-out-of-range"),
    pytest.param(lambda e: e.ingest(X2, [1.5, 0], ids=NEW), DataError, "in [0, 3); found 1.5", id="y-fractional"),
    pytest.param(lambda e: e.ingest(X2, [np.nan, 0], ids=NEW), DataError, "in [0, 3); found nan", id="y-nan"),
    pytest.param(lambda e: e.ingest(X2, ["cat", "dog"], ids=NEW), DataError, "got dtype <U3", id="y-strings"),
    # ingest: ids
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=[2**63 - 1, 9001]),
        DataError,
        "ids must be integers in [0, 2**63 - 2]; found 9223372036854775807",
        id="id-2^63-1",
    ),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=np.array([2**63, 9001], np.uint64)),
        DataError,
        "found 9223372036854775808",
        id="id-uint64-2^63",
    ),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=[2**64, 9001]), DataError, "found 18446744073709551616", id="id-2^64"
    ),
    pytest.param(lambda e: e.ingest(X2, [0, 1], ids=[-1, 9001]), DataError, "found -1 at position 0", id="id-negative"),
    pytest.param(lambda e: e.ingest(X2, [0, 1], ids=[True, 9001]), DataError, "found True", id="id-bool"),
    pytest.param(lambda e: e.ingest(X2, [0, 1], ids=[1.5, 9001]), DataError, "found 1.5", id="id-fractional"),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=np.array([1152921504606846976, 9001], np.float64)),
        DataError,
        "a float64 above 2**53, where float64 cannot hold every integer",
        id="id-float64-above-2^53",
    ),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=np.array([2**24 + 1, 2**24 + 2], np.float32)),
        DataError,
        "a float32 above 2**24",
        id="id-float32-above-2^24",
    ),
    pytest.param(lambda e: e.ingest(X2, [0, 1], ids=["a", "b"]), DataError, "found 'a'", id="id-string"),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=[9000, 9000]),
        DataError,
        "ids must be unique; id 9000 appears at positions 0 and 1",
        id="id-duplicate",
    ),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=[9000, 1]),
        DataError,
        "already in the store (first: 1)",
        id="id-already-stored",
    ),
    pytest.param(lambda e: e.ingest(X2, [0, 1], ids=[9000]), DataError, "len(ids)=1 != len(x)=2", id="ids-length"),
    pytest.param(
        lambda e: e.ingest(X2, [0, 1], ids=NEW, probabilities=[0.1, 0.2]),
        DataError,
        "partition.strategy is uniform",
        id="probabilities-on-uniform",
    ),
    pytest.param(
        lambda e: e.add(np.zeros((2, D - 1)), [0, 1], ids=NEW),
        DataError,
        f"holds samples of shape ({D},)",
        id="add-wrong-shape",
    ),
    # delete
    pytest.param(
        lambda e: e.delete([1, 99_999]),
        DataError,
        "not in the store and were never deleted (first: [99999]); the whole request was rejected",
        id="delete-unknown-id",
    ),
    pytest.param(lambda e: e.delete([]), DataError, "the deletion request is empty", id="delete-empty"),
    pytest.param(lambda e: e.delete("17"), DataError, "ids must be a list of integers, got str", id="delete-string"),
    pytest.param(lambda e: e.delete({1: 2}), DataError, "got dict", id="delete-dict"),
    pytest.param(lambda e: e.delete(None), DataError, "got NoneType", id="delete-none"),
    pytest.param(
        lambda e: e.delete([1, 2.5]), DataError, "found 2.5 at position 1: not a whole number", id="delete-float"
    ),
    pytest.param(lambda e: e.delete([True]), DataError, "found True at position 0: a bool", id="delete-bool"),
    pytest.param(lambda e: e.delete([1, "2"]), DataError, "found '2' at position 1: a str", id="delete-mixed"),
    pytest.param(
        lambda e: e.delete(np.array([2.0**60])), DataError, "a float64 above 2**53", id="delete-float64-above-2^53"
    ),
    pytest.param(lambda e: e.delete([-3]), DataError, "id -3 is outside [0, 9223372036854775806]", id="delete-neg"),
    pytest.param(lambda e: e.delete([2**63 - 1]), DataError, "id 9223372036854775807 is outside", id="delete-huge"),
    # verify
    pytest.param(lambda e: e.verify([99]), DataError, "shard 99 does not exist", id="verify-shard-99"),
    pytest.param(lambda e: e.verify([-1]), DataError, "shard -1 does not exist", id="verify-shard-negative"),
    pytest.param(lambda e: e.verify("0"), DataError, "shards must be a list of shard indices", id="verify-string"),
    pytest.param(lambda e: e.verify([1.0]), DataError, "shard 1.0 does not exist", id="verify-float-shard"),
    # predict and score
    pytest.param(
        lambda e: e.predict(np.zeros((2, D + 1))), DataError, f"the ensemble expects ({D},)", id="predict-shape"
    ),
    pytest.param(lambda e: e.predict(X2 + np.nan), DataError, "NaN/inf value(s)", id="predict-nan"),
    pytest.param(lambda e: e.predict([["a"] * D]), DataError, "inputs must be numeric features", id="predict-strings"),
    pytest.param(lambda e: e.predict([[1.0] * D, [1.0]]), DataError, "equal-length rows", id="predict-ragged"),
    pytest.param(lambda e: e.predict(X2, method="median"), ConfigError, "unknown method 'median'", id="predict-method"),
    pytest.param(lambda e: e.predict(X2, batch_size=0), ConfigError, "batch_size must be >= 1", id="predict-batch-0"),
    pytest.param(
        lambda e: e.score(np.zeros((5, D)), [0, 1, 2]), DataError, "len(y)=3 != len(x)=5", id="score-label-length"
    ),
    pytest.param(lambda e: e.score(X2, ["a", "b"]), DataError, "labels must be integers", id="score-label-strings"),
    pytest.param(
        lambda e: e.shard_scores(np.zeros((5, D)), [0, 1]),
        DataError,
        "len(y)=2 != len(x)=5",
        id="shard-scores-label-length",
    ),
    # config changes
    pytest.param(
        lambda e: e.reconfigure(small_config("shards=4")),
        ConfigError,
        "shards of store",
        id="reconfigure-shards",
    ),
    pytest.param(
        lambda e: e.reconfigure("configs/tiny.yaml"),
        ConfigError,
        "config must be a SisaConfig",
        id="reconfigure-not-a-config",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), API_CALLS)
def test_bad_api_call_leaves_the_trained_store_unchanged(
    world: dict[str, Path], call: Callable[[Ensemble], Any], error: type[SisaError], message: str
) -> None:
    before = store_digest(world["store"])
    with Ensemble.open(world["store"]) as ens, pytest.raises(error, match=re.escape(message)):
        call(ens)
    assert store_digest(world["store"]) == before
    with Ensemble.open(world["store"], readonly=True) as ens:
        assert ens.status()["samples"] == N and not ens.pending()


# ------------------------------------------------ first fit of a new store (API)
X, Y = blobs(N, d=D)
FIRST_FIT = [
    pytest.param(["shards=200"], ConfigError, "holds 0 samples, fewer than slices=3", id="more-shards-than-samples"),
    pytest.param(["slices=150"], ConfigError, "fewer than slices=150", id="more-slices-than-shard-size"),
    pytest.param(["model.name=cnn"], ModelError, "model 'cnn' needs image inputs", id="cnn-on-flat-features"),
    pytest.param(["model.name=numpy:zeros"], ModelError, "failed to build (TypeError", id="callable-not-a-model"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), FIRST_FIT)
def test_refused_first_fit_changes_nothing(
    tmp_path: Path, overrides: list[str], error: type[SisaError], message: str
) -> None:
    # A shard with fewer samples than slices would train on empty slices: at the first fit that
    # is a config too fine for the data (lower shards or slices). After deletions it is allowed.
    with Ensemble.create(tmp_path / "st", small_config(*overrides)) as ens:
        ens.ingest(X, Y)
        before = store_digest(ens.path)
        with pytest.raises(error, match=re.escape(message)):
            ens.fit()
        assert store_digest(ens.path) == before


# ------------------------------------------------------------- not a store (API)
NOT_A_STORE = [
    pytest.param("missing", "is not a sisa store (no data.mdb)", id="missing-dir"),
    pytest.param("empty_dir", "is not a sisa store (no data.mdb)", id="empty-dir"),
    pytest.param("random_files", "is not a sisa store (no data.mdb)", id="dir-with-random-files"),
    pytest.param("a_file", "is a file, not a sisa store", id="file-not-dir"),
    pytest.param("random_mdb", "MDB_INVALID", id="random-bytes-data-mdb"),
    pytest.param("empty_mdb", "its data.mdb is empty", id="empty-data-mdb"),
    pytest.param("foreign_lmdb", "is not a readable sisa store", id="foreign-lmdb"),
]


def _tree_digest(path: Path) -> str:
    return store_digest(path) if path.is_dir() else (path.read_text() if path.exists() else "absent")


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
@pytest.mark.parametrize(("name", "message"), NOT_A_STORE)
def test_opening_what_is_not_a_store(world: dict[str, Path], name: str, message: str, readonly: bool) -> None:
    path = world["dir"] / name
    before = _tree_digest(path)
    with pytest.raises(StoreError, match=re.escape(message)):
        Ensemble.open(path, readonly=readonly)
    assert _tree_digest(path) == before  # file names and bytes, lock files aside


CREATE_ON = [
    pytest.param("a_file", "is a file, not a directory", id="file"),
    pytest.param("random_files", "exists and is not empty", id="dir-with-random-files"),
    pytest.param("store", "already holds a store", id="existing-store"),
]


@pytest.mark.parametrize(("name", "message"), CREATE_ON)
def test_creating_a_store_where_one_cannot_be(world: dict[str, Path], name: str, message: str) -> None:
    path = world["dir"] / name
    before = _tree_digest(path)
    with pytest.raises(StoreError, match=re.escape(message)):
        Ensemble.create(path, small_config())
    assert _tree_digest(path) == before


def test_create_with_something_that_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config must be a SisaConfig, not dict"):
        Ensemble.create(tmp_path / "st", {"shards": 3})  # type: ignore[arg-type]
    assert not (tmp_path / "st").exists()


# ------------------------------------------------------------ CLI on the trained store
CLI_ON_STORE = [
    # delete --ids
    pytest.param(["delete", "--ids", "99999"], "not in the store", id="delete-unknown-id"),
    pytest.param(["delete", "--ids", "-5"], "id -5 is outside", id="delete-negative-id"),
    pytest.param(["delete", "--ids", str(2**63)], "id 9223372036854775808 is outside", id="delete-huge-id"),
    pytest.param(["delete", "--ids", "12", "abc"], "'abc' is not an integer id", id="delete-non-integer"),
    pytest.param(["audit", "--id", "x17"], "'x17' is not an integer id", id="audit-id-non-integer"),
    pytest.param(["audit", "--id", "-3"], "id -3 is outside", id="audit-id-negative"),
    pytest.param(["delete"], "exactly one of --ids", id="delete-no-ids"),
    pytest.param(["delete", "--ids", "1", "--ids-file", "{dir}/ids_garbage"], "exactly one of", id="delete-both"),
    # delete --ids-file
    pytest.param(["delete", "--ids-file", "{dir}/ids_garbage"], "line 2: 'x7' is not an integer id", id="ids-garbage"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_float"], "line 1: '1.5' is not an integer", id="ids-float"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_hex"], "'0x10' is not an integer id", id="ids-hex"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_underscore"], "'1_000' is not an integer id", id="ids-underscore"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_unicode_digits"], "is not an integer id", id="ids-unicode-digits"),
    pytest.param(["delete", "--ids", "1_000"], "'1_000' is not an integer id", id="delete-underscore-id"),
    pytest.param(
        ["delete", "--ids-file", "{dir}/ids_two_per_line"], "put one integer id per line", id="ids-two-a-line"
    ),
    pytest.param(["delete", "--ids-file", "{dir}/ids_comments_only"], "request is empty", id="ids-comments-only"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_empty"], "the deletion request is empty", id="ids-empty-file"),
    pytest.param(
        ["delete", "--ids-file", "{dir}/ids_unknown"], "(first: [99999]); the whole request", id="ids-unknown-id"
    ),
    pytest.param(
        ["delete", "--ids-file", "{dir}/ids_duplicate_unknown"], "1 id(s) are not in the store", id="ids-duplicates"
    ),
    pytest.param(["delete", "--ids-file", "{dir}/ids_negative"], "id -4 is outside", id="ids-negative"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_too_big"], "id 9223372036854775807 is outside", id="ids-2^63-1"),
    pytest.param(["delete", "--ids-file", "{dir}/missing"], "cannot read ids file", id="ids-missing-file"),
    pytest.param(["delete", "--ids-file", "{dir}"], "Is a directory", id="ids-file-is-a-dir"),
    pytest.param(["delete", "--ids-file", "{dir}/ids_binary"], "codec can't decode", id="ids-binary-file"),
    # verify, eval
    pytest.param(["verify", "--shard", "9"], "shard 9 does not exist", id="verify-shard-9"),
    pytest.param(["verify", "--shard", "x"], "invalid int value: 'x'", id="verify-shard-not-int"),
    pytest.param(["eval", "--method", "median"], "invalid choice: 'median'", id="eval-unknown-method"),
    # add
    pytest.param(["add", "--input", "{dir}/text.npz"], "is not an .npz archive", id="add-not-npz"),
    pytest.param(["add", "--input", "{dir}/missing.npz"], "does not exist", id="add-missing-file"),
    pytest.param(["add", "--input", "{dir}/truncated.npz"], "is not an .npz archive", id="add-truncated-npz"),
    pytest.param(["add", "--input", "{dir}/wrong_shape.npz"], f"holds samples of shape ({D},)", id="add-wrong-shape"),
    pytest.param(["add", "--input", "{dir}/stored_ids.npz"], "already in the store (first: 1)", id="add-stored-ids"),
    pytest.param(["add", "--input", "{dir}/nan.npz"], "NaN/inf value(s)", id="add-nan"),
    pytest.param(["add", "--input", "{dir}/bad_label.npz"], "in [0, 3); found 7", id="add-label-out-of-range"),
    pytest.param(["add", "--input", "{dir}/images.idx"], "give its labels file with --labels", id="add-idx-no-labels"),
    pytest.param(
        ["add", "--input", "{dir}/nan.npz", "--labels", "{dir}/nan.npz"], "--labels goes with IDX", id="add-labels-npz"
    ),
    pytest.param(
        ["add", "--input", "{dir}/ids_float"], "ids_float is not an .npz archive", id="add-read-as-store-format"
    ),
    pytest.param(["train", "data.train={dir}/nan.npz"], "already holds its training data", id="train-other-data"),
    # train on the existing store
    pytest.param(["train", "train.epochs=0"], "train.epochs=0 must be >= 1", id="train-zero-epochs"),
    pytest.param(["train", "train.lr=.inf"], "train.lr=inf must be > 0 and finite", id="train-infinite-lr"),
    pytest.param(["train", "train.batch_size=-1"], "train.batch_size=-1 must be >= 1", id="train-negative-batch"),
    pytest.param(["train", "shards=4"], "shards of store", id="train-change-shards"),
    pytest.param(["train", "data.num_classes=5"], "data.num_classes of store", id="train-change-num-classes"),
    pytest.param(
        ["train", "partition.slice_order=probability"], "partition.slice_order of store", id="train-change-slice-order"
    ),
    pytest.param(["train", "bogus=1"], "unknown config key(s) bogus", id="train-unknown-key"),
    pytest.param(["train", "--config", "{dir}/not_yaml.yaml"], "is not valid YAML", id="train-config-not-yaml"),
    pytest.param(["train", "data.test={dir}/missing.npz"], "does not exist", id="train-missing-test-file"),
    pytest.param(["train", "data.test={dir}/truncated.npz"], "is not an .npz archive", id="train-truncated-test"),
    pytest.param(["train", "model.name=cnn"], "model 'cnn' needs image inputs", id="train-cnn-on-flat-data"),
    pytest.param(["train", "model.name=no_such_module:build"], "cannot be imported", id="train-model-not-importable"),
]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``sisa argv``; argparse's usage errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("argv", "message"), CLI_ON_STORE)
def test_bad_cli_input_exits_2_and_leaves_the_store_unchanged(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = store_digest(world["store"])
    argv = [argv[0], "--store", str(world["store"]), *(_fill(a, world) for a in argv[1:]), "--json"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert message in err, err
    if out:  # a sisa error (not an argparse usage error) also reports itself as JSON on stdout
        report = json.loads(out)
        assert report["ok"] is False and message in report["message"]
    assert store_digest(world["store"]) == before


# ---------------------------------------------------- CLI `train` of a new store
CLI_NEW_STORE = [
    pytest.param(["--config", "{dir}/not_yaml.yaml"], "is not valid YAML", id="config-not-yaml"),
    pytest.param(["--config", "{dir}/binary.yaml"], "is not UTF-8 text", id="config-binary"),
    pytest.param(["--config", "{dir}/duplicate.yaml"], "found duplicate key 'shards'", id="config-duplicate-key"),
    pytest.param(["--config", "{dir}/missing.yaml"], "does not exist", id="config-missing"),
    pytest.param(["--config", "{config}", "trian.lr=0.1"], "unknown config key(s) trian", id="unknown-key"),
    pytest.param(["--config", "{config}", "slices=0"], "slices=0 must be in [1, 1024]", id="zero-slices"),
    pytest.param(["--config", "{config}", "train.lr=-1"], "train.lr=-1.0 must be > 0", id="negative-lr"),
    pytest.param(
        ["--config", "{config}", "shards=500"],
        f"holds 0 samples, fewer than slices=3 ({N} samples over shards=500): lower shards or slices",
        id="more-shards-than-samples",
    ),
    pytest.param(["--config", "{config}", "slices=200"], "fewer than slices=200", id="more-slices-than-shard-size"),
    pytest.param(["--config", "{config}", "data.train={dir}/text.npz"], "is not an .npz archive", id="npz-not-npz"),
    pytest.param(
        ["--config", "{config}", "data.dataset=csv", "data.train={dir}/bad_cell.csv"],
        "line 3, column 'f0': 'abc' is not a number",
        id="csv-bad-cell",
    ),
    pytest.param(
        ["--config", "{config}", "data.dataset=idx", "data.train={dir}/truncated.idx", "data.train_labels={dir}/x"],
        "it is truncated or corrupt",
        id="idx-truncated",
    ),
    pytest.param(["--config", "{config}", "data.test={dir}/missing.npz"], "does not exist", id="missing-test-split"),
    pytest.param(
        ["--config", "{config}", "model.name=no_such_module:build"], "cannot be imported", id="model-not-importable"
    ),
    pytest.param(["--config", "{config}", "model.name=cnn"], "needs image inputs", id="cnn-on-flat-data"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_NEW_STORE)
def test_refused_train_leaves_no_store_behind(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    new = tmp_path / "new_store"
    code, out, err = _run_cli(["train", "--store", str(new), *(_fill(a, world) for a in argv)], capsys)
    assert code == 2, (out, err)
    assert message in err, err
    assert not new.exists()


CLI_STORE_PATHS = [
    pytest.param("train", "a_file", "is a file, not a directory", id="train-store-is-a-file"),
    pytest.param("train", "random_files", "exists and is not empty", id="train-store-dir-with-random-files"),
    pytest.param("status", "empty_dir", "is not a sisa store (no data.mdb)", id="status-empty-dir"),
    pytest.param("status", "random_files", "is not a sisa store (no data.mdb)", id="status-dir-with-random-files"),
    pytest.param("eval", "a_file", "is a file, not a sisa store", id="eval-file-not-dir"),
    pytest.param("delete", "random_mdb", "is not a readable sisa store", id="delete-random-data-mdb"),
    pytest.param("apply", "empty_mdb", "its data.mdb is empty", id="apply-empty-data-mdb"),
    pytest.param("resume", "foreign_lmdb", "is not a readable sisa store", id="resume-foreign-lmdb"),
    pytest.param("audit", "missing", "is not a sisa store (no data.mdb)", id="audit-missing-dir"),
]


@pytest.mark.parametrize(("command", "name", "message"), CLI_STORE_PATHS)
def test_cli_on_what_is_not_a_store(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], command: str, name: str, message: str
) -> None:
    path = world["dir"] / name
    before = _tree_digest(path)
    extra = {"train": ["--config", str(world["config"])], "delete": ["--ids", "1"]}.get(command, [])
    code, out, err = _run_cli([command, "--store", str(path), *extra], capsys)
    assert code == 2, (out, err)
    assert message in err, err
    assert _tree_digest(path) == before
