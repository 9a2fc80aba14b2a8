"""Reading images: PNG, JPEG, TIFF and DICOM into one float32 H x W array in [0, 1] plus facts."""

from __future__ import annotations

import io
import logging
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ImageReadError, ImageTooLargeError, UnsupportedImageError

logger = logging.getLogger(__name__)

MAX_PIXELS = 80_000_000
"""Largest accepted image, in pixels (rows * columns); larger files are refused before decoding."""

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class ImageMeta:
    """What was read, besides the pixels.

    Attributes:
        path: File path (or upload name) the image came from.
        format: ``'png'``, ``'jpeg'``, ``'tiff'`` or ``'dicom'``.
        original_size: ``(height, width)`` in pixels.
        bit_depth: Bits per sample as stored (DICOM: BitsStored).
        photometric: Photometric interpretation as stored (``'MONOCHROME1'``, ``'MONOCHROME2'``, ``'RGB'``, ...).
        view: View position (``'PA'``, ``'AP'``, ``'LL'``, ...) when the file says so, else None.
        modality: DICOM modality (``'DX'``, ``'CR'``, ...), None for non-DICOM files.
        warnings: Conversions applied on the way (colour to gray, MONOCHROME1 inversion, ...).
    """

    path: str
    format: str
    original_size: tuple[int, int]
    bit_depth: int
    photometric: str
    view: str | None = None
    modality: str | None = None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Record a conversion warning and log it with the file name."""
        self.warnings.append(message)
        logger.warning("%s: %s", self.path, message)


def load_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG, JPEG, TIFF or DICOM chest X-ray (format found from the content, not the name).

    Args:
        path: Image file.

    Returns:
        ``(image, meta)``: float32 ``H x W`` array in ``[0, 1]`` (see the module docstring for the intensity
        rule) and its :class:`ImageMeta`.

    Raises:
        ImageReadError: Missing, empty, truncated, corrupt or non-image file.
        UnsupportedImageError: Valid file this package refuses (multi-frame, no pixel data, CT/MR, other format,
            missing codec plugin).
        ImageTooLargeError: More than :data:`MAX_PIXELS` pixels.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e
    return load_image_bytes(data, str(path))


def load_image_bytes(data: bytes, name: str) -> tuple[np.ndarray, ImageMeta]:
    """Read an image from memory (e.g. a web upload); same contract as :func:`load_image`.

    Args:
        data: File content.
        name: File name, used only in messages and ``meta.path``.

    Returns:
        ``(image, meta)`` as :func:`load_image`.

    Raises:
        ImageReadError, UnsupportedImageError, ImageTooLargeError: As :func:`load_image`.
    """
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    if data[128:132] == b"DICM":
        from covidcxr.io.dicom import _read_dicom  # dicom.py builds on ImageMeta from here

        image, meta = _read_dicom(data, name)
    else:
        image, meta = _read_pil(data, name)
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(image), meta


# --------------------------------------------------------------------------------------------- PIL formats
def _read_pil(data: bytes, name: str) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Our own limit is lower than PIL's warning threshold; the size check below is the one that counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(name, f"image refused before decoding: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(name, "not a recognised image file (expected PNG, JPEG, TIFF or DICOM)") from e
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise ImageReadError(name, f"corrupt image header ({e})") from e

    fmt = _PIL_FORMATS.get(im.format or "")
    if fmt is None:
        raise UnsupportedImageError(name, f"{im.format} images are not supported (use PNG, JPEG, TIFF or DICOM)")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageTooLargeError(name, f"{w} x {h} = {w * h:,} pixels exceeds the limit of {MAX_PIXELS:,}")
    if getattr(im, "n_frames", 1) > 1 and fmt == "tiff":
        raise UnsupportedImageError(name, f"multi-page TIFF ({im.n_frames} pages); save one frontal image per file")
    int_bits = _tiff_bits(im) if fmt == "tiff" else 16  # read before exif_transpose drops the TIFF tags
    try:
        im.load()
        if fmt in ("jpeg", "tiff"):
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} image data ({e})") from e

    mode = im.mode
    meta = ImageMeta(path=name, format=fmt, original_size=im.size[::-1], bit_depth=8, photometric="MONOCHROME2")
    if mode == "1":
        meta.bit_depth = 1
        return np.asarray(im, dtype=np.float32), meta
    if mode in ("L", "LA"):
        if mode == "LA":
            meta.warn("alpha channel ignored")
        return np.asarray(im.getchannel(0), dtype=np.float32) / 255.0, meta
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        meta.bit_depth = int_bits
        return arr.astype(np.float32) / float(2**meta.bit_depth - 1), meta
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        meta.bit_depth = 32
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0.0 or hi > 1.0:
            meta.warn(f"float image with range [{lo:.4g}, {hi:.4g}] min-max scaled to [0, 1]")
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return arr, meta
    # Colour (RGB, RGBA, P, CMYK, YCbCr, ...): to gray with a warning.
    meta.photometric = {"P": "PALETTE COLOR"}.get(mode, mode)
    meta.warn(f"{mode} colour image converted to grayscale")
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    return rgb @ _LUMA / 255.0, meta


def _tiff_bits(im: Any) -> int:
    bits = getattr(im, "tag_v2", {}).get(258, (32,))
    return int(bits[0] if isinstance(bits, tuple) else bits)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a lung-mask image as uint8 {0, 1}."""
    from covidcxr.io.image import load_image

    arr, _ = load_image(path)
    return (arr > 0.5).astype(np.uint8)


def sniff_format(data: bytes) -> str | None:
    """Upload format from the magic bytes: ``png``, ``jpeg``, ``dicom`` or None (the name is never trusted).

    Args:
        data: File content.

    Returns:
        The format, or None for anything else.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def check_gray(image: Any, index: int | None = None, *, min_side: int = 1) -> np.ndarray:
    """The in-memory image contract: a 2-D grey array (H x W), returned as float32.

    Args:
        image: Array-like to check.
        index: Position in a batch, named in the error.
        min_side: Smallest accepted height and width.

    Returns:
        ``image`` as a float32 array (no copy when it already is one).

    Raises:
        ConfigError: Not 2-D, or smaller than ``min_side``.
    """
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape, default=0) < min_side:
        where = f"image {index}: " if index is not None else ""
        raise ConfigError(f"{where}shape {arr.shape}: expected a 2-D grey image (H, W) of at least {min_side} x "
                          f"{min_side} pixels")
    return arr.astype(np.float32, copy=False)
