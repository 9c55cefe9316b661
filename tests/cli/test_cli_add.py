"""`sisa add` reads every format `train` reads, numbers id-less samples after the store's largest id, and
`sisa train` refuses to silently ignore other training data on an existing store."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.data.loaders import load_split
from sisa.ensemble import Ensemble
from tests.conftest import blobs, small_config, store_digest, write_config

pytestmark = pytest.mark.usefixtures("ray_session")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> dict:
    assert main([*argv, "--json"]) == code
    return json.loads(capsys.readouterr().out)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join(f"f{i}" for i in range(x.shape[1])) + ",label"
    rows = [",".join(repr(float(v)) for v in row) + f",{int(label)}" for row, label in zip(x, y, strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def npz_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, dict[str, Path]]:
    """A store trained by `sisa train` from train.npz (ids 0..179); more data files beside it."""
    x, y = blobs(400, d=6, seed=3)
    files = {
        "train": tmp_path / "train.npz",
        "test": tmp_path / "test.npz",
        "other": tmp_path / "other.npz",
        "csv": tmp_path / "more.csv",
    }
    np.savez(files["train"], x=x[:180], y=y[:180])
    np.savez(files["test"], x=x[180:240], y=y[180:240])
    np.savez(files["other"], x=x[240:300], y=y[240:300])
    write_csv(files["csv"], x[300:330], y[300:330])
    cfg = small_config("data.dataset=npz", f"data.train={files['train']}", f"data.test={files['test']}")
    config = write_config(cfg, tmp_path / "cfg.yaml")
    store = tmp_path / "st"
    run_json(capsys, "train", "--config", str(config), "--store", str(store))
    return store, config, files


def test_train_refuses_other_training_data_on_an_existing_store(
    npz_store: tuple[Path, Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: pointing data.train at another file trained the old samples ("skipped 4 up-to-date")."""
    store, config, files = npz_store
    before = store_digest(store)
    argv = ["train", "--config", str(config), "--store", str(store), f"data.train={files['other']}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.train: '{files['train']}' -> '{files['other']}'" in err
    assert f"sisa add --store {store} --input FILE" in err
    assert main(["train", "--store", str(store), "data.train_limit=50"]) == 2
    assert "data.train_limit: None -> 50" in capsys.readouterr().err
    assert store_digest(store) == before
    # The same data (a resume, or a recipe change) is still fine.
    assert run_json(capsys, "train", "--config", str(config), "--store", str(store))["ingested"] == 0


def test_add_reads_npz_and_csv_and_numbers_after_the_largest_id(
    npz_store: tuple[Path, Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `sisa add` read only npz, and without ids numbered 0..n-1, colliding on the second add."""
    store, _, files = npz_store
    # The largest id is deleted first: its number must still never come back.
    assert run_json(capsys, "delete", "--store", str(store), "--ids", "179")["state"] == "applied"
    first = run_json(capsys, "add", "--store", str(store), "--input", str(files["other"]))
    assert first["added"] == 60 and first["ids"] == [180, 239] and first["numbered"] is True
    second = run_json(capsys, "add", "--store", str(store), "--input", str(files["other"]))  # the same file again
    assert second["ids"] == [240, 299]
    from_csv = run_json(capsys, "add", "--store", str(store), "--input", str(files["csv"]))
    assert from_csv["added"] == 30 and from_csv["ids"] == [300, 329]
    assert main(["add", "--store", str(store), "--input", str(files["csv"])]) == 0
    assert "ids 330..359 (the file has no ids: numbered after the store's largest id)" in capsys.readouterr().out
    with Ensemble.open(store, readonly=True) as ens:
        assert ens.status()["samples"] == 179 + 60 + 60 + 30 + 30
        assert ens.lookup([179])[0]["deleted"] is True
    # Ids in the file are kept as they are.
    x, y = blobs(10, d=6, seed=9)
    np.savez(files["other"].with_name("ids.npz"), x=x, y=y, ids=np.arange(10) + 10**12)
    given = run_json(capsys, "add", "--store", str(store), "--input", str(files["other"].with_name("ids.npz")))
    assert given["ids"] == [10**12, 10**12 + 9] and given["numbered"] is False
    assert run_json(capsys, "verify", "--store", str(store))["ok"] is True


def test_add_reads_idx_and_says_what_it_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, size=(120, 4, 3)), rng.integers(0, 3, size=120)
    for name, part in (("a", slice(0, 90)), ("b", slice(90, 120))):
        write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz", images[part])
        write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz", labels[part])
    cfg = small_config(
        "data.dataset=idx",
        f"data.train={tmp_path / 'a-images-idx3-ubyte.gz'}",
        f"data.train_labels={tmp_path / 'a-labels-idx1-ubyte.gz'}",
    )
    store = tmp_path / "st"
    with Ensemble.create(store, cfg) as ens:
        ens.ingest(load_split(cfg.data, "train"))
        ens.fit()
    images_b = str(tmp_path / "b-images-idx3-ubyte.gz")
    before = store_digest(store)
    assert main(["add", "--store", str(store), "--input", images_b]) == 2
    assert "read as IDX images: give its labels file with --labels FILE" in capsys.readouterr().err
    assert main(["add", "--store", str(store), "--input", str(tmp_path / "x.dat"), "--format", "csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert store_digest(store) == before
    added = run_json(
        capsys, "add", "--store", str(store), "--input", images_b, "--labels", str(tmp_path / "b-labels-idx1-ubyte.gz")
    )
    assert added["added"] == 30 and added["ids"] == [90, 119]


def test_ingest_without_ids_continues_after_the_largest_id(tmp_path: Path) -> None:
    """The Python API follows the same rule as `sisa add`: only a store's first samples get 0..n-1."""
    x, y = blobs(100, d=6, seed=2)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x[:40], y[:40])
        ens.ingest(x[40:70], y[40:70], ids=np.arange(30) + 500)
        ens.ingest(x[70:], y[70:])  # used to collide with 0..29
        assert ens.status()["samples"] == 100
        assert [r["in_store"] for r in ens.lookup([0, 39, 500, 529, 530, 559])] == [True] * 6
        assert ens.lookup([560])[0]["in_store"] is False
