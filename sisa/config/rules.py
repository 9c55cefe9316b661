"""The shared config checks (a condition with its message, a choice from a list) and strict YAML parsing.

They live apart from :mod:`sisa.config.settings` so that config sections defined in other modules
(such as :mod:`sisa.evaluate.settings`) share them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from sisa.errors import ConfigError

__all__ = ["choice", "load_yaml", "require"]


def require(ok: bool, message: str) -> None:
    """Raise :class:`~sisa.errors.ConfigError` with ``message`` unless ``ok``.

    Args:
        ok: The condition that must hold.
        message: What is wrong and how to fix it.

    Raises:
        ConfigError: If ``ok`` is false.
    """
    if not ok:
        raise ConfigError(message)


def choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Require ``value`` to be one of ``allowed``.

    Args:
        name: The dotted config key, for the message.
        value: The configured value.
        allowed: The accepted values.

    Raises:
        ConfigError: Naming the key, the bad value and the allowed ones.
    """
    require(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping.

    Plain YAML loading keeps the last of ``shards: 8`` ... ``shards: 16`` without a word;
    a config must not silently drop a setting the user wrote.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by own keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}; keep one of them",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, but refuse a key repeated in one mapping.

    Raises:
        yaml.YAMLError: On invalid YAML or a duplicate key (with its line and column).
    """
    return yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
