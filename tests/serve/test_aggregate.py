"""Tests of sisa.serve.aggregate on tiny real ensembles (vmap vs loop, combine semantics, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sisa.errors import ConfigError, NotTrainedError
from sisa.serve.aggregate import (
    BACKENDS,
    CPU_VMAP_MAX_BATCH,
    METHODS,
    can_vmap,
    choose_backend,
    combine,
    predict,
    predict_proba,
    shard_logits,
    shard_probas,
)

S = 5


def mlp_ensemble(s: int = S) -> list[nn.Module]:
    models: list[nn.Module] = []
    for seed in range(s):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)))
    return models


def cnn_ensemble(s: int = S) -> list[nn.Module]:
    models: list[nn.Module] = []
    for seed in range(s):
        torch.manual_seed(100 + seed)
        models.append(
            nn.Sequential(
                nn.Conv2d(1, 4, 3),  # 8x8 -> 6x6
                nn.ReLU(),
                nn.MaxPool2d(2),  # -> 3x3
                nn.Flatten(),
                nn.Linear(4 * 3 * 3, 3),
            )
        )
    return models


def bn_ensemble(s: int = S) -> list[nn.Module]:
    """MLPs with BatchNorm, so buffers must be stacked and eval mode matters."""
    models: list[nn.Module] = []
    for seed in range(s):
        torch.manual_seed(200 + seed)
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        m.train()
        m(torch.randn(32, 6))  # give each model its own running stats
        models.append(m)
    return models


ARCHS = {
    "mlp": (mlp_ensemble, (6,)),
    "cnn": (cnn_ensemble, (1, 8, 8)),
    "bn": (bn_ensemble, (6,)),
}


def inputs(shape: tuple[int, ...], n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, *shape, generator=g)


def bias_model(bias: list[float]) -> nn.Module:
    """A model that ignores its input and outputs ``bias`` as logits."""
    m = nn.Linear(2, len(bias))
    with torch.no_grad():
        m.weight.zero_()
        m.bias.copy_(torch.tensor(bias))
    return m


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(("n", "batch_size"), [(1, 1), (7, 3), (300, 128)])
@pytest.mark.parametrize("method", METHODS)
def test_vmap_equals_loop(arch: str, n: int, batch_size: int, method: str) -> None:
    make, shape = ARCHS[arch]
    models = make()
    x = inputs(shape, n)
    weights = [3.0, 1.0, 0.0, 2.0, 5.0] if method == "weighted" else None
    out = {
        b: predict_proba(models, x, method=method, weights=weights, backend=b, batch_size=batch_size)
        for b in ("vmap", "loop")
    }
    assert out["vmap"].shape == (n, 4 if arch == "mlp" else 3)
    torch.testing.assert_close(out["vmap"], out["loop"], rtol=1e-5, atol=1e-6)
    labels = {
        b: predict(models, x, method=method, weights=weights, backend=b, batch_size=batch_size)
        for b in ("vmap", "loop")
    }
    assert torch.equal(labels["vmap"], labels["loop"])
    assert labels["vmap"].dtype == torch.int64 and labels["vmap"].shape == (n,)
    # Chunking changes nothing: one big chunk gives the same answer.
    whole = predict_proba(models, x, method=method, weights=weights, backend="loop", batch_size=n)
    torch.testing.assert_close(out["vmap"], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shard_logits_match_each_model(arch: str) -> None:
    make, shape = ARCHS[arch]
    models = make()
    x = inputs(shape, 10)
    expected = []
    for m in models:
        m.eval()
        with torch.no_grad():
            expected.append(m(x))
    expected_t = torch.stack(expected)
    for backend in ("vmap", "loop"):
        got = shard_logits(models, x, backend=backend, batch_size=4)
        assert got.shape == expected_t.shape
        torch.testing.assert_close(got, expected_t, rtol=1e-5, atol=1e-6)


def test_vote_known_answer_and_ties() -> None:
    x = torch.zeros(2, 2)
    # Shard 2 has a tie in its own logits between labels 0 and 1 -> votes 0.
    models = [bias_model([0, 0, 5]), bias_model([0, 0, 5]), bias_model([1, 1, 0])]
    for backend in ("vmap", "loop"):
        votes = predict_proba(models, x, method="vote", backend=backend)
        torch.testing.assert_close(votes, torch.tensor([[1 / 3, 0, 2 / 3]] * 2))
        assert predict(models, x, method="vote", backend=backend).tolist() == [2, 2]
    # Two votes each for labels 2 and 1: the tie goes to the lowest label.
    tie = [bias_model([0, 0, 5]), bias_model([0, 5, 0]), bias_model([0, 0, 5]), bias_model([0, 5, 0])]
    assert predict(tie, x, method="vote").tolist() == [1, 1]
    # Three shards, three different labels: all tied, label 0 wins.
    three = [bias_model([0, 0, 5]), bias_model([5, 0, 0]), bias_model([0, 5, 0])]
    torch.testing.assert_close(predict_proba(three, x, method="vote"), torch.full((2, 3), 1 / 3))
    assert predict(three, x, method="vote").tolist() == [0, 0]


def test_vote_can_disagree_with_mean() -> None:
    # Two shards narrowly prefer label 0, one is very sure of label 1.
    models = [bias_model([1.0, 0.9]), bias_model([1.0, 0.9]), bias_model([0.0, 10.0])]
    x = torch.zeros(1, 2)
    assert predict(models, x, method="vote").tolist() == [0]
    assert predict(models, x, method="mean").tolist() == [1]


def test_mean_and_weighted_match_manual() -> None:
    models = mlp_ensemble(3)
    x = inputs((6,), 20)
    per_model = torch.stack([torch.softmax(m.eval()(x), dim=-1) for m in models]).detach()
    torch.testing.assert_close(predict_proba(models, x, method="mean"), per_model.mean(0))
    torch.testing.assert_close(predict_proba(models, x, method="weighted", weights=[1, 0, 0]), per_model[0])
    counts = torch.tensor([10.0, 30.0, 60.0])
    manual = 0.1 * per_model[0] + 0.3 * per_model[1] + 0.6 * per_model[2]
    torch.testing.assert_close(predict_proba(models, x, method="weighted", weights=counts), manual)
    # combine() on precomputed probabilities agrees with the end-to-end call.
    probas = shard_probas(models, x)
    torch.testing.assert_close(combine(probas, "weighted", counts), manual)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (None, "needs weights"),
        ([1.0, 2.0], "length S=3"),
        ([1.0, -1.0, 2.0], "non-negative"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ([1.0, float("nan"), 1.0], "finite"),
    ],
)
def test_weighted_rejects_bad_weights(weights: list[float] | None, match: str) -> None:
    models = mlp_ensemble(3)
    with pytest.raises(ConfigError, match=match):
        predict_proba(models, inputs((6,), 4), method="weighted", weights=weights)
    with pytest.raises(ValueError, match=match):
        combine(torch.full((3, 4, 2), 0.5), "weighted", weights)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_and_no_grad(method: str, backend: str) -> None:
    models = cnn_ensemble()
    out = predict_proba(models, inputs((1, 8, 8), 9), method=method, weights=[1] * S, backend=backend)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(9))
    assert not out.requires_grad
    out.mul_(2)  # a normal tensor, not an inference tensor: in-place use is allowed


def test_models_modes_and_weights_left_alone() -> None:
    models = bn_ensemble(3)
    models[1].eval()
    models[2].get_submodule("1").eval()  # a frozen BatchNorm inside a training model
    modes = [[mod.training for mod in m.modules()] for m in models]
    state = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    for backend in ("vmap", "loop"):
        logits = shard_logits(models, inputs((6,), 5), backend=backend)
        assert not logits.requires_grad
        assert [[mod.training for mod in m.modules()] for m in models] == modes
        for m, before in zip(models, state, strict=True):
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), k  # running stats not updated


def test_mixed_architectures_fall_back_to_loop() -> None:
    models = mlp_ensemble(2) + [nn.Sequential(nn.Linear(6, 4))]
    assert not can_vmap(models)
    assert can_vmap(mlp_ensemble(2))
    assert not can_vmap([])
    assert choose_backend(models, 1, "auto") == "loop"
    x = inputs((6,), 3)
    out = predict_proba(models, x, backend="auto")
    torch.testing.assert_close(out, predict_proba(models, x, backend="loop"))
    with pytest.raises(ConfigError, match="vmap"):
        predict_proba(models, x, backend="vmap")
    # Same class, different shapes is not vmappable either.
    wide = [nn.Linear(6, 4), nn.Linear(6, 5)]
    assert not can_vmap(wide)


def test_choose_backend_auto() -> None:
    models = mlp_ensemble()
    assert choose_backend(models, CPU_VMAP_MAX_BATCH + 1, "auto") == "loop"
    assert choose_backend(models, 1, "auto") == ("vmap" if CPU_VMAP_MAX_BATCH >= 1 else "loop")
    assert choose_backend(models[:1], 1, "auto") == "loop"  # nothing to batch over
    assert choose_backend(models, 10_000, "vmap") == "vmap"
    assert choose_backend(models, 1, "loop") == "loop"


def test_empty_input_gives_empty_output() -> None:
    for backend in ("vmap", "loop"):
        out = predict_proba(mlp_ensemble(), torch.empty(0, 6), backend=backend)
        assert out.shape == (0, 4)


def test_errors() -> None:
    x = inputs((6,), 3)
    with pytest.raises(NotTrainedError):
        predict([], x)
    with pytest.raises(NotTrainedError):
        shard_logits([], x)
    with pytest.raises(NotTrainedError):
        predict_proba([], x, method="weighted", weights=[])
    with pytest.raises(NotTrainedError):
        combine(torch.empty(0, 3, 2))
    with pytest.raises(ConfigError, match="mean, vote, weighted"):
        predict(mlp_ensemble(), x, method="median")
    with pytest.raises(ValueError, match="mean, vote, weighted"):
        combine(torch.full((1, 3, 2), 0.5), "median")
    with pytest.raises(ConfigError, match="auto, vmap, loop"):
        predict(mlp_ensemble(), x, backend="gpu")
    with pytest.raises(ConfigError, match="batch_size"):
        predict(mlp_ensemble(), x, batch_size=0)
