"""The one analysis of one chest X-ray: lung mask, input gate, probability, embedding and Grad-CAM in one pass.

:func:`analyze_one` is what the web app (:class:`~covidcxr.service.case_service.CaseService`), ``covidcxr explain``
and the PACS client present; each network runs once (the forward pass Grad-CAM differentiates also gives the
probability and the embedding), and the input gate (:mod:`covidcxr.classification.ood`) decides whether a verdict
may be shown at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)


LOW_LUNG_ENERGY = 0.5
"""Below this share of Grad-CAM energy inside the lungs, the result carries the flag ``heatmap_outside_lungs``."""













@dataclass
class Analysis:
    """One image analysed: what the page, the CLI and the PACS client present.

    Attributes:
        prediction: The model's :class:`~covidcxr.classification.inference.Prediction` of the image (probability,
            label, embedding, heat map; one forward pass per network).
        mask: Lung mask ``H x W`` (uint8) shown with the result.
        lung_fraction: Share of the image inside the lungs (None when the mask was given).
        qc_flags: Segmentation and preprocessing QC flags.
        heatmap: Grad-CAM heat map ``H x W`` in [0, 1].
        lung_energy_fraction: Share of the heat map inside the lungs.
        explanation_flags: ``heatmap_outside_lungs`` when that share is below :data:`LOW_LUNG_ENERGY`.
        timing: Milliseconds per step.
    """

    prediction: Any
    mask: np.ndarray
    lung_fraction: float | None
    qc_flags: list[str]
    heatmap: np.ndarray
    lung_energy_fraction: float | None
    explanation_flags: list[str]
    timing: dict[str, float]
    gate: Any = None

    @property
    def usable(self) -> bool:
        """Whether the input gate lets a verdict be shown (see :mod:`covidcxr.classification.ood`)."""
        return self.gate is None or self.gate.usable


def analyze_one(
    artifact: Any, image: np.ndarray, *, segmenter: Any = None, segmenter_key: str | None = None,
    mask: np.ndarray | None = None,
) -> Analysis:
    """The one analysis of one image: lung mask, probability, embedding and Grad-CAM, each network run once.

    Args:
        artifact: Loaded classifier or ensemble artifact.
        image: float32 ``H x W`` in [0, 1].
        segmenter: Lung segmenter used when ``mask`` is None.
        segmenter_key: SHA-256 of ``segmenter``'s weights; its mask is handed to the model when it is the model's
            own segmenter (else the model segments with its own weights, as in training).
        mask: A given lung mask (its QC is the caller's); None segments with ``segmenter``.

    Returns:
        The :class:`Analysis`.

    Raises:
        ConfigError: Neither a mask nor a segmenter, or a mask of another size.
    """
    from covidcxr.classification.explain import lung_energy_fraction

    timing: dict[str, float] = {}
    qc: list[str] = []
    lung_fraction = None
    t = time.perf_counter()
    if mask is None:
        if segmenter is None:
            raise ConfigError("analyze_one needs a lung mask or a segmenter")
        seg = segmenter.predict([image])[0]
        mask, qc, lung_fraction = np.asarray(seg.mask).astype(np.uint8), list(seg.qc_flags), float(seg.lung_fraction)
        timing["segment"] = _ms(t)
    elif np.shape(mask) != np.shape(image):
        raise ConfigError(f"mask is {np.shape(mask)[1]}x{np.shape(mask)[0]} but the image is "
                          f"{image.shape[1]}x{image.shape[0]}")
    t = time.perf_counter()
    pred = artifact.analyze(image, masks_for_model(artifact, segmenter_key, mask), explain=True)
    timing["classify_explain"] = _ms(t)
    heat = pred.heatmaps[0]
    energy = lung_energy_fraction(heat, mask)
    qc_all = sorted(set(qc) | set(pred.qc_flags[0] if pred.qc_flags else []))
    pred.qc_flags = [qc_all]
    checked = artifact.gate(pred, [image])[0]  # no verdict on what is not a usable frontal chest X-ray
    return Analysis(
        prediction=pred, mask=mask, lung_fraction=lung_fraction,
        qc_flags=qc_all, heatmap=heat, lung_energy_fraction=energy,
        explanation_flags=["heatmap_outside_lungs"] if energy is not None and energy < LOW_LUNG_ENERGY else [],
        timing=timing, gate=checked,
    )


def _ms(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 1)


def _image_facts(image: np.ndarray, meta: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"height": int(image.shape[0]), "width": int(image.shape[1])}
    if meta is not None:
        facts.update(format=meta.format, bit_depth=int(meta.bit_depth), photometric=meta.photometric,
                     view=meta.view, modality=meta.modality, warnings=list(meta.warnings))
    return facts


def masks_for_model(artifact: Any, segmenter_key: str | None, mask: np.ndarray) -> np.ndarray | None:
    """The mask to hand to the model: ours only when it comes from the model's own segmenter.

    The model then sees exactly the preprocessing it was trained with; with any other segmenter (or none used by
    the model) the artifact segments with its own weights.

    Args:
        artifact: Loaded classifier or ensemble artifact.
        segmenter_key: SHA-256 of the segmenter that produced ``mask`` (None: not the model's).
        mask: Lung mask of the image.

    Returns:
        ``mask`` or None.
    """
    keys = artifact.segmenter_keys
    return mask if keys and keys == {segmenter_key} else None


def pick_segmenter(artifact: Any, weights: str | Path | None) -> tuple[Any, str | None]:
    """The model's own segmenter when it has one (masks reusable by the model), else the given or shipped one."""
    from covidcxr.segmentation.segmenter import LungSegmenter

    if weights is not None:
        segmenter = LungSegmenter.load(weights)
        return segmenter, segmenter.weights_hash
    for m in artifact.members:
        if m.segmenter_key is not None:
            return m.segmenter, m.segmenter_key
    return LungSegmenter.load(None), None


# --------------------------------------------------------------------------------------------- CLI: explain
