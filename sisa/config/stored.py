"""Configs as a store keeps them: read back across versions, and checked when handed in from Python."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sisa.config.fields import config_fields, fixed_changes
from sisa.config.loader import config_from_dict
from sisa.config.settings import SisaConfig
from sisa.errors import ConfigError

__all__ = ["config_from_stored", "refuse_config_at_open", "require_config", "require_same_fixed"]


def config_from_stored(stored: Mapping[str, Any]) -> SisaConfig:
    """The config a store holds, as this version reads it.

    Stores created before ``resources.cpu_isa`` existed trained unpinned, which is
    ``native``; reading them with today's default (``avx2``) would call every checkpoint
    stale and retrain (or fail to verify) the lot.

    Args:
        stored: The config dict kept in the store's meta.

    Returns:
        The validated config.
    """
    raw = dict(stored)
    raw["resources"] = {"cpu_isa": "native", **(raw.get("resources") or {})}
    return config_from_dict(raw)


def require_config(config: Any) -> SisaConfig:
    """``config`` itself if it is a :class:`~sisa.config.settings.SisaConfig`.

    Raises:
        ConfigError: Naming what was passed instead and how to build a config.
    """
    if not isinstance(config, SisaConfig):
        raise ConfigError(
            f"config must be a SisaConfig, not {type(config).__name__}; "
            "build one with sisa.load_config(path, overrides)"
        )
    return config


def require_same_fixed(old: SisaConfig, new: SisaConfig, where: object) -> None:
    """Refuse a config change that touches a field fixed at creation (``FIELD_ROLES``: ``fixed``).

    Args:
        old: The stored config.
        new: The proposed one.
        where: The store, named in the message.

    Raises:
        ConfigError: Naming each changed field and its stored value.
    """
    changed = fixed_changes(old, new)
    if changed:
        stored = config_fields(old)
        raise ConfigError(
            f"{', '.join(changed)} of store {where} cannot change after creation "
            f"(stored: {', '.join(f'{k}={stored[k]}' for k in changed)}); they decide where samples live "
            "and what a label means: keep the stored values, or train a new --store"
        )


def refuse_config_at_open(config: object) -> None:
    """``Ensemble.open`` takes no config: say how a stored config is changed instead.

    Raises:
        ConfigError: If ``config`` is not None.
    """
    if config is not None:
        raise ConfigError(
            "Ensemble.open takes no config: a store keeps the config it was created with. To change it, "
            "open the store and call ens.reconfigure(config) (recipe changes retrain at the next fit; "
            "seed, shards, slices, partition and data.num_classes cannot change)"
        )
