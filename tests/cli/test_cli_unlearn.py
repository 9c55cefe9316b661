"""The deletion commands of the CLI: delete, apply, pending, verify, audit, add, resume."""

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.unlearn.audit import AUDIT_DB
from tests.conftest import blobs, small_config, store_digest, writer_in_child

pytestmark = pytest.mark.usefixtures("ray_session")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> dict:
    assert main([*argv, "--json"]) == code
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
    return tmp_path / "st"


def test_delete_verify_audit_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = run_json(capsys, "delete", "--store", str(store), "--ids", "17", "42", "99")
    assert cert["request_id"] == 1 and cert["state"] == "applied" and cert["seconds"] > 0
    assert cert["retrained_shards"] and all("from_slice" in cert["shards"][str(s)] for s in cert["retrained_shards"])
    ver = run_json(capsys, "verify", "--store", str(store))
    assert ver["ok"] and set(ver["shards"]) == {"0", "1", "2"}
    assert all(v["live_weights"] == v["replay_weights"] for v in ver["shards"].values())
    one = run_json(capsys, "verify", "--store", str(store), "--shard", "1")
    assert set(one["shards"]) == {"1"}
    audit = run_json(capsys, "audit", "--store", str(store))
    checkpoint = run_json(capsys, "audit", "--store", str(store), "--checkpoint")["checkpoint"]
    # the log: 3 models published at fit, one per retrained shard, the certificate
    size = 3 + len(cert["retrained_shards"]) + 1
    assert checkpoint.split("\n")[1] == str(size)
    assert audit == {"ok": True, "entries": 1, "problems": [], "log_size": size, "checkpoint": checkpoint}
    again = run_json(capsys, "delete", "--store", str(store), "--ids", "17")
    assert again["state"] == "noop" and again["already_deleted"] == 1


def test_ids_file_defer_pending_apply(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# forget these\n5\n\n6\n")
    pending = run_json(capsys, "delete", "--store", str(store), "--ids-file", str(ids), "--defer")
    assert pending["state"] == "pending"
    listed = run_json(capsys, "pending", "--store", str(store))
    assert [r["request_id"] for r in listed["pending"]] == [1]
    applied = run_json(capsys, "apply", "--store", str(store))
    assert [c["request_id"] for c in applied["applied"]] == [1]
    assert run_json(capsys, "pending", "--store", str(store))["pending"] == []
    assert main(["audit", "--store", str(store)]) == 0
    assert "chain OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ids", "123456"], "not in the store"),
        ([], "exactly one of --ids"),
        (["--ids-file", "MISSING"], "cannot read ids file"),
        (["--ids-file", "GARBAGE"], "line 2: 'x7' is not an integer id"),
        (["--ids-file", "EMPTY"], "empty"),
    ],
)
def test_bad_delete_requests_exit_2_and_change_nothing(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "GARBAGE").write_text("3\nx7\n")
    (tmp_path / "EMPTY").write_text("\n# nothing\n")
    argv = [str(tmp_path / a) if a in ("MISSING", "GARBAGE", "EMPTY") else a for a in argv]
    before = store_digest(store)
    assert main(["delete", "--store", str(store), *argv]) == 2
    assert message in capsys.readouterr().err
    assert store_digest(store) == before


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["12", "abc"], "--ids: 'abc' is not an integer id"),
        (["12,13,14"], "separate ids with spaces, not commas: --ids 12 13 14"),
        (["12", "13,"], "--ids: '13,' is not an integer id"),
    ],
)
def test_non_integer_ids_exit_2_naming_the_fix(
    store: Path, capsys: pytest.CaptureFixture[str], ids: list[str], message: str
) -> None:
    before = store_digest(store)
    assert main(["delete", "--store", str(store), "--ids", *ids]) == 2
    assert message in capsys.readouterr().err
    assert store_digest(store) == before


@pytest.mark.parametrize(("bare", "ids"), [(["5", "17"], "5 17"), (["5,17"], "5 17")])
def test_bare_ids_exit_2_naming_the_option(
    store: Path, capsys: pytest.CaptureFixture[str], bare: list[str], ids: str
) -> None:
    before = store_digest(store)
    with pytest.raises(SystemExit) as exited:
        main(["delete", "--store", str(store), *bare])
    assert exited.value.code == 2
    assert f"`sisa delete --ids {ids}`" in capsys.readouterr().err
    assert store_digest(store) == before


def test_ids_file_dash_reads_standard_input(
    store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("# from a pipe\n3\n\n5\n"))
    cert = run_json(capsys, "delete", "--store", str(store), "--ids-file", "-")
    assert cert["deleted"] == 2 and cert["state"] == "applied"
    monkeypatch.setattr("sys.stdin", io.StringIO("7\nx\n"))
    before = store_digest(store)
    assert main(["delete", "--store", str(store), "--ids-file", "-"]) == 2
    assert "standard input line 2: 'x' is not an integer id" in capsys.readouterr().err
    assert store_digest(store) == before


def test_add_from_npz_then_resume(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = blobs(20, d=10, seed=4)
    np.savez(tmp_path / "new.npz", x=x, y=y, ids=np.arange(900, 920))
    added = run_json(capsys, "add", "--store", str(store), "--input", str(tmp_path / "new.npz"))
    assert added["added"] == 20 and all(v == [4] for v in added["trained"].values())
    resumed = run_json(capsys, "resume", "--store", str(store))
    assert resumed == {"applied": [], "trained": {}, "rebound": {}}
    assert run_json(capsys, "verify", "--store", str(store))["ok"]


def test_a_broken_audit_chain_exits_1(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (verify's exit 1 is the next test's: a model that no retrain from scratch reproduces)
    run_json(capsys, "delete", "--store", str(store), "--ids", "3")
    with Ensemble.open(store) as ens:
        db = ens.store.db(AUDIT_DB)
        ens.store.write(lambda txn: txn.put(struct.pack(">Q", 0), b'{"seq": 0}', db=db))
    report = run_json(capsys, "audit", "--store", str(store), code=1)
    assert report["ok"] is False and report["problems"]
    assert main(["audit", "--store", str(store)]) == 1
    assert "CHAIN BROKEN" in capsys.readouterr().out


def test_verify_fails_with_exit_1_while_a_stale_model_serves(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Ensemble.open(store) as ens:
        ens.reconfigure(small_config("unlearn.policy=serve-stale"))
    run_json(capsys, "delete", "--store", str(store), "--ids", "8", "--defer")
    result = run_json(capsys, "verify", "--store", str(store), code=1)
    assert result["ok"] is False
    assert [k for k, v in result["shards"].items() if not v["ok"]]
    run_json(capsys, "apply", "--store", str(store))
    assert run_json(capsys, "verify", "--store", str(store))["ok"]


def test_status_shows_a_clean_interim_model_while_a_deletion_waits(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ensemble.open(store) as ens:
        ens.reconfigure(small_config("unlearn.policy=serve-clean"))
        with ens.store.read() as txn:
            late = next(int(i) for s in range(3) for i in ens.store.slice_ids(txn, s, 2))  # a last-slice id
    pending = run_json(capsys, "delete", "--store", str(store), "--ids", str(late), "--defer")
    (shard,) = [int(k) for k in pending["shards"]]
    status = run_json(capsys, "status", "--store", str(store))["per_shard"][shard]
    assert (status["live"], status["interim"], status["live_stage"]) == (True, True, 2)
    assert main(["status", "--store", str(store)]) == 0
    assert "stage 2 (clean, deletion pending)" in capsys.readouterr().out
    verified = run_json(capsys, "verify", "--store", str(store), code=1)
    assert "clean interim" in verified["shards"][str(shard)]["reason"]
    run_json(capsys, "apply", "--store", str(store))
    assert run_json(capsys, "verify", "--store", str(store))["ok"]


def test_wait_lets_a_delete_queue_behind_another_writer(
    store: Path, capsys: pytest.CaptureFixture[str], env_python: dict[str, str]
) -> None:
    with writer_in_child(store, 1.0, env_python) as child:
        refused = run_json(capsys, "delete", "--store", str(store), "--ids", "8", "--defer", "--wait", "0.2", code=2)
        assert refused["error"] == "StoreLockedError" and "(waited 0.2s)" in refused["message"]
        queued = run_json(capsys, "delete", "--store", str(store), "--ids", "8", "--defer", "--wait", "120")
        assert queued["state"] == "pending" and child.wait(timeout=120) == 0
    with pytest.raises(SystemExit):
        main(["apply", "--store", str(store), "--wait", "-1"])
    assert "must be a finite number of seconds >= 0" in capsys.readouterr().err
    assert run_json(capsys, "apply", "--store", str(store), "--wait", "5")["applied"][0]["state"] == "applied"


def journal_interrupted(path: Path, ids: list[int]) -> None:
    """Journal an immediate request and stop, as `sisa delete` killed after its journal (or cut off Ray) leaves it."""
    from sisa.unlearn import journal

    with Ensemble.open(path, resume=False) as ens:
        store = ens.store
        meta = {"already_deleted": 0, "defer": False, "policy": "exclude"}
        store.write(lambda txn: journal.record_request(store, txn, ids, store.secret(), meta))


def test_repeating_an_interrupted_delete_finishes_it_and_returns_its_certificate(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal_interrupted(store, [17])
    assert [r["request_id"] for r in run_json(capsys, "pending", "--store", str(store))["pending"]] == [1]
    cert = run_json(capsys, "delete", "--store", str(store), "--ids", "17")  # the client's retry
    assert cert["state"] == "applied" and cert["request_id"] == 1 and cert["deleted"] == 1
    assert cert["apply_seconds"] <= cert["seconds"]
    assert run_json(capsys, "pending", "--store", str(store))["pending"] == []
    assert all(s["live"] for s in run_json(capsys, "status", "--store", str(store))["per_shard"])
    again = run_json(capsys, "delete", "--store", str(store), "--ids", "17")  # now it really is done
    assert again["state"] == "noop" and again["already_deleted"] == 1

    # A deferred request is finished by repeating it without --defer, and reported as itself.
    assert run_json(capsys, "delete", "--store", str(store), "--ids", "5", "--defer")["request_id"] == 2
    assert run_json(capsys, "delete", "--store", str(store), "--ids", "5", "--defer")["state"] == "pending"
    assert run_json(capsys, "delete", "--store", str(store), "--ids", "5")["request_id"] == 2

    # Another deletion finishes an interrupted request and says so, in JSON and in text.
    journal_interrupted(store, [42])
    assert main(["delete", "--store", str(store), "--ids", "99"]) == 0
    out = capsys.readouterr().out
    assert "request 4 applied" in out and "also finished pending request 3" in out and "request 3 applied" in out
    assert "since the request was journaled" in out
    assert run_json(capsys, "pending", "--store", str(store))["pending"] == []
    audit = run_json(capsys, "audit", "--store", str(store))
    assert audit["ok"] and audit["entries"] == 4


def test_status_counts_the_slices_that_adds_made(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = blobs(30, d=10, seed=5)
    np.savez(tmp_path / "new.npz", x=x, y=y, ids=np.arange(1000, 1030))
    run_json(capsys, "add", "--store", str(store), "--input", str(tmp_path / "new.npz"))
    status = run_json(capsys, "status", "--store", str(store))
    assert status["slices"] == 3 and status["shard_slices"] == [4, 4, 4]
    assert [len(s["slice_samples"]) for s in status["per_shard"]] == [4, 4, 4]
    assert main(["status", "--store", str(store)]) == 0
    assert "3 shards x 4 slices" in capsys.readouterr().out
