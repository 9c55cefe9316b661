"""Deletion end to end: bit-exact verify, untouched checkpoints, erasure, audit, crash resume, add."""

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.errors import DataError
from sisa.unlearn.audit import AUDIT_DB, read_entries
from tests.conftest import blobs, files_containing, plaintexts, sample_evidence, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)


def make(path: Path, *overrides: str) -> Ensemble:
    ens = Ensemble.create(path, small_config(*overrides))
    ens.ingest(X, Y)
    ens.fit()
    return ens


def checkpoints(ens: Ensemble) -> dict[tuple[int, int], bytes]:
    with ens.store.read() as txn:
        return {
            (s, r["stage"]): ens.store.checkpoint(txn, r)
            for s in range(ens.config.shards)
            for r in ens.store.stage_records(txn, s)
        }


def where(ens: Ensemble, sample_id: int) -> tuple[int, int]:
    return ens.locate([sample_id])[sample_id]


@pytest.fixture
def ens(tmp_path: Path):
    e = make(tmp_path / "st")
    yield e
    e.close()


def test_delete_retrains_from_last_clean_slice_and_verifies(ens: Ensemble) -> None:
    victim = 17
    shard, slice_ = where(ens, victim)
    before = checkpoints(ens)
    cert = ens.delete([victim])
    assert cert["state"] == "applied" and cert["retrained_shards"] == [shard]
    info = cert["shards"][str(shard)]
    assert info["from_slice"] == slice_ + 1
    assert len(info["removed_checkpoints"]) == len(info["new_checkpoints"]) == 3 - slice_
    assert cert["seconds"] > 0 and cert["deleted"] == 1
    after = checkpoints(ens)
    for (s, stage), blob in before.items():
        if s != shard or stage <= slice_:
            assert after[(s, stage)] == blob  # untouched shards and earlier stages: same bytes
        else:
            assert after[(s, stage)] != blob
    result = ens.verify()
    assert result["ok"] and all(v["ok"] for v in result["shards"].values())
    assert result["shards"][str(shard)]["replay_weights"] == info["live_weights"]
    assert ens.status()["samples"] == 599


def test_certificate_counts_the_retrain_work(ens: Ensemble) -> None:
    """Each retrained shard's entry says what the retrain cost: stage j trains on slices 1..j for its epochs."""
    victim = 17
    shard, slice_ = where(ens, victim)
    cert = ens.delete([victim])
    info = cert["shards"][str(shard)]
    sizes = next(s for s in ens.status()["per_shard"] if s["shard"] == shard)["slice_samples"]
    with ens.store.read() as txn:
        new = [r for r in ens.store.stage_records(txn, shard) if r["stage"] > slice_]
    assert [r["sha256"] for r in new] == info["new_checkpoints"] and new
    assert [r["n_samples"] for r in new] == [sum(sizes[:j]) for j in range(slice_ + 1, len(sizes) + 1)]
    assert info["sample_epochs"] == sum(r["n_samples"] * r["epochs"] for r in new) > 0
    assert info["compute_seconds"] == round(sum(r["seconds"] for r in new), 4) > 0


def test_locate_names_shard_and_slice_of_stored_ids_only(ens: Ensemble) -> None:
    places = ens.locate(list(range(len(X))))
    counts: dict[tuple[int, int], int] = {}
    for place in places.values():
        counts[place] = counts.get(place, 0) + 1
    for info in ens.status()["per_shard"]:
        assert [counts.get((info["shard"], r), 0) for r in range(3)] == info["slice_samples"]
    ens.delete([5])
    with pytest.raises(DataError, match="not in the store"):
        ens.locate([4, 5])
    with pytest.raises(DataError):
        ens.locate(["x"])
    assert ens.locate(4) == {4: places[4]}


def test_certificate_and_audit_never_hold_raw_ids(ens: Ensemble) -> None:
    cert = ens.delete([4242 % 600, 17])
    text = json.dumps(cert)
    assert len(cert["id_hashes"]) == 2 and all(len(h) == 64 for h in cert["id_hashes"])
    with ens.store.read() as txn:
        logged = [json.dumps(entry) for entry in read_entries(ens.store, txn)]
    assert '"ids"' not in text and '"ids"' not in logged[0]
    assert ens.audit().ok and ens.audit().entries == 1


def test_deleted_bytes_are_on_no_file(ens: Ensemble) -> None:
    victims = (3, 99, 450)
    evidence = {i: sample_evidence(ens, i) for i in victims}
    for i in victims:
        assert all(files_containing(ens.path, form) == [] for form in plaintexts(X[i]))  # encrypted at rest
        sealed, keys = evidence[i]
        assert files_containing(ens.path, sealed) == [str(ens.path / "data.mdb")]
        assert all(files_containing(ens.path, k) == [str(ens.path / "keys" / "data.mdb")] for k in keys)
    places = {where(ens, i) for i in victims}
    with ens.store.read() as txn:
        runs = {ens.store.place(txn, i) for i in victims}
        kept = next(i for i in range(600) if i not in victims and ens.store.place(txn, i) in runs)  # shares a run
        left = sum(len(ens.store.run_ids(txn, *run)) for run in runs if run is not None) - len(victims)
    kept_sealed, _ = sample_evidence(ens, kept)
    cert = ens.delete(list(victims))
    for i in victims:
        _, keys = evidence[i]
        # the key that decrypted the deleted samples is on no file: their ciphertext, wherever it
        # lies (free pages, old blocks), is unrecoverable
        assert all(files_containing(ens.path, k) == [] for k in keys)
        assert all(files_containing(ens.path, form) == [] for form in plaintexts(X[i]))
    erasure = cert["batch"]["erasure"]
    assert {tuple(s) for s in erasure["rotated_slices"]} == places and erasure["rotated_runs"] == len(runs)
    assert erasure["reencrypted"] == left  # only the deleted ids' runs: what is left of them, nothing else
    # a sample left in a re-keyed slice is stored under the new key, and loads as before
    assert sample_evidence(ens, kept)[0] != kept_sealed
    with ens.store.read() as txn:
        x, y = ens.store.load_samples(txn, np.array([kept]), (10,))
    assert np.array_equal(x[0], X[kept].astype(np.float32)) and y[0] == Y[kept]
    assert ens.verify()["ok"]


def test_batched_deferred_requests_cost_one_retrain_per_shard(ens: Ensemble) -> None:
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    for i in ids:
        pending = ens.delete([i], defer=True)
        assert pending["state"] == "pending"
    assert len(ens.pending()) == 8
    shards = {s["shard"] for s in ens.status()["per_shard"] if not s["live"]}
    assert shards  # affected shards are out of service until applied
    trained: list[int] = []
    certs = ens.apply(progress=lambda r: trained.append(r.shard))
    assert [c["request_id"] for c in certs] == list(range(1, 9))
    affected = {s for c in certs for s in c["retrained_shards"]}
    restart = {s: min(c["shards"][str(s)]["restart_stage"] for c in certs if str(s) in c["shards"]) for s in affected}
    assert sorted(trained) == sorted(s for s in affected for _ in range(3 - restart[s]))
    assert ens.pending() == [] and ens.verify()["ok"] and ens.audit().entries == 8


def test_exclude_policy_takes_affected_shards_out_until_applied(ens: Ensemble) -> None:
    shard, _ = where(ens, 10)
    ens.delete([10], defer=True)
    live = ens.live_models()
    assert shard not in live and len(live) == 2
    ens.apply()
    assert len(ens.live_models()) == 3


def test_serve_stale_policy_keeps_serving_until_applied(tmp_path: Path) -> None:
    ens = make(tmp_path / "stale", "unlearn.policy=serve-stale")
    shard, _ = where(ens, 10)
    old = ens.predict_proba(X[:5])
    ens.delete([10], defer=True)
    assert len(ens.live_models()) == 3 and np.array_equal(ens.predict_proba(X[:5]), old)
    assert ens.status()["per_shard"][shard]["stale"]
    assert not ens.verify()["ok"]  # the stale model saw the deleted sample
    ens.apply()
    assert ens.verify()["ok"] and not any(s["stale"] for s in ens.status()["per_shard"])
    assert all(files_containing(ens.path, form) == [] for form in plaintexts(X[10]))
    ens.close()


def ids_by_place(ens: Ensemble) -> dict[tuple[int, int], list[int]]:
    """Sample ids of each (shard, slice), 0-based."""
    out: dict[tuple[int, int], list[int]] = {}
    for i in range(len(X)):
        out.setdefault(where(ens, i), []).append(i)
    return out


def serving(ens: Ensemble, shard: int) -> tuple[bool, bool, int | None, str | None]:
    s = ens.status()["per_shard"][shard]
    return s["live"], s["interim"], s["live_stage"], s["live_checkpoint"]


def test_serve_clean_policy_serves_the_last_clean_stage_until_applied(tmp_path: Path) -> None:
    ens = make(tmp_path / "clean", "unlearn.policy=serve-clean")
    ref = make(tmp_path / "exclude")
    places = ids_by_place(ens)
    shard, victim = 1, places[(1, 2)][0]  # in the last slice: stages 1 and 2 never saw it
    with ens.store.read() as txn:
        stage2 = ens.store.stage_record(txn, shard, 2)
    pending = ens.delete([victim], defer=True)
    assert pending["shards"][str(shard)]["serving_stage"] == 2
    # In the same instant the shard serves its stage-2 checkpoint, which trained on slices 1-2 only.
    assert serving(ens, shard) == (True, True, 2, stage2["sha256"])
    assert len(ens.live_models()) == 3
    ens.predict_proba(X[:5])
    assert ens.provenance()[shard] == stage2["key"]
    report = ens.verify()
    assert not report["ok"] and "clean interim" in report["shards"][str(shard)]["reason"]
    ens.apply()
    ref.delete([victim])
    # The retrain is the same as under `exclude`, bit for bit, and the shard serves it.
    assert serving(ens, shard)[:3] == (True, False, 3)
    assert ens.status()["per_shard"] == ref.status()["per_shard"]
    assert ens.verify()["ok"]
    ens.close()
    ref.close()


def test_serve_clean_follows_later_requests_to_an_earlier_stage_or_out(tmp_path: Path) -> None:
    ens = make(tmp_path / "clean", "unlearn.policy=serve-clean")
    places = ids_by_place(ens)
    a, b, c = places[(0, 2)][0], places[(0, 1)][0], places[(0, 0)][0]
    ens.delete([a], defer=True)
    assert serving(ens, 0)[:3] == (True, True, 2)
    ens.delete([b], defer=True)  # stage 2 saw b: back to stage 1
    assert serving(ens, 0)[:3] == (True, True, 1)
    ens.delete([places[(0, 2)][1]], defer=True)  # a later slice than the one served: stays
    assert serving(ens, 0)[:3] == (True, True, 1)
    ens.delete([c], defer=True)  # the first slice: no clean trained stage is left, the shard leaves
    assert serving(ens, 0) == (False, False, None, None) and sorted(ens.live_models()) == [1, 2]
    ens.apply()
    assert serving(ens, 0)[:3] == (True, False, 3) and ens.verify()["ok"]
    ens.close()


def test_serve_clean_never_puts_a_shard_in_service_that_was_not(tmp_path: Path) -> None:
    ens = make(tmp_path / "clean", "unlearn.policy=serve-clean")
    places = ids_by_place(ens)
    ens.reconfigure(small_config())  # exclude: the first request takes shard 2 out
    ens.delete([places[(2, 2)][0]], defer=True)
    ens.reconfigure(small_config("unlearn.policy=serve-clean"))
    ens.delete([places[(2, 2)][1]], defer=True)  # stage 2 is clean, but the shard was not serving
    assert serving(ens, 2)[0] is False
    ens.apply()
    assert ens.verify()["ok"]
    ens.close()


@pytest.mark.parametrize("then", ["exclude", "serve-clean"])
def test_a_stale_model_is_erased_when_the_policy_changes_under_it(tmp_path: Path, then: str) -> None:
    # serve-stale keeps a retired model's bytes without a stage record; if the policy changes
    # before the apply, the next request must drop them, or a checkpoint that trained on a
    # deleted id would survive with nothing pointing at it.
    ens = make(tmp_path / "st", "unlearn.policy=serve-stale")
    places = ids_by_place(ens)
    ens.delete([places[(0, 2)][0]], defer=True)
    ens.reconfigure(small_config(f"unlearn.policy={then}"))
    ens.delete([places[(0, 1)][0]], defer=True)
    ens.apply()
    with ens.store.read() as txn:
        stored = set(ens.store.checkpoint_keys(txn))
        referenced = {r["key"] for s in range(3) for r in ens.store.stage_records(txn, s)}
    assert stored == referenced
    assert ens.verify()["ok"]
    ens.close()


def test_add_then_delete_stays_exact(ens: Ensemble) -> None:
    x2, y2 = blobs(40, d=10, seed=9)
    report = ens.add(x2, y2, ids=np.arange(5000, 5040))
    touched = sorted(report.trained)
    assert all(stages == [4] for stages in report.trained.values())  # only the new slice trains
    assert [len(s["slice_samples"]) for s in ens.status()["per_shard"]] == [4 if s in touched else 3 for s in range(3)]
    assert ens.verify()["ok"]
    cert = ens.delete([5001, 12])
    assert ens.verify()["ok"] and cert["state"] == "applied"
    x3, y3 = blobs(10, d=10, seed=10)
    ens.add(x3, y3, ids=np.arange(6000, 6010))
    ens.delete([6003])
    assert ens.verify()["ok"] and ens.audit().ok


def test_empty_shard_after_deletion(ens: Ensemble) -> None:
    with ens.store.read() as txn:
        ids = np.concatenate([ens.store.slice_ids(txn, 1, r) for r in range(3)]).tolist()
        # Also hit slice 1 of the other shards: every stage checkpoint of the store goes.
        ids += [int(ens.store.slice_ids(txn, s, 0)[0]) for s in (0, 2)]
    cert = ens.delete(ids)
    assert cert["shards"]["0"]["from_slice"] == cert["shards"]["2"]["from_slice"] == 1
    assert cert["shards"]["1"]["samples"] == 0 and cert["shards"]["1"]["live_checkpoint"] is None
    assert sorted(ens.live_models()) == [0, 2]
    assert ens.predict(X[:3]).shape == (3,)
    result = ens.verify()
    assert result["ok"] and result["shards"]["1"]["reason"].startswith("empty shard")


def test_idempotence_and_bad_requests_change_nothing(ens: Ensemble, tmp_path: Path) -> None:
    ens.delete([30])
    before = store_digest(ens.path)
    assert ens.delete([30])["state"] == "noop"
    bad = [
        ([30, 999_999], "not in the store"),
        ([], "empty"),
        ([1, "2"], "integers"),
        ([1.5], "integers"),
        ([True], "integers"),
        ([-3], "outside"),
        ("17", "list of integers"),
    ]
    for ids, message in bad:
        with pytest.raises(DataError, match=message):
            ens.delete(ids)
    assert store_digest(ens.path) == before
    with pytest.raises(DataError, match="never reused"):
        ens.ingest(X[:1], Y[:1], ids=[30])
    cert = ens.delete([30, 31])
    assert cert["already_deleted"] == 1 and cert["deleted"] == 1


def test_audit_detects_tampering(ens: Ensemble) -> None:
    for i in (40, 41, 42):
        ens.delete([i])
    assert ens.audit().ok
    db = ens.store.db(AUDIT_DB)

    def entry(txn, seq):
        return json.loads(bytes(txn.get(struct.pack(">Q", seq), db=db)))

    def put(txn, seq, rec):
        txn.put(struct.pack(">Q", seq), json.dumps(rec).encode(), db=db)

    snapshot = ens.store.write(lambda txn: {i: entry(txn, i) for i in range(3)})

    def restore():
        ens.store.write(lambda txn: [put(txn, i, r) for i, r in snapshot.items()])
        assert ens.audit().ok

    edited = dict(snapshot[1], entry={**snapshot[1]["entry"], "deleted": 7})
    ens.store.write(lambda txn: put(txn, 1, edited))
    assert not ens.audit().ok and "MAC mismatch" in " ".join(ens.audit().problems)
    restore()
    ens.store.write(lambda txn: (put(txn, 1, snapshot[2]), put(txn, 2, snapshot[1])))
    assert not ens.audit().ok
    restore()
    ens.store.write(lambda txn: txn.delete(struct.pack(">Q", 2), db=db))
    assert not ens.audit().ok and "removed" in " ".join(ens.audit().problems)
    restore()
    forged = dict(snapshot[2], seq=3, prev=snapshot[2]["mac"])
    ens.store.write(lambda txn: put(txn, 3, forged))
    assert not ens.audit().ok


CRASH_CHILD = """
import os, signal, sys
from sisa.ensemble import Ensemble
from sisa.unlearn import journal
ens = Ensemble.open(sys.argv[1])
point = sys.argv[2]
if point in ("after-journal", "after-deferred-journal"):
    store = ens.store
    meta = {"already_deleted": 0, "defer": point != "after-journal", "policy": "exclude"}
    store.write(lambda txn: journal.record_request(store, txn, [int(sys.argv[3])], store.secret(), meta))
    os.kill(os.getpid(), signal.SIGKILL)
elif point == "mid-retrain":
    ens.delete([int(sys.argv[3])], progress=lambda r: os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.parametrize("point", ["after-journal", "mid-retrain"])
def test_kill_during_delete_then_open_finishes_it(tmp_path: Path, env_python: dict, point: str) -> None:
    ens = make(tmp_path / "crash")
    with ens.store.read() as txn:  # a victim in slice 1, so the retrain has several stages
        victim = int(ens.store.slice_ids(txn, 0, 0)[0])
    reference = make(tmp_path / "ref")
    reference.delete([victim])
    expected = {s["shard"]: s["live_weights"] for s in reference.status()["per_shard"]}
    reference.close()
    ens.close()
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path / "crash"), point, str(victim)],
        env=env_python,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Ensemble.open(tmp_path / "crash", readonly=True) as reader:
        assert 0 not in reader.live_models()  # in between, the shard that saw the id is not served
        assert len(reader.pending()) == 1
    with Ensemble.open(tmp_path / "crash") as ens:  # opening for writing finishes the request
        assert ens.pending() == []
        assert {s["shard"]: s["live_weights"] for s in ens.status()["per_shard"]} == expected
        assert ens.verify()["ok"] and ens.audit().ok and ens.audit().entries == 1
        assert ens.status()["samples"] == 599
    assert all(files_containing(tmp_path / "crash", form) == [] for form in plaintexts(X[victim]))
    with Ensemble.open(tmp_path / "crash", readonly=True) as reader, reader.store.keys.read() as ktxn:
        # the erasure the crash cut short was finished: every run has one key, the victim's made after the deletion
        runs = reader.store.keys.all_runs(ktxn)
    assert all(len(k) == 1 for k in runs.values()) and any(k[0].since == 1 for k in runs.values())
    assert not (tmp_path / "crash" / ".compact").exists()


def test_a_deferred_deletion_killed_before_its_erasure_is_erased_by_the_next_open(
    tmp_path: Path, env_python: dict
) -> None:
    # Accepted (journaled) but killed before the erasure, and deferred: the next writable open applies
    # nothing, so only its own erasure step (recover_erasure) can make the samples unrecoverable.
    ens = make(tmp_path / "crash")
    with ens.store.read() as txn:
        victim = int(ens.store.slice_ids(txn, 0, 0)[0])
    ens.close()
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path / "crash"), "after-deferred-journal", str(victim)],
        env=env_python,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    def run_keys() -> dict[Any, Any]:
        with Ensemble.open(tmp_path / "crash", readonly=True) as reader, reader.store.keys.read() as ktxn:
            return reader.store.keys.all_runs(ktxn)

    assert not any(k[0].since for k in run_keys().values())  # not erased yet: every run keeps its first key
    with Ensemble.open(tmp_path / "crash") as ens:
        assert len(ens.pending()) == 1  # still deferred: nothing retrained
    # Erased: the victim's run was re-keyed (its old key, which opened the id's sample, destroyed).
    runs = run_keys()
    assert all(len(k) == 1 for k in runs.values()) and any(k[0].since == 1 for k in runs.values())


def test_store_secret_is_owner_only(ens: Ensemble) -> None:
    assert (ens.path / "hmac.key").stat().st_mode & 0o777 == 0o600
    assert os.path.getsize(ens.path / "hmac.key") == 32


def test_long_lived_reader_follows_compaction_by_another_process(tmp_path: Path, env_python: dict) -> None:
    make(tmp_path / "rd").close()
    reader = Ensemble.open(tmp_path / "rd", readonly=True)
    assert reader.status()["samples"] == 600
    # A deletion compacts only keys/data.mdb; compact data.mdb itself first, so the reader's file is
    # swapped under it and the deletion lands in the new file. Without following the swap the reader
    # keeps the unlinked old file's snapshot, where all 600 samples are still in service.
    code = (
        "import sys\n"
        "from sisa.ensemble import Ensemble\n"
        "with Ensemble.open(sys.argv[1]) as ens:\n"
        "    ens.store.compact()\n"
        "    ens.delete([7, 8])\n"
    )
    ident = os.stat(tmp_path / "rd" / "data.mdb").st_ino
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "rd")], env=env_python, check=True, timeout=300)
    assert os.stat(tmp_path / "rd" / "data.mdb").st_ino != ident  # data.mdb itself was swapped
    assert reader.status()["samples"] == 598  # sees the compacted file, not the old snapshot
    assert len(reader.audit().problems) == 0 and reader.audit().entries == 1
    reader.close()


def test_provenance_names_the_models_a_prediction_used(ens: Ensemble) -> None:
    assert ens.provenance() == {}
    ens.predict(X[:4])
    with ens.store.read() as txn:
        before = {s: r["key"] for s, r in ens.store.live(txn).items()}
    assert ens.provenance() == before
    shard, _ = where(ens, 11)
    ens.delete([11])
    ens.predict(X[:4])
    after = ens.provenance()
    assert after.keys() == before.keys() and after[shard] != before[shard]
    assert all(after[s] == before[s] for s in before if s != shard)


def test_verify_reads_one_snapshot_while_another_process_deletes(tmp_path: Path, env_python: dict) -> None:
    # `sisa verify` takes no lock, so a writer may delete while it replays. Every shard must be
    # replayed from the snapshot its plan and live records came from: a later shard's samples
    # are not half gone ("sample ... is missing"), and its replay matches the model it checks.
    path = tmp_path / "st"
    with make(path) as writer:
        victim = ids_by_place(writer)[(2, 0)][0]  # in the last shard that local verify replays
    code = (
        "import sys\n"
        "from sisa.ensemble import Ensemble\n"
        "with Ensemble.open(sys.argv[1], address='local') as ens:\n"
        "    ens.delete([int(sys.argv[2])])\n"
    )
    deleted: list[int] = []

    def delete_meanwhile(result) -> None:
        if not deleted:
            out = subprocess.run([sys.executable, "-c", code, str(path), str(victim)], env=env_python, timeout=300)
            assert out.returncode == 0
            deleted.append(victim)

    with Ensemble.open(path, readonly=True, address="local") as reader:
        report = reader.verify(progress=delete_meanwhile)
    assert deleted and report["ok"], report
    with Ensemble.open(path, readonly=True) as after, after.store.read() as txn:  # the deletion took effect
        assert not after.store.has_sample(txn, victim)


def journal_interrupted(ens: Ensemble, ids: list[int]) -> int:
    """Journal an immediate (not deferred) request and stop, as a delete killed after its journal leaves it."""
    from sisa.unlearn import journal

    store = ens.store
    meta = {"already_deleted": 0, "defer": False, "policy": ens.config.unlearn.policy}
    return int(store.write(lambda txn: journal.record_request(store, txn, ids, store.secret(), meta))["request_id"])


def test_open_finishes_exactly_the_interrupted_request_and_leaves_deferred_ones_pending(tmp_path: Path) -> None:
    ens = make(tmp_path / "st")
    with ens.store.read() as txn:
        in_shard = {s: [int(i) for i in ens.store.slice_ids(txn, s, 1)] for s in (0, 1)}
    shared, only_deferred, interrupted = in_shard[0][0], in_shard[1][0], in_shard[0][1]
    first = ens.delete([shared], defer=True)["request_id"]  # shares shard 0 with the interrupted request
    second = ens.delete([only_deferred], defer=True)["request_id"]  # shard 1 only
    killed = journal_interrupted(ens, [interrupted])
    ens.close()

    with Ensemble.open(tmp_path / "st") as ens:
        # Exactly the interrupted request was certified; the deferred ones stay pending.
        assert [r["request_id"] for r in ens.pending()] == [first, second]
        assert ens.audit().entries == 1
        status = {s["shard"]: s for s in ens.status()["per_shard"]}
        # Shard 0 was retrained, necessarily without the deferred id too (its journal removed it) ...
        assert status[0]["live"] and ens.verify(shards=[0])["ok"]
        # ... while shard 1, touched only by a deferred request, stays out of service, untrained.
        assert not status[1]["live"] and status[1]["stages_done"] == 1
        shard0 = status[0]["live_checkpoint"]
        trained: list[int] = []
        certs = ens.apply(progress=lambda r: trained.append(r.shard))
        assert [c["request_id"] for c in certs] == [first, second] and killed not in (first, second)
        assert set(trained) == {1}  # shard 0 needed nothing more: the deferred request is only certified
        assert certs[0]["shards"]["0"]["live_checkpoint"] == shard0
        assert ens.pending() == [] and ens.audit().entries == 3 and ens.verify()["ok"]


def test_apply_of_requests_that_are_not_pending_is_refused(ens: Ensemble) -> None:
    ens.delete([3], defer=True)
    before = store_digest(ens.path)
    with pytest.raises(DataError, match=r"request\(s\) \[7\] are not pending"):
        ens.apply(requests=[1, 7])
    assert store_digest(ens.path) == before and len(ens.pending()) == 1


def test_a_run_emptied_by_a_deferred_deletion_and_refilled_before_apply_is_still_erased(tmp_path: Path) -> None:
    # Every id of one run deleted (deferred): its key is destroyed before delete returns. New samples that
    # land in the same slice before apply get the emptied run's number under a fresh key, and still load.
    ens = make(tmp_path / "st")
    with ens.store.read() as txn:
        run = ens.store.place(txn, 0)
        assert run is not None
        members = [int(i) for i in ens.store.run_ids(txn, *run)]
    _, old_keys = sample_evidence(ens, members[0])
    ens.delete(members, defer=True)
    assert all(files_containing(ens.path, k) == [] for k in old_keys)  # erased when accepted, deferred or not
    rng = np.random.default_rng(1)
    extra_x, extra_y = rng.normal(size=(400, 10)).astype(np.float32), rng.integers(0, 3, 400)
    ens.ingest(extra_x, extra_y, ids=np.arange(10_000, 10_400))
    with ens.store.read() as txn:
        refilled = [i for i in range(10_000, 10_400) if ens.store.place(txn, i) == run]
    assert refilled  # the emptied run's number came back
    ens.apply()
    assert all(files_containing(ens.path, k) == [] for k in old_keys)
    with ens.store.read() as txn:  # the new samples were re-encrypted under the run's new key and load
        x, _ = ens.store.load_samples(txn, np.asarray(refilled), (10,))
    assert np.array_equal(x, extra_x[np.asarray(refilled) - 10_000])
    assert ens.verify()["ok"]
    ens.close()


# The certificate's fields, as the README lists them: a new field is documented before it is certified.
CERTIFICATE_FIELDS = {
    "request_id", "state", "requested_at", "applied_at", "seconds", "apply_seconds", "id_hashes", "deleted",
    "already_deleted", "policy", "retrained_shards", "runner", "audit_seq", "shards", "batch", "erased_at",
}  # fmt: skip
SHARD_FIELDS = {
    "from_slice", "restart_stage", "removed_checkpoints", "new_checkpoints", "live_checkpoint", "live_weights",
    "manifest", "runs", "serving_stage", "clean_domain", "domain", "rebound", "samples", "sample_epochs",
    "compute_seconds",
}  # fmt: skip
BATCH_FIELDS = {"requests", "retrain_seconds", "erasure"}
ERASURE_FIELDS = {
    "rotated_slices", "rotated_runs", "reencrypted", "checkpoint_keys", "key_file_bytes", "seconds", "quarantined",
}  # fmt: skip


def _values(obj: object) -> list[object]:
    """Every scalar in a nested JSON-like value."""
    if isinstance(obj, dict):
        return [v for item in obj.values() for v in _values(item)]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _values(item)]
    return [obj]


def test_a_certificate_holds_exactly_the_documented_fields_and_no_id(tmp_path: Path) -> None:
    base = 10**12  # ids no count, size, time or digest in a certificate can equal or contain by chance
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(X, Y, ids=np.arange(600) + base)
        ens.fit()
        victims = [base + 5, base + 17, base + 421]
        cert = ens.delete(victims)
        with ens.store.read() as txn:
            logged = read_entries(ens.store, txn)
    assert set(cert) == CERTIFICATE_FIELDS
    assert set(cert["batch"]) == BATCH_FIELDS and set(cert["batch"]["erasure"]) == ERASURE_FIELDS
    assert cert["shards"]
    for info in cert["shards"].values():  # `rebind_reason` comes only with a rebound shard
        assert set(info) == SHARD_FIELDS | ({"rebind_reason"} if info["rebound"] else set())
    assert len(cert["id_hashes"]) == 3 and all(len(h) == 64 for h in cert["id_hashes"])
    for record in (cert, *logged):
        values = _values(record)
        assert not any(v in victims for v in values if isinstance(v, int))  # no id as a number
        text = json.dumps(record)
        assert not any(str(v) in text for v in victims)  # nor inside any string
