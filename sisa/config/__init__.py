"""Layer 1, configuration: frozen dataclasses loaded from YAML, validated on load.

``settings`` holds the sections, the field roles (recipe / fixed / free) and the loader;
``rules`` the small validation helpers they share. Imports only :mod:`sisa.errors`.
"""

from sisa.config.settings import (
    FIELD_ROLES,
    FIXED,
    FREE,
    RECIPE,
    AggregateConfig,
    DataConfig,
    ModelConfig,
    PartitionConfig,
    ResourcesConfig,
    SisaConfig,
    TrainConfig,
    UnlearnConfig,
    config_fields,
    config_from_dict,
    config_to_dict,
    fixed_changes,
    load_config,
)

__all__ = [
    "FIELD_ROLES",
    "FIXED",
    "FREE",
    "RECIPE",
    "AggregateConfig",
    "DataConfig",
    "ModelConfig",
    "PartitionConfig",
    "ResourcesConfig",
    "SisaConfig",
    "TrainConfig",
    "UnlearnConfig",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "fixed_changes",
    "load_config",
]
