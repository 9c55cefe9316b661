"""One model on all of its data, trained with the ensemble's own recipe: the retraining baseline.

The unlearning harness compares every method with this model retrained without the forget
set. Training goes through :func:`sisa.train.trainer.train_shard` with one shard and one slice,
so architecture, optimizer, batch size, epochs and determinism are exactly those of a
SISA shard; only the data (all of it) and the seed differ.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.data.inputs import model_inputs
from sisa.serve.aggregate import shard_probas
from sisa.train.checkpoint import load_checkpoint
from sisa.train.jobs import ShardJob, SliceData
from sisa.train.models import build_model
from sisa.train.trainer import train_shard

__all__ = ["monolithic_config", "predict_proba", "single_stage_job", "train_monolithic", "usable_threads"]


def usable_threads(requested: int = 0) -> int:
    """Threads to use: ``requested``, or every core this process may run on when 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def monolithic_config(cfg: SisaConfig, *, seed: int, threads: int) -> SisaConfig:
    """The recipe of a single model standing in for the whole ensemble.

    One shard of one slice: the recalibrated epoch schedule then gives exactly
    ``train.epochs`` epochs, the budget of a conventionally trained model.

    Args:
        cfg: The ensemble's config.
        seed: Seed of initialisation and data order.
        threads: Torch threads (part of the recipe: they change float summation order).

    Returns:
        The derived config.
    """
    resources = dataclasses.replace(cfg.resources, threads_per_shard=threads)
    return dataclasses.replace(cfg, seed=seed, shards=1, slices=1, resources=resources)


def single_stage_job(cfg: SisaConfig, data: LabeledArrays) -> ShardJob:
    """A job that trains all of ``data`` as shard 0's one and only stage, from scratch.

    Args:
        cfg: The recipe (normally from :func:`monolithic_config`).
        data: Training samples.

    Returns:
        The job for :func:`sisa.train.trainer.train_shard`.
    """
    return ShardJob(
        config=cfg,
        shard=0,
        slices=(SliceData(data.ids, model_inputs(data.x, data.scale), data.y),),  # raw values: as a store gives them
        start_stage=0,
        parent=None,
        parent_key=None,
        input_shape=data.feature_shape,
        num_classes=cfg.data.num_classes,
    )


def train_monolithic(cfg: SisaConfig, data: LabeledArrays, *, seed: int, threads: int = 0) -> tuple[nn.Module, float]:
    """Train one model on ``data`` in this process.

    Args:
        cfg: The ensemble's config (model and train sections are used).
        data: Training samples.
        seed: Seed; the same seed and data give bit-identical weights.
        threads: Torch threads (0 = every usable core).

    Returns:
        ``(model in eval mode, wall seconds of training)``.
    """
    mono = monolithic_config(cfg, seed=seed, threads=usable_threads(threads))
    job = single_stage_job(mono, data)
    started = time.perf_counter()
    *_, last = train_shard(job)
    seconds = time.perf_counter() - started
    model = build_model(cfg.model, data.feature_shape, cfg.data.num_classes)
    model.load_state_dict(load_checkpoint(last.checkpoint)["model"])
    return model.to(torch.device(mono.resources.device)).eval(), seconds


def predict_proba(model: nn.Module, x: np.ndarray, *, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities of one model, as float64 numpy.

    Args:
        model: A classifier returning logits.
        x: Features ``(n, ...)``.
        batch_size: Rows per forward.

    Returns:
        ``(n, classes)`` probabilities.
    """
    device = next(model.parameters()).device
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return shard_probas([model], xt, backend="loop", batch_size=batch_size)[0].double().cpu().numpy()
