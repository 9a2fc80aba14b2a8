"""Joint image + mask transforms and the preprocessing that a model config derives.

Training augmentation uses torchvision.transforms.v2 on ``tv_tensors.Image`` / ``tv_tensors.Mask`` pairs: a v2
transform draws *one* set of random parameters per call and applies it to every tensor of the sample, and
masks are resampled with nearest interpolation by their kernels, so image and mask stay aligned. Photometric
transforms (brightness, contrast, gamma) touch the image only: masks pass through them.

Inference preprocessing (:func:`prepare_batch`) follows the U-Net config saved with the weights (input size,
normalisation), so a model is always fed the way it was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from covidcxr.errors import ConfigError
from covidcxr.transforms.resize import _EPS

log = logging.getLogger(__name__)

def normalise(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise a batch ``(N, C, H, W)`` of [0, 1] images as a model config says.

    The mean and standard deviation are computed in float64 and rounded to the batch's dtype, then applied in it:
    float32 sums over 65,536 pixels are only as exact as each runtime's reduction order, and the exported U-Net
    (which carries this function in its graph) gave P(lung) up to 3.5e-4 away from torch that way, enough to flip
    mask pixels on the threshold; with float64 statistics both agree within 7e-6 (``benchmarks/runtime.py``).

    Args:
        x: Batch of images in [0, 1].
        mode: ``'zscore'`` (per image: zero mean, unit variance; robust to exposure and contrast differences
            between scanners) or ``'unit'`` (unchanged [0, 1]).

    Returns:
        Normalised batch (same shape and dtype).

    Raises:
        ConfigError: Unknown mode.
    """
    if mode == "unit":
        return x
    if mode == "zscore":
        flat = x.flatten(1).double()
        shape = (-1, *([1] * (x.ndim - 1)))
        mean = flat.mean(dim=1).to(x.dtype).view(shape)
        std = flat.std(dim=1).to(x.dtype).view(shape)
        return (x - mean) / (std + _EPS)
    raise ConfigError(f"normalisation={mode!r}: expected 'zscore' or 'unit'")


def prepare_batch(images: Sequence[np.ndarray | torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
    """Resize and normalise gray images for a U-Net config (``input_size``, ``normalisation``).

    Args:
        images: ``H x W`` float images in [0, 1]; sizes may differ.
        config: The model config (see :func:`covidcxr.models.unet_config`).

    Returns:
        float32 tensor ``(N, 1, S, S)``.

    Raises:
        ConfigError: An image is not 2-D or the config is invalid.
    """
    from covidcxr.transforms.preprocess import segmenter_input

    arrays = [im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else im for im in images]
    return normalise(torch.from_numpy(segmenter_input(arrays, config)), config["normalisation"])


# --------------------------------------------------------------------------------------------- augmentation
class RandomGamma(v2.Transform):
    """Random gamma curve ``x ** gamma`` on images only (masks and other tensors pass through).

    Args:
        gamma: ``(low, high)`` range; gamma is drawn log-uniformly so darkening and brightening are balanced.
        p: Probability of applying it.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma: tuple[float, float] = (0.8, 1.25), p: float = 1.0) -> None:
        super().__init__()
        if not 0 < gamma[0] <= gamma[1]:
            raise ConfigError(f"gamma={gamma}: expected 0 < low <= high")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p={p}: expected a probability in [0, 1]")
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one gamma (1.0 when not applied) for all inputs of the sample."""
        lo, hi = np.log(self.gamma[0]), np.log(self.gamma[1])
        apply = bool(torch.rand(()) < self.p)
        return {"gamma": float(np.exp(lo + (hi - lo) * float(torch.rand(())))) if apply else 1.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn gamma to an image."""
        if params["gamma"] == 1.0:
            return inpt
        return TF.adjust_gamma(inpt, params["gamma"])


def build_seg_train_transform(
    size: int,
    *,
    degrees: float = 10.0,
    translate: float = 0.06,
    scale: tuple[float, float] = (0.9, 1.1),
    brightness: float = 0.2,
    contrast: float = 0.2,
    gamma: tuple[float, float] = (0.8, 1.25),
    elastic: float = 0.0,
) -> v2.Transform:
    """Joint training augmentation for ``(tv_tensors.Image, tv_tensors.Mask)`` samples.

    One random draw per call is applied to image and mask alike (geometry); brightness, contrast and gamma
    change the image only. No horizontal flip: the heart side is part of what the lung fields look like.

    Args:
        size: Output side in pixels (the model input size).
        degrees: Maximum absolute rotation.
        translate: Maximum shift as a fraction of the side.
        scale: Zoom range.
        brightness: ColorJitter brightness strength (0 = off).
        contrast: ColorJitter contrast strength (0 = off).
        gamma: Gamma range (``(1, 1)`` = off).
        elastic: Probability of a mild elastic deformation (0 = off, the default).

    Returns:
        A v2 transform taking and returning ``(image, mask)``; the image comes out float32 in [0, 1], the mask
        keeps its dtype.

    Raises:
        ConfigError: Invalid ranges.
    """
    if size <= 0:
        raise ConfigError(f"size={size}: must be positive")
    if not 0.0 <= translate < 0.5:
        raise ConfigError(f"translate={translate}: expected a fraction in [0, 0.5)")
    if not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"scale={scale}: expected 0 < low <= high")
    if not 0.0 <= elastic <= 1.0:
        raise ConfigError(f"elastic={elastic}: expected a probability in [0, 1]")
    steps: list[v2.Transform] = [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.RandomAffine(
            degrees=degrees,
            translate=(translate, translate),
            scale=scale,
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=0,
        ),
    ]
    if elastic > 0:
        steps.append(v2.RandomApply([v2.ElasticTransform(alpha=20.0, sigma=6.0)], p=elastic))
    steps.append(v2.Resize((size, size), antialias=True))
    if brightness > 0 or contrast > 0:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    if gamma != (1.0, 1.0):
        steps.append(RandomGamma(gamma))
    steps.append(v2.Lambda(_clamp_image, tv_tensors.Image))
    return v2.Compose(steps)


def build_seg_eval_transform(size: int) -> v2.Transform:
    """Deterministic counterpart of :func:`build_seg_train_transform`: to float, resize to ``size``.

    Args:
        size: Output side in pixels.

    Returns:
        A v2 transform taking and returning ``(image, mask)``.
    """
    return v2.Compose(
        [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Resize((size, size), antialias=True),
        ]
    )


def _clamp_image(image: torch.Tensor) -> torch.Tensor:
    return tv_tensors.wrap(image.clamp(0.0, 1.0), like=image)
