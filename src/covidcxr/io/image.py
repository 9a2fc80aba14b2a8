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
MAX_DECODED_SIDE = 4300
"""Default longest side of a decoded image: larger images are reduced while decoding, by the smallest integer
factor that brings both sides within it (area averaging, so a 10,000 x 8,000 image never becomes a float array of
that size). The models need a few hundred pixels, the web page shows 768 and the lung mask is computed at 256."""

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class ImageMeta:
    """What was read, besides the pixels.

    Attributes:
        path: File path (or upload name) the image came from.
        format: ``'png'``, ``'jpeg'``, ``'tiff'`` or ``'dicom'``.
        original_size: ``(height, width)`` in pixels as stored (after EXIF orientation); the decoded array is
            smaller when it was reduced to the ``max_side`` limit (``warnings`` then says so).
        bit_depth: Bits per sample as stored (DICOM: BitsStored).
        photometric: Photometric interpretation as stored (``'MONOCHROME1'``, ``'MONOCHROME2'``, ``'RGB'``, ...).
        view: DICOM files: the ViewPosition mapped onto :data:`covidcxr.vocab.VIEWS` (``'PA'``, ``'AP'``,
            ``'AP supine'``, ``'lateral'``, ``'unknown'``); None for other formats. Never the header's raw text.
        modality: DICOM files: the Modality mapped onto :data:`covidcxr.vocab.MODALITIES` (``'CR'``, ``'DX'``,
            ``'other'``); None for other formats. Never the header's raw text.
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


def load_image(
    path: str | os.PathLike[str], *, max_side: int | None = MAX_DECODED_SIDE
) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG, JPEG, TIFF or DICOM chest X-ray (format found from the content, not the name).

    Args:
        path: Image file.
        max_side: Longest side of the returned array: a larger image is reduced while decoding by the smallest
            integer factor that fits (area averaging; ``meta.warnings`` notes it, ``meta.original_size`` keeps
            the stored size). None decodes at full size.

    Returns:
        ``(image, meta)``: float32 ``H x W`` array in ``[0, 1]`` (see the module docstring for the intensity
        rule) and its :class:`ImageMeta`.

    Raises:
        ImageReadError: Missing, empty, truncated, corrupt or non-image file.
        UnsupportedImageError: Valid file this package refuses (multi-frame, no pixel data, CT/MR, other format,
            missing codec plugin).
        ImageTooLargeError: More than :data:`MAX_PIXELS` pixels.
        ConfigError: ``max_side`` is not a positive integer or None.
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
    return load_image_bytes(data, str(path), max_side=max_side)


def load_image_bytes(
    data: bytes, name: str, *, max_side: int | None = MAX_DECODED_SIDE
) -> tuple[np.ndarray, ImageMeta]:
    """Read an image from memory (e.g. a web upload); same contract as :func:`load_image`.

    Args:
        data: File content.
        name: File name, used only in messages and ``meta.path``.
        max_side: As :func:`load_image`.

    Returns:
        ``(image, meta)`` as :func:`load_image`.

    Raises:
        ImageReadError, UnsupportedImageError, ImageTooLargeError, ConfigError: As :func:`load_image`.
    """
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int | np.integer)
                                 or max_side < 1):
        raise ConfigError(f"max_side={max_side!r}: expected a positive number of pixels or None")
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    if data[128:132] == b"DICM":
        from covidcxr.io.dicom import _read_dicom  # dicom.py builds on ImageMeta from here

        image, meta = _read_dicom(data, name, max_side)
    else:
        image, meta = _read_pil(data, name, max_side)
    if image.dtype == np.float32 and image.flags.owndata and image.flags.writeable:
        # A fresh float32 array (the usual case): the same NaN -> 0 and clipping, in place (two full-size copies less;
        # clipping first sends +-inf to 1 / 0 as nan_to_num then clip did, and np.isnan is one pass, not five).
        np.clip(image, 0.0, 1.0, out=image)
        np.copyto(image, np.float32(0.0), where=np.isnan(image))
    else:
        image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(image), meta


# --------------------------------------------------------------------------------------------- reduction
def _reduction_factor(height: int, width: int, max_side: int | None) -> int:
    """Smallest integer factor ``f`` with ``ceil(side / f) <= max_side`` for both sides (1: no reduction)."""
    if max_side is None or max(height, width) <= max_side:
        return 1
    return -(-max(height, width) // max_side)


def _reduced_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """``(height, width)`` after reducing by ``factor`` (partial edge blocks count as one pixel)."""
    return -(-height // factor), -(-width // factor)


def _note_reduction(meta: ImageMeta, factor: int, shape: tuple[int, ...], max_side: int | None) -> None:
    h, w = meta.original_size
    meta.warn(f"reduced from {w} x {h} to {shape[1]} x {shape[0]} px (factor {factor}; decoded side limit "
              f"{max_side})")


def _block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``arr`` (``H x W`` or ``H x W x C``) over ``factor x factor`` blocks, keeping its dtype.

    Integer inputs are rounded back to their own dtype, so lookup tables (DICOM Modality/VOI LUT, palettes) still
    apply afterwards. Works in strips of rows: only a few megabytes are ever held in float64, never the full frame.
    """
    h, w = arr.shape[:2]
    oh, ow = _reduced_size(h, w, factor)
    out = np.empty((oh, ow, *arr.shape[2:]), dtype=arr.dtype)
    integer = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    col_starts = np.arange(0, w, factor)
    col_count = np.minimum(factor, w - col_starts).astype(np.float64)
    extra = (1,) * (arr.ndim - 2)
    rows_per_strip = max(1, (1 << 21) // max(1, w * factor * int(np.prod(arr.shape[2:], dtype=np.int64))))
    for r0 in range(0, oh, rows_per_strip):
        r1 = min(oh, r0 + rows_per_strip)
        strip = arr[r0 * factor:min(h, r1 * factor)].astype(np.float64)
        row_starts = np.arange(0, strip.shape[0], factor)
        sums = np.add.reduceat(np.add.reduceat(strip, row_starts, axis=0), col_starts, axis=1)
        count = np.minimum(factor, strip.shape[0] - row_starts).astype(np.float64)[:, None] * col_count[None, :]
        mean = sums / count.reshape(count.shape + extra)
        if integer:
            info = np.iinfo(arr.dtype) if arr.dtype != np.bool_ else None
            mean = np.rint(mean)
            if info is not None:
                mean = np.clip(mean, info.min, info.max)
        out[r0:r1] = mean
    return out


# Pillow transposes matching EXIF orientations 2-8 (as ImageOps.exif_transpose applies them).
_EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                   7: "TRANSVERSE", 8: "ROTATE_90"}


def _reduce_pil(im: Any, fmt: str, factor: int) -> tuple[Any, tuple[int, int]]:
    """Decode ``im`` reduced by ``factor`` (JPEG: DCT scaling via ``draft`` first) and apply its EXIF orientation.

    Returns the reduced, oriented image and the stored ``(height, width)`` after orientation.
    """
    from PIL import Image

    w, h = im.size
    orientation = im.getexif().get(0x0112, 1) if fmt in ("jpeg", "tiff") else 1
    rh, rw = _reduced_size(h, w, factor)
    if fmt == "jpeg":
        im.draft(im.mode, (rw, rh))  # decodes at 1/2, 1/4 or 1/8 scale, never below the requested size
    im.load()
    # Pillow resizes bilevel and palette images with nearest neighbour only, and premultiplies alpha (which is
    # ignored here anyway): reduce gray or RGB instead.
    if im.mode in ("1", "LA", "La"):
        im = im.convert("L")
    elif im.mode in ("P", "PA", "RGBA", "RGBa"):
        im = im.convert("RGB")
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.Resampling.BOX)
    method = _EXIF_TRANSPOSE.get(orientation)
    if method is not None:
        im = im.transpose(getattr(Image.Transpose, method))
    return im, ((w, h) if orientation in (5, 6, 7, 8) else (h, w))


# --------------------------------------------------------------------------------------------- PIL formats
def _read_pil(data: bytes, name: str, max_side: int | None = MAX_DECODED_SIDE) -> tuple[np.ndarray, ImageMeta]:
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
    stored_mode = im.mode
    factor = _reduction_factor(h, w, max_side)
    try:
        if factor > 1:
            im, original_size = _reduce_pil(im, fmt, factor)
        else:
            im.load()
            if fmt in ("jpeg", "tiff"):
                im = ImageOps.exif_transpose(im)
            original_size = im.size[::-1]
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} image data ({e})") from e

    mode = im.mode
    meta = ImageMeta(path=name, format=fmt, original_size=original_size, bit_depth=8, photometric="MONOCHROME2")
    if factor > 1:
        _note_reduction(meta, factor, im.size[::-1], max_side)
        if stored_mode == "1":  # reduced as 8-bit gray (block averages of the bilevel image): the "L" branch
            meta.bit_depth = 1
    if mode == "1":
        meta.bit_depth = 1
        return np.asarray(im, dtype=np.float32), meta
    if mode in ("L", "LA"):
        if stored_mode in ("LA", "La"):
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
    meta.photometric = {"P": "PALETTE COLOR"}.get(stored_mode, stored_mode)
    meta.warn(f"{stored_mode} colour image converted to grayscale")
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
