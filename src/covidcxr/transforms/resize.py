"""Resizing images (antialiased, Pillow) and masks (area + threshold): numpy in, numpy out, no torch."""

from __future__ import annotations

import logging

import numpy as np

from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)

_EPS = 1e-6


# --------------------------------------------------------------------------------------------- resizing
def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a gray image with bilinear interpolation, antialiased when shrinking (triangle filter).

    Pillow's float ("F" mode) resampler is used: on CPU it is 10-40x faster than ``torch.nn.functional.interpolate``
    for single images, which matters because inference resizes every image twice (in and out). Training and
    inference call this same function, and it needs no torch (a torch tensor is accepted and read as numpy).

    Args:
        image: ``H x W`` float array.
        size: Output side (square) or ``(height, width)``.

    Returns:
        float32 array of the new size.

    Raises:
        ConfigError: The image is not 2-D.
    """
    from PIL import Image

    out = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 2:
        raise ConfigError(f"image shape {tuple(arr.shape)}: expected a 2-D H x W array")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape == out:
        return arr.copy()
    resized = Image.fromarray(arr).resize((out[1], out[0]), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.float32)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask by area averaging and re-thresholding at 0.5 (less jagged than nearest).

    Args:
        mask: ``H x W`` array, nonzero = foreground.
        size: Output side (square) or ``(height, width)``.

    Returns:
        uint8 array in {0, 1}.

    Raises:
        ConfigError: The mask is not 2-D.
    """
    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    return (resize_image((m > 0).astype(np.float32), size) >= 0.5).astype(np.uint8)
