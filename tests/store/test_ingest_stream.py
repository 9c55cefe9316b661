"""Ingest in bounded transactions: streams (iterators, torch Datasets, Ray Datasets, Parquet) and large arrays.

The promise: the same store as one array ingest would make, readers never see a part of
an ingest, and a failure or a crash takes back everything the call wrote.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sisa.data.arrays import LabeledArrays
from sisa.ensemble import Ensemble
from sisa.errors import DataError
from sisa.store.database import Store
from tests.conftest import blobs, live_state, small_config

X, Y = blobs(600, d=10)
IDS = np.arange(1000, 1600, dtype=np.int64)


def contents(ens: Ensemble) -> dict[str, Any]:
    """What the store holds, logically: meta, counts per slice, where every id lives, each sample's bytes."""
    with ens.store.read() as txn:
        meta = {k: v for k, v in ens.store.meta(txn).items() if k != "config"}
        ids = [int(i) for s in range(ens.config.shards) for r in range(4) for i in ens.store.slice_ids(txn, s, r)]
        x, y = ens.store.load_samples(txn, np.asarray(sorted(ids), np.int64), (10,)) if ids else (None, None)
    status = ens.status()
    return {
        "meta": meta,
        "per_shard": [p["slice_samples"] for p in status["per_shard"]],
        "samples": status["samples"],
        "where": ens.locate(ids) if ids else {},
        "x": None if x is None else x.tobytes(),
        "y": None if y is None else y.tobytes(),
    }


def batches(x: np.ndarray, y: np.ndarray, ids: np.ndarray | None, size: int):
    for start in range(0, len(x), size):
        part = slice(start, start + size)
        yield (x[part], y[part]) if ids is None else (x[part], y[part], ids[part])


@pytest.fixture
def arrays_store(tmp_path: Path):
    with Ensemble.create(tmp_path / "arrays", small_config()) as ens:
        ens.ingest(X, Y, IDS)
        yield ens


def test_an_iterator_of_batches_makes_the_store_arrays_make(tmp_path: Path, arrays_store: Ensemble) -> None:
    with Ensemble.create(tmp_path / "stream", small_config()) as ens:
        assert ens.ingest(batches(X, Y, IDS, 64)) == 600
        assert contents(ens) == contents(arrays_store)


def test_large_arrays_are_written_in_staged_batches_with_the_same_result(
    tmp_path: Path, arrays_store: Ensemble
) -> None:
    with Ensemble.create(tmp_path / "chunked", small_config()) as ens:
        assert ens.ingest(X, Y, IDS, batch_size=50) == 600
        assert contents(ens) == contents(arrays_store)


def test_a_torch_dataset_is_read_in_chunks(tmp_path: Path, arrays_store: Ensemble) -> None:
    class Pairs(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.read: list[int] = []

        def __len__(self) -> int:
            return len(X)

        def __getitem__(self, i: int):
            self.read.append(i)
            return torch.from_numpy(X[i]), int(Y[i])

    ds = Pairs()
    with Ensemble.create(tmp_path / "ds", small_config()) as ens:
        assert ens.ingest(ds, ids=IDS, batch_size=128) == 600
        assert contents(ens) == contents(arrays_store)
    assert ds.read == list(range(600))  # each item once, in order


def test_unnumbered_batches_continue_the_numbering(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "n", small_config()) as ens:
        ens.ingest(X[:100], Y[:100])  # ids 0..99
        ens.ingest(batches(X[100:], Y[100:], None, 77))
        assert sorted(ens.locate(list(range(600)))) == list(range(600))


def test_a_bad_batch_takes_back_what_the_call_wrote(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "bad", small_config()) as ens:
        ens.ingest(X[:200], Y[:200], IDS[:200])
        before = contents(ens)
        bad = X[200:].copy()
        bad[250, 3] = np.nan  # in the fifth batch of 64

        with pytest.raises(DataError, match="NaN"):
            ens.ingest(batches(bad, Y[200:], IDS[200:], 64))
        assert contents(ens) == before
        with pytest.raises(DataError, match="already in the store or in an earlier batch of this ingest"):
            ens.ingest(batches(X[200:], Y[200:], np.concatenate([IDS[200:300], IDS[250:550]]), 100))
        assert contents(ens) == before
        with ens.store.read() as txn:
            assert ens.store.staged_count(txn) == 0
        # The taken-back samples' runs were re-keyed: the same ids ingested again, with other bytes,
        # are never encrypted under the key that encrypted the taken-back ones.
        with ens.store.keys.read() as ktxn:
            runs = {run: [k.generation for k in keys] for run, keys in ens.store.keys.all_runs(ktxn).items()}
        assert all(len(g) == 1 for g in runs.values()) and max(g[0] for g in runs.values()) >= 1
        assert ens.ingest(batches(X[200:], Y[200:], IDS[200:], 64)) == 400  # the good data still goes in


def test_an_exception_from_the_source_takes_back_the_call(tmp_path: Path) -> None:
    def failing():
        yield X[:100], Y[:100], IDS[:100]
        raise OSError("the network share went away")

    with Ensemble.create(tmp_path / "src", small_config()) as ens:
        before = contents(ens)
        with pytest.raises(OSError, match="went away"):
            ens.ingest(failing())
        assert contents(ens) == before  # contents() hides staged samples, so also look for them directly
        with ens.store.read() as txn:
            assert ens.store.staged_count(txn) == 0
            assert not any(ens.store.has_sample(txn, int(i)) for i in IDS[:100])
            assert not any(len(ens.store.member_ids(txn, s, r)) for s in range(ens.config.shards) for r in range(4))
        assert ens.ingest(X[:100], Y[:100], IDS[:100]) == 100  # the same ids go in again
        with ens.store.read() as txn:
            assert ens.store.count_samples(txn) == 100 and ens.store.staged_count(txn) == 0


def test_readers_never_see_part_of_an_ingest(tmp_path: Path) -> None:
    path = tmp_path / "readers"
    with Ensemble.create(path, small_config()) as ens:
        ens.ingest(X[:300], Y[:300], IDS[:300])
        ens.fit()
        seen: list[tuple[int, list[int]]] = []

        def watched():
            for k, batch in enumerate(batches(X[300:], Y[300:], IDS[300:], 50)):
                if k == 3:  # three batches are staged: a reader sees none of them
                    with Ensemble.open(path, readonly=True) as reader:
                        status = reader.status()
                        seen.append((status["samples"], [p["samples"] for p in status["per_shard"]]))
                        with reader.store.read() as txn:
                            got = [
                                int(i) for s in range(3) for r in range(3) for i in reader.store.slice_ids(txn, s, r)
                            ]
                        assert not set(got) & set(IDS[300:].tolist())
                        assert reader.verify()["ok"]  # its replay trains on the committed samples only
                yield batch

        ens.ingest(watched())
        assert seen and seen[0][0] == 300
        assert ens.status()["samples"] == 600


CRASH = """
import os, signal, sys
import numpy as np
from sisa.ensemble import Ensemble
from tests.conftest import blobs
x, y = blobs(600, d=10)
def killed():
    for k, start in enumerate(range(300, 600, 50)):
        if k == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield x[start:start + 50], y[start:start + 50], np.arange(1000 + start, 1050 + start)
ens = Ensemble.open(sys.argv[1])
ens.ingest(killed())
"""


def test_a_crash_mid_ingest_is_taken_back_at_the_next_open(tmp_path: Path, env_python: dict[str, str]) -> None:
    path = tmp_path / "crash"
    with Ensemble.create(path, small_config()) as ens:
        ens.ingest(X[:300], Y[:300], IDS[:300])
        before = contents(ens)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path)], env=env_python, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = Store.open(path, readonly=True)
    with store.read() as txn:
        assert store.staged_count(txn) == 150  # what the killed process left, invisible to readers
        assert store.count_samples(txn) == 300
    store.close()
    with Ensemble.open(path) as ens:  # a writable open takes it back
        assert contents(ens) == before
        assert ens.ingest(batches(X[300:], Y[300:], IDS[300:], 50)) == 300


def test_streams_refuse_what_needs_the_whole_ingest(tmp_path: Path) -> None:
    prior = tmp_path / "p.csv"
    prior.write_text("id,probability\n" + "".join(f"{i},0.01\n" for i in IDS.tolist()))
    cfg = small_config("partition.strategy=distribution-aware", f"partition.probabilities={prior}")
    with Ensemble.create(tmp_path / "da", cfg) as ens:
        with pytest.raises(DataError, match="pass the samples as arrays"):
            ens.ingest(batches(X, Y, IDS, 64))
        assert ens.status()["samples"] == 0
        with pytest.raises(DataError, match="pass y=None"):
            ens.ingest(batches(X, Y, IDS, 64), Y)
        with pytest.raises(DataError, match="batch_size"):
            ens.ingest(X, Y, IDS, batch_size=0)
    with Ensemble.create(tmp_path / "u", small_config()) as ens:
        with pytest.raises(DataError, match="batch 0 of the iterator is a str"):
            ens.ingest(iter(["nope"]))
        with pytest.raises(DataError, match="gave no samples"):
            ens.ingest(iter([]))
        assert ens.status()["samples"] == 0


def test_dict_batches_name_their_columns(tmp_path: Path, arrays_store: Ensemble) -> None:
    rows = ({"pixels": X[s : s + 100], "target": Y[s : s + 100], "key": IDS[s : s + 100]} for s in range(0, 600, 100))
    with Ensemble.create(tmp_path / "cols", small_config()) as ens:
        ens.ingest(rows, features="pixels", label="target", id="key")
        assert contents(ens) == contents(arrays_store)
        with pytest.raises(DataError, match="no column 'label'.*features=, label= and id="):
            ens.ingest(iter([{"x": X[:2], "y": Y[:2]}]), label="label")


def write_parquet(path: Path, columns: dict[str, np.ndarray]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=100)
    return path


def parquet_columns() -> dict[str, np.ndarray]:
    return {**{f"f{j}": X[:, j] for j in range(10)}, "label": Y, "sample_key": IDS}


@pytest.mark.usefixtures("ray_session")
def test_a_ray_dataset_from_parquet_streams_into_the_same_store(tmp_path: Path, arrays_store: Ensemble) -> None:
    ray_data = pytest.importorskip("ray.data")
    path = write_parquet(tmp_path / "train.parquet", parquet_columns())
    ds = ray_data.read_parquet(str(path))
    with Ensemble.create(tmp_path / "rd", small_config()) as ens:
        n = ens.ingest(ds, features=[f"f{j}" for j in range(10)], label="label", id="sample_key", batch_size=128)
        assert n == 600 and contents(ens) == contents(arrays_store)
        ens.fit()
        arrays_store.fit()
        assert live_state(ens) == live_state(arrays_store)  # bit-identical models


def test_sisa_train_reads_a_parquet_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sisa.cli.main import main
    from sisa.data.loaders import load_parquet
    from tests.conftest import write_config

    train = write_parquet(tmp_path / "train.parquet", parquet_columns())
    test = write_parquet(tmp_path / "test.parquet", {k: v[:100] for k, v in parquet_columns().items()})
    data = load_parquet(train, num_classes=3, id_column="sample_key")
    assert np.array_equal(data.x, X) and np.array_equal(data.ids, IDS)
    cfg = small_config(
        "data.dataset=parquet",
        f"data.train={train}",
        f"data.test={test}",
        "data.id_column=sample_key",
    )
    config = write_config(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(config), "--store", str(tmp_path / "st"), "--address", "local"]) == 0
    with Ensemble.open(tmp_path / "st", readonly=True) as ens:
        assert ens.status()["samples"] == 600 and ens.locate([1000, 1599])
    capsys.readouterr()
    ided = write_parquet(tmp_path / "ided.parquet", {**{f"f{j}": X[:, j] for j in range(10)}, "label": Y, "id": IDS})
    bad = small_config("data.dataset=parquet", f"data.train={ided}", f"data.test={test}")  # id read as a feature?
    code = main(["train", "--config", str(write_config(bad, tmp_path / "bad.yaml")), "--store", str(tmp_path / "b")])
    assert code == 2 and "looks like sample ids" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the store was created


def test_ingest_memory_does_not_hold_the_stream(tmp_path: Path) -> None:
    """One batch at a time: the source is consumed lazily, never listed (what bounds driver memory)."""
    consumed: list[int] = []

    def lazy():
        for k, batch in enumerate(batches(X, Y, IDS, 100)):
            consumed.append(k)
            assert len(consumed) == k + 1
            yield batch

    with Ensemble.create(tmp_path / "lazy", small_config()) as ens:
        assert ens.ingest(lazy()) == 600
    assert consumed == list(range(6))


def test_labeled_arrays_keep_their_ids(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "la", small_config()) as ens:
        ens.ingest(iter([LabeledArrays(X[:10].astype(np.float32), Y[:10], IDS[:10])]))
        assert sorted(ens.locate(IDS[:10].tolist())) == IDS[:10].tolist()


def test_add_takes_a_stream_as_one_new_slice_per_touched_shard(tmp_path: Path) -> None:
    with (
        Ensemble.create(tmp_path / "add-stream", small_config()) as ens,
        Ensemble.create(tmp_path / "add-arrays", small_config()) as ref,
    ):
        for e in (ens, ref):
            e.ingest(X[:450], Y[:450], IDS[:450])
            e.fit()
        report = ens.add(batches(X[450:], Y[450:], IDS[450:], 40))
        expected = ref.add(X[450:], Y[450:], IDS[450:])
        assert report.trained == expected.trained == {s: [4] for s in range(3)}
        assert contents(ens)["where"] == contents(ref)["where"]
        assert live_state(ens) == live_state(ref)
