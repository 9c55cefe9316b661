"""A model for the GPU tests that runs out of "GPU memory" when a batch holds a marked sample.

Used as ``model.name=tests.train.oom_model:build``: the shard holding the marked sample fails
with ``torch.cuda.OutOfMemoryError`` at the stage that first trains on it (on the CPU too,
which is where the tests run), and every other shard trains normally.
"""

from __future__ import annotations

import torch
from torch import nn

MARK = 1.0e6  # the value of the marked sample's first feature


class _OutOfMemoryOnMark(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.reshape(len(x), -1)[:, 0] == MARK).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.inner(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An MLP that raises ``torch.cuda.OutOfMemoryError`` on a batch holding a marked sample."""
    inner = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))
    return _OutOfMemoryOnMark(inner)
