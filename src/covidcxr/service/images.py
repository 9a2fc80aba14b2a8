"""Images for the page: base64 PNG layers and display-size resizing."""

from __future__ import annotations

import base64
import io

import numpy as np


def png_base64(array: np.ndarray) -> str:
    """Encode a uint8 gray/RGB/RGBA array (or a float gray array in [0, 1]) as base64 PNG."""
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = np.uint8(np.rint(np.clip(arr, 0.0, 1.0) * 255))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fit_size(shape: tuple[int, int], longest: int) -> tuple[int, int]:
    h, w = shape
    scale = min(1.0, longest / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(array: np.ndarray, shape: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    import cv2

    h, w = shape
    if array.shape[:2] == (h, w):
        return array
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (w, h), interpolation=interp)
