"""Where an ingest puts its samples: the configured partition strategy applied to new ids.

Kept apart from :mod:`sisa.partition.assign` (pure assignment functions) because it also reads the
deletion prior and the store's per-shard expected deletions, and apart from the ensemble
because it decides everything before a write transaction opens: a bad prior raises here
and the store is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sisa.config.settings import SisaConfig
from sisa.errors import ConfigError, DataError
from sisa.partition.assign import (
    distribution_aware_assignment,
    greedy_shards,
    hashed_slices,
    ordered_slices,
    shard_masses,
    uniform_assignment,
)
from sisa.partition.prior import check_probabilities, load_prior

__all__ = ["check_shard_sizes", "place", "prior_for"]


def place(
    cfg: SisaConfig, ids: np.ndarray, probabilities: Any, stored_masses: list[float] | None
) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Shard and slice of each new id, and the shards' expected deletions afterwards.

    Under ``uniform`` the shard is the hash of (seed, id). Under ``distribution-aware`` the
    first ingest (no stored masses) cuts shards with Algorithm 1; later ones put each new
    sample into the shard expecting the fewest deletions, never moving stored samples.
    Slices are a hashed draw, or with ``partition.slice_order: probability`` this ingest's
    samples of each shard cut into R slices by rising deletion probability.

    Args:
        cfg: The ensemble's config.
        ids: The new sample ids.
        probabilities: Deletion probabilities aligned with ``ids`` (overrides the
            configured prior file), or None.
        stored_masses: The store's per-shard expected deletions (``shard_mass`` meta),
            None before the first distribution-aware ingest.

    Returns:
        ``(shard, slice, masses)``; ``masses`` is None under the uniform strategy.

    Raises:
        DataError: On probabilities given to a uniform store, or a bad or missing prior.
        ConfigError: If ``partition.bound`` cuts the data into another number of shards.
    """
    part = cfg.partition
    if part.strategy == "uniform":
        if probabilities is not None and not part.uses_prior:
            raise DataError(
                "deletion probabilities were given, but partition.strategy is uniform and partition.slice_order "
                "is hashed, which ignore them; create the store with partition.strategy: distribution-aware or "
                "partition.slice_order: probability, or drop probabilities="
            )
        shard, slice_ = uniform_assignment(ids, cfg.seed, cfg.shards, cfg.slices)
        masses = None
        p = prior_for(cfg, ids, probabilities) if part.uses_prior else None
    else:
        p = prior_for(cfg, ids, probabilities)
        if stored_masses is None:  # the first ingest: Algorithm 1 over all of it
            shard, slice_ = distribution_aware_assignment(ids, p, cfg.seed, cfg.shards, cfg.slices, part.bound)
            masses = shard_masses(shard, p, cfg.shards)
        else:
            shard, masses = greedy_shards(ids, p, cfg.seed, stored_masses)
            slice_ = hashed_slices(ids, cfg.seed, cfg.slices)
    if part.slice_order == "probability" and p is not None:
        # Per ingest call: stored samples never move, so a later ingest orders only its own samples.
        slice_ = ordered_slices(ids, p, shard, cfg.seed, cfg.slices)
    return shard, slice_, masses


def prior_for(cfg: SisaConfig, ids: np.ndarray, probabilities: Any) -> np.ndarray:
    """The deletion prior of ``ids``: the given array, else the configured file.

    Raises:
        DataError: If the array is malformed, the file is bad, or neither is given.
    """
    if probabilities is not None:
        p = np.asarray(probabilities)
        if p.shape != (len(ids),) or p.dtype.kind not in "iuf":
            raise DataError(
                f"probabilities must be {len(ids)} numbers, one per sample in ids order; "
                f"got an array of shape {p.shape} and dtype {p.dtype}"
            )
        p = p.astype(np.float64)
        check_probabilities(p, "probabilities")
        return p
    path = cfg.partition.probabilities
    if not path:
        why = (
            "partition.strategy is distribution-aware"
            if cfg.partition.strategy == "distribution-aware"
            else "partition.slice_order is probability"
        )
        raise DataError(
            f"{why} but no deletion prior was given: set "
            "partition.probabilities=PATH (.csv id,probability or .npz ids/probability) or pass probabilities="
        )
    return load_prior(path, ids)


def check_shard_sizes(cfg: SisaConfig, sizes: Sequence[int]) -> None:
    """Refuse a first training in which a shard holds fewer samples than slices.

    Such a shard would train on empty slices: SISA's checkpoints per slice mean nothing
    there, and the data is too small for the configured S x R. After deletions a small
    (even empty) shard is a fact the ensemble handles, so only the first fit checks this.

    Args:
        cfg: The ensemble's config.
        sizes: Number of samples in each shard.

    Raises:
        ConfigError: Naming the smallest shard and how to fix the config.
    """
    smallest = min(range(len(sizes)), key=lambda s: (sizes[s], s))
    if sizes[smallest] < cfg.slices:
        raise ConfigError(
            f"shard {smallest} holds {sizes[smallest]} samples, fewer than slices={cfg.slices} "
            f"({sum(sizes)} samples over shards={cfg.shards}): lower shards or slices "
            "(e.g. the override shards=N or slices=N), or ingest more data"
        )
