"""Model builders: the built-in MLP and small CNN, or any ``package.module:callable``."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from sisa.config.settings import ModelConfig
from sisa.errors import ModelError

__all__ = ["build_model", "cnn", "dense_head", "feature_network", "import_callable", "mlp"]


def dense_head(
    layers: list[nn.Module], width: int, num_classes: int, hidden: Sequence[int], dropout: float
) -> nn.Module:
    """Append ``(Linear -> ReLU)* -> Dropout -> Linear`` to ``layers`` and wrap them.

    The layers are created in order, after whatever ``layers`` already holds, so the
    global RNG draws (and so the initial weights) follow the network's layout.
    """
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Module:
    """Build a multi-layer perceptron over flattened inputs.

    Args:
        input_shape: Shape of one sample, e.g. ``(1, 28, 28)`` or ``(600,)``.
        num_classes: Output width.
        hidden: Widths of the hidden layers.
        dropout: Dropout before the output layer.

    Returns:
        ``Flatten -> (Linear -> ReLU)* -> Dropout -> Linear``.
    """
    return dense_head([nn.Flatten()], math.prod(input_shape), num_classes, hidden, dropout)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int],
    hidden: Sequence[int],
    dropout: float = 0.0,
) -> nn.Module:
    """Build a small CNN: 3x3 conv + ReLU + 2x2 max-pool per channel entry, then an MLP head.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: Output width.
        channels: Output channels of each conv block, e.g. ``(32, 64)``.
        hidden: Widths of the fully connected layers after the convolutions.
        dropout: Dropout before the output layer.

    Returns:
        The network; the default config is the conv32-conv64-fc128 model of the design.

    Raises:
        ModelError: If the input is not an image or is too small for the pooling.
    """
    layers, width = _conv_blocks(input_shape, channels, "model")
    return dense_head(layers, width, num_classes, hidden, dropout)


def _conv_blocks(input_shape: Sequence[int], channels: Sequence[int], section: str) -> tuple[list[nn.Module], int]:
    """The CNN's conv blocks and a Flatten, and the width they output."""
    if len(input_shape) != 3:
        raise ModelError(
            f"{section} 'cnn' needs image inputs (C, H, W); got sample shape {tuple(input_shape)}; "
            f"use {section}.name=mlp"
        )
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in channels:
        if h < 2 or w < 2:
            raise ModelError(
                f"input {tuple(input_shape)} is too small for {len(channels)} conv blocks; use fewer {section}.channels"
            )
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    return layers, c * h * w


def feature_network(
    name: str, input_shape: Sequence[int], hidden: Sequence[int], channels: Sequence[int], options: dict[str, Any]
) -> nn.Module:
    """A backbone: the built-in ``mlp`` / ``cnn`` without an output layer, or a ``module:callable``.

    Args:
        name: ``mlp``, ``cnn`` or ``package.module:callable`` (called as ``f(input_shape=..., **options)``).
        input_shape: Shape of one sample.
        hidden: Fully connected widths (after the CNN's convolutions), each followed by ReLU.
        channels: Conv channels of ``cnn``.
        options: Keyword arguments of a callable.

    Returns:
        A network mapping a batch of samples to features (flattened by its user).

    Raises:
        ModelError: If the callable cannot be imported, fails, or returns no ``nn.Module``.
    """
    if name in ("mlp", "cnn"):
        if name == "mlp":
            layers: list[nn.Module] = [nn.Flatten()]
            width = math.prod(input_shape)
        else:
            layers, width = _conv_blocks(input_shape, channels, "backbone")
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers)
    return _call(
        name, "backbone.name", "f(input_shape=..., **backbone.options)", input_shape=tuple(input_shape), **options
    )


def _call(spec: str, where: str, signature: str, **kwargs: Any) -> nn.Module:
    """Call the user's ``package.module:callable`` named by config key ``where``; it must return an ``nn.Module``.

    Raises:
        ModelError: If it cannot be imported, fails (as a model problem, not a training crash), or
            returns something else; the message shows how it is called (``signature``).
    """
    factory = import_callable(spec, where)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code failed: report it as a model problem, not a training crash
        raise ModelError(
            f"{where}={spec!r} failed to build ({type(exc).__name__}: {exc}); it is called as {signature}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}={spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_callable(spec: str, where: str) -> Any:
    """The object named by ``package.module:callable``.

    Raises:
        ModelError: If it cannot be imported (the message names the config key ``where``).
    """
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"{where}={spec!r} cannot be imported ({exc}); check the module is on PYTHONPATH") from exc


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the network named by ``cfg``.

    Args:
        cfg: Model section of the config.
        input_shape: Shape of one sample.
        num_classes: Number of classes.

    Returns:
        A freshly initialised ``nn.Module`` (initialisation uses torch's global RNG,
        which the trainer seeds first).

    Raises:
        ModelError: If a custom ``module:callable`` cannot be imported, fails when
            called, or does not return an ``nn.Module``.
    """
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden, cfg.dropout)
    if cfg.name == "cnn":
        return cnn(input_shape, num_classes, cfg.channels, cfg.hidden, cfg.dropout)
    signature = "f(input_shape=..., num_classes=..., **model.options)"
    return _call(
        cfg.name, "model.name", signature, input_shape=tuple(input_shape), num_classes=num_classes, **cfg.options
    )
