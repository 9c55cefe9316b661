"""The runner choice as a pure function of predicted costs, and the cost prediction from stage records."""

from __future__ import annotations

import pytest

from sisa.errors import ConfigError
from sisa.train import orchestrator
from sisa.train.runner_choice import (
    Setting,
    choose,
    makespan,
    predict_seconds,
    seconds_per_sample_epoch,
)

TWO_CORES = Setting(cores=2, ray_start=7.0, child_start=1.5)


def test_one_shard_always_trains_in_one_process() -> None:
    choice = choose([100.0], TWO_CORES)
    assert choice.runner == "local" and choice.processes == 1 and set(choice.predicted) == {"local"}


def test_short_retrains_in_place_stay_in_one_process() -> None:
    # A warm worker (pinned, trains in place): two 0.4 s shards finish in 0.8 s; a child costs 1.5 s.
    choice = choose([0.4, 0.4], Setting(cores=2, in_place=True))
    assert choice.runner == "local"
    assert choice.predicted == pytest.approx({"local": 0.8, "parallel": 1.9, "ray": 7.4})


def test_long_retrains_go_side_by_side() -> None:
    choice = choose([30.0] * 8, Setting(cores=2, in_place=True))
    assert (choice.runner, choice.processes) == ("parallel", 2)
    assert choice.predicted["parallel"] == pytest.approx(121.5)


def test_warm_children_cost_no_start() -> None:
    cold = choose([1.0, 1.0], Setting(cores=2, in_place=True))
    warm = choose([1.0, 1.0], Setting(cores=2, in_place=True, warm_children=2))
    assert cold.runner == "local" and warm.runner == "parallel"  # 2.0 < 2.5, then 1.0 < 2.0


def test_slots_follow_threads_per_shard_and_cores() -> None:
    assert choose([10.0] * 8, Setting(cores=16, threads_per_shard=4)).processes == 4
    assert choose([10.0] * 3, Setting(cores=16)).processes == 3  # never more processes than shards
    assert choose([10.0] * 8, Setting(cores=2, threads_per_shard=2)).runner == "local"  # one slot


def test_a_gpu_plan_never_runs_side_by_side_in_local_processes() -> None:
    choice = choose([60.0] * 4, Setting(cores=4, device="cuda", in_place=True))
    assert "parallel" not in choice.predicted and choice.runner == "ray"


def test_ray_wins_when_its_start_is_cheaper() -> None:
    # On this machine Ray's start (7 s) costs more than a child's; a cheap start elsewhere flips it.
    assert choose([30.0] * 8, Setting(cores=8, ray_start=1.0, child_start=2.0)).runner == "ray"


def test_ties_go_to_the_simpler_runner() -> None:
    assert choose([1.0, 1.0], Setting(cores=2, in_place=True, child_start=1.0)).runner == "local"


def test_makespan_longest_first() -> None:
    assert makespan([3, 3, 2, 2, 2], 2) == 7
    assert makespan([5.0], 4) == 5.0
    assert makespan([], 2) == 0.0


def test_costs_from_stage_records_and_the_cost_model() -> None:
    records = [
        {"seconds": 1.0, "n_samples": 100, "epochs": 2},
        {"seconds": 3.0, "n_samples": 300, "epochs": 2},
    ]
    rate = seconds_per_sample_epoch(records)
    assert rate == pytest.approx(4.0 / 800)
    assert seconds_per_sample_epoch([]) is None
    # A shard of slices 100, 100, 100 retrained from stage 1 trains stages 2 and 3: 200 + 300 samples.
    assert predict_seconds([(0, 1)], {0: [100, 100, 100]}, 2, rate) == pytest.approx([1000 * rate])
    assert predict_seconds([(0, 0), (1, 2)], {0: [10, 10], 1: [5, 5, 5]}, {0: 1, 1: 2}, 1.0) == [30.0, 30.0]


def test_plan_runner_overrides_and_unmeasured_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(orchestrator.RUNNER_ENV, raising=False)
    monkeypatch.setattr(orchestrator.ray, "is_initialized", lambda: False)
    from tests.conftest import small_config

    res = small_config().resources
    assert orchestrator.plan_runner(None, 2).runner == "ray"  # nothing measured: as before
    assert orchestrator.plan_runner(None, 2, [30.0, 30.0], res).runner in ("local", "parallel")
    assert orchestrator.plan_runner("host:6379", 2, [0.1, 0.1], res).runner == "ray"  # a named cluster wins
    assert orchestrator.plan_runner("local", 8, [30.0] * 8, res).runner == "local"
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "parallel")
    assert orchestrator.plan_runner(None, 1, None, res).runner == "parallel"
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "ray")
    assert orchestrator.plan_runner(None, 2, [0.1, 0.1], res).runner == "ray"
    monkeypatch.setattr(orchestrator.ray, "is_initialized", lambda: True)
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "local")
    assert orchestrator.plan_runner(None, 2, None, res).runner == "local"  # the override beats a Ray up here
    monkeypatch.setenv(orchestrator.RUNNER_ENV, "spark")
    with pytest.raises(ConfigError, match="parallel"):
        orchestrator.plan_runner(None, 2)
