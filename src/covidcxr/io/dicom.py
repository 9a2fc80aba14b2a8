"""DICOM reading (VOI LUT, MONOCHROME1, compressed transfer syntaxes) and writing."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ImageReadError, ImageTooLargeError, UnsupportedImageError
from covidcxr.io.files import _quantise
from covidcxr.io.image import (
    _LUMA,
    MAX_DECODED_SIDE,
    MAX_PIXELS,
    ImageMeta,
    _block_mean,
    _note_reduction,
    _reduction_factor,
)
from covidcxr.vocab import OTHER_MODALITY, UNKNOWN_VIEW, modality_from_header, view_from_header

logger = logging.getLogger(__name__)

# Projection radiography modalities; cross-sectional (CT, MR, PT, ...) and other objects are refused.
_ACCEPTED_MODALITIES = {"CR", "DX", "DR", "RG", "OT", ""}
_SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Photometric interpretations of the standard (PS3.3 C.7.6.3.1.2); any other header text is refused, unechoed.
_PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
                 "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")  # a well-formed DICOM code string (CS)


def _shown(value: str) -> str:
    """``value`` for an error message when it is a well-formed DICOM code string, else a placeholder.

    Error messages reach API responses and the web page; header free text must not.
    """
    return value if _CODE.fullmatch(value) else "(not a valid code string)"


# --------------------------------------------------------------------------------------------- DICOM
def _read_dicom(data: bytes, name: str, max_side: int | None = MAX_DECODED_SIDE) -> tuple[np.ndarray, ImageMeta]:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pydicom raises many types on malformed input
        raise ImageReadError(name, f"corrupt or truncated DICOM file ({type(e).__name__}: {e})") from e

    modality = str(ds.get("Modality", "") or "").upper()
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", None) if getattr(sop, "is_valid", False) else None
    sop_name = sop_name or "unknown SOP class"
    if "PixelData" not in ds and sop is None and not modality:
        raise ImageReadError(name, "corrupt DICOM file: no SOP class, modality or pixel data could be read")
    if "PixelData" not in ds:
        raise UnsupportedImageError(
            name, f"DICOM object has no pixel data ({sop_name}, modality {_shown(modality) if modality else '?'}); "
            "not an image"
        )
    if modality not in _ACCEPTED_MODALITIES:
        raise UnsupportedImageError(
            name,
            f"modality {_shown(modality)} is not a projection radiograph "
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
    if photometric not in _PHOTOMETRICS:  # pydicom cannot decode it either (and would echo the text)
        raise UnsupportedImageError(name, f"photometric interpretation {_shown(photometric)} is not a DICOM one")
    meta = ImageMeta(
        path=name,
        format="dicom",
        original_size=(rows, cols),
        bit_depth=int(ds.get("BitsStored", 8)),
        photometric=photometric,
        view=_header_view(ds, name),
        modality=_header_modality(modality, name),
    )
    arr = _decode_dicom_pixels(ds, name)
    factor = _reduction_factor(rows, cols, max_side)
    if factor > 1 and photometric != "PALETTE COLOR":  # palette indices are reduced after the colour lookup
        arr = _block_mean(arr, factor)  # stored dtype kept: the LUTs below still apply
        _note_reduction(meta, factor, arr.shape, max_side)

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
        if factor > 1:
            arr = _block_mean(arr, factor)
            _note_reduction(meta, factor, arr.shape, max_side)
    else:  # RGB / YBR_*: pydicom's pixel_array already converts YBR to RGB
        depth = meta.bit_depth
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnsupportedImageError(name, f"photometric interpretation {photometric} with shape {arr.shape}")
    meta.warn(f"{photometric} colour DICOM converted to grayscale")
    return (arr.astype(np.float32) @ _LUMA) / float(2**depth - 1), meta


def _header_view(ds: Any, name: str) -> str:
    """ViewPosition mapped onto :data:`covidcxr.vocab.VIEWS`; the raw header text is never kept or logged."""
    raw = ds.get("ViewPosition")
    view = view_from_header(raw)
    if view == UNKNOWN_VIEW and str(raw or "").strip():
        logger.debug("%s: ViewPosition not recognised (%d characters); view reported as %r", name,
                     len(str(raw)), UNKNOWN_VIEW)
    return view


def _header_modality(modality: str, name: str) -> str:
    """Modality mapped onto :data:`covidcxr.vocab.MODALITIES` (the refusal above has already seen the raw value)."""
    mapped = modality_from_header(modality)
    if mapped == OTHER_MODALITY and modality:
        logger.debug("%s: modality reported as %r", name, OTHER_MODALITY)
    return mapped


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
