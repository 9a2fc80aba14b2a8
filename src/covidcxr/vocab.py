"""The project's vocabulary, spelled once: class labels, splits, segmentation and intensity modes.

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
