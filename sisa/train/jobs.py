"""What the trainer takes and gives: a shard job (its slices, maybe lazy) and the result of each stage.

Runners (in this process, pinned local processes, Ray tasks) carry a :class:`ShardJob` to
:func:`sisa.train.trainer.train_shard` and each :class:`StageResult` back to the driver, which
commits it; neither holds anything a process cannot pickle.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.train.backbone import Backbone

__all__ = ["LazySlices", "ShardJob", "SliceData", "StageResult"]


@dataclass(frozen=True)
class SliceData:
    """One slice of a shard: its sorted ids, features and labels."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray


class LazySlices(Sequence[SliceData]):
    """A shard's slices, each loaded only when indexed; subclasses say from where.

    The driver's side reads the store (:class:`~sisa.train.slices.StoredSlices`), a
    task's side Ray's object store (:class:`~sisa.train.ray_runner.RemoteSlices`).
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> SliceData:
        """Load slice ``index`` (``0 <= index < len(self)``)."""

    @overload
    def __getitem__(self, index: int) -> SliceData: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[SliceData, ...]: ...

    def __getitem__(self, index: int | slice) -> SliceData | tuple[SliceData, ...]:
        if isinstance(index, slice):
            return tuple(self.load(i) for i in range(*index.indices(len(self))))
        return self.load(range(len(self))[index])  # normalises negatives, raises IndexError


@dataclass(frozen=True)
class ShardJob:
    """Everything needed to (re)train one shard from a given stage onwards.

    Attributes:
        config: The ensemble's config (recipe, seed, resources).
        shard: Shard index.
        slices: The shard's slices in order; stage r trains on ``slices[:r]``. A
            tuple, or a lazy sequence that loads a slice when it is indexed (from
            the store in the driver, from Ray's object store in a task); the
            trainer indexes each slice once, slice r when stage r starts.
        start_stage: Number of stages already done; training starts at stage
            ``start_stage + 1``.
        parent: Bytes of the stage ``start_stage`` checkpoint, or ``None`` when
            ``start_stage == 0``.
        parent_key: Key of that checkpoint.
        input_shape: Shape of one sample.
        num_classes: Number of classes.
        slice_sizes: Rows of each slice, so that a lazy ``slices`` need not be
            loaded to size the training buffer; empty means "ask ``slices``".
        domain: Id of the determinism domain the job must run in (that of its parent
            checkpoint, or of the live model a replay is compared with); a worker in
            another domain refuses. ``None``: any domain (training from scratch).
        backbone: The shared frozen backbone (``backbone.source`` other than none); its
            digest is part of the recipe, so of every checkpoint key.
        backbone_ref: Where the orchestrator put the backbone instead (a Ray object ref,
            put once for all of a fit's tasks); the task resolves it into ``backbone``.
    """

    config: SisaConfig
    shard: int
    slices: Sequence[SliceData]
    start_stage: int
    parent: bytes | None
    parent_key: str | None
    input_shape: tuple[int, ...]
    num_classes: int
    slice_sizes: tuple[int, ...] = field(default=())
    domain: str | None = None
    backbone: Backbone | None = None
    backbone_ref: Any = None

    def sizes(self) -> tuple[int, ...]:
        """Rows of each slice (from ``slice_sizes``, else by loading ``slices``)."""
        if self.slice_sizes:
            return self.slice_sizes
        return tuple(len(s.ids) for s in self.slices)


@dataclass(frozen=True)
class StageResult:
    """A finished stage: the checkpoint bytes and what they are provably made of."""

    shard: int
    stage: int
    key: str
    checkpoint: bytes
    sha256: str
    manifest: str
    weights: str
    parent: str | None
    n_samples: int
    epochs: int
    seconds: float
    domain: dict[str, Any] = field(default_factory=dict)
    # On a GPU: ``device`` (index), ``total_bytes``, ``fraction`` (the allocator cap, None when
    # uncapped) and ``peak_bytes`` (the most the stage's tensors held); empty on the CPU.
    gpu: dict[str, Any] = field(default_factory=dict)
    # :func:`~sisa.store.digests.slices_digest` of its slices: what the commitment cache is compared with.
    slices: str = ""

    def __repr__(self) -> str:
        # Not the checkpoint: its bytes (hundreds of KB) would flood a log or a progress callback.
        return (
            f"StageResult(shard={self.shard}, stage={self.stage}, key={self.key[:16]}..., "
            f"n_samples={self.n_samples}, seconds={self.seconds:.3f}, domain={self.domain.get('id')})"
        )
