"""Left-right mirror images: a frontal chest X-ray exported or scanned mirrored (the heart on the image's left).

The COVID-19 classifier is not mirror-invariant (on the development CXRs mirroring moves P(covid) by a median
0.06 and changes 10 % of the labels: ``benchmarks/input_gate.py --part mirror``), so a mirrored radiograph must not
get a verdict. Turning it back is not safe: the check is right about 96 % of the time, and an upright image it
mistook for a mirrored one would then be judged in the wrong orientation; refusing costs only a new export.

The check reads the classifier's own last feature map (no extra network pass): the difference between the left and
right halves of each channel, pooled over rows, goes through a linear score (standardise + logistic regression,
collapsed into one weight vector) that is high for upright images and low for their mirror images. Its threshold
is a low quantile of out-of-fold scores of upright development images, so about that share of real upright CXRs is
refused. It is fitted with the model (``tools/ship_model.py``) and stored in the artifact as ``mirror_check.npz``
with its settings in ``config.json`` (``"mirror"``); a model without one has no mirror check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError, NotFittedError

MIRROR_FILE = "mirror_check.npz"
REASON = "looks_mirrored"
MESSAGE = "it looks like a left-right mirror image (heart on image's left)"
"""What a refusal says (at most 64 characters: also the meaning of the reason's code in a DICOM SR)."""


def mirror_features(feature_map: np.ndarray) -> np.ndarray:
    """Left-minus-right half means of a feature map ``(N, C, H, W)`` -> ``(N, C)`` (the middle column of an odd
    width is left out), so the features of a mirror image are about the negative of the upright image's."""
    fm = np.asarray(feature_map)
    if fm.ndim != 4 or fm.shape[-1] < 2:
        raise ConfigError(f"feature map of shape {fm.shape}: expected (N, C, H, W) with W >= 2")
    half = fm.shape[-1] // 2
    n = fm.shape[2] * half
    # Summed in float64 without a float64 copy of the whole map (a batch's map is ~60 MB in float32).
    return (fm[..., :half].sum(axis=(2, 3), dtype=np.float64) / n) - (fm[..., -half:].sum(axis=(2, 3), dtype=np.float64) / n)


class MirrorCheck:
    """Upright or mirrored, from the classifier's feature map (see the module docstring).

    Args:
        C: Inverse L2 penalty of the logistic regression.
        quantile: Share of upright development images (out of fold) allowed below the threshold.
    """

    def __init__(self, *, C: float = 0.03, quantile: float = 0.005) -> None:
        if not C > 0:
            raise ConfigError(f"C={C!r}: expected a positive number")
        if not 0.0 < quantile < 0.5:
            raise ConfigError(f"quantile={quantile!r}: expected a value in (0, 0.5)")
        self.C = C
        self.quantile = quantile

    def fit(self, upright: np.ndarray, mirrored: np.ndarray, *, threshold: float | None = None) -> MirrorCheck:
        """Fit on :func:`mirror_features` of upright images and of the same images mirrored.

        Args:
            upright: Features of upright images ``(N, C)``.
            mirrored: Features of their mirror images ``(M, C)``.
            threshold: Score below which an image is called mirrored (from out-of-fold scores, see
                :meth:`threshold_from`); None: the ``quantile`` of the training images' own scores (optimistic).
        """
        from sklearn.linear_model import LogisticRegression

        up, mi = np.asarray(upright, np.float64), np.asarray(mirrored, np.float64)
        if up.ndim != 2 or mi.ndim != 2 or up.shape[1] != mi.shape[1] or len(up) < 2 or len(mi) < 2:
            raise ConfigError(f"features of shapes {up.shape} and {mi.shape}: expected two (N, C) arrays, N >= 2")
        x = np.concatenate([up, mi])
        y = np.r_[np.ones(len(up)), np.zeros(len(mi))]
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        lr = LogisticRegression(C=self.C, max_iter=5000).fit((x - mean) / scale, y)
        # The standardisation folded into the weights: score = x @ coef_ + intercept_.
        self.coef_ = lr.coef_[0] / scale
        self.intercept_ = float(lr.intercept_[0] - np.sum(lr.coef_[0] * mean / scale))
        self.threshold_ = float(threshold) if threshold is not None else self.threshold_from(self.score_features(up))
        return self

    def threshold_from(self, upright_scores: np.ndarray) -> float:
        """The ``quantile`` of upright images' scores (computed out of fold by the caller)."""
        s = np.asarray(upright_scores, np.float64)
        if s.ndim != 1 or not len(s):
            raise ConfigError(f"scores of shape {s.shape}: expected a non-empty 1-D array")
        return float(np.quantile(s, self.quantile))

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("MirrorCheck is not fitted: call fit() or load()")

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """Score per row of :func:`mirror_features` (high = upright)."""
        self._check_fitted()
        x = np.atleast_2d(np.asarray(features, np.float64))
        if x.shape[1] != len(self.coef_):
            raise ConfigError(f"{x.shape[1]} features; the mirror check was fitted on {len(self.coef_)}")
        return x @ self.coef_ + self.intercept_

    def scores(self, feature_map: np.ndarray) -> np.ndarray:
        """Score per image of a feature map ``(N, C, H, W)`` (high = upright)."""
        return self.score_features(mirror_features(feature_map))

    def mirrored(self, scores: np.ndarray) -> np.ndarray:
        """Whether each score calls its image mirrored."""
        self._check_fitted()
        return np.asarray(scores, np.float64) < self.threshold_

    def save(self, directory: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``mirror_check.npz`` into ``directory``; returns the ``config["mirror"]`` entry."""
        self._check_fitted()
        np.savez_compressed(Path(directory) / MIRROR_FILE, coef=self.coef_, intercept=self.intercept_)
        return {"file": MIRROR_FILE, "threshold": self.threshold_, "C": self.C, "quantile": self.quantile,
                "features": "feature_map left-minus-right half means", **(info or {})}

    @classmethod
    def load(cls, directory: str | Path, entry: dict[str, Any]) -> MirrorCheck:
        """Read the check named by a config's ``"mirror"`` entry.

        Raises:
            ModelError: The file is missing or corrupt.
        """
        from covidcxr.io.files import read_npz

        path = Path(directory) / entry.get("file", MIRROR_FILE)
        arrays = read_npz(path, ("coef", "intercept"), "mirror check")
        try:
            obj = cls(C=float(entry.get("C", 0.03)), quantile=float(entry.get("quantile", 0.005)))
            obj.threshold_ = float(entry["threshold"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{path}: cannot read the mirror check (config entry {entry!r}: {exc})") from exc
        obj.coef_, obj.intercept_ = arrays["coef"], float(arrays["intercept"])
        return obj
