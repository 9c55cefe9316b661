"""Format-2 stores: refused with the command that converts them, and converted by `sisa migrate`.

The format-2 store is written here the way sisa 710eb75 wrote it (float32 features and an
int64 label in the clear, a BLAKE2b-128 digest, checkpoints as plain bytes), from a
format-3 store trained in the same run, so the migrated store must give back the very
same models. The conversion was also checked by hand against a store the old code wrote.
"""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.errors import StoreError
from sisa.store.layout import DBS, id_key
from tests.conftest import blobs, live_state, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(300, d=6)
PIXELS = np.clip(np.round((X - X.min()) * 20), 0, 255)  # integral, as bytes ingested as float32 were


def downgrade(path: Path) -> None:
    """Rewrite a format-3 store in place as format 2: clear float32 records, plain checkpoints, per-id index."""
    with Ensemble.open(path, readonly=True) as ens, ens.store.read() as txn:
        store = ens.store
        places = store.locate(txn, range(len(X)))
        ids = np.asarray(sorted(places), dtype=np.int64)
        x, y = store.load_samples(txn, ids, tuple(store.meta(txn)["feature_shape"]))
        blobs_ = {r["key"]: store.checkpoint(txn, r) for s in range(3) for r in store.stage_records(txn, s)}
    env = lmdb.open(str(path), max_dbs=len(DBS) + 8, subdir=True)
    samples, ckpt, meta, assign, members = (
        env.open_db(n.encode()) for n in ("samples", "ckpt", "meta", "assign", "members")
    )
    with env.begin(write=True) as txn:
        txn.drop(assign, delete=False)  # format 2: id -> (shard, slice); one (shard, slice, id) key per member
        txn.drop(members, delete=False)
        for sid, (shard, slice_) in places.items():
            txn.put(id_key(sid), struct.pack(">II", shard, slice_), db=assign)
            txn.put(struct.pack(">IIQ", shard, slice_, sid), b"", db=members)
        for sid, xi, yi in zip(ids.tolist(), x.reshape(len(ids), -1), y.tolist(), strict=True):
            body = struct.pack("<q", yi) + xi.astype("<f4").tobytes()
            txn.put(id_key(sid), body + hashlib.blake2b(id_key(sid) + body, digest_size=16).digest(), db=samples)
        for key, blob in blobs_.items():
            txn.put(key.encode(), blob, db=ckpt)
        txn.put(b"format", b"2", db=meta)
        txn.delete(b"feature_dtype", db=meta)
    env.close()
    shutil.rmtree(path / "keys")


@pytest.fixture
def old_store(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "old"
    with Ensemble.create(path, small_config("data.num_classes=3")) as ens:
        ens.ingest(PIXELS.astype(np.float32), Y)
        ens.fit()
        ens.delete([5])
        ens.delete([7], defer=True)
        state = {"live": live_state(ens), "proba": ens.predict_proba(PIXELS[:20].astype(np.float32))}
    downgrade(path)
    return path, state


def test_a_format_2_store_is_refused_with_the_command_that_migrates_it(old_store: tuple[Path, dict]) -> None:
    path, _ = old_store
    before = store_digest(path)
    with pytest.raises(StoreError, match=r"format 2 .*sisa migrate --store .* --to NEW"):
        Ensemble.open(path)
    assert store_digest(path) == before


def test_migrate_gives_the_same_models_in_uint8_and_leaves_the_old_store(
    old_store: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, state = old_store
    before = store_digest(path)
    new = tmp_path / "new"
    assert main(["migrate", "--store", str(path), "--to", str(new), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 298 and report["feature_dtype"] == "uint8" and report["checkpoints"] > 0
    assert store_digest(path) == before  # only read
    with Ensemble.open(new) as ens:
        assert live_state(ens) == state["live"]
        assert np.array_equal(ens.predict_proba(PIXELS[:20].astype(np.float32)), state["proba"])
        assert [r["request_id"] for r in ens.pending()] == [2]  # the deferred request stays pending
        assert ens.audit().ok and ens.audit().entries == 1
        report = ens.verify()  # every shard in service replays to its live model
        assert all(info["ok"] for info in report["shards"].values() if info["live_weights"] is not None)
        cert = ens.apply()[0]  # and applies in the new store
        assert cert["request_id"] == 2 and ens.verify()["ok"] and ens.audit().entries == 2
        assert ens.store.meta()["feature_dtype"] == "|u1"


def test_migrate_refuses_a_used_target_and_a_store_of_this_format(
    old_store: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = old_store
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("mine")
    assert main(["migrate", "--store", str(path), "--to", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err and (used / "x").read_text() == "mine"
    current = tmp_path / "current"
    with Ensemble.create(current, small_config("data.num_classes=3")) as ens:
        ens.ingest(PIXELS, Y)
    assert main(["migrate", "--store", str(current), "--to", str(tmp_path / "n2")]) == 2
    assert "already in this format" in capsys.readouterr().err and not (tmp_path / "n2").exists()
