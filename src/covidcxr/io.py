"""Reading and writing chest X-ray images: one contract for PNG, JPEG, TIFF and DICOM.

Every reader returns ``(image, meta)``: ``image`` is a float32 ``H x W`` array in ``[0, 1]`` where bright means
dense (bone, soft tissue) and dark means air, and ``meta`` is an :class:`ImageMeta` record. DICOM files are
recognised by the ``DICM`` magic bytes at offset 128, never by the file name.

Intensity rule:

* PNG/JPEG/TIFF: divide by the bit depth's maximum (8 bit: /255, 16 bit: /65535, 1 bit: 0/1). Float TIFFs in
  ``[0, 1]`` are kept, other float TIFFs are min-max scaled (with a warning).
* DICOM: apply the Modality LUT (rescale slope/intercept or LUT), then the VOI LUT or window (first one) with
  pydicom. With a window, the window's output range (pydicom's ``y_min..y_max``) maps to ``[0, 1]``; with a VOI
  LUT sequence, ``0..2**bits-1`` of the LUT; with neither, the stored bit depth's range passed through the
  Modality LUT maps to ``[0, 1]``. MONOCHROME1 is then inverted (``1 - x``) so bright is always dense.
* Colour images are converted to gray (ITU-R 601 luma) with a warning.

Images over :data:`MAX_PIXELS` are refused from their header, before the pixels are decoded.
"""

from __future__ import annotations

import hashlib
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
# Projection radiography modalities; cross-sectional (CT, MR, PT, ...) and other objects are refused.
_ACCEPTED_MODALITIES = {"CR", "DX", "DR", "RG", "OT", ""}
_SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
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


# --------------------------------------------------------------------------------------------- DICOM
def _read_dicom(data: bytes, name: str) -> tuple[np.ndarray, ImageMeta]:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pydicom raises many types on malformed input
        raise ImageReadError(name, f"corrupt or truncated DICOM file ({type(e).__name__}: {e})") from e

    modality = str(ds.get("Modality", "") or "").upper()
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", sop) or "unknown SOP class"
    if "PixelData" not in ds and sop is None and not modality:
        raise ImageReadError(name, "corrupt DICOM file: no SOP class, modality or pixel data could be read")
    if "PixelData" not in ds:
        raise UnsupportedImageError(
            name, f"DICOM object has no pixel data ({sop_name}, modality {modality or '?'}); not an image"
        )
    if modality not in _ACCEPTED_MODALITIES:
        raise UnsupportedImageError(
            name,
            f"modality {modality} is not a projection radiograph "
            "(accepted: CR, DX, DR, RG, OT); CT/MR slices and other objects are refused",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError(name, f"multi-frame DICOM ({frames} frames); expected one frontal radiograph")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageReadError(name, "DICOM header lacks a valid Rows/Columns")
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(name, f"{cols} x {rows} = {rows * cols:,} pixels exceeds the limit of {MAX_PIXELS:,}")

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    meta = ImageMeta(
        path=name,
        format="dicom",
        original_size=(rows, cols),
        bit_depth=int(ds.get("BitsStored", 8)),
        photometric=photometric,
        view=view,
        modality=modality or None,
    )
    arr = _decode_dicom_pixels(ds, name)

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        try:
            arr = apply_modality_lut(arr, ds)
            if _has_voi(ds):
                lo, hi = _voi_output_range(ds)
                arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            else:
                lo, hi = sorted(_modality_output_range(ds))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError) as e:
            raise ImageReadError(name, f"invalid Modality/VOI LUT or window attributes ({e})") from e
        image = (np.asarray(arr, dtype=np.float64) - lo) / ((hi - lo) or 1.0)
        if photometric == "MONOCHROME1":
            meta.warn("MONOCHROME1 image inverted so that bright means dense")
            image = 1.0 - np.clip(image, 0.0, 1.0)
        return image, meta
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:  # RGB / YBR_*: pydicom's pixel_array already converts YBR to RGB
        depth = meta.bit_depth
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedImageError(name, f"photometric interpretation {photometric} with shape {arr.shape}")
    meta.warn(f"{photometric} colour DICOM converted to grayscale")
    return (arr.astype(np.float32) @ _LUMA) / float(2**depth - 1), meta


def _decode_dicom_pixels(ds: Any, name: str) -> np.ndarray:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    tsyntax = UID(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or "1.2.840.10008.1.2")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise UnsupportedImageError(
            name,
            f"pydicom cannot decode transfer syntax {tsyntax.name!r} ({tsyntax}); "
            "convert the file to an uncompressed or JPEG/JPEG 2000 transfer syntax",
        ) from e
    if not decoder.is_available:
        raise UnsupportedImageError(
            name,
            f"no installed plugin decodes transfer syntax {tsyntax.name!r} "
            f"({tsyntax}); install {_plugin_hint(tsyntax)}",
        )
    try:
        return ds.pixel_array
    except Exception as e:  # decoders raise ValueError/RuntimeError/OSError on broken streams
        raise ImageReadError(name, f"cannot decode pixel data ({tsyntax.name}): {type(e).__name__}: {e}") from e


def _plugin_hint(tsyntax: str) -> str:
    from pydicom import uid

    if tsyntax in uid.JPEG2000TransferSyntaxes or "2000" in getattr(tsyntax, "name", ""):
        return "'pylibjpeg' and 'pylibjpeg-openjpeg' (pip install pylibjpeg pylibjpeg-openjpeg)"
    if tsyntax in uid.JPEGTransferSyntaxes or tsyntax in uid.JPEGLSTransferSyntaxes:
        return "'pylibjpeg' and 'pylibjpeg-libjpeg' (pip install pylibjpeg pylibjpeg-libjpeg)"
    if tsyntax in uid.RLETransferSyntaxes:
        return "'pylibjpeg-rle' (pip install pylibjpeg pylibjpeg-rle)"
    return "'python-gdcm' (pip install python-gdcm)"


def _has_voi(ds: Any) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _modality_output_range(ds: Any) -> tuple[float, float]:
    """The value range after the Modality LUT, as pydicom's windowing assumes it (``y_min, y_max``)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _voi_output_range(ds: Any) -> tuple[float, float]:
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    return _modality_output_range(ds)


def write_dicom(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    view: str | None = None,
    patient_id: str = "ANON",
    modality: str = "DX",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    study_date: str | None = None,
    transfer_syntax: str | None = None,
    instance_uid: str | None = None,
) -> Path:
    """Write a valid DICOM Part-10 file with pydicom (test fixtures and the synthetic cohort).

    Args:
        path: Output file.
        array: ``H x W`` image (or ``F x H x W`` frames): floats in ``[0, 1]`` are quantised to ``bits_stored``;
            unsigned integers are stored as given.
        photometric: ``'MONOCHROME2'`` or ``'MONOCHROME1'`` (stored inverted, so reading gives ``array`` back).
        bits_stored: 1-16; 8 or less is stored in 8-bit words, more in 16-bit words.
        view: ViewPosition (``'PA'``, ``'AP'``, ...).
        patient_id: PatientID.
        modality: Modality; chooses the SOP class (DX, CR, CT, MR, else Secondary Capture).
        window: Optional ``(center, width)`` written as WindowCenter/WindowWidth (in rescaled units).
        rescale: Optional ``(slope, intercept)`` written as RescaleSlope/RescaleIntercept.
        study_date: StudyDate as ``YYYYMMDD``.
        transfer_syntax: Transfer syntax UID; None is Explicit VR Little Endian, a compressed one (e.g. RLE
            Lossless, JPEG 2000 Lossless) is encoded with ``Dataset.compress`` and an installed encoder.
        instance_uid: SOPInstanceUID; None draws a random one. Study/series UIDs are derived from it.

    Returns:
        The written path.

    Raises:
        ConfigError: Invalid photometric, bit depth or pixel values.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ConfigError(f"photometric={photometric!r}: expected 'MONOCHROME1' or 'MONOCHROME2'")
    if not 1 <= bits_stored <= 16:
        raise ConfigError(f"bits_stored={bits_stored}: expected 1..16")
    stored = _quantise(np.asarray(array), bits_stored, "array")
    if stored.ndim not in (2, 3):
        raise ConfigError(f"array shape {stored.shape}: expected H x W or frames x H x W")
    if photometric == "MONOCHROME1":
        stored = (2**bits_stored - 1) - stored
    stored = stored.astype(np.uint8 if bits_stored <= 8 else np.uint16)

    instance_uid = instance_uid or generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = _SOP_CLASSES.get(modality.upper(), _SECONDARY_CAPTURE)
    file_meta.MediaStorageSOPInstanceUID = instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[instance_uid, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[instance_uid, "series"])
    ds.Modality = modality.upper()
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    if study_date:
        ds.StudyDate = study_date
    if view:
        ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    if stored.ndim == 3:
        ds.NumberOfFrames = int(stored.shape[0])
    ds.BitsAllocated = stored.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.tobytes()
    if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------- PNG
def save_png(path: str | os.PathLike[str], array: np.ndarray, bit_depth: int = 8) -> Path:
    """Save a gray (``H x W``) or 8-bit RGB (``H x W x 3``) image as PNG.

    Args:
        path: Output file.
        array: Floats in ``[0, 1]`` (scaled to the bit depth's maximum), or unsigned integers / booleans stored
            as given (booleans as 0/max).
        bit_depth: 8 or 16.

    Returns:
        The written path.

    Raises:
        ConfigError: Unsupported bit depth, shape, or values out of range.
    """
    from PIL import Image

    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth={bit_depth}: expected 8 or 16")
    arr = np.asarray(array)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3 and bit_depth == 8)):
        raise ConfigError(f"array shape {arr.shape}: expected H x W (or H x W x 3 at 8 bit)")
    stored = _quantise(arr, bit_depth, "array").astype(np.uint8 if bit_depth == 8 else np.uint16)
    path = Path(path)
    Image.fromarray(stored).save(path, format="PNG")
    return path


def _quantise(arr: np.ndarray, bits: int, what: str) -> np.ndarray:
    """Floats in [0, 1] -> round(x * (2**bits - 1)); bools -> 0/max; unsigned integers checked and kept."""
    top = 2**bits - 1
    if arr.dtype == bool:
        return arr.astype(np.int64) * top
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise ConfigError(f"{what}: float values must be finite and in [0, 1]")
        return np.rint(arr.astype(np.float64) * top).astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            raise ConfigError(f"{what}: integer values must be in [0, {top}] for {bits} bits")
        return arr.astype(np.int64)
    raise ConfigError(f"{what}: unsupported dtype {arr.dtype}")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (the identity of weights files in configs and indexes).

    Args:
        path: File to hash.
        chunk: Bytes read at a time.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
