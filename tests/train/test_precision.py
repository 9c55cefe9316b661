"""bf16 autocast (train.precision) and ops without a deterministic implementation (issue 6, GPUs).

Both run on the CPU: bf16 autocast exists there too, and ``Tensor.put_`` (accumulate=False)
is an op that torch refuses under ``use_deterministic_algorithms(True)`` on the CPU as well,
so the determinism error below is torch's own, not a simulation. On CUDA more ops raise
(the backward of MaxPool3d, AdaptiveMaxPool2d, interpolate, ...; histc, bincount); the trainer
handles them the same way, by torch's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from sisa.config.settings import TrainConfig
from sisa.errors import ConfigError, TrainingError
from sisa.store.digests import recipe, recipe_digest
from sisa.train import orchestrator
from sisa.train.checkpoint import load_checkpoint
from sisa.train.trainer import nondeterministic_op, train_epochs, train_shard
from tests.conftest import small_config
from tests.train.test_trainer import make_job


class _PutLogits(nn.Module):
    """A linear model that writes one logit back with ``Tensor.put_``: no deterministic kernel."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        index = torch.zeros(1, dtype=torch.long)
        return out.clone().put_(index, out.take(index))


class _Raises(nn.Module):
    """A model whose forward raises an unrelated RuntimeError."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (this is not about determinism)")


def put_model(input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """``model.name=tests.train.test_precision:put_model``."""
    return _PutLogits(int(torch.Size(input_shape).numel()), num_classes)


def raising_model(input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """``model.name=tests.train.test_precision:raising_model``."""
    return _Raises(int(torch.Size(input_shape).numel()), num_classes)


# ----------------------------------------------------------------------------- precision
def test_precision_is_validated_and_defaults_to_fp32() -> None:
    assert TrainConfig().precision == "fp32"
    assert small_config("train.precision=bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        small_config("train.precision=fp16")


def test_precision_is_part_of_the_recipe_and_fp32_keeps_old_digests() -> None:
    fp32, bf16 = small_config(), small_config("train.precision=bf16")
    assert recipe_digest(fp32) != recipe_digest(bf16)
    assert recipe(bf16)["train"]["precision"] == "bf16"
    # The default is omitted, so stores trained before the key existed keep their checkpoint keys.
    assert "precision" not in recipe(fp32)["train"]
    assert recipe_digest(small_config("train.precision=fp32")) == recipe_digest(fp32)


@pytest.mark.kernels
def test_bf16_and_fp32_differ_and_each_is_bit_reproducible() -> None:
    fp32 = [list(train_shard(make_job())) for _ in range(2)]
    bf16 = [list(train_shard(make_job(small_config("train.precision=bf16")))) for _ in range(2)]
    for runs in (fp32, bf16):
        assert [r.checkpoint for r in runs[0]] == [r.checkpoint for r in runs[1]]
    assert fp32[0][-1].weights != bf16[0][-1].weights
    assert fp32[0][-1].key != bf16[0][-1].key
    # Weights stay fp32 under autocast; only the forward's matmuls ran in bfloat16.
    model = load_checkpoint(bf16[0][-1].checkpoint)["model"]
    assert all(t.dtype == torch.float32 for t in model.values())


def test_train_epochs_keeps_its_positional_signature() -> None:
    # sisa/approximate.py calls it positionally; precision is keyword-only with an fp32 default.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    train_epochs(model, opt, x, y, torch.arange(16), 1, 8, torch.Generator().manual_seed(0))
    train_epochs(model, opt, x, y, torch.arange(16), 1, 8, torch.Generator().manual_seed(0), precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        train_epochs(model, opt, x, y, torch.arange(16), 1, 8, torch.Generator(), precision="fp8")


# ----------------------------------------------------------------------------- determinism errors
def test_op_without_deterministic_implementation_raises_training_error() -> None:
    job = make_job(small_config("model.name=tests.train.test_precision:put_model"))
    with pytest.raises(TrainingError) as err:
        list(train_shard(job))
    message = str(err.value)
    assert "put_" in message and "no deterministic implementation on cpu" in message
    assert "replace the layer" in message and "choose another model" in message
    assert isinstance(err.value.__cause__, RuntimeError)
    # Never a silent fallback: the caller's determinism switch is restored, nothing was yielded.
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_error_travels_through_the_orchestrator_as_training_error() -> None:
    job = make_job(small_config("model.name=tests.train.test_precision:put_model"))
    with pytest.raises(TrainingError, match="put_"):
        orchestrator.execute(orchestrator.LOCAL, [job], lambda _: None)


def test_other_runtime_errors_are_not_labelled_as_determinism() -> None:
    job = make_job(small_config("model.name=tests.train.test_precision:raising_model"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as err:
        list(train_shard(job))
    assert not isinstance(err.value, TrainingError)


def test_nondeterministic_op_parses_torchs_cuda_message() -> None:
    cuda = RuntimeError(
        "max_pool3d_with_indices_backward_cuda does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, ..."
    )
    assert nondeterministic_op(cuda) == "max_pool3d_with_indices_backward_cuda"
    assert nondeterministic_op(RuntimeError("CUDA out of memory")) is None
    assert nondeterministic_op(ValueError("x does not have a deterministic implementation")) is None
