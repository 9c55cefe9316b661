"""What every config field is to a store (its role), declared on the field itself, and walks over the fields.

A field's role lives in its ``dataclasses.field(metadata=...)`` (:func:`setting`), so a
field cannot exist without one: :func:`field_roles` refuses a leaf that has none, and
``sisa.config.settings`` calls it when the module loads.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["FIXED", "FREE", "RECIPE", "config_fields", "config_to_dict", "field_roles", "fixed_changes", "setting"]

RECIPE = (
    "recipe"  # changes the trained bytes: part of the recipe (sisa.config.recipe), so every checkpoint key covers it
)
FIXED = "fixed"  # decided when the store is created; Ensemble.reconfigure (and `sisa train k=v`) refuses a change
FREE = "free"  # neither: changing it on an existing store retrains nothing and moves nothing
ROLES = (RECIPE, FIXED, FREE)
_ROLE = "sisa.role"  # the metadata key


def setting(default: Any = dataclasses.MISSING, *, role: str, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that says how it bears on an existing store.

    Args:
        default: Its default value (or ``factory`` for a mutable one).
        role: :data:`RECIPE`, :data:`FIXED` or :data:`FREE`.
        factory: A ``default_factory`` instead of ``default``.

    Returns:
        A ``dataclasses.field`` with the role in its metadata.

    Raises:
        ValueError: On an unknown role (a programming error, raised when the class is defined).
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_ROLE: role})
    return dataclasses.field(default=default, metadata={_ROLE: role})


def field_roles(cls: type, prefix: str = "") -> dict[str, str]:
    """Every leaf field of a config dataclass by dotted name (``train.lr``), with its role.

    Sections (fields holding a dataclass) are walked into; every other field must carry a role.

    Raises:
        TypeError: Naming a leaf field declared without :func:`setting`.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(field_roles(hint, f"{prefix}{f.name}."))
        elif _ROLE in f.metadata:
            out[prefix + f.name] = f.metadata[_ROLE]
        else:
            raise TypeError(
                f"config field {prefix}{f.name} has no role: declare it with sisa.config.fields.setting(..., role=...)"
            )
    return out


def config_fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config dataclass by dotted name (``train.lr``), with its value.

    Mappings (``model.options``, ``resources.custom``) are leaves, not walked into.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def fixed_changes(old: Any, new: Any) -> list[str]:
    """The fields fixed at a store's creation (role :data:`FIXED`) that differ between two configs of one class."""
    roles = field_roles(type(old))
    before, after = config_fields(old), config_fields(new)
    return [name for name in before if roles[name] == FIXED and before[name] != after[name]]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turn a config dataclass into plain JSON-able dicts and lists."""
    out = dataclasses.asdict(cfg)
    return typing.cast(dict[str, Any], json.loads(json.dumps(out)))
