"""The project's vocabulary, spelled once: class labels, splits, segmentation and intensity modes, views, modalities.

Every module that names a label or a mode imports it from here, so a new mode or a renamed label is one edit.
"""

from __future__ import annotations

LABELS: tuple[str, str] = ("non_covid", "covid")
"""Class names; index 1 (``covid``) is the positive class everywhere (labels, logits, probabilities)."""
NEGATIVE_LABEL, POSITIVE_LABEL = LABELS
SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Values of a manifest's ``split`` column."""
SEG_MODES: tuple[str, ...] = ("none", "mask", "crop")
"""How the lung mask enters the classifier: not at all, zero outside the lungs, or crop to the lung box."""
INTENSITY_MODES: tuple[str, ...] = ("none", "clahe")
"""Intensity standardisation after the segmentation mode (``clahe``: OpenCV contrast-limited equalisation)."""
VIEWS: tuple[str, ...] = ("PA", "AP", "AP supine", "lateral", "unknown")
"""Radiograph view positions as this package reports them (``ImageMeta.view`` of a DICOM file, API, web page).

Header free text never passes through: :func:`view_from_header` maps it onto this closed list."""
UNKNOWN_VIEW = "unknown"
MODALITIES: tuple[str, ...] = ("CR", "DX", "other")
"""DICOM modalities as this package reports them (``ImageMeta.modality``); see :func:`modality_from_header`."""
OTHER_MODALITY = "other"

_VIEW_SPELLINGS: dict[str, str] = {
    "PA": "PA", "POSTERO-ANTERIOR": "PA", "POSTEROANTERIOR": "PA", "PA ERECT": "PA", "PA UPRIGHT": "PA",
    "AP": "AP", "ANTERO-POSTERIOR": "AP", "ANTEROPOSTERIOR": "AP", "AP ERECT": "AP", "AP UPRIGHT": "AP",
    "AP SUPINE": "AP supine", "APS": "AP supine", "AP-SUPINE": "AP supine", "AP_SUPINE": "AP supine",
    "SUPINE AP": "AP supine", "SUPINE": "AP supine", "AP SUP": "AP supine", "AP LYING": "AP supine",
    "LL": "lateral", "RL": "lateral", "LATERAL": "lateral", "LAT": "lateral", "LLAT": "lateral",
    "RLAT": "lateral", "LEFT LATERAL": "lateral", "RIGHT LATERAL": "lateral", "L LAT": "lateral", "R LAT": "lateral",
}
_MODALITY_SPELLINGS: dict[str, str] = {"CR": "CR", "DX": "DX"}


def view_from_header(text: object) -> str:
    """Map a DICOM ViewPosition (free text) onto :data:`VIEWS`; anything unrecognised is ``'unknown'``.

    Case, surrounding blanks and runs of inner blanks are ignored. The raw text is never returned.
    """
    key = " ".join(str(text or "").upper().split())
    return _VIEW_SPELLINGS.get(key, UNKNOWN_VIEW)


def modality_from_header(text: object) -> str:
    """Map a DICOM Modality (free text) onto :data:`MODALITIES`; anything but CR and DX is ``'other'``."""
    return _MODALITY_SPELLINGS.get(str(text or "").strip().upper(), OTHER_MODALITY)
