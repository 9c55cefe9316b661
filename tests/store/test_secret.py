"""The HMAC secret kept outside the store directory (SISA_SECRET_FILE): works, absent from the store, checked."""

import os
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from sisa.store.secret import ENV
from tests.conftest import blobs, files_containing, small_config, store_digest

X, Y = blobs(600, d=10)


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store created with its secret in a file outside its directory; the variable stays set."""
    secret = tmp_path / "vault" / "sisa.secret"
    monkeypatch.setenv(ENV, str(secret))
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
    return secret


def test_a_store_with_an_outside_secret_works_and_its_directory_holds_no_secret(tmp_path: Path, outside: Path) -> None:
    store = tmp_path / "st"
    secret = outside.read_bytes()
    assert len(secret) == 32 and (outside.stat().st_mode & 0o777) == 0o600
    with Ensemble.open(store, address="local") as ens:
        cert = ens.delete([3, 99])
        assert cert["state"] == "applied" and ens.audit().ok
        assert [r["deleted"] for r in ens.lookup([3, 99, 4])] == [True, True, False]
        with pytest.raises(Exception, match="deleted"):  # a deleted id is still refused at ingest
            ens.ingest(X[[3]], Y[[3]], ids=np.asarray([3]))
    # A copy of the store directory carries no secret: no hmac.key, and its bytes are in no file.
    assert not (store / "hmac.key").exists()
    assert files_containing(store, secret) == []


def test_a_missing_or_wrong_outside_secret_fails_clearly_and_changes_nothing(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "st"
    digest = store_digest(store)
    monkeypatch.delenv(ENV)
    with Ensemble.open(store, address="local") as ens:
        with pytest.raises(ConfigError, match=f"keeps its HMAC secret outside the store directory: set {ENV}"):
            ens.delete([3])
        with pytest.raises(ConfigError, match=ENV):
            ens.audit()
        assert ens.predict(X[:4]).shape == (4,)  # serving needs no secret
    assert store_digest(store) == digest
    wrong = tmp_path / "wrong.secret"
    wrong.write_bytes(os.urandom(32))
    monkeypatch.setenv(ENV, str(wrong))
    with Ensemble.open(store, address="local") as ens, pytest.raises(ConfigError, match="is not the HMAC secret"):
        ens.delete([3])
    assert store_digest(store) == digest
    # The CLI: exit 2, the reason on stderr, the store as it was.
    assert main(["delete", "--store", str(store), "--ids", "3"]) == 2
    assert "is not the HMAC secret of store" in capsys.readouterr().err
    short = tmp_path / "short.secret"
    short.write_bytes(b"too short")
    monkeypatch.setenv(ENV, str(short))
    assert main(["delete", "--store", str(store), "--ids", "3"]) == 2
    assert "has 9 bytes, a secret has 32" in capsys.readouterr().err
    assert store_digest(store) == digest
    monkeypatch.setenv(ENV, str(outside))
    with Ensemble.open(store, address="local") as ens:
        assert ens.delete([3])["state"] == "applied"  # the right file again: it works


def test_a_bad_outside_secret_at_create_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.secret"
    bad.write_bytes(b"x" * 31)
    monkeypatch.setenv(ENV, str(bad))
    with pytest.raises(ConfigError, match="has 31 bytes"):
        Ensemble.create(tmp_path / "st", small_config())
    assert not (tmp_path / "st").exists()
