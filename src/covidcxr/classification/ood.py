"""The input gate: no verdict on what is not a usable frontal chest X-ray.

Four checks:

* **Input type** (:mod:`covidcxr.classification.input_type`, independent of the COVID-19 model): a lateral view, a
  CT image, a radiograph turned on its side or another picture gets no verdict, and the reason says what it looked
  like.
* **Mirror images** (:mod:`covidcxr.classification.mirror`, part of the model: it reads the classifier's feature
  map): a frontal radiograph that looks left-right mirrored gets no verdict.
* **Lung QC.** Segmentation flags that mean there is no usable lung field (a blank image, no lung, one lung, both
  regions on one side, a mask too small to use) withhold the result.
* **Distance to the training cases.** The mean cosine distance of an image's embedding to its ``k`` nearest
  training embeddings; above a threshold set on validation images (a high quantile of their distances, so about
  ``1 - quantile`` of in-distribution images are refused) the input is out of distribution: a photograph, a hand
  radiograph, a lateral view look unlike every training case.

The reference (training embeddings, float16, and the threshold) is stored in the model artifact as
``ood_reference.npz`` with its settings in ``config.json`` (``"ood"``); :func:`fit_reference` makes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.classification.input_type import LOOKS_LIKE
from covidcxr.classification.mirror import MESSAGE as MIRROR_MESSAGE
from covidcxr.classification.mirror import REASON as MIRROR_REASON
from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCE_FILE = "ood_reference.npz"
BLOCKING_QC_FLAGS: tuple[str, ...] = ("blank_image", "no_lung", "one_lung_missing", "lungs_same_side",
                                      "seg_fallback")
"""Segmentation QC flags after which no verdict is given (measured on the development CXRs: benchmarks/input_gate.py)."""
REASONS = {
    "blank_image": "the image is (nearly) uniform",
    "no_lung": "no lung was found",
    "one_lung_missing": "only one lung was found",
    "lungs_same_side": "both lung regions lie on the same side",
    "seg_fallback": "the lung mask is unusable",
    "out_of_distribution": "it looks unlike every chest X-ray the model was trained on",
}
INPUT_TYPE_REASON = "looks_{}"
"""Gate reason for a refused input type (``looks_ct``, ``looks_lateral``, ...), its text that of the check."""
REASONS.update({INPUT_TYPE_REASON.format(kind): text for kind, text in LOOKS_LIKE.items()})
REASONS[MIRROR_REASON] = MIRROR_MESSAGE


@dataclass
class GateResult:
    """Per-image verdict of the input gate.

    Attributes:
        usable: Whether a probability and label may be shown.
        reasons: Why not (keys of :data:`REASONS`), empty when usable.
        distance: Mean cosine distance to the nearest training cases (None without a reference).
        threshold: The distance threshold (None without a reference).
    """

    usable: bool
    reasons: list[str]
    distance: float | None = None
    threshold: float | None = None

    @property
    def message(self) -> str:
        """"no result: not a usable frontal chest X-ray, because ..." (empty when usable)."""
        if self.usable:
            return ""
        return "no result: not a usable frontal chest X-ray, because " + "; ".join(REASONS.get(r, r)
                                                                                  for r in self.reasons)


class OODReference:
    """Training embeddings and the distance threshold of one model (see :func:`fit_reference`).

    Args:
        embeddings: L2-normalised training embeddings ``(N, D)``.
        threshold: Distance above which an input is out of distribution.
        k: Neighbours averaged.
    """

    def __init__(self, embeddings: np.ndarray, threshold: float, k: int = 5) -> None:
        if embeddings.ndim != 2 or len(embeddings) < k:
            raise ConfigError(f"OOD reference needs at least k={k} embeddings, got shape {embeddings.shape}")
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self._reference64: np.ndarray | None = None  # float64 copy for distances (:meth:`_reference`)
        self.threshold = float(threshold)
        self.k = int(k)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Mean cosine distance of each row to its ``k`` nearest reference embeddings.

        The products are summed in float64: in float32 the last bits depend on the BLAS kernel (the CPU), its
        threads and the batch size (1.2e-7 apart between two chunkings of the same images), and the gate compares
        the distance with a threshold."""
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ConfigError(f"embeddings of shape {q.shape} do not fit a {self.embeddings.shape[1]}-d reference")
        sim = q.astype(np.float64) @ self._reference().T
        top = -np.partition(-sim, self.k - 1, axis=1)[:, : self.k]
        return (1.0 - top.mean(axis=1)).astype(np.float64)

    def self_distances(self) -> np.ndarray:
        """Each reference embedding's distance to its ``k`` nearest *other* reference embeddings (leave-one-out),
        i.e. how an in-distribution training image scores when it is not its own neighbour."""
        ref = self._reference()
        sim = ref @ ref.T
        np.fill_diagonal(sim, -np.inf)
        top = -np.partition(-sim, self.k - 1, axis=1)[:, : self.k]
        return (1.0 - top.mean(axis=1)).astype(np.float64)

    def _reference(self) -> np.ndarray:
        """The reference embeddings in float64, converted once on first use (not at load: a one-image predict that
        stops before the gate does not pay for it)."""
        if self._reference64 is None:
            self._reference64 = self.embeddings.astype(np.float64)
        return self._reference64

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Write ``ood_reference.npz`` into ``directory``; returns the ``config["ood"]`` entry."""
        path = Path(directory) / REFERENCE_FILE
        np.savez_compressed(path, embeddings=self.embeddings.astype(np.float16))
        return {"file": REFERENCE_FILE, "threshold": self.threshold, "k": self.k, "n": len(self.embeddings)}

    @classmethod
    def load(cls, directory: str | Path, entry: dict[str, Any]) -> OODReference:
        """Read the reference named by a config's ``"ood"`` entry.

        Raises:
            ModelError: The file is missing or corrupt.
        """
        from covidcxr.io.files import read_npz

        path = Path(directory) / entry.get("file", REFERENCE_FILE)
        emb = read_npz(path, ("embeddings",), "out-of-distribution reference")["embeddings"]
        return cls(emb, float(entry["threshold"]), int(entry.get("k", 5)))


def fit_reference(train_embeddings: np.ndarray, val_embeddings: np.ndarray, *, quantile: float = 0.995,
                  k: int = 5) -> tuple[OODReference, np.ndarray]:
    """Reference from training embeddings, threshold at a quantile of the validation images' distances.

    Args:
        train_embeddings: L2-normalised embeddings of the training images.
        val_embeddings: Of validation images (not in ``train_embeddings``), all in distribution.
        quantile: Share of validation images that must pass.
        k: Neighbours averaged.

    Returns:
        ``(reference, validation distances)``.
    """
    if not 0.5 <= quantile < 1.0:
        raise ConfigError(f"quantile={quantile}: expected a value in [0.5, 1)")
    probe = OODReference(train_embeddings, np.inf, k)
    d_val = probe.distances(val_embeddings)
    return OODReference(train_embeddings, float(np.quantile(d_val, quantile)), k), d_val


def gate(qc_flags: list[str], distance: float | None = None, threshold: float | None = None,
         input_type: Any = None, mirrored: bool | None = None) -> GateResult:
    """The input gate of one image from its QC flags, (when the model has a reference) its distance, (when
    checked) its :class:`~covidcxr.classification.input_type.InputType` and (when the model has a mirror check)
    whether it looks mirrored; what the input looked like comes first."""
    reasons = [] if input_type is None or input_type.frontal else [INPUT_TYPE_REASON.format(input_type.kind)]
    if mirrored and not reasons:
        reasons.append(MIRROR_REASON)
    reasons += [f for f in BLOCKING_QC_FLAGS if f in qc_flags]
    if distance is not None and threshold is not None and distance > threshold:
        reasons.append("out_of_distribution")
    return GateResult(not reasons, reasons, distance, threshold)


def reference_for_model(artifact: Any, train_rows: Any, val_rows: Any, *, quantile: float = 0.995, k: int = 5,
                        mask_dir: str | Path | None = None, num_workers: int = 2) -> tuple[OODReference, np.ndarray]:
    """Embed a model's training and validation rows (the one manifest loop) and fit its reference.

    Returns:
        ``(reference, validation distances)``; store it with ``reference.save(artifact.directory)`` and put the
        returned entry into ``config.json`` under ``"ood"``.
    """
    from covidcxr.classification.loop import predict_manifest

    _, train_emb = predict_manifest(artifact, train_rows, embeddings=True, mask_dir=mask_dir, num_workers=num_workers)
    _, val_emb = predict_manifest(artifact, val_rows, embeddings=True, mask_dir=mask_dir, num_workers=num_workers)
    return fit_reference(train_emb, val_emb, quantile=quantile, k=k)
