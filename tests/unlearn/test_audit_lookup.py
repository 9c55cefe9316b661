"""What an auditor asks: the past certificates, and "was id X deleted, when, by which request?"."""

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.errors import DataError
from tests.conftest import blobs, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")


def documented_hash(store: Path, sample_id: int) -> str:
    """The keyed hash exactly as the README documents it, computed without sisa's code."""
    key = (store / "hmac.key").read_bytes()
    return hmac.new(key, b"sisa-id|" + sample_id.to_bytes(8, "big"), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A store with one applied request (ids 17, 42) and one deferred (id 99)."""
    path = tmp_path_factory.mktemp("audit") / "st"
    x, y = blobs(600, d=10)
    with Ensemble.create(path, small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        cert = ens.delete([17, 42])
        ens.delete([99], defer=True)
    return path, cert


def run(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> str:
    assert main(list(argv)) == code
    return capsys.readouterr().out


def test_show_lists_the_certificates(audited: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    store, cert = audited
    before = store_digest(store)
    out = json.loads(run(capsys, "audit", "--store", str(store), "--show", "--json"))
    assert out["ok"] is True and out["entries"] == 1
    [shown] = out["certificates"]
    # The log's leaves: the 3 shards' models published at fit, one per shard the deletion retrained, then
    # the certificate.
    seq = 3 + len(cert["retrained_shards"])
    assert shown["audit_seq"] == cert["audit_seq"] == seq and shown["request_id"] == cert["request_id"] == 1
    assert out["log_size"] == seq + 1 and out["checkpoint"].split("\n")[1] == str(seq + 1)
    assert shown["applied_at"] == cert["applied_at"] and shown["shards"] == cert["shards"]
    assert shown["id_hashes"] == sorted(documented_hash(store, i) for i in (17, 42))
    text = run(capsys, "audit", "--store", str(store), "--show")
    assert f"audit entry {seq}: request 1, requested " in text and "2 id hash(es)" in text
    assert "2 sample(s) deleted" in text and text.rstrip().endswith(
        "audit: 1 deletion certificate(s), log and chain OK"
    )
    with Ensemble.open(store, readonly=True) as ens:
        assert [c["request_id"] for c in ens.certificates()] == [1]
    assert store_digest(store) == before


def test_lookup_by_id_answers_when_and_by_which_request(
    audited: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    store, cert = audited
    before = store_digest(store)
    out = json.loads(run(capsys, "audit", "--store", str(store), "--id", "17", "99", "5", "100000", "--json"))
    deleted, pending, kept, unknown = out["lookups"]
    assert deleted["deleted"] is True and deleted["request_id"] == 1 and deleted["state"] == "applied"
    assert deleted["applied_at"] == cert["applied_at"] and deleted["requested_at"] == cert["requested_at"]
    assert deleted["audit_seq"] == cert["audit_seq"] and deleted["certificate_names_it"] is True
    assert deleted["id_hash"] == documented_hash(store, 17)
    assert pending["deleted"] is True and pending["request_id"] == 2 and pending["state"] == "pending"
    assert pending["audit_seq"] is None and pending["applied_at"] is None
    assert kept == {
        "id": 5,
        "id_hash": documented_hash(store, 5),
        "deleted": False,
        "in_store": True,
        "message": "id 5 was never deleted (the store holds it)",
    }
    assert unknown["deleted"] is False and unknown["in_store"] is False and "never deleted" in unknown["message"]
    text = run(capsys, "audit", "--store", str(store), "--id", "42", "5")
    assert "id 42: deleted by request 1, requested " in text
    assert f"certificate in audit entry {cert['audit_seq']}" in text
    assert "id 5 was never deleted (the store holds it)" in text
    with Ensemble.open(store, readonly=True) as ens:
        assert [r["request_id"] for r in ens.lookup([42, 99])] == [1, 2]
        with pytest.raises(DataError, match="integers"):
            ens.lookup([1.5])
    assert store_digest(store) == before
