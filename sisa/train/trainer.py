"""Pure-torch training of one shard, slice by slice, with a checkpoint after every stage.

No Ray and no store here: a runner ships a :class:`~sisa.train.jobs.ShardJob` in and gets
:class:`~sisa.train.jobs.StageResult` objects back (:mod:`sisa.train.jobs`); the checkpoint
bytes are :mod:`sisa.train.checkpoint`'s. Stage r trains on slices 1..r; every random
source is seeded from (seed, shard, stage) and the data order derives from the
sorted ids, so the same job always yields the same bytes (invariant 2). A job's
slices may be a lazy sequence: the trainer reads slice r only when stage r starts,
and each slice once, into one buffer on the training device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.errors import DomainMismatchError, GpuMemoryError, TrainingError
from sisa.partition.assign import splitmix64
from sisa.store.digests import (
    checkpoint_key,
    manifest_digest_of_words,
    packed_ids,
    recipe_digest,
    sha256,
    slice_digest,
    slices_digest,
    weights_digest,
)
from sisa.train import domain as domains
from sisa.train import gpu
from sisa.train.adapters import AdaptedModel, build_shard_model
from sisa.train.backbone import extract_features
from sisa.train.checkpoint import encode_checkpoint, load_checkpoint
from sisa.train.jobs import ShardJob, StageResult

__all__ = [
    "autocast",
    "derive_seed",
    "deterministic",
    "load_checkpoint",  # the codec's (sisa.train.checkpoint), here for the readers that load a stage's model
    "make_optimizer",
    "nondeterministic_op",
    "train_epochs",
    "train_shard",
]

log = logging.getLogger(__name__)

# torch's message when use_deterministic_algorithms(True) meets an op without a deterministic kernel:
# "<op> does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'..."
_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")


def derive_seed(seed: int, shard: int, stage: int) -> int:
    """A 63-bit seed that depends only on (seed, shard, stage).

    Args:
        seed: Root seed from the config.
        shard: Shard index.
        stage: Stage number (0 is model initialisation).

    Returns:
        A non-negative int usable by ``torch.manual_seed``.
    """
    mixed = splitmix64(np.asarray([seed, shard, stage], dtype=np.uint64))
    value = splitmix64(np.asarray(mixed[0] ^ splitmix64(mixed[1] ^ splitmix64(mixed[2]))))
    return int(value) >> 1


def make_optimizer(cfg: SisaConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The train section's optimizer over ``model``'s parameters.

    Args:
        cfg: Config whose ``train`` section names the optimizer and its settings.
        model: The model to optimise.
        lr: Learning rate to use instead of ``cfg.train.lr`` (the unlearning baselines
            keep the optimizer kind but tune their own rate).

    Returns:
        A fresh optimizer.
    """
    t = cfg.train
    rate = t.lr if lr is None else lr
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=rate, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=rate, weight_decay=t.weight_decay)


def _source_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, used only as the source of one copy.

    Arrays from Ray's object store are read-only views of shared memory; torch warns that
    it cannot protect them, but nothing here writes to them, and copying them first would
    double a slice's memory for nothing.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


class _ShardRows:
    """The rows of slices 1..r on the training device, filled one slice at a time.

    One buffer sized for the whole shard is allocated once and each slice is copied
    into it once: stage r trains on the prefix ``[:rows of slices 1..r]``, which holds
    exactly the concatenation of those slices. Concatenating per stage instead would
    copy the growing prefix R times (and re-upload it to a GPU every stage).
    """

    def __init__(self, job: ShardJob, device: torch.device, backbone: nn.Module | None = None) -> None:
        self.job = job
        self.device = device
        # Head adapters train on the frozen backbone's features: each slice is turned into them
        # once, when it is loaded, instead of passing through the backbone every epoch.
        self.backbone = backbone
        self.feature_seconds = 0.0  # spent in the feature pass: compute, counted in the stage that needed it
        self.sizes = job.sizes()
        if len(self.sizes) != len(job.slices):
            raise TrainingError(
                f"shard {job.shard}: job lists {len(self.sizes)} slice sizes for {len(job.slices)} slices"
            )
        self.ids: list[np.ndarray] = []
        # Each slice's ids packed and digested once: stage r's manifest and slices digest read slices 1..r.
        self.words: list[bytes] = []
        self.digests: list[bytes] = []
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.rows = 0

    def extend_to(self, stage: int) -> None:
        """Load slices ``len(self.ids) + 1 .. stage`` into the buffer."""
        while len(self.ids) < stage:
            index = len(self.ids)
            part = self.job.slices[index]
            if len(part.ids) != self.sizes[index]:
                raise TrainingError(
                    f"shard {self.job.shard} slice {index}: {len(part.ids)} rows arrived, {self.sizes[index]} expected"
                )
            n = len(part.ids)
            if n:
                x, y = _source_tensor(part.x), _source_tensor(part.y)
                if self.backbone is not None:
                    started = time.perf_counter()
                    x = extract_features(self.backbone, x.to(self.device))
                    self.feature_seconds += time.perf_counter() - started
                if self.x is None or self.y is None:
                    total = sum(self.sizes)
                    self.x = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=self.device)
                    self.y = torch.empty((total, *y.shape[1:]), dtype=y.dtype, device=self.device)
                self.x[self.rows : self.rows + n].copy_(x)
                self.y[self.rows : self.rows + n].copy_(y)
            self.ids.append(np.asarray(part.ids))
            self.words.append(packed_ids(self.ids[-1]))
            self.digests.append(slice_digest(self.words[-1]))
            self.rows += n

    def stage(self, stage: int) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
        """``(ids, x, y)`` of slices 1..stage; x and y are views (None when no row exists)."""
        ids = np.concatenate(self.ids[:stage])
        n = ids.size
        if self.x is None or self.y is None:
            return ids, None, None
        return ids, self.x[:n], self.y[:n]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The mixed-precision context of a forward pass under ``train.precision``.

    Args:
        device: Device the forward runs on.
        precision: ``fp32`` (no autocast) or ``bf16`` (``torch.autocast`` to bfloat16).

    Returns:
        A context manager to wrap the forward and loss in.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16'")


def nondeterministic_op(exc: BaseException) -> str | None:
    """The op named by torch's "does not have a deterministic implementation" error, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    match = _NONDETERMINISTIC.search(str(exc))
    return match.group(1) if match else None


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    precision: str = "fp32",
) -> None:
    """Minibatch cross-entropy descent over ``x`` for ``epochs`` epochs, in place.

    Args:
        model: Model to train.
        optimizer: Its optimizer.
        x: Features on the model's device.
        y: Labels on the model's device.
        order: Row order that sorts the rows by sample id; each epoch permutes this
            order with ``generator``, so batches depend on the ids, not on row layout.
        epochs: Passes over the data.
        batch_size: Rows per step.
        generator: Seeded CPU generator of the permutations.
        precision: ``fp32``, or ``bf16`` to run forward and loss under bfloat16
            autocast (gradients and optimizer steps stay fp32).
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]
    for _ in range(epochs):
        # The permutation comes from a generator seeded per stage and is applied to the
        # rows in sorted-id order, so the data order depends only on the ids.
        rows = order[torch.randperm(n, generator=generator).to(order.device)]
        for start in range(0, n, batch_size):
            idx = rows[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            with autocast(x.device, precision):
                loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()


@contextmanager
def deterministic(threads: int, device: torch.device) -> Iterator[None]:
    """Fix threads and deterministic kernels for a block, restoring the caller's settings after.

    Args:
        threads: Torch intra-op threads inside the block.
        device: Device the block computes on (CUDA needs extra switches).
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    # Thread count changes float summation order, so it is part of the recipe.
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            # cuBLAS's workspace (read once per process) and the math switches (TF32, reduced
            # precision, cuDNN) that a user's code may have flipped: pinned, restored after.
            gpu.ensure_cuda_env()
            stack.enter_context(gpu.pinned_math())
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1])


def train_shard(job: ShardJob) -> Iterator[StageResult]:
    """Train a shard's remaining stages, yielding each stage's checkpoint as it finishes.

    Args:
        job: What to train and from where.

    Yields:
        One :class:`StageResult` per stage ``job.start_stage + 1 .. len(job.slices)``.

    Raises:
        DomainMismatchError: If this process is not in ``job.domain`` (checked before any
            training: a stage chained onto a checkpoint of another domain, or a replay in
            one, would differ in the last bits without anything being wrong).
        TrainingError: If the parent checkpoint is missing, or the model calls an op that
            has no deterministic implementation on this device (never a silent fallback
            to nondeterministic kernels: the checkpoints would not be reproducible).
    """
    cfg = job.config
    device = torch.device(cfg.resources.device)
    if device.type != "cuda":
        yield from _train_shard(job, device, None)
        return
    gpu.require_cuda(cfg.resources.gpus_per_shard)
    gpu.ensure_cuda_env()
    # The share's cap holds while this shard trains and comes off after, also in a driver.
    with gpu.memory_cap(cfg.resources.gpus_per_shard) as cap:
        yield from _train_shard(job, torch.device("cuda", cap["device"]), cap)


def _train_shard(job: ShardJob, device: torch.device, cap: dict[str, Any] | None) -> Iterator[StageResult]:
    """:func:`train_shard` on ``device``, under the memory ``cap`` of a GPU share (None on the CPU)."""
    cfg = job.config
    here = domains.current(cfg.resources.threads_per_shard, device.type)
    if job.domain is not None and job.domain != here.id:
        raise DomainMismatchError(
            f"shard {job.shard}: this worker is in determinism domain {domains.describe(here)}, but the shard "
            f"needs domain {job.domain}; it refused to train (the bytes would differ). The worker's node changed "
            "its environment or software since it was probed: restart the job, or run `sisa domains` to see "
            "which nodes are in which domain"
        )
    frozen: nn.Module | None = None
    if job.backbone is not None:
        job.backbone.check()  # the bytes the recipe names, whatever carried them here
        frozen = job.backbone.module if device.type == "cpu" else copy.deepcopy(job.backbone.module).to(device)
    recipe = recipe_digest(cfg, job.backbone.digest if job.backbone is not None else None)
    epochs = cfg.train.stage_epochs(cfg.slices)

    torch.manual_seed(derive_seed(cfg.seed, job.shard, 0))
    with deterministic(cfg.resources.threads_per_shard, device):
        model = build_shard_model(cfg, job.input_shape, job.num_classes, frozen).to(device)
    optimizer = make_optimizer(cfg, model)
    parent_key = job.parent_key
    if job.start_stage > 0:
        if job.parent is None or parent_key is None:
            raise TrainingError(f"shard {job.shard}: resuming at stage {job.start_stage} needs its checkpoint")
        ckpt = load_checkpoint(job.parent)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])

    head_only = isinstance(model, AdaptedModel) and model.shared_backbone is not None
    rows = _ShardRows(job, device, frozen if head_only else None)
    # a head trains on the features computed once per slice
    trained: nn.Module = model.head if isinstance(model, AdaptedModel) and head_only else model
    run = _ShardRun(job, model, trained, optimizer, rows, recipe, epochs, here)
    for stage in range(job.start_stage + 1, len(job.slices) + 1):
        with deterministic(cfg.resources.threads_per_shard, device), _out_of_memory(job, stage, cap):
            before = rows.feature_seconds
            rows.extend_to(stage)  # slice r is read when stage r starts: a lazy job streams in
            result = _train_stage(run, stage, parent_key)
        if rows.feature_seconds > before:  # the feature pass of the slices this stage loaded is its compute too
            result = dataclasses.replace(result, seconds=result.seconds + rows.feature_seconds - before)
        if cap is not None:
            peak = int(torch.cuda.max_memory_allocated(cap["device"]))
            torch.cuda.reset_peak_memory_stats(cap["device"])
            result = dataclasses.replace(result, gpu={**cap, "peak_bytes": peak})
        yield result
        parent_key = result.key


@contextmanager
def _out_of_memory(job: ShardJob, stage: int, cap: dict[str, Any] | None) -> Iterator[None]:
    """Turn the GPU running out of memory in a stage into an error that says what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        res = job.config.resources
        resume = f"Committed stages are kept; the same command resumes from them. torch said: {exc}"
        if cap is None:  # not a share of ours: the model itself put work on a GPU
            raise GpuMemoryError(
                f"shard {job.shard} stage {stage}: the GPU ran out of memory (resources.gpus_per_shard="
                f"{res.gpus_per_shard}). Lower train.batch_size or the model's size (a recipe change: every shard "
                f"retrains). {resume}"
            ) from exc
        limit = cap["total_bytes"] * (cap["fraction"] or 1.0)
        raise GpuMemoryError(
            f"shard {job.shard} stage {stage}: the GPU ran out of memory within this shard's share "
            f"(resources.gpus_per_shard={res.gpus_per_shard}: {limit / 2**30:.2f} GiB of the "
            f"{cap['total_bytes'] / 2**30:.1f} GiB card for tensors, after about "
            f"{gpu.CUDA_CONTEXT_BYTES / 2**30:.1f} GiB for the CUDA context). Pack fewer shards per GPU (raise "
            f"resources.gpus_per_shard), or lower train.batch_size (a recipe change: every shard retrains). {resume}"
        ) from exc


@dataclass(frozen=True)
class _ShardRun:
    """What every stage of one :func:`train_shard` call shares: the job and the state it trains.

    Attributes:
        job: The shard job.
        model: The shard's model (its state is the checkpoint: the per-shard part).
        trained: What the rows are fed to: ``model`` itself, or its head when the rows are the
            frozen backbone's features.
        optimizer: ``model``'s optimizer, carried from stage to stage.
        rows: The shard's rows on the training device, filled slice by slice.
        recipe: The recipe digest every checkpoint key of the shard covers.
        epochs: Epochs of each stage.
        here: The determinism domain this process trains in.
    """

    job: ShardJob
    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    rows: _ShardRows
    recipe: str
    epochs: int
    here: domains.Domain


def _train_stage(run: _ShardRun, stage: int, parent_key: str | None) -> StageResult:
    """Train stage ``stage`` of ``run`` in place (after the checkpoint ``parent_key``) and encode its checkpoint."""
    job, model, rows, epochs, here = run.job, run.model, run.rows, run.epochs, run.here
    cfg = job.config
    device = torch.device(cfg.resources.device)
    started = time.perf_counter()
    seed = derive_seed(cfg.seed, job.shard, stage)
    torch.manual_seed(seed)  # dropout and any other use of the global RNG
    generator = torch.Generator().manual_seed(seed)
    ids, x, y = rows.stage(stage)
    if ids.size and x is not None and y is not None:
        # Rows stay in slice order; this order sorts them by id, and the epoch loop gathers
        # order[perm] batch by batch, so the data order depends only on the ids.
        order_t = torch.from_numpy(np.argsort(ids, kind="stable")).to(device)
        try:
            t = cfg.train
            train_epochs(
                run.trained, run.optimizer, x, y, order_t, epochs, t.batch_size, generator, precision=t.precision
            )
        except RuntimeError as exc:
            op = nondeterministic_op(exc)
            if op is None:
                raise
            cpu_hint = "" if device.type == "cpu" else ", or train on the CPU with resources.gpus_per_shard=0"
            raise TrainingError(
                f"shard {job.shard} stage {stage}: model {cfg.model.name!r} calls {op}, which has no deterministic "
                f"implementation on {device.type}, and SISA needs bit-identical retraining (it never falls back "
                f"to nondeterministic kernels). Fix: replace the layer that calls {op} (or choose another "
                f"model){cpu_hint}. torch said: {exc}"
            ) from exc
    manifest = manifest_digest_of_words(rows.words[:stage])
    key = checkpoint_key(run.recipe, job.shard, stage, manifest, parent_key, here.id)
    meta = {
        "shard": job.shard,
        "stage": stage,
        "key": key,
        "parent": parent_key or "",
        "manifest": manifest,
        "recipe": run.recipe,
        "n_samples": int(ids.size),
        "epochs": epochs,
        "torch": str(torch.__version__),
        "domain": here.id,
    }
    blob = encode_checkpoint(model, run.optimizer, meta)
    seconds = time.perf_counter() - started
    log.debug("shard %d stage %d: %d samples, %.2fs", job.shard, stage, ids.size, seconds)
    return StageResult(
        shard=job.shard,
        stage=stage,
        key=key,
        checkpoint=blob,
        sha256=sha256(blob),
        manifest=manifest,
        slices=slices_digest(rows.digests[:stage]),
        weights=weights_digest(model.state_dict()),
        parent=parent_key,
        n_samples=int(ids.size),
        epochs=epochs,
        seconds=seconds,
        domain=here.to_dict(),
    )
