"""The LMDB store: all-or-nothing ingest, locking, map growth, reopen in another process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.errors import DataError, StoreError, StoreLockedError
from sisa.store.database import Store
from tests.conftest import blobs, small_config, store_digest, writer_in_child


@pytest.fixture
def ens(tmp_path: Path):
    e = Ensemble.create(tmp_path / "st", small_config())
    x, y = blobs(200, d=6)
    e.ingest(x, y, ids=np.arange(200) * 2)
    yield e
    e.close()


def test_ingest_stores_samples_and_assignment(ens: Ensemble) -> None:
    status = ens.status()
    assert status["samples"] == 200 and status["feature_shape"] == [6]
    assert sum(s["samples"] for s in status["per_shard"]) == 200
    with ens.store.read() as txn:
        ids = np.concatenate([ens.store.slice_ids(txn, s, r) for s in range(3) for r in range(3)])
        x, y = ens.store.load_samples(txn, np.array([0, 10]), (6,))
    assert sorted(ids.tolist()) == list(range(0, 400, 2))
    x0, y0 = blobs(200, d=6)
    assert np.array_equal(x, x0[[0, 5]]) and np.array_equal(y, y0[[0, 5]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": [0, 1]}, "already in the store"),
        ({"ids": [1, 1]}, "duplicate"),
        ({"x": np.full((2, 6), np.nan, np.float32)}, "NaN"),
        ({"y": [0, 7]}, r"\[0, 3\)"),
        ({"x": np.zeros((2, 5), np.float32)}, "shape"),
        ({"y": [0]}, "length|len"),
        ({"ids": [-1, 5]}, "negative|>= 0"),
        ({"x": np.zeros((0, 6), np.float32), "y": [], "ids": []}, "empty|no samples"),
    ],
)
def test_rejected_ingest_changes_nothing(ens: Ensemble, kwargs: dict, message: str) -> None:
    before = store_digest(ens.path)
    args = {"x": np.zeros((2, 6), np.float32), "y": [0, 1], "ids": [1001, 1003]} | kwargs
    with pytest.raises(DataError, match=message):
        ens.ingest(args["x"], args["y"], ids=args["ids"])
    assert store_digest(ens.path) == before
    assert ens.status()["samples"] == 200


def test_second_writer_gets_a_clear_lock_error(ens: Ensemble, env_python: dict) -> None:
    with pytest.raises(StoreLockedError, match="locked by pid"):
        Ensemble.open(ens.path)
    # The child exits 1, the status of an uncaught exception, with the error named on stderr.
    code = f"from sisa.ensemble import Ensemble; Ensemble.open({str(ens.path)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_python)
    assert out.returncode == 1 and "StoreLockedError" in out.stderr and "read-only" in out.stderr
    # Readers need no lock.
    with Ensemble.open(ens.path, readonly=True) as reader:
        assert reader.status()["samples"] == 200


def test_a_writer_waits_for_the_lock_when_asked(tmp_path: Path, env_python: dict) -> None:
    with Ensemble.create(tmp_path / "st", small_config()) as made:
        made.ingest(*blobs(60, d=6))
    with writer_in_child(tmp_path / "st", 1.0, env_python) as child:
        with pytest.raises(StoreLockedError, match=r"locked by pid \d+: .*--wait SECONDS"):
            Ensemble.open(tmp_path / "st")
        with pytest.raises(StoreLockedError, match=r"\(waited 0.2s\)"):
            Ensemble.open(tmp_path / "st", lock_timeout=0.2)
        with Ensemble.open(tmp_path / "st", lock_timeout=120) as ens:  # granted once the child lets go
            assert child.wait(timeout=120) == 0 and child.stdout is not None
            assert child.stdout.read().strip() == "released"
            assert ens.store.writable
            ens.delete([3], defer=True)
    with Ensemble.open(tmp_path / "st", readonly=True) as reader:
        assert len(reader.pending()) == 1


def test_not_a_store_and_existing_store(tmp_path: Path, ens: Ensemble) -> None:
    with pytest.raises(StoreError, match="not a sisa store"):
        Ensemble.open(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        Ensemble.create(tmp_path / "junk", small_config())
    with pytest.raises(StoreError, match="already holds a store"):
        Ensemble.create(ens.path, small_config())


def test_read_only_handle_refuses_writes(ens: Ensemble) -> None:
    with Ensemble.open(ens.path, readonly=True) as reader, pytest.raises(StoreError, match="read-only"):
        reader.ingest(np.zeros((1, 6), np.float32), [0], ids=[999])


def test_map_grows_on_demand(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "grow", {"config": {}})
    size0 = store.map_size
    blob = b"\x01" * (1 << 20)

    def fill(txn):
        for i in range(2 * (size0 >> 20)):
            txn.put(f"k{i}".encode(), blob, db=store.db("ckpt"))

    store.write(fill)
    assert store.map_size > size0
    with store.read() as txn:
        assert txn.stat(store.db("ckpt"))["entries"] == 2 * (size0 >> 20)
    store.close()


def test_store_files_are_owner_only(ens: Ensemble) -> None:
    ens.delete([4])  # a deletion rewrites and compacts the key file
    modes = {p.relative_to(ens.path).as_posix(): p.stat().st_mode & 0o777 for p in [ens.path, *ens.path.rglob("*")]}
    assert {"hmac.key", "data.mdb", "keys", "keys/data.mdb"} <= modes.keys(), modes
    assert {k: m for k, m in modes.items() if m != (0o700 if (ens.path / k).is_dir() else 0o600)} == {}, modes


def test_reopen_in_a_new_process(ens: Ensemble, env_python: dict) -> None:
    status = ens.status()
    ens.close()
    code = (
        "import json; from sisa.ensemble import Ensemble\n"
        f"e = Ensemble.open({str(status['store'])!r})\n"
        "print(json.dumps(e.status()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_python, check=True)
    assert json.loads(out.stdout) == status
