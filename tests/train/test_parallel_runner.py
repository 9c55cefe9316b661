"""Deletions through pinned local processes side by side: Ray's bytes, and no false success when a child dies."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sisa.ensemble import Ensemble
from sisa.errors import TrainingError
from sisa.train import local_runner, orchestrator
from sisa.train.jobs import ShardJob, StageResult
from tests.conftest import trained_blobs_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained store (S=3, R=3), trained without Ray."""
    return trained_blobs_store(tmp_path_factory.mktemp("parallel") / "st")


def one_id_per_shard(store: Path, shards: int) -> list[int]:
    """Ids from ``shards`` different shards (one each)."""
    with Ensemble.open(store, readonly=True) as ens:
        where = ens.locate(list(range(120)))
    first: dict[int, int] = {}
    for sample, (shard, _) in sorted(where.items()):
        first.setdefault(shard, sample)
    assert len(first) >= shards
    return [first[k] for k in sorted(first)[:shards]]


def delete_with(runner: str, store: Path, ids: list[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv(orchestrator.RUNNER_ENV, runner)
    with Ensemble.open(store) as ens:
        return ens.delete(ids)


def weights(cert: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    return {k: (v["live_weights"], v["new_checkpoints"]) for k, v in cert["shards"].items()}


@pytest.mark.parametrize("touched", [2, 3])
def test_a_deletion_in_parallel_processes_is_bit_identical_to_ray(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, touched: int, ray_session: None
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ids = one_id_per_shard(trained, touched)
    certs = {}
    for runner in ("parallel", "local", "ray"):
        store = tmp_path / runner
        shutil.copytree(trained, store)
        certs[runner] = delete_with(runner, store, ids, monkeypatch)
        assert certs[runner]["runner"] == runner
        assert len(certs[runner]["retrained_shards"]) == touched
    assert weights(certs["parallel"]) == weights(certs["ray"]) == weights(certs["local"])
    # The live models the new runner left are the ones a replay from scratch gives (on Ray).
    with Ensemble.open(tmp_path / "parallel") as ens:
        assert ens.verify()["ok"]


def test_a_killed_child_fails_the_deletion_and_leaves_it_pending(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ids = one_id_per_shard(trained, 2)
    reference = tmp_path / "reference"
    shutil.copytree(trained, reference)
    expected = weights(delete_with("local", reference, ids, monkeypatch))

    store = tmp_path / "st"
    shutil.copytree(trained, store)
    real = local_runner.LocalRunner.train
    killed: list[int] = []

    def dies_after_one_stage(self: local_runner.LocalRunner, job: ShardJob) -> Iterator[StageResult]:
        for result in real(self, job):
            yield result
            if not killed and self.pid is not None:  # as the OOM killer would, mid-shard
                killed.append(self.pid)
                os.kill(self.pid, signal.SIGKILL)

    monkeypatch.setattr(local_runner.LocalRunner, "train", dies_after_one_stage)
    with pytest.raises(TrainingError, match="died"):
        delete_with("parallel", store, ids, monkeypatch)
    monkeypatch.setattr(local_runner.LocalRunner, "train", real)

    assert killed
    with Ensemble.open(store, readonly=True) as ens:
        (request,) = ens.pending()  # still pending: no certificate, no false success
    with Ensemble.open(store, resume=False) as ens:
        (cert,) = ens.apply()  # the retry finishes it, with the same bytes
    assert cert["request_id"] == request["request_id"]
    assert weights(cert) == expected
