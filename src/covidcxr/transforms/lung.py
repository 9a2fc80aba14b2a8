"""Segmentation modes applied to an image: zero outside the lungs (mask) or crop to their box (crop)."""

from __future__ import annotations

import logging

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.vocab import SEG_MODES

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- seg modes
def _out_shape(out_size: int | tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if out_size is None:
        return default
    shape = (out_size, out_size) if isinstance(out_size, int) else (int(out_size[0]), int(out_size[1]))
    if min(shape) < 1:
        raise ConfigError(f"out_size={out_size}: must be positive")
    return shape


def apply_seg_mode(
    image: np.ndarray,
    mask: np.ndarray,
    mode: str,
    out_size: int | tuple[int, int] | None = None,
    *,
    margin: float = 0.1,
    dilate: float = 0.03,
    flags: list[str] | None = None,
) -> np.ndarray:
    """Lung-focused classifier input: the full image, the image masked to the lungs, or a crop around them.

    Args:
        image: ``H x W`` float image in [0, 1].
        mask: Lung mask (nonzero = lung); resized (area + threshold) when its shape differs from the image's.
        mode: ``'none'`` (image unchanged), ``'mask'`` (zero outside the lung mask dilated by ``dilate``) or
            ``'crop'`` (a box around both lungs plus ``margin``, with the aspect of the output, resized to it).
        out_size: Output side or ``(height, width)``; None keeps the image's size.
        margin: Crop margin as a fraction of the lung box's larger side, added on every side.
        dilate: Mask dilation radius as a fraction of the image's larger side (keeps the lung border visible).
        flags: A QC flag list; ``'seg_fallback'`` is appended to it when an empty mask forces the full image.

    Returns:
        float32 image of ``out_size`` (or the input size).

    Raises:
        ConfigError: Unknown mode, negative margin/dilation, or arrays that are not 2-D.
    """
    from covidcxr.transforms.resize import resize_image, resize_mask

    if mode not in SEG_MODES:
        raise ConfigError(f"seg mode {mode!r}: expected one of {', '.join(SEG_MODES)}")
    if margin < 0 or dilate < 0:
        raise ConfigError(f"margin={margin}, dilate={dilate}: must not be negative")
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    if image.ndim != 2 or mask.ndim != 2:
        raise ConfigError(f"image shape {image.shape}, mask shape {mask.shape}: expected 2-D arrays")
    shape = _out_shape(out_size, image.shape)
    lung = mask > 0
    if lung.shape != image.shape:
        lung = resize_mask(lung, image.shape) > 0
    if mode != "none" and not lung.any():
        log.warning("empty lung mask: seg mode %r falls back to the full image", mode)
        if flags is not None and "seg_fallback" not in flags:
            flags.append("seg_fallback")
        mode = "none"
    if mode == "mask":
        radius = dilate * max(image.shape)
        keep = dilate_disc(lung, radius) if radius > 0 else lung
        image = image * keep
    elif mode == "crop":
        image = _crop_to_lungs(image, lung, shape, margin)
    if image.shape == shape:
        return np.ascontiguousarray(image, dtype=np.float32)
    return resize_image(image, shape)


def dilate_disc(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of the mask: ``distanceTransform(~mask) <= radius`` (OpenCV's
    exact transform, the same set as SciPy's EDT), computed over the mask's bounding box plus ``radius`` only.

    The transform costs the same for any radius; a dilation by the disc costs its diameter per pixel, and the radius
    grows with the image (3 % of its side): 2.2 s against 0.06 s for a 3000 x 3600 image, the same pixels. The box
    saves about half of a whole-image transform.

    Args:
        mask: Boolean ``H x W`` array.
        radius: Distance in pixels (> 0).

    Returns:
        Boolean ``H x W`` array.
    """
    import cv2

    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return out
    r = int(np.ceil(radius)) + 1  # every pixel within the radius lies in the box, and so does its nearest lung pixel
    y0, y1 = max(rows[0] - r, 0), min(rows[-1] + r + 1, mask.shape[0])
    x0, x1 = max(cols[0] - r, 0), min(cols[-1] + r + 1, mask.shape[1])
    outside = np.ascontiguousarray(~mask[y0:y1, x0:x1]).view(np.uint8)
    out[y0:y1, x0:x1] = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= radius
    return out


def lung_crop_box(lung: np.ndarray, shape: tuple[int, int], margin: float = 0.1) -> tuple[int, int, int, int]:
    """The square-ish box the ``crop`` mode cuts around both lungs (it may reach outside the image).

    Args:
        lung: Boolean lung mask with at least one lung pixel.
        shape: ``(height, width)`` the crop is resized to; the box takes this aspect so nothing is stretched.
        margin: Margin as a fraction of the lung box's larger side.

    Returns:
        ``(top, left, height, width)`` in image pixels.
    """
    rows, cols = np.flatnonzero(lung.any(axis=1)), np.flatnonzero(lung.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad = margin * max(y1 - y0, x1 - x0)
    height, width = (y1 - y0) + 2 * pad, (x1 - x0) + 2 * pad
    aspect = shape[1] / shape[0]
    if width / height < aspect:
        width = height * aspect
    else:
        height = width / aspect
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top, left = round(float(cy - height / 2)), round(float(cx - width / 2))
    return top, left, max(1, round(float(height))), max(1, round(float(width)))


def _crop_to_lungs(image: np.ndarray, lung: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    top, left, h, w = lung_crop_box(lung, shape, margin)
    # Parts of the box outside the image are zero (the X-ray background), not clipped, so the box keeps its aspect.
    out = np.zeros((h, w), np.float32)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    return out
