"""Loading a config: YAML files, dotted ``key=value`` overrides, and the type conversion that checks each value.

Unknown keys are rejected with the list of allowed ones, so a typo never silently falls
back to a default. A config file may also hold sections of higher layers
(:data:`OTHER_SECTIONS`: ``evaluate``), which :func:`config_from_dict` sets aside for them;
:func:`build_config`, :func:`config_tree` and :func:`read_config_file` are the pieces those
layers load their own sections with.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sisa.config.rules import load_yaml as _load_yaml
from sisa.config.settings import SisaConfig
from sisa.errors import ConfigError

__all__ = ["OTHER_SECTIONS", "build_config", "config_from_dict", "config_tree", "load_config", "read_config_file"]

# Top-level sections of a config file that belong to a higher layer, not to SisaConfig: the loader sets
# them aside unread (that layer loads and validates them), so they never reach a store or a shard task.
# `evaluate`: the harness's settings, sisa.evaluate.settings.load_evaluate_config.
OTHER_SECTIONS = ("evaluate",)

T = TypeVar("T")

# Scalar annotation -> (whether a YAML value is one, what the message calls it, the conversion).
# A bool is never taken for a number.
_SCALARS: dict[type, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of keys, got {value!r}")
        return build_config(hint, value, where + ".")  # type: ignore[arg-type]
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    scalar = _SCALARS.get(hint) if isinstance(hint, type) else None
    if scalar is not None:
        accepts, kind, convert = scalar
        if not accepts(value):
            raise ConfigError(f"{where} must be {kind}, got {value!r}")
        return convert(value)
    return value


def build_config(cls: type[T], raw: Mapping[str, Any], prefix: str = "") -> T:
    """Build and validate a config dataclass (sections nested) from a mapping of plain data.

    Other layers build their own sections with it (``sisa.evaluate.settings``), so every
    config is checked the same way.

    Args:
        cls: The frozen dataclass.
        raw: Its keys, as found in a YAML file; missing keys take the defaults.
        prefix: Dotted path of ``raw`` in the file (``"evaluate."``), for the messages.

    Returns:
        The validated instance.

    Raises:
        ConfigError: On unknown keys (with the allowed ones), wrong types, or values out of range.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive: field mismatch
        raise ConfigError(f"bad config under {prefix or 'top level'}: {exc}") from exc


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. shards=8 or train.lr=0.01")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = _load_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from exc
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_tree(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A deep copy of a whole config mapping as plain data, with dotted overrides applied; nothing validated.

    Args:
        raw: Nested mapping as found in a YAML file.
        overrides: Dotted ``key=value`` strings applied on top, values parsed as YAML.

    Returns:
        The new tree (``raw`` is not changed).

    Raises:
        ConfigError: If ``raw`` is not a mapping of plain data, or an override is malformed.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of keys (as in a YAML file), got {type(raw).__name__}")
    try:
        tree: dict[str, Any] = json.loads(json.dumps(dict(raw)))  # deep copy, JSON-able only
    except (TypeError, ValueError) as exc:  # YAML dates, sets, binary, or NaN keys
        raise ConfigError(
            f"a config value is not plain data ({exc}); quote dates and use numbers, strings, lists"
        ) from exc
    for override in overrides:
        _apply_override(tree, override)
    return tree


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> SisaConfig:
    """Build a validated :class:`SisaConfig` from a nested mapping.

    A top-level key of :data:`OTHER_SECTIONS` (``evaluate``) is set aside unread and unchecked:
    it belongs to a higher layer, which validates it itself. Any other unknown key is refused.
    So a stored config from before ``evaluate`` left :class:`SisaConfig` still loads.

    Args:
        raw: Nested mapping as found in a YAML file.
        overrides: Dotted ``key=value`` strings applied on top, values parsed as YAML.

    Returns:
        The frozen config.

    Raises:
        ConfigError: On unknown keys, wrong types, or values out of range.
    """
    tree = config_tree(raw, overrides)
    for name in OTHER_SECTIONS:
        tree.pop(name, None)
    return build_config(SisaConfig, tree)


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, unvalidated (``{}`` for ``None`` or an empty file).

    Raises:
        ConfigError: If the file is missing, not UTF-8, not YAML, or not a mapping at the top level.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file {p} {what}; pass an existing YAML file")
    try:
        raw = _load_yaml(p.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text ({exc}); pass a YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return dict(raw)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SisaConfig:
    """Load a YAML config file and apply dotted overrides.

    The file's ``evaluate:`` section (and an ``evaluate.*`` override) is not part of
    :class:`SisaConfig` and is ignored here, unchecked: only ``sisa evaluate`` reads it, through
    :func:`sisa.evaluate.settings.load_evaluate_config`. (The ``sisa`` command line checks it on
    every command that reads a config file, so a typo there still fails fast.)

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``key=value`` strings such as ``shards=8`` or ``train.lr=0.01``.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: If the file is missing, not YAML, or holds bad keys or values.
    """
    return config_from_dict(read_config_file(path), overrides)
