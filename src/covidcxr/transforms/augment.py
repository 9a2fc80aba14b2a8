"""Classifier input pipeline: training augmentation and the deterministic evaluation transform.

Both transforms take the cached image, a ``uint8`` tensor ``(1, S, S)`` (segmentation mode already applied,
squashed to a square of ``cache_size`` = about 1.15 x the input size), and return a float32 tensor
``(1, image_size, image_size)`` in [0, 1]. Normalisation (ImageNet mean/std on the replicated grey channel, or
a single grey mean/std) is done by the model's stem (:class:`covidcxr.models.CxrClassifier`) with the values
stored in the artifact config, so one convention holds for training, inference and Grad-CAM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from covidcxr.errors import ConfigError
from covidcxr.transforms.joint import RandomGamma

CACHE_SCALE = 1.15


@dataclass
class AugmentConfig:
    """Augmentation settings with chest X-ray defaults (no horizontal flip: the heart is on the left).

    Attributes:
        image_size: Network input side (square).
        enabled: False gives the evaluation transform for training too.
        rotation: Maximum rotation in degrees (+-).
        translate: Maximum shift as a fraction of the side.
        scale: Affine zoom range.
        crop_scale: Area fraction range of the random resized crop.
        crop_ratio: Aspect-ratio range of the random resized crop.
        brightness: ColorJitter brightness factor (+-).
        contrast: ColorJitter contrast factor (+-).
        gamma: Gamma range (log-uniform).
        hflip: Probability of a horizontal flip.
    """

    image_size: int = 224
    enabled: bool = True
    rotation: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.95, 1.05)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)
    hflip: float = 0.0

    def __post_init__(self) -> None:
        if int(self.image_size) < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        self.image_size = int(self.image_size)
        for name in ("scale", "crop_scale", "crop_ratio", "gamma"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0 < lo <= hi:
                raise ConfigError(f"augment {name} must be 0 < low <= high, got {(lo, hi)}")
            setattr(self, name, (lo, hi))
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"augment hflip is a probability, got {self.hflip}")

    @property
    def cache_size(self) -> int:
        """Side of the cached uint8 image: a margin above the input size for random crops."""
        return cache_size_for(self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError.

        Args:
            data: Mapping of field names to values.

        Returns:
            The config.

        Raises:
            ConfigError: A key that is not a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown augment settings {unknown}; valid: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def cache_size_for(image_size: int) -> int:
    """Side of the cached image for a given input size (``ceil(1.15 * image_size)``)."""
    return math.ceil(CACHE_SCALE * int(image_size))




def _as_config(cfg: AugmentConfig | Mapping[str, Any] | int) -> AugmentConfig:
    if isinstance(cfg, AugmentConfig):
        return cfg
    if isinstance(cfg, int):
        return AugmentConfig(image_size=cfg)
    if isinstance(cfg, Mapping):
        return AugmentConfig.from_dict(cfg)
    raise ConfigError(f"expected AugmentConfig, dict or int image size, got {type(cfg).__name__}")


def build_eval_transform(cfg: AugmentConfig | Mapping[str, Any] | int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic transform: resize the cached uint8 image to the input size and scale to [0, 1].

    Args:
        cfg: Augment config (only ``image_size`` is used), its dict, or the input size.

    Returns:
        Callable mapping ``uint8 (1, S, S)`` to ``float32 (1, image_size, image_size)``.
    """
    size = _as_config(cfg).image_size
    return v2.Compose([v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])


def build_train_transform(cfg: AugmentConfig | Mapping[str, Any] | int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random training transform (or the eval transform when ``cfg.enabled`` is False).

    Geometry runs on uint8 (fast), intensity changes on float. Random draws use torch's RNG, which Lightning
    seeds per DataLoader worker.

    Args:
        cfg: Augment config, its dict, or the input size (defaults for everything else).

    Returns:
        Callable mapping ``uint8 (1, S, S)`` to ``float32 (1, image_size, image_size)``.
    """
    cfg = _as_config(cfg)
    if not cfg.enabled:
        return build_eval_transform(cfg)
    size = cfg.image_size
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.ToImage(),  # a tv_tensors.Image, so the transforms shared with segmentation (RandomGamma) apply
        v2.RandomResizedCrop((size, size), scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomAffine(degrees=cfg.rotation, translate=(cfg.translate, cfg.translate), scale=cfg.scale),
    ]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    if cfg.gamma != (1.0, 1.0):
        steps.append(RandomGamma(cfg.gamma))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
