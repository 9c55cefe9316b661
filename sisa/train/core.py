"""Training the shared backbone once on the core set: samples declared at ingest, never deletable.

The backbone network (``backbone.name``) gets a temporary linear classifier and trains
with the ``train`` section's optimizer, learning rate and batch size for
``backbone.epochs`` epochs on every core sample, in sorted-id order, seeded from the
ensemble's seed alone; then the classifier is dropped and the network frozen. It trains in the
shards' pinned CPU domain (:func:`train_core_in_domain`), so its bytes do not depend on how the
driving process was started: a Python-API fit and a ``sisa train`` of the same data and config
store the same backbone, hence the same shard models. Its
*source key* (config, recipe, core ids) says when a stored backbone is still the one this
config would train, so a fit retrains it only when one of those changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.errors import DataError
from sisa.train import local_runner
from sisa.train.backbone import Backbone, build_network, core_source_key, feature_width, freeze
from sisa.train.trainer import derive_seed, deterministic, make_optimizer, train_epochs

__all__ = ["CORE_STREAM", "train_core", "train_core_in_domain", "train_core_weights"]

log = logging.getLogger(__name__)

# The "shard" number the core training's seeds derive from: beyond any real shard (at most 4096).
CORE_STREAM = 1 << 20


def train_core(
    cfg: SisaConfig, ids: np.ndarray, x: np.ndarray, y: np.ndarray, input_shape: Sequence[int], num_classes: int
) -> Backbone:
    """Train the backbone on the core set, in this process, deterministically.

    Args:
        cfg: The ensemble's config (``backbone`` and ``train`` sections, seed, threads).
        ids: The core samples' ids.
        x: Their features (model inputs, float32).
        y: Their labels.
        input_shape: Shape of one sample.
        num_classes: Number of classes.

    Returns:
        The frozen backbone; its info holds the source key, the core size and the seconds taken.

    Raises:
        DataError: If the core set is empty.
    """
    if len(ids) == 0:
        raise DataError(
            "backbone.source: core needs a core set, and the store has none: declare core ids at ingest "
            "(Ensemble.ingest(..., core=ids) or `sisa train --core-ids FILE`)"
        )
    started = time.perf_counter()
    device = torch.device("cpu")
    with deterministic(cfg.resources.threads_per_shard, device):
        torch.manual_seed(derive_seed(cfg.seed, CORE_STREAM, 0))
        network = build_network(cfg, input_shape)
        classifier = nn.Linear(feature_width(network, input_shape), num_classes)
        model = nn.Sequential(network, nn.Flatten(), classifier)
        optimizer = make_optimizer(cfg, model)
        seed = derive_seed(cfg.seed, CORE_STREAM, 1)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        order = torch.from_numpy(np.argsort(ids, kind="stable"))
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
        t = cfg.train
        train_epochs(
            model, optimizer, xt, yt, order, cfg.backbone.epochs, t.batch_size, generator, precision=t.precision
        )
    seconds = time.perf_counter() - started
    log.info("trained the backbone on %d core samples in %.1fs", len(ids), seconds)
    info = {
        "source": "core",
        "name": cfg.backbone.name,
        "source_key": core_source_key(cfg, ids),
        "core": len(ids),
        "seconds": round(seconds, 4),
    }
    return freeze(network, info)


def train_core_in_domain(
    cfg: SisaConfig, ids: np.ndarray, x: np.ndarray, y: np.ndarray, input_shape: Sequence[int], num_classes: int
) -> Backbone:
    """:func:`train_core` in the shards' CPU determinism domain (:func:`sisa.train.local_runner.cpu_domain`).

    Here if this process started pinned, else in the pinned child that ``--address local`` trains in.

    The kernels a process runs depend on how it was started (``ATEN_CPU_CAPABILITY``, MKL's and
    oneDNN's pins), and a backbone trained under other kernels differs in its last bits, and so does
    every head trained on its features. Training it where the shards' stages train makes it a function
    of the data and the config alone, like them. Same arguments and result as :func:`train_core`; the
    info also names the domain (``domain``: its id).
    """
    runner = local_runner.cpu_domain(cfg)
    if runner.in_process:
        backbone = train_core(cfg, ids, x, y, input_shape, num_classes)
    else:
        state, info = runner.call(__name__, "train_core_weights", cfg, ids, x, y, tuple(input_shape), num_classes)
        network = build_network(cfg, input_shape)
        network.load_state_dict(state)
        backbone = freeze(network, info)
    backbone.info["domain"] = runner.domain.id
    return backbone


def train_core_weights(
    cfg: SisaConfig, ids: np.ndarray, x: np.ndarray, y: np.ndarray, input_shape: Sequence[int], num_classes: int
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """:func:`train_core`'s weights and info, for the pinned child of :func:`train_core_in_domain` to send back."""
    backbone = train_core(cfg, ids, x, y, input_shape, num_classes)
    return {k: v.detach().cpu() for k, v in backbone.module.state_dict().items()}, backbone.info
