"""Content digests: the recipe, training manifests, weights, the content address of a checkpoint, keyed id hashes.

These are what make a checkpoint's provenance checkable: its key is a hash of the
recipe (:func:`recipe`: the settings that decide a shard's bits), the shard, the stage,
exactly the ids it trained on (slice by slice), its parent checkpoint and the determinism
domain it was trained in, so a checkpoint that saw a deleted id can never be mistaken for one
that did not (invariant 3 of the design).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sisa.config.fields import config_to_dict
from sisa.config.rules import require
from sisa.config.settings import ModelConfig, SisaConfig

ID_LABEL = b"sisa-id|"  # what a keyed id hash prefixes to the id (commitments compute it in bulk)

__all__ = [
    "ID_LABEL",
    "Basis",
    "checkpoint_key",
    "keyed_hash",
    "manifest_digest",
    "manifest_digest_of_words",
    "recipe",
    "recipe_digest",
    "packed_ids",
    "sha256",
    "slice_digest",
    "slices_digest",
    "weights_digest",
]


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def recipe(config: SisaConfig, backbone: str | None = None) -> dict[str, Any]:
    """The settings that determine a shard's weights, bit for bit (the fields of role ``recipe``).

    Keys added after stores existed are left out at their old value (``train.precision: fp32``,
    ``resources.cpu_isa: native``, a model without an adapter), so those stores keep their
    checkpoint keys.

    Args:
        config: The ensemble's config.
        backbone: Digest of the shared backbone's weights (``backbone.source`` other than
            none); it enters the recipe, so a changed backbone changes every checkpoint key.

    Returns:
        A JSON-able dict; its digest is part of every checkpoint key, so a
        checkpoint is never reused under another recipe.

    Raises:
        ConfigError: If the config has a backbone and no digest is given (or the reverse).
    """
    require(
        (backbone is not None) == config.backbone.enabled,
        "a recipe with a shared backbone needs the backbone's digest (and one without takes none)",
    )
    train = config_to_dict(config.train)
    if train["precision"] == "fp32":
        # The default is left out, so recipes (and checkpoint keys) from before the key existed still match.
        del train["precision"]
    out = {
        "seed": config.seed,
        "model": _model_recipe(config.model),
        "train": train,
        "threads": config.resources.threads_per_shard,
        "device": config.resources.device,
    }
    if config.resources.cpu_isa != "native":
        # Stores from before the key existed trained natively; leaving native out keeps their keys.
        out["cpu_isa"] = config.resources.cpu_isa
    if backbone is not None:
        out["backbone"] = {**config_to_dict(config.backbone), "digest": backbone}
    return out


def _model_recipe(model: ModelConfig) -> dict[str, Any]:
    """The model section as it enters the recipe: the adapter keys only when an adapter is set.

    Leaving them out of a plain model's recipe keeps the checkpoint keys of stores from
    before adapters existed.
    """
    out = config_to_dict(model)
    if model.adapter == "none":
        for name in ("adapter", "rank", "alpha", "targets"):
            del out[name]
    elif model.adapter == "head":
        for name in ("rank", "alpha", "targets"):
            del out[name]  # a head has no LoRA: these cannot change its bytes
    return out


def recipe_digest(config: SisaConfig, backbone: str | None = None) -> str:
    """Hex SHA-256 of the canonical JSON of :func:`recipe` (``backbone``: the backbone's digest)."""
    blob = json.dumps(recipe(config, backbone), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def packed_ids(ids: np.ndarray) -> bytes:
    """Sorted ids as 8-byte big-endian words: the bytes manifests, slice digests and commitments hash."""
    return np.ascontiguousarray(np.asarray(ids, dtype=">i8")).tobytes()


def manifest_digest(slice_ids: Sequence[np.ndarray]) -> str:
    """Digest of the exact training set of a stage, slice by slice.

    Args:
        slice_ids: For each slice 1..r of the stage, its sorted int64 ids.

    Returns:
        Hex SHA-256 that changes when any id is added, removed or moved between slices.
    """
    return manifest_digest_of_words([packed_ids(ids) for ids in slice_ids])


def manifest_digest_of_words(words: Sequence[bytes]) -> str:
    """:func:`manifest_digest` of slices already packed as 8-byte big-endian ids (what a cache keeps).

    Args:
        words: For each slice, its sorted ids as 8-byte big-endian words.

    Returns:
        The same hex digest as :func:`manifest_digest` of those ids.
    """
    h = hashlib.sha256(b"sisa-manifest-v1")
    for j, packed in enumerate(words):
        # Lengths are hashed too, so slice boundaries are unambiguous.
        h.update(struct.pack(">II", j, len(packed) // 8))
        h.update(packed)
    return h.hexdigest()


def slice_digest(words: bytes) -> bytes:
    """SHA-256 of one slice's ids, packed by :func:`packed_ids` (the commitment cache keeps one per slice)."""
    return hashlib.sha256(words).digest()


def slices_digest(digests: Sequence[bytes]) -> str:
    """A stage's training set named by its slices' :func:`slice_digest` values, in slice order.

    It names the same ids as :func:`manifest_digest` (which keys checkpoints and cannot change), but is
    composed slice by slice: the commitment cache, which keeps each slice's digest, rehashes only the
    slice a deletion changed to name what it holds, rather than every id of the shard, and publishing a
    retrained model compares this with the digest its trainer recorded.

    Args:
        digests: Each slice's 32-byte digest, slices 1..r in order.

    Returns:
        Hex SHA-256 (32-byte inputs need no length prefix: the slice boundaries are fixed).
    """
    h = hashlib.sha256(b"sisa-slices-v1")
    for d in digests:
        h.update(d)
    return h.hexdigest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a model's parameters and buffers, bit for bit.

    Args:
        state: A ``state_dict``.

    Returns:
        Hex SHA-256 over names, dtypes, shapes and raw bytes, in sorted name order.
    """
    h = hashlib.sha256(b"sisa-weights-v1")
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Reinterpret as bytes so every dtype (bf16 included) hashes its exact bits.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_key(
    recipe_digest: str, shard: int, stage: int, manifest: str, parent: str | None, domain: str | None = None
) -> str:
    """Content address of a stage checkpoint.

    Args:
        recipe_digest: Digest of the training recipe (model, optimiser, seed, threads, device).
        shard: Shard index.
        stage: Stage number r (1-based): the checkpoint after training on slices 1..r.
        manifest: :func:`manifest_digest` of slices 1..r.
        parent: Key of the stage r-1 checkpoint it resumed from, or ``None`` at stage 1.
        domain: Id of the determinism domain it was trained in (:class:`~sisa.train.domain.Domain`);
            ``None`` only for stages recorded before domains were.

    Returns:
        Hex SHA-256 key.
    """
    text = f"sisa-ckpt-v1|{recipe_digest}|{shard}|{stage}|{manifest}|{parent or '-'}"
    if domain is not None:
        # The same recipe and data in another domain give other bytes, so another address: a
        # checkpoint retrained elsewhere never passes for the one it replaces.
        text += f"|{domain}"
    return hashlib.sha256(text.encode()).hexdigest()


def keyed_hash(secret: bytes, sample_id: int) -> str:
    """HMAC-SHA256 of a sample id under the store's secret: names a sample without revealing it.

    The exact input, so that an auditor holding the secret can recompute it: key = the 32 bytes of
    the store's ``hmac.key``; message = the ASCII bytes ``sisa-id|`` followed by the id as an 8-byte
    big-endian unsigned integer; result = the lowercase hex digest (64 characters).

    Args:
        secret: The store's HMAC secret.
        sample_id: The id, in ``[0, 2**63 - 2]``.

    Returns:
        The hex digest.
    """
    return hmac.new(secret, ID_LABEL + struct.pack(">Q", sample_id), hashlib.sha256).hexdigest()


class Basis:
    """What a combiner (``aggregate.method: combiner``) is fitted on: the models and the core set's digest.

    Its digest names a stored combiner (``combiner-`` + digest), so the store's report can tell whether
    the stored one is the live models' without the training side (:mod:`sisa.train.combiner`).
    """

    def __init__(self, models: Mapping[int, str], core_ids: np.ndarray) -> None:
        """Name the models (shard -> checkpoint key) and the core ids a combiner is fitted on."""
        self.models = {int(s): str(k) for s, k in sorted(models.items())}
        self.core = manifest_digest([np.sort(np.asarray(core_ids, dtype=np.int64))])

    def header(self) -> dict[str, Any]:
        """The basis as JSON-able fields, written into the combiner's bytes and its record."""
        return {"models": {str(s): k for s, k in self.models.items()}, "core": self.core}

    @property
    def digest(self) -> str:
        """Hex SHA-256 of :meth:`header`: the combiner's store key is ``combiner-`` + this."""
        return hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode()).hexdigest()
