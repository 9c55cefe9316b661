"""`sisa migrate` says what the old directory still holds, and removes it with --remove-source."""

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from tests.conftest import live_state, small_config, store_digest
from tests.store.test_migrate import PIXELS, Y, downgrade

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def format_2(tmp_path: Path) -> tuple[Path, dict]:
    """A format-2 store (samples in the clear), and its live models."""
    path = tmp_path / "old"
    with Ensemble.create(path, small_config("data.num_classes=3"), address="local") as ens:
        ens.ingest(PIXELS.astype(np.float32), Y)
        ens.fit()
        state = live_state(ens)
    downgrade(path)
    return path, state


def test_migrate_says_the_source_holds_plaintext_and_removes_it_when_asked(
    format_2: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, state = format_2
    assert PIXELS[3].astype("<f4").tobytes() in (path / "data.mdb").read_bytes()  # plaintext, as format 2 keeps it
    assert main(["migrate", "--store", str(path), "--to", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    assert f"{path} is unchanged and still holds its samples in plaintext (format 2)" in out
    assert "--remove-source" in out and path.exists()

    new = tmp_path / "new"
    assert main(["migrate", "--store", str(path), "--to", str(new), "--remove-source", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_removed"] is True and not path.exists()
    with Ensemble.open(new, address="local") as ens:
        assert live_state(ens) == state and ens.audit().ok


def test_remove_source_leaves_the_source_when_the_migration_fails_or_another_process_holds_it(
    format_2: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = format_2
    before = store_digest(path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("mine")
    assert main(["migrate", "--store", str(path), "--to", str(used), "--remove-source"]) == 2
    assert "not empty" in capsys.readouterr().err and store_digest(path) == before
    fd = os.open(path / "writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another process writing it would hold
        assert main(["migrate", "--store", str(path), "--to", str(tmp_path / "n"), "--remove-source"]) == 2
    finally:
        os.close(fd)
    assert "in use by another process: nothing was migrated or removed" in capsys.readouterr().err
    assert store_digest(path) == before and not (tmp_path / "n").exists()
