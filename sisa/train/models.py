"""Model builders: the built-in MLP and small CNN, or any ``package.module:callable``."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

from torch import nn

from sisa.config.settings import ModelConfig
from sisa.errors import ModelError

__all__ = ["build_model", "cnn", "mlp"]


def _dense_head(
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
    return _dense_head([nn.Flatten()], math.prod(input_shape), num_classes, hidden, dropout)


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
    if len(input_shape) != 3:
        raise ModelError(
            f"model 'cnn' needs image inputs (C, H, W); got sample shape {tuple(input_shape)}; use model.name=mlp"
        )
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in channels:
        if h < 2 or w < 2:
            raise ModelError(
                f"input {tuple(input_shape)} is too small for {len(channels)} conv blocks; use fewer model.channels"
            )
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    return _dense_head(layers, c * h * w, num_classes, hidden, dropout)


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
    module_name, _, attr = cfg.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"model.name={cfg.name!r} cannot be imported ({exc}); check the module is on PYTHONPATH"
        ) from exc
    try:
        model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **cfg.options)
    except Exception as exc:  # the user's code failed: report it as a model problem, not a training crash
        raise ModelError(
            f"model.name={cfg.name!r} failed to build ({type(exc).__name__}: {exc}); it is called as "
            "f(input_shape=..., num_classes=..., **model.options)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name={cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
