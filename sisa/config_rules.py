"""The two checks every config section uses: a condition with its message, and a choice from a list.

They live apart from :mod:`sisa.config` so that config sections defined in other modules
(such as :mod:`sisa.evaluation_config`) share them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from sisa.errors import ConfigError

__all__ = ["choice", "require"]


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
