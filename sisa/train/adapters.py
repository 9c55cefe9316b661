"""Per-shard parts on a shared frozen backbone: a head on its features, or LoRA adapters plus a head.

An :class:`AdaptedModel` holds the backbone outside its registered modules, so its
``state_dict``, ``parameters()`` and so its checkpoints, optimizer state and weight digest
are only the per-shard part. LoRA (Hu et al., 2021) adds ``scale * B @ A`` beside chosen
Linear / Conv2d layers of a per-shard copy of the backbone's structure that shares every
frozen tensor with the original: S shards hold one copy of the backbone's weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.errors import ModelError
from sisa.train.backbone import feature_width
from sisa.train.models import build_model, dense_head

__all__ = ["AdaptedModel", "LoRAConv2d", "LoRALinear", "adaptable_layers", "build_shard_model"]


def _hold(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Keep ``module`` on ``owner`` without registering it: out of state_dict, parameters() and .to()."""
    object.__setattr__(owner, name, module)


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` for a frozen ``nn.Linear``; only A and B train."""

    base: nn.Linear

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        """Wrap ``base``: A gets LoRA's Kaiming-uniform init, B zeros (so training starts at the backbone)."""
        super().__init__()
        _hold(self, "base", base)
        self.a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output plus the low-rank update."""
        base = self.base
        return base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale


class LoRAConv2d(nn.Module):
    """``base(x) + scale * B(A(x))`` for a frozen ``nn.Conv2d``: A has base's kernel and rank outputs, B is 1x1."""

    base: nn.Conv2d

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        """Wrap ``base`` (groups=1 only); A: Kaiming-uniform, B: zeros."""
        super().__init__()
        if base.groups != 1:
            raise ModelError("LoRA on a grouped convolution is not supported; leave that layer out of model.targets")
        _hold(self, "base", base)
        kh, kw = base.kernel_size
        device = base.weight.device
        self.a = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=device))
        self.b = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=device))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen convolution plus the low-rank one."""
        base = self.base
        low = F.conv2d(x, self.a, None, base.stride, base.padding, base.dilation)
        return base(x) + F.conv2d(low, self.b) * self.scale


_LORA = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def adaptable_layers(module: nn.Module) -> list[str]:
    """Names (as ``named_modules`` gives them) of the layers LoRA can adapt: every Linear and Conv2d."""
    return [name for name, m in module.named_modules() if type(m) in _LORA and name]


def _structure(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree that shares every parameter and buffer with it."""
    clone = copy.copy(module)
    clone._modules = {name: _structure(child) if child is not None else None for name, child in module._modules.items()}
    return clone


class AdaptedModel(nn.Module):
    """One shard's model: the shared frozen backbone (unregistered), optional LoRA, and a head.

    Attributes:
        head: The per-shard classifier on the backbone's flattened features.
        lora: The per-shard LoRA modules by layer name (dots as ``__``), when ``model.adapter: lora``.
    """

    backbone: nn.Module
    head: nn.Module

    def __init__(self, backbone: nn.Module, width: int, head: nn.Module, lora: dict[str, nn.Module]) -> None:
        """Assemble a shard model; use :func:`build_shard_model`."""
        super().__init__()
        _hold(self, "backbone", backbone)
        self.width = width
        if lora:
            self.lora = nn.ModuleDict({name.replace(".", "__"): m for name, m in lora.items()})
        self.head = head

    @property
    def shared_backbone(self) -> nn.Module | None:
        """The backbone every shard shares unchanged (head adapters), whose features can be computed once."""
        return None if "lora" in self._modules else self.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """This shard's backbone features of ``x``, flattened (with its LoRA, if any)."""
        out: torch.Tensor = self.backbone(x).flatten(1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: the head on the features."""
        out: torch.Tensor = self.head(self.features(x))
        return out


def build_shard_model(
    cfg: SisaConfig, input_shape: Sequence[int], num_classes: int, backbone: nn.Module | None = None
) -> nn.Module:
    """The model one shard trains: ``model`` whole, or its adapter on the shared ``backbone``.

    Parameters are created in a fixed order (LoRA layers in network order, then the head)
    from torch's global RNG, which the trainer seeds first.

    Args:
        cfg: The ensemble's config.
        input_shape: Shape of one sample.
        num_classes: Number of classes.
        backbone: The frozen backbone module, on the device the model will run on
            (``backbone.source`` other than none; not moved by ``.to()``).

    Returns:
        A fresh model.

    Raises:
        ModelError: If a backbone is needed and missing, or ``model.targets`` names a layer
            LoRA cannot adapt.
    """
    if not cfg.backbone.enabled:
        return build_model(cfg.model, input_shape, num_classes)
    if backbone is None:
        raise ModelError("this config shares a backbone (backbone.source), and none was given to build on")
    m = cfg.model
    width = feature_width(backbone, input_shape, next(iter(backbone.parameters()), torch.empty(0)).device)
    lora: dict[str, nn.Module] = {}
    network = backbone
    if m.adapter == "lora":
        layers = adaptable_layers(backbone)
        targets = list(m.targets) or layers
        bad = [t for t in targets if t not in layers]
        if bad or not targets:
            raise ModelError(
                f"model.targets {bad or '(default: every Linear and Conv2d)'} names no LoRA-adaptable layer of the "
                f"backbone; its Linear/Conv2d layers are: {layers or 'none'}"
            )
        network = _structure(backbone)
        found = dict(network.named_modules())
        for name in (t for t in layers if t in targets):  # network order, whatever order targets lists
            parent_name, _, child = name.rpartition(".")
            base = found[name]
            wrapped = _LORA[type(base)](base, m.rank, m.alpha)
            found[parent_name]._modules[child] = wrapped
            lora[name] = wrapped
    head = dense_head([], width, num_classes, m.hidden, m.dropout)
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    return AdaptedModel(network, width, head.to(device), lora)
