"""Erasure by re-keying, seen from a reader: paired snapshots keep decrypting, a bare old one is told to read again."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.errors import StoreChangedError
from sisa.store import environment
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)
DELETE = """
import sys
from sisa.ensemble import Ensemble
with Ensemble.open(sys.argv[1], address="local") as ens:
    ens.delete([int(sys.argv[2])])
"""


def test_a_reader_keeps_its_snapshot_and_a_bare_old_snapshot_is_told_to_read_again(
    tmp_path: Path, env_python: dict[str, str]
) -> None:
    path = tmp_path / "st"
    with Ensemble.create(path, small_config(), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
    with Ensemble.open(path, readonly=True) as reader:
        store = reader.store
        with store.read() as txn:
            run = store.place(txn, 0)
            assert run is not None
            mate = int(next(i for i in store.run_ids(txn, *run) if i != 0))
        # Two snapshots taken before another process deletes id 0 and re-keys its run: one from
        # read() (paired with a key snapshot), one of the bulk environment alone.
        with store.read() as paired, environment.read(store._shared, follow=False) as bare:
            child = subprocess.run([sys.executable, "-c", DELETE, str(path), "0"], env=env_python, timeout=300)
            assert child.returncode == 0
            x, _ = store.load_samples(paired, np.array([0, mate]), (10,))  # its keys were snapshotted too
            assert np.array_equal(x, X[[0, mate]].astype(np.float32))
            with pytest.raises(StoreChangedError, match="read again"):
                store.load_samples(bare, np.array([mate]), (10,))  # the old key is gone from keys/
        with store.read() as fresh:  # a new read sees the deletion and the run-mate under its new key
            assert not store.has_sample(fresh, 0)
            x, _ = store.load_samples(fresh, np.array([mate]), (10,))
        assert np.array_equal(x[0], X[mate].astype(np.float32))
