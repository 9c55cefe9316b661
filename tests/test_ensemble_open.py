"""Ensemble.open and Ensemble.create release the store when building the ensemble fails."""

from pathlib import Path

import pytest

from sisa.config.fields import config_to_dict
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from sisa.store import environment
from sisa.store.database import Store
from tests.conftest import small_config


def _open_envs_under(path: Path) -> list[str]:
    """The LMDB environments this process still holds open inside ``path``."""
    root = str(path.resolve())
    return [p for p in environment._ENVS if p.startswith(root)]  # noqa: SLF001 - the registry is the evidence


def test_open_with_a_bad_stored_config_releases_the_store(tmp_path: Path) -> None:
    path = tmp_path / "st"
    Ensemble.create(path, small_config()).close()
    bad = {**config_to_dict(small_config()), "shards": -1}
    store = Store.open(path)
    store.write(lambda txn: store.put_meta(txn, config=bad))
    store.close()

    with pytest.raises(ConfigError):
        Ensemble.open(path)

    assert _open_envs_under(path) == []  # no environment left open
    again = Store.open(path, lock_timeout=0.0)  # the writer lock is free at once
    assert again.writable
    again.close()
    assert _open_envs_under(path) == []


def test_create_that_fails_after_the_store_exists_releases_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "st"

    def broken(*_a: object, **_k: object) -> None:
        raise ConfigError("a failure while building the ensemble")

    monkeypatch.setattr("sisa.ensemble.Planner", broken)
    with pytest.raises(ConfigError):
        Ensemble.create(path, small_config())
    monkeypatch.undo()

    assert _open_envs_under(path) == []
    again = Store.open(path, lock_timeout=0.0)
    assert again.writable
    again.close()
