"""Shipping shard data to tasks: lazy jobs, streamed slices and the in-flight limit give the same bytes."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, TrainingError
from sisa.store.digests import recipe_digest
from sisa.train import orchestrator
from sisa.train.jobs import ShardJob, SliceData, StageResult
from sisa.train.slices import StoredSlices
from sisa.train.trainer import train_shard
from tests.conftest import blobs, live_state, small_config
from tests.train.test_trainer import make_job

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(900, d=10)
DELETE = [4, 300, 301, 877]


def stage_sha(ens: Ensemble) -> dict[tuple[int, int], str]:
    with ens.store.read() as txn:
        return {(s, r["stage"]): r["sha256"] for s in range(ens.config.shards) for r in ens.store.stage_records(txn, s)}


class Recording(Sequence[SliceData]):
    """A lazy slice sequence that records which slice was loaded when."""

    def __init__(self, slices: Sequence[SliceData], log: list[int]) -> None:
        self.slices, self.log = tuple(slices), log

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        assert isinstance(index, int), "the trainer indexes one slice at a time"
        self.log.append(index)
        return self.slices[index]


@pytest.mark.kernels
def test_trainer_reads_each_slice_once_when_its_stage_starts() -> None:
    loads: list[int] = []
    base = make_job()
    job = ShardJob(**{**base.__dict__, "slices": Recording(base.slices, loads), "slice_sizes": base.sizes()})
    seen: list[tuple[int, list[int]]] = []
    lazy: list[bytes] = []
    for result in train_shard(job):
        seen.append((result.stage, list(loads)))
        lazy.append(result.checkpoint)
    # Slice r-1 (0-based) arrives when stage r starts, never earlier, and never twice.
    assert seen == [(1, [0]), (2, [0, 1]), (3, [0, 1, 2])]
    full = list(train_shard(make_job()))
    assert lazy == [r.checkpoint for r in full]

    # A resumed job loads the slices its parent stage trained on up front, then one per stage.
    loads.clear()
    resumed = ShardJob(**{**job.__dict__, "start_stage": 2, "parent": full[1].checkpoint, "parent_key": full[1].key})
    assert [r.checkpoint for r in train_shard(resumed)] == [full[2].checkpoint]
    assert loads == [0, 1, 2]


def test_job_with_wrong_slice_sizes_is_refused() -> None:
    base = make_job()
    bad = ShardJob(**{**base.__dict__, "slice_sizes": (1, 2, 3)})
    with pytest.raises(TrainingError, match="slice 0: 100 rows arrived, 1 expected"):
        list(train_shard(bad))


def test_stored_slices_stay_in_the_driver(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(X, Y)
        with ens.store.read() as txn:
            job = ens.planner.shard_job(txn, 1)
        assert isinstance(job.slices, StoredSlices)
        assert job.sizes() == tuple(len(job.slices[r].ids) for r in range(len(job.slices)))
        assert sum(job.sizes()) == len(job.slices[0].ids) + sum(len(s.ids) for s in job.slices[1:])
        with pytest.raises(TypeError, match="stays in the driver"):
            pickle.dumps(job)
        # What the orchestrator ships instead holds the same samples and pickles.
        shipped = orchestrator.ship(job)
        assert isinstance(shipped.slices, tuple)
        again = pickle.loads(pickle.dumps(shipped))
        for a, b in zip(again.slices, (job.slices[r] for r in range(len(job.slices))), strict=True):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


def test_remote_slices_fetch_by_index_and_pickle_only_refs() -> None:
    job = make_job(small_config("resources.stream_slices=true"))
    shipped = orchestrator.ship(job)
    remote = shipped.slices
    assert isinstance(remote, orchestrator.RemoteSlices) and len(remote) == len(job.slices)
    assert shipped.slice_sizes == job.sizes()
    copy = pickle.loads(pickle.dumps(shipped)).slices
    for r in (0, 1, 2, -1):
        got, want = copy[r], job.slices[r]
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)
    with pytest.raises(IndexError):
        copy[3]
    # Mid-prefetch (slice 1 is being fetched after slice 0 was read), pickling still carries only refs.
    assert np.array_equal(remote[0].ids, job.slices[0].ids)
    assert pickle.loads(pickle.dumps(remote)).refs == remote.refs


# The modes differ only in how Ray ships slices, which the driver's kernel level cannot touch:
# one of them is enough for the `kernels` re-run.
@pytest.mark.parametrize(
    "mode", [pytest.param("inline", marks=pytest.mark.kernels), "streamed", "streamed-one-at-a-time"]
)
def test_streamed_and_limited_training_and_deletion_give_the_bytes_of_local(tmp_path: Path, mode: str) -> None:
    overrides = {
        "inline": (),
        "streamed": ("resources.stream_slices=true",),
        "streamed-one-at-a-time": ("resources.stream_slices=true", "resources.max_shards_in_flight=1"),
    }[mode]
    states = {}
    for name, address, extra in (("local", "local", ()), (mode, None, overrides)):
        with Ensemble.create(tmp_path / name, small_config(*extra), address=address) as ens:
            ens.ingest(X, Y)
            ens.fit()
            trained = stage_sha(ens)
            cert = ens.delete(DELETE)  # resumes affected shards from a later stage
            assert cert["state"] == "applied" and cert["retrained_shards"]
            states[name] = (trained, stage_sha(ens), live_state(ens), ens.verify()["ok"])
    assert states[mode] == states["local"]
    assert states[mode][3] is True


def plan_events(limit: int, shards: int = 3) -> list[str]:
    """Order of job pulls and stage arrivals when run_jobs trains ``shards`` shards."""
    cfg = small_config("resources.stream_slices=true", f"resources.max_shards_in_flight={limit}")
    events: list[str] = []

    def jobs() -> Iterator[ShardJob]:
        for shard in range(shards):
            events.append(f"pull {shard}")
            base = make_job(cfg)
            yield ShardJob(**{**base.__dict__, "shard": shard})

    def on_stage(result: StageResult) -> None:
        events.append(f"stage {result.shard}.{result.stage}")

    orchestrator.run_jobs(jobs(), on_stage)
    return events


def test_in_flight_limit_pulls_the_next_job_only_when_a_shard_finishes() -> None:
    one = plan_events(1)
    assert one == [f"{e} {s}" if e == "pull" else f"stage {s}.{e}" for s in range(3) for e in ("pull", 1, 2, 3)]
    # With no limit every job is pulled (and submitted) before the first stage comes back.
    unlimited = plan_events(0)
    assert unlimited[:3] == ["pull 0", "pull 1", "pull 2"]
    assert sorted(unlimited[3:]) == sorted(f"stage {s}.{r}" for s in range(3) for r in (1, 2, 3))


def test_streaming_knobs_are_validated_and_not_part_of_the_recipe() -> None:
    base = load_config(None)
    assert (base.resources.stream_slices, base.resources.max_shards_in_flight) == (False, 0)
    tuned = load_config(None, ["resources.stream_slices=true", "resources.max_shards_in_flight=4"])
    assert (tuned.resources.stream_slices, tuned.resources.max_shards_in_flight) == (True, 4)
    assert recipe_digest(tuned) == recipe_digest(base)
    with pytest.raises(ConfigError, match="max_shards_in_flight=-1 must be >= 0"):
        load_config(None, ["resources.max_shards_in_flight=-1"])
    with pytest.raises(ConfigError, match="resources.stream_slices must be true or false"):
        load_config(None, ["resources.stream_slices=1"])


def test_an_empty_plan_starts_no_ray(env_python: dict[str, str]) -> None:
    # An apply or verify with nothing to train must not pay a Ray start-up (~4 s), also
    # when its jobs come from a lazy iterator that turns out empty.
    code = (
        "import ray\n"
        "from sisa.train import orchestrator\n"
        "orchestrator.execute(None, iter(()), print)\n"
        "assert not ray.is_initialized(), 'ray was started'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_python, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
