"""Erasure when a request is accepted: before `delete` returns (deferred too), and past a damaged survivor."""

import logging
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.store.digests import keyed_hash
from tests.behaviour.test_faults import flip_byte_in_file
from tests.conftest import blobs, files_containing, plaintexts, sample_evidence, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)


def make(path: Path) -> Ensemble:
    ens = Ensemble.create(path, small_config(), address="local")
    ens.ingest(X, Y)
    ens.fit()
    return ens


def test_a_deferred_deletion_leaves_no_key_or_plaintext_of_its_ids_before_any_apply(tmp_path: Path) -> None:
    ens = make(tmp_path / "st")
    victims = [3, 99, 450]
    keys = {v: sample_evidence(ens, v)[1] for v in victims}
    request = ens.delete(victims, defer=True)
    # Right after delete returns, before any apply or retrain: the keys that decrypted the victims'
    # ciphertext (wherever it lies: free pages of data.mdb) and their plaintext are in no file.
    for v in victims:
        assert all(files_containing(ens.path, k) == [] for k in keys[v]), v
        assert all(files_containing(ens.path, form) == [] for form in plaintexts(X[v])), v
    assert request["state"] == "pending" and request["erased_at"] >= request["requested_at"]
    assert request["erasure"]["rotated_runs"] >= 1 and request["erasure"]["quarantined"] == []
    status = ens.status()
    assert not status["key_compaction_pending"] and status["quarantined"] == []
    # nothing retrained: the shards that held the victims are out of service until the apply
    assert request["shards"] and not any(status["per_shard"][int(s)]["live"] for s in request["shards"])
    (cert,) = ens.apply()
    # The certificate says when the data became unrecoverable (at acceptance), and what that erasure did.
    assert cert["erased_at"] == request["erased_at"] < cert["applied_at"]
    assert cert["batch"]["erasure"]["rotated_runs"] == request["erasure"]["rotated_runs"]
    assert ens.verify()["ok"]
    ens.close()


def test_a_survivor_that_fails_to_decrypt_is_quarantined_and_never_blocks_the_erasure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "st"
    ens = make(path)
    victim = 17
    with ens.store.read() as txn:
        run = ens.store.place(txn, victim)
        assert run is not None
        mates = [int(i) for i in ens.store.run_ids(txn, *run) if int(i) != victim]
    damaged, kept = mates[0], mates[1:]
    sealed, _ = sample_evidence(ens, damaged)
    _, victim_keys = sample_evidence(ens, victim)  # the run's key: the victim's and the damaged survivor's
    secret = ens.store.secret()
    ens.close()
    # A survivor in the same run as the victim: its ciphertext no longer authenticates under any key.
    flip_byte_in_file(path / "data.mdb", sealed, offset=len(sealed) // 2)

    with Ensemble.open(path, address="local") as ens:
        with ens.store.read() as txn:
            assert ens.store.sealed_sample(txn, damaged) != sealed  # the flip hit the live record
        with caplog.at_level(logging.ERROR, logger="sisa.store.erasure"):
            cert = ens.delete([victim])
        assert cert["state"] == "applied"
        # The victim's erasure completed: its run's old key (which the damaged survivor needed too) is gone.
        assert all(files_containing(path, k) == [] for k in victim_keys)
        assert all(files_containing(path, form) == [] for form in plaintexts(X[victim]))
        # Named in the certificate (by keyed hash, like every id there), the log and the status.
        (q,) = cert["batch"]["erasure"]["quarantined"]
        assert q["id_hash"] == keyed_hash(secret, damaged) and (q["shard"], q["slice"], q["run"]) == run
        assert "decrypts under none of its run's keys" in q["reason"]
        assert f"quarantined sample {damaged} (shard {run[0]} slice {run[1]} run {run[2]})" in caplog.text
        (listed,) = ens.status()["quarantined"]
        assert listed["id"] == damaged and (listed["shard"], listed["slice"], listed["run"]) == run
        # Dropped from the store, not deleted: gone from training, the other survivors re-encrypted and
        # readable, and the models retrained without it (verify replays the store as it is now).
        with ens.store.read() as txn:
            assert not ens.store.has_sample(txn, damaged) and ens.store.place(txn, damaged) is None
            x, _ = ens.store.load_samples(txn, np.asarray(kept), (10,))
        assert np.array_equal(x, X[kept])
        assert ens.verify()["ok"]
    # `sisa status` names it for the operator, with its place and the reason.
    assert main(["status", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"quarantined sample {damaged} (shard {run[0]} slice {run[1]} run {run[2]}): it decrypts under" in out
    with Ensemble.open(path, address="local") as ens:
        # Not a deletion: its genuine bytes may be ingested again from the source.
        ens.ingest(X[[damaged]], Y[[damaged]], ids=np.asarray([damaged]))
        with ens.store.read() as txn:
            assert ens.store.has_sample(txn, damaged)
