"""`sisa compact`: reclaims free pages of data.mdb; the store reads the same afterwards."""

import json
import os
from pathlib import Path

import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from tests.conftest import blobs, live_state, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_compact_shrinks_data_mdb_after_deletions_and_keeps_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = blobs(900, d=10)
    path = tmp_path / "st"
    with Ensemble.create(path, small_config(), address="local") as ens:
        ens.ingest(x, y)
        ens.fit()
        ens.delete(list(range(0, 300, 3)))
        state, status = live_state(ens), ens.status()
    measured_before = os.path.getsize(path / "data.mdb")
    assert main(["compact", "--store", str(path), "--json"]) == 0
    measured_after = os.path.getsize(path / "data.mdb")
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_before"] == measured_before and out["bytes_after"] == measured_after
    assert measured_after < measured_before
    with Ensemble.open(path, address="local") as ens:
        assert live_state(ens) == state and ens.status()["samples"] == status["samples"] == 800
        assert ens.verify()["ok"] and ens.audit().ok
    assert main(["compact", "--store", str(tmp_path / "nope")]) == 2
    assert "not a sisa store" in capsys.readouterr().err
