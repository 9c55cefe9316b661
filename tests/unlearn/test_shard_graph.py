"""Shard graphs end to end (``partition.graph``): deletion under ring:k and random:k stays exact.

A real store trained on blobs, a deletion, and a second store built from scratch on the same
data without the deleted ids: every stage's checkpoint key and every live model's bytes agree,
verify replays bit for bit, the certificate and the receipts name every shard that trained on
the id, and the cost model's planned work is what the certificate says the retrain took.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.partition import cost_model as cm
from sisa.partition.graph import groups, readers
from sisa.receipt.keys import load_signer
from sisa.receipt.verify import verify_receipt
from sisa.store.digests import manifest_digest, packed_ids, slice_digest, slices_digest
from sisa.unlearn.commitcache import _db, _key, _read_header
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)
IDS = np.arange(600, dtype=np.int64)
SHARDS = 4


def build(path: Path, graph: str, keep: np.ndarray | None = None) -> Ensemble:
    """A trained S=4, R=3 store under ``graph``, on the blobs (only the ``keep`` rows when given)."""
    rows = np.ones(len(IDS), bool) if keep is None else keep
    ens = Ensemble.create(path, small_config(f"shards={SHARDS}", f"partition.graph={graph}"), address="local")
    ens.ingest(X[rows], Y[rows], IDS[rows])
    ens.fit()
    return ens


def stages(ens: Ensemble) -> dict[tuple[int, int], tuple[str, str, str]]:
    """(shard, stage) -> (checkpoint key, sha256 of its bytes, weights digest) of every stored stage."""
    with ens.store.read() as txn:
        return {
            (s, r["stage"]): (r["key"], r["sha256"], r["weights"])
            for s in range(SHARDS)
            for r in ens.store.stage_records(txn, s)
        }


def live(ens: Ensemble) -> dict[int, tuple[str, str, str]]:
    with ens.store.read() as txn:
        return {s: (r["key"], r["sha256"], r["weights"]) for s, r in ens.store.live(txn).items()}


def layout(ens: Ensemble) -> np.ndarray:
    """(S, R) stored samples per slice."""
    with ens.store.read() as txn:
        return np.array([[len(ens.store.slice_ids(txn, s, r)) for r in range(3)] for s in range(SHARDS)])


@pytest.mark.parametrize("graph", ["ring:1", "random:2"])
def test_delete_under_a_graph_is_bit_identical_to_a_fresh_store_without_the_ids(tmp_path: Path, graph: str) -> None:
    spec_groups, spec_readers = groups(graph, 0, SHARDS), readers(graph, 0, SHARDS)
    with build(tmp_path / "a", graph) as ens:
        # each stage's manifest covers its own and its links' slices 1..r
        with ens.store.read() as txn:
            own = {s: [ens.store.slice_ids(txn, s, r) for r in range(3)] for s in range(SHARDS)}
            for s in range(SHARDS):
                union = [np.sort(np.concatenate([own[m][r] for m in spec_groups[s]])) for r in range(3)]
                for record in ens.store.stage_records(txn, s):
                    assert record["manifest"] == manifest_digest(union[: record["stage"]])
        victim = int(own[1][1][0])  # shard 1, slice 2 (0-based 1): readers retrain from slice 2
        before = stages(ens)
        cert = ens.delete([victim])
        hit = spec_readers[1]
        assert len(hit) > 1 and cert["retrained_shards"] == list(hit)
        for s in hit:
            info = cert["shards"][str(s)]
            assert info["from_slice"] == 2 and info["restart_stage"] == 1
            assert info["runs"] == ([[1, 0]] if s == 1 else [])  # only the holder's run is re-keyed
        after = stages(ens)
        for (s, stage), value in before.items():
            if s in hit and stage >= 2:
                assert after[(s, stage)] != value
            else:
                assert after[(s, stage)] == value  # untouched shards and clean stages keep their bytes
        result = ens.verify()
        assert result["ok"] and all(v["ok"] for v in result["shards"].values())
        # the cost model's planned work is the work the certificate reports
        first = np.array([1 if s in hit else SHARDS * 10 for s in range(SHARDS)])
        trained = cm.graph_layout(layout(ens), spec_groups)
        epochs = ens.config.train.stage_epochs(3)
        planned = cm.planned_work(trained, first, epochs)
        assert planned == sum(cert["shards"][str(s)]["sample_epochs"] for s in hit) > 0
        # the commitment cache followed the deletion in every shard that trained on the id
        with ens.store.read() as txn:
            db, recs = _db(ens.store), ens.store.live(txn)
            for s in hit:
                head = _read_header(txn, db, s)
                assert head is not None and slices_digest(head.digests) == recs[s]["slices"]
        got_stages, got_live = stages(ens), live(ens)
    keep = IDS != victim
    with build(tmp_path / "b", graph, keep) as fresh:
        assert stages(fresh) == got_stages
        assert live(fresh) == got_live


def test_status_shows_the_graph_and_what_each_shard_trains_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ensemble.create(tmp_path / "st", small_config(f"shards={SHARDS}", "partition.graph=ring:1")) as ens:
        ens.ingest(X, Y, IDS)
    assert main(["status", "--store", str(tmp_path / "st"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = groups("ring:1", 0, SHARDS)
    assert result["graph"] == "ring:1" and [s["trains_on"] for s in result["per_shard"]] == [list(g[1:]) for g in want]
    assert main(["status", "--store", str(tmp_path / "st")]) == 0
    text = capsys.readouterr().out
    assert "shard graph ring:1" in text and "trains on" in text
    with Ensemble.create(tmp_path / "plain", small_config(f"shards={SHARDS}")) as ens:
        ens.ingest(X, Y, IDS)
    assert main(["status", "--store", str(tmp_path / "plain")]) == 0
    assert "trains on" not in capsys.readouterr().out  # no graph, no column


def test_receipt_covers_every_shard_that_trained_on_the_id(tmp_path: Path) -> None:
    with build(tmp_path / "st", "ring:1") as ens:
        victim = 5
        holder = ens.locate([victim])[victim][0]
        cert = ens.delete([victim], receipts=True)
    receipt = cert["receipts"][victim]
    shards = [item["shard"] for item in receipt["shards"]]
    assert shards == list(readers("ring:1", 0, SHARDS)[holder]) == cert["retrained_shards"]
    assert len(verify_receipt(receipt, load_signer().verifier)) == 3 + len(shards)


def test_add_then_delete_under_a_graph_stays_exact(tmp_path: Path) -> None:
    with build(tmp_path / "st", "ring:1") as ens:
        x2, y2 = blobs(30, d=10, seed=9)
        ens.add(x2, y2, ids=np.arange(5000, 5030))
        assert ens.verify()["ok"]
        cert = ens.delete([5001, 12])
        assert cert["state"] == "applied" and ens.verify()["ok"] and ens.audit().ok


def test_graph_none_trains_each_shard_on_its_own_slices(tmp_path: Path) -> None:
    with build(tmp_path / "st", "none") as ens, ens.store.read() as txn:
        for s in range(SHARDS):
            own = [ens.store.slice_ids(txn, s, r) for r in range(3)]
            assert all(np.array_equal(a, b) for a, b in zip(ens.store.training_slices(txn, s), own, strict=True))
            for record in ens.store.stage_records(txn, s):
                assert record["manifest"] == manifest_digest(own[: record["stage"]])


def test_a_deferred_deletion_takes_the_id_out_of_every_linked_shards_commitment_cache(tmp_path: Path) -> None:
    # The cache keeps each manifest's ids in the clear, like the membership records: a deleted id leaves it in
    # the journal's transaction, in every shard whose manifest covered it, not at a retrain that may come later.
    with build(tmp_path / "st", "ring:1") as ens:
        victim = 7
        holder = ens.locate([victim])[victim][0]
        ens.delete([victim], defer=True)
        with ens.store.read() as txn:
            db = _db(ens.store)
            for s in readers("ring:1", 0, SHARDS)[holder]:
                head = _read_header(txn, db, s)
                assert head is not None
                cached = [np.frombuffer(bytes(txn.get(_key(s, b"s", r), db=db)), ">u8") for r in range(3)]
                assert not any(victim in ids for ids in cached)
                now = ens.store.training_slices(txn, s, 3)
                assert slices_digest(head.digests) == slices_digest([slice_digest(packed_ids(p)) for p in now])


def test_heads_on_a_core_backbone_under_ring_1_delete_exactly(tmp_path: Path) -> None:
    # The per-shard part (here a head on a backbone trained on a core set) is what trains on the linked slices.
    head = (
        "backbone.source=core",
        "backbone.name=mlp",
        "backbone.hidden=[16]",
        "backbone.epochs=3",
        "model.adapter=head",
    )
    core = np.arange(0, 600, 10)

    def make(path: Path, keep: np.ndarray) -> Ensemble:
        cfg = small_config(f"shards={SHARDS}", "partition.graph=ring:1", *head)
        ens = Ensemble.create(path, cfg, address="local")
        ens.ingest(X[keep], Y[keep], IDS[keep], core=core)
        ens.fit()
        return ens

    victims = [5, 123, 461]
    with make(tmp_path / "a", np.ones(len(IDS), bool)) as ens:
        holders = {shard for shard, _ in ens.locate(victims).values()}
        cert = ens.delete(victims)
        assert cert["retrained_shards"] == sorted({s for t in holders for s in readers("ring:1", 0, SHARDS)[t]})
        assert ens.verify()["ok"]
        got = {s: (k, w) for s, (k, _, w) in live(ens).items()}
        with ens.store.read() as txn:  # each head trained on its own and its link's samples
            for s, rec in ens.store.live(txn).items():
                group = groups("ring:1", 0, SHARDS)[s]
                assert rec["n_samples"] == sum(len(ens.store.slice_ids(txn, m, r)) for m in group for r in range(3))
    with make(tmp_path / "b", ~np.isin(IDS, victims)) as fresh:
        assert {s: (k, w) for s, (k, _, w) in live(fresh).items()} == got


def test_serve_clean_under_a_graph_serves_each_readers_last_clean_stage_until_applied(tmp_path: Path) -> None:
    with Ensemble.create(
        tmp_path / "st", small_config(f"shards={SHARDS}", "partition.graph=ring:1", "unlearn.policy=serve-clean")
    ) as ens:
        ens.ingest(X, Y, IDS)
        ens.fit()
        with ens.store.read() as txn:
            victim = int(ens.store.slice_ids(txn, 2, 2)[0])  # shard 2, last slice: readers 1 and 2 keep stage 2
            stage2 = {s: ens.store.stage_record(txn, s, 2)["key"] for s in range(SHARDS)}
        pending = ens.delete([victim], defer=True)
        assert sorted(int(s) for s in pending["shards"]) == [1, 2]
        assert all(info["serving_stage"] == 2 for info in pending["shards"].values())
        with ens.store.read() as txn:
            served = ens.store.live(txn)
            for s in (1, 2):
                assert served[s]["key"] == stage2[s] and served[s].get("interim")
            assert not served[0].get("interim") and not served[3].get("interim")
        report = ens.verify()
        assert not report["ok"] and all("clean interim" in report["shards"][s]["reason"] for s in ("1", "2"))
        ens.apply()
        assert ens.verify()["ok"]
