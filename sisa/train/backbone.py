"""The shared frozen backbone: its network, its digest, its stored bytes, its features.

A backbone that never saw deletable data can be shared by every shard without breaking
exactness (a deletion retrains only each shard's head or adapters). Its identity is the
digest of its weights, which enters the recipe: another backbone gives other checkpoint
keys, so every per-shard checkpoint trained on the old one is stale. Its bytes are stored
once per store (weights only, loaded without executing pickled code); checkpoints hold
only the per-shard part. :func:`ensure_stored` keeps the stored one the one the config names.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.fields import config_to_dict
from sisa.config.settings import SisaConfig
from sisa.errors import IntegrityError, ModelError, NotTrainedError
from sisa.store.database import Store
from sisa.store.digests import manifest_digest, sha256, weights_digest
from sisa.store.erasure import erase
from sisa.store.layout import BACKBONE_PREFIX
from sisa.train.models import feature_network

__all__ = [
    "BACKBONE_FORMAT",
    "FEATURE_CHUNK",
    "Backbone",
    "CoreTrainer",
    "build_network",
    "core_source_key",
    "decode",
    "encode",
    "ensure_stored",
    "extract_features",
    "feature_width",
    "freeze",
    "load_pretrained",
    "load_stored",
]

log = logging.getLogger(__name__)

BACKBONE_FORMAT = 1

# Rows per forward when a slice's features are computed: fixed, and counted from the slice's
# first row, so a slice's features depend only on that slice (the same bytes at every retrain).
FEATURE_CHUNK = 512


@dataclass(frozen=True)
class Backbone:
    """A frozen backbone, as shared by every shard of an ensemble.

    Attributes:
        module: The network, in eval mode, every parameter frozen, on the CPU.
        digest: :func:`~sisa.store.digests.weights_digest` of its state: part of the recipe.
        info: Where it came from (``source``, ``name``, core-set size, training seconds, ...).
    """

    module: nn.Module
    digest: str
    info: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise IntegrityError unless the module's weights still hash to :attr:`digest`."""
        if weights_digest(self.module.state_dict()) != self.digest:
            raise IntegrityError(
                f"the shared backbone's weights do not match its digest {self.digest[:16]}...: "
                "it was modified after it was stored"
            )


def freeze(module: nn.Module, info: dict[str, Any]) -> Backbone:
    """Freeze ``module`` in place (eval mode, no gradients, CPU) and wrap it with its digest."""
    module = module.to("cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return Backbone(module, weights_digest(module.state_dict()), dict(info))


def build_network(cfg: SisaConfig, input_shape: Sequence[int]) -> nn.Module:
    """The backbone's network as ``cfg.backbone`` names it (fresh weights, or the callable's)."""
    b = cfg.backbone
    if b.name is None:  # pragma: no cover - the config refuses it
        raise ModelError("backbone.name is not set")
    return feature_network(b.name, input_shape, b.hidden, b.channels, b.options)


def load_pretrained(cfg: SisaConfig, input_shape: Sequence[int]) -> Backbone:
    """Call ``backbone.name`` (``source: pretrained``) and freeze what it returns.

    The callable loads the user's weights (a local file, say); sisa stores those bytes,
    so the shards' workers and later predictions never need the file.
    """
    started = time.perf_counter()
    module = build_network(cfg, input_shape)
    info = {"source": "pretrained", "name": cfg.backbone.name, "seconds": round(time.perf_counter() - started, 4)}
    return freeze(module, info)


def encode(backbone: Backbone) -> bytes:
    """The bytes stored for a backbone: its weights and info (no code)."""
    state = {
        "format": BACKBONE_FORMAT,
        "state": {k: v.detach().to("cpu") for k, v in backbone.module.state_dict().items()},
        "digest": backbone.digest,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def decode(blob: bytes, module: nn.Module, digest: str) -> Backbone:
    """Load stored backbone bytes into ``module`` (the network built from the config).

    Args:
        blob: Bytes from :func:`encode`.
        module: The backbone's architecture, built by :func:`build_network`.
        digest: The digest recorded in the store.

    Returns:
        The frozen backbone.

    Raises:
        IntegrityError: If the bytes are not a backbone, do not fit the network (the config's
            backbone changed since they were stored), or do not hash to ``digest``.
    """
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"the stored backbone cannot be decoded safely: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != BACKBONE_FORMAT or state.get("digest") != digest:
        raise IntegrityError("the stored backbone has an unknown format or another digest than its record")
    try:
        module.load_state_dict(state["state"])
    except RuntimeError as exc:
        raise IntegrityError(
            f"the stored backbone does not fit the network backbone.name builds now ({exc}); the config's "
            "backbone changed since it was stored: run `sisa train` (fit) to store the new one and retrain"
        ) from exc
    backbone = freeze(module, {})
    if backbone.digest != digest:
        raise IntegrityError(f"the stored backbone's weights do not hash to their recorded digest {digest[:16]}...")
    return backbone


def extract_features(module: nn.Module, x: torch.Tensor, chunk: int = FEATURE_CHUNK) -> torch.Tensor:
    """The backbone's features of ``x``, flattened to ``(n, width)``, ``chunk`` rows per forward.

    Chunks are counted from ``x``'s first row, so the result depends only on ``x``.
    """
    with torch.no_grad():
        parts = [module(x[i : i + chunk]).flatten(1) for i in range(0, x.shape[0], chunk)]
    if not parts:
        width = feature_width(module, tuple(x.shape[1:]), x.device)
        return torch.empty((0, width), dtype=torch.float32, device=x.device)
    return torch.cat(parts)


def feature_width(module: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> int:
    """Width of the backbone's flattened features for samples of ``input_shape``.

    Raises:
        ModelError: If the network cannot run on such samples.
    """
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *input_shape), device=device))
    except Exception as exc:  # the user's network: say which shape it was given
        raise ModelError(
            f"the backbone fails on samples of shape {tuple(input_shape)} ({type(exc).__name__}: {exc}); "
            "check backbone.name against the data"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != 1:
        raise ModelError("the backbone must return one tensor of features per sample, shape (n, ...)")
    return int(out[0].numel())


def load_stored(store: Store, cfg: SisaConfig, txn: Any, cached: Backbone | None = None) -> Backbone | None:
    """The store's backbone, loaded into the network ``cfg`` builds and checked (None when ``cfg`` shares none).

    Args:
        store: The store.
        cfg: Its config.
        txn: A read transaction of the store.
        cached: A backbone loaded before; returned as is when its digest is still the stored one.

    Raises:
        NotTrainedError: If the config has a backbone and the store none yet (fit stores it).
        IntegrityError: If its bytes were altered or no longer fit ``backbone.name``'s network.
    """
    if not cfg.backbone.enabled:
        return None
    meta = store.meta(txn)
    record = meta.get("backbone")
    if record is None:
        raise NotTrainedError(f"store {store.path} has no backbone yet; run fit (sisa train) first")
    if cached is not None and cached.digest == record["digest"]:
        return cached
    got = store.backbone_bytes(txn)
    if got is None:  # pragma: no cover - the record was just read in this transaction
        raise NotTrainedError(f"store {store.path} has no backbone yet; run fit (sisa train) first")
    loaded = decode(got[1], build_network(cfg, tuple(meta["feature_shape"])), record["digest"])
    return Backbone(loaded.module, loaded.digest, dict(record))


def core_source_key(cfg: SisaConfig, core_ids: np.ndarray) -> str:
    """Digest of everything the core-trained backbone's bytes depend on: config, recipe, core ids."""
    train = config_to_dict(cfg.train)
    train.pop("epochs")  # backbone.epochs counts for the core training
    train.pop("epoch_schedule")
    parts = {
        "backbone": config_to_dict(cfg.backbone),
        "train": train,
        "seed": cfg.seed,
        "threads": cfg.resources.threads_per_shard,
        "core": manifest_digest([np.sort(np.asarray(core_ids, dtype=np.int64))]),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Trains a backbone on the core set: sisa.train.core.train_core_in_domain, passed in by the caller, since
# it needs the trainer, which needs this module.
CoreTrainer = Callable[[SisaConfig, np.ndarray, np.ndarray, np.ndarray, Sequence[int], int], Backbone]


def ensure_stored(store: Store, cfg: SisaConfig, cached: Backbone | None, train_core: CoreTrainer) -> Backbone:
    """Make the stored backbone the one ``cfg`` names now, storing a new one if it changed.

    ``pretrained``: the callable is called and its weights hashed; other weights replace
    the stored ones. ``core``: a backbone whose source key (config, recipe, core ids)
    differs is retrained on the core set. Either way the new digest changes the recipe,
    so every per-shard checkpoint of the old backbone is stale and retrains.

    Args:
        store: A writable store holding samples.
        cfg: Its config; it shares a backbone (``backbone.source`` other than none).
        cached: A backbone loaded before (see :func:`load_stored`).
        train_core: :func:`sisa.train.core.train_core_in_domain`.

    Returns:
        The backbone now stored.
    """
    with store.read() as txn:
        meta = store.meta(txn)
        shape = tuple(meta["feature_shape"])
        record = meta.get("backbone")
        core = store.core_ids(txn) if cfg.backbone.source == "core" else None
    if core is not None:
        key = core_source_key(cfg, core)
        if record is not None and record.get("source_key") == key:
            with store.read() as txn:
                return typing.cast(Backbone, load_stored(store, cfg, txn, cached))
        with store.read() as txn:
            x, y = store.load_samples(txn, core, shape, "the core set")
        fresh = train_core(cfg, core, x, y, shape, cfg.data.num_classes)
    else:
        fresh = load_pretrained(cfg, shape)
        if record is not None and record["digest"] == fresh.digest:
            with store.read() as txn:
                return typing.cast(Backbone, load_stored(store, cfg, txn, cached))
    blob = encode(fresh)
    new: dict[str, Any] = {"key": BACKBONE_PREFIX + fresh.digest, "sha256": sha256(blob), "digest": fresh.digest}
    new.update(bytes=len(blob), **fresh.info)
    sealed = store.seal_checkpoint(blob, new["key"])  # its key is committed first
    store.write(lambda txn: store.put_backbone(txn, new, sealed))
    # The replaced backbone's bytes stay in free pages until reused: destroying their key now (and
    # compacting the key file) makes them unreadable at once, not at the next deletion's sweep.
    erase(store, [])
    log.info("stored a new %s backbone %s... (%d bytes)", cfg.backbone.source, fresh.digest[:16], len(blob))
    return Backbone(fresh.module, fresh.digest, new)
