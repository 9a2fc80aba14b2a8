"""What kind of picture an input is: an upright frontal chest X-ray, or a lateral view, a CT image, a radiograph
turned on its side or upside down, another picture.

A small perceptron (one hidden layer) on about 600 hand-made features of a 64 x 64 / 128 x 128 thumbnail (its
normalised pixels at 16 x 16, row and column profiles, gradient-orientation histograms per cell, intensity
histograms and percentiles, fine texture, the dark/bright split and edge sharpness, the aspect ratio), with a
linear second opinion on CT images. It knows nothing about the COVID-19 classifier, so it is not refitted when that
model changes, and inference is numpy + OpenCV (no torch, no network runtime): coefficients in
``weights/input_type.npz``, settings and figures in ``weights/input_type.json``, trained and cross-validated by
patient with ``benchmarks/input_gate.py`` (model card ``weights/INPUT_TYPE_CARD.md``).

An image is accepted as a frontal chest X-ray when ``P(frontal) >= threshold``; otherwise the most probable other
kind names what it looked like. Radiographs turned by 90/180/270 degrees or flipped upside down are refused, not
turned upright (see the card); a left-right mirror image is not told apart (measured: learning it refused 5-7 % of
real frontal CXRs in a cross-validated trial while choosing the design, see the card): the COVID-19 model's mirror
check does that (:mod:`covidcxr.classification.mirror`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError, NotFittedError
from covidcxr.io.image import check_gray

log = logging.getLogger(__name__)

FRONTAL = "frontal"
KINDS: tuple[str, ...] = (FRONTAL, "rotated", "lateral", "ct", "other")
"""Classes, index 0 = an upright frontal chest X-ray (the only kind given a verdict)."""
LOOKS_LIKE = {
    "rotated": "it looks like a chest X-ray turned on its side or upside down",
    "lateral": "it looks like a lateral view, not a frontal chest X-ray",
    "ct": "it looks like a CT image, not a chest X-ray",
    "other": "it looks like a picture other than a chest X-ray",
}
"""What a refusal says, per kind (at most 64 characters: also the meaning of the reason's code in a DICOM SR)."""
THUMB = 64
WEIGHTS_NAME = "input_type"
FEATURE_VERSION = 2
"""Version of :func:`image_features` (a saved classifier of another version is refused): 2 = one OpenCV shrink,
the dark/bright split and edge features."""
N_CT_FEATURES = 27
"""The last features of :func:`image_features` that the CT second opinion reads: percentiles, texture, the
dark/bright split, edges (see :class:`InputTypeClassifier`)."""


_CELL = (np.arange(THUMB)[:, None] // 16 * 4 + np.arange(THUMB)[None, :] // 16).ravel() * 8
"""Index of the 4 x 4 grid cell of each 64 x 64 pixel, times the 8 orientation bins."""
_OCTANT = np.array([0, 1, 3, 2, 7, 6, 4, 5])
"""Signed gradient direction (45-degree bins counter-clockwise from +x) from ``4 (gy < 0) + 2 (gx < 0) + steep``."""
_PCT = np.array([1, 5, 25, 50, 75, 95, 99]) / 100


def _percentiles(ordered: np.ndarray) -> np.ndarray:
    """Percentiles :data:`_PCT` of sorted values (linear interpolation, as ``np.percentile``)."""
    pos = _PCT * (ordered.size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, ordered.size - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def _shrink(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a 128 x 128 float64 thumbnail in [0, 1], each pixel the mean of its area of the image (OpenCV; an
    image of up to 1024 px is first resampled bilinearly to 512 x 512 so the area step is an exact 4 x 4 mean)."""
    import cv2

    side = 2 * THUMB
    if max(arr.shape) <= 8 * side and arr.shape != (4 * side, 4 * side):
        arr = cv2.resize(arr, (4 * side, 4 * side), interpolation=cv2.INTER_LINEAR)
    return np.clip(cv2.resize(arr, (side, side), interpolation=cv2.INTER_AREA).astype(np.float64), 0.0, 1.0)


def _two_levels(raw: np.ndarray) -> tuple[float, list[float]]:
    """How the thumbnail splits into a dark and a bright part (Otsu on a 64-bin histogram): a CT image in a lung
    window is two flat levels with sharp edges (black lungs, uniform soft tissue), a radiograph grades smoothly.
    Returns the threshold and [between-class share of the variance, both class means, both class spreads relative
    to the gap between them, share of pixels midway between the two, dark share]."""
    hist = np.bincount(np.minimum((raw * 64).astype(int), 63).ravel(), minlength=64).astype(np.float64) / raw.size
    c = (np.arange(64) + 0.5) / 64
    w0 = np.cumsum(hist)
    s0, q0 = np.cumsum(hist * c), np.cumsum(hist * c * c)
    w1, s1, q1 = 1.0 - w0, s0[-1] - s0, q0[-1] - q0
    m0, m1 = s0 / np.maximum(w0, 1e-9), s1 / np.maximum(w1, 1e-9)
    between = (w0 * w1 * (m1 - m0) ** 2)[:-1]
    k = int(np.argmax(between))
    var = max(q0[-1] - s0[-1] ** 2, 1e-9)
    lo, hi = m0[k], m1[k]
    gap = max(hi - lo, 1e-3)
    sd0 = np.sqrt(max(q0[k] / max(w0[k], 1e-9) - lo ** 2, 0.0))
    sd1 = np.sqrt(max(q1[k] / max(w1[k], 1e-9) - hi ** 2, 0.0))
    mid = float(hist[np.abs(c - (lo + hi) / 2) < gap / 4].sum())
    return (lo + hi) / 2, [float(between[k] / var), lo, hi, sd0 / gap, sd1 / gap, mid, float(w0[k])]


def image_features(image: np.ndarray) -> np.ndarray:
    """The classifier's features of one grey image (float32 ``H x W`` in [0, 1]), a 1-D float64 vector.

    The image is shrunk once to 128 x 128 (:func:`_shrink`; the aspect ratio is kept as a feature) and that halved
    to 64 x 64; the 64 x 64 one standardised gives 16 x 16 pixels, 64 row and 64 column means and 8 signed
    gradient-orientation bins (so up and down differ) per cell of a 4 x 4 grid; its raw intensities a 16-bin
    histogram, percentiles (whole image and centre), moments and the dark/bright split (:func:`_two_levels`); the
    128 x 128 one a Laplacian texture map, the texture of the dark and the bright part and how sharp the edges are.
    """
    arr = check_gray(image)
    h, w = arr.shape
    fine = _shrink(np.ascontiguousarray(arr, np.float32))
    raw = (fine[::2, ::2] + fine[1::2, ::2] + fine[::2, 1::2] + fine[1::2, 1::2]) / 4
    mean, std = raw.mean(), raw.std()
    z = (raw - mean) / (std + 1e-3)
    thumb = z.reshape(16, 4, 16, 4).mean(axis=(1, 3)).ravel()
    rows, cols = z.mean(axis=1), z.mean(axis=0)
    gy, gx = np.gradient(z)
    mag = np.hypot(gx, gy)
    octant = _OCTANT[4 * (gy < 0) + 2 * (gx < 0) + (np.abs(gy) > np.abs(gx))]
    cells = np.bincount(_CELL + octant.ravel(), weights=mag.ravel(), minlength=128).reshape(4, 4, 8)
    cells = cells / (cells.sum(axis=2, keepdims=True) + 1e-6)
    ordered = np.sort(raw.ravel())
    hist = np.diff(np.searchsorted(ordered, np.linspace(0, 1, 17)[1:-1]), prepend=0, append=raw.size) / raw.size
    moments = [mean, std, float(np.mean(raw < 0.02)), float(np.mean(raw > 0.98)), np.log(h / w),
               float(np.mean(mag)), float(np.mean(np.abs(z[:, ::-1] - z)))]  # the last: left-right asymmetry
    # Texture at 128 x 128: CT lungs are near-black and flat, radiographs grey and noisy.
    lap = np.abs(4 * fine[1:-1, 1:-1] - fine[:-2, 1:-1] - fine[2:, 1:-1] - fine[1:-1, :-2] - fine[1:-1, 2:])
    lap_cells = lap[:124, :124].reshape(4, 31, 4, 31).mean(axis=(1, 3)).ravel() / (fine.std() + 1e-3)
    centre = raw[16:48, 16:48]
    texture = [*_percentiles(ordered), *_percentiles(np.sort(centre.ravel())), float(np.mean(centre < 0.05)),
               float(np.mean(lap < 0.005)), float(np.log(lap.mean() + 1e-6))]
    cut, levels = _two_levels(raw)
    # Edges: a CT image's are few and sharp (gradient on few pixels), a radiograph's spread out; in a CT image
    # the bright part (soft tissue) is flat and the dark part (lungs) dotted with vessels.
    dark = fine[1:-1, 1:-1] < cut
    n_dark = int(dark.sum())
    lap_dark = float((lap * dark).sum()) / max(n_dark, 1)
    lap_bright = float((lap * ~dark).sum()) / max(lap.size - n_dark, 1)
    top = np.partition(mag.ravel(), mag.size - mag.size // 10)[-(mag.size // 10):]
    edges = [float(top.sum() / (mag.sum() + 1e-6)), np.log(lap_dark + 1e-6), np.log(lap_bright + 1e-6)]
    return np.concatenate([thumb, rows, cols, cells.ravel(), hist, moments, lap_cells, texture, levels,
                           edges]).astype(np.float64)


def feature_matrix(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stacked :func:`image_features` ``(N, F)``."""
    feats = [image_features(im) for im in images]
    return np.stack(feats) if feats else np.zeros((0, 0))


@dataclass
class InputType:
    """What one input looked like.

    Attributes:
        kind: The most probable kind (``frontal`` when accepted).
        frontal: Whether it is accepted as an upright frontal chest X-ray.
        p_frontal: Probability of ``frontal``.
        probs: Probability per kind.
    """

    kind: str
    frontal: bool
    p_frontal: float
    probs: dict[str, float] = field(default_factory=dict)

    @property
    def message(self) -> str:
        """What a refusal says ("it looks like a CT image, ..."); empty when accepted."""
        return "" if self.frontal else LOOKS_LIKE.get(self.kind, f"it looks like {self.kind}")


class InputTypeClassifier:
    """Frontal chest X-ray or not, and what else (see the module docstring).

    A one-hidden-layer perceptron on standardised :func:`image_features`, and a second opinion on CT images: a
    logistic regression, CT or not, on the last :data:`N_CT_FEATURES` features only (intensity percentiles, texture,
    the dark/bright split, edge sharpness). The perceptron weighs every feature, the layout of the thumbnail above
    all, and a CT reconstruction cropped like a radiograph can look frontal to it; the linear second opinion keeps
    to how flat and two-levelled the image is. ``P(frontal)`` is the smaller of the two opinions (the probability
    taken off goes to ``ct``). Training uses scikit-learn; the fitted state is plain arrays (``mean_``, ``scale_``,
    ``weights_``, ``biases_``, ``ct_coef_``, ``ct_intercept_``) applied with numpy.

    Args:
        hidden: Hidden units.
        alpha: L2 penalty.
        threshold: Smallest ``P(frontal)`` accepted.
        max_iter: Training epochs (Adam).
        ct_check: Fit and apply the CT second opinion (when the training data hold CT images).
    """

    def __init__(self, *, hidden: int = 128, alpha: float = 1e-3, threshold: float = 0.5, max_iter: int = 200,
                 ct_check: bool = True) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"hidden={hidden!r}: expected a positive integer")
        if not alpha >= 0:
            raise ConfigError(f"alpha={alpha!r}: expected a non-negative number")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold={threshold!r}: expected a value in (0, 1)")
        self.ct_check = bool(ct_check)
        self.hidden = hidden
        self.alpha = alpha
        self.threshold = threshold
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, kinds: Sequence[str], *, seed: int = 0) -> InputTypeClassifier:
        """Fit on a feature matrix (:func:`feature_matrix`) and one kind (of :data:`KINDS`) per row."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        x = np.asarray(features, dtype=np.float64)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ConfigError(f"unknown input kinds {unknown}; expected some of {KINDS}")
        if x.ndim != 2 or len(x) != len(kinds):
            raise ConfigError(f"features of shape {x.shape} for {len(kinds)} kinds")
        if FRONTAL not in kinds or len(set(kinds)) < 2:
            raise ConfigError("training needs frontal images and at least one other kind")
        y = np.array([KINDS.index(k) for k in kinds])
        self.mean_ = x.mean(axis=0)
        self.scale_ = x.std(axis=0) + 1e-6
        xs = (x - self.mean_) / self.scale_
        clf = MLPClassifier((self.hidden,), alpha=self.alpha, max_iter=self.max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ConvergenceWarning, module="sklearn")
            clf.fit(xs, y)
        self.ct_coef_, self.ct_intercept_ = np.zeros(0), 0.0
        is_ct = y == KINDS.index("ct")
        if self.ct_check and is_ct.any() and x.shape[1] > N_CT_FEATURES:
            lr = LogisticRegression(C=1.0, max_iter=3000).fit(xs[:, -N_CT_FEATURES:], is_ct.astype(int))
            self.ct_coef_, self.ct_intercept_ = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        w_out, b_out = clf.coefs_[1], clf.intercepts_[1]
        if len(clf.classes_) == 2:  # sklearn's binary form: one logistic output for the second class
            w_out, b_out = np.concatenate([np.zeros_like(w_out), w_out], 1), np.concatenate([[0.0], b_out])
        # Logits for every kind; kinds absent from training are never predicted.
        out_w = np.zeros((self.hidden, len(KINDS)))
        out_b = np.full(len(KINDS), -1e9)
        out_w[:, clf.classes_], out_b[clf.classes_] = w_out, b_out
        self.weights_ = [clf.coefs_[0], out_w]
        self.biases_ = [clf.intercepts_[0], out_b]
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("InputTypeClassifier is not fitted: call fit() or load()")

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, len(KINDS))`` of feature rows."""
        self._check_fitted()
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != len(self.mean_):
            raise ConfigError(f"{x.shape[1]} features; the classifier was fitted on {len(self.mean_)}")
        xs = (x - self.mean_) / self.scale_
        hidden = np.maximum(xs @ self.weights_[0] + self.biases_[0], 0.0)
        logits = hidden @ self.weights_[1] + self.biases_[1]
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs = e / e.sum(axis=1, keepdims=True)
        if len(self.ct_coef_):
            z = xs[:, -N_CT_FEATURES:] @ self.ct_coef_
            not_ct = 1.0 / (1.0 + np.exp(np.clip(z + self.ct_intercept_, -500, 500)))
            excess = np.maximum(probs[:, 0] - not_ct, 0.0)
            probs[:, 0] -= excess
            probs[:, KINDS.index("ct")] += excess
        return probs

    def decide(self, probs: np.ndarray) -> list[InputType]:
        """One :class:`InputType` per probability row."""
        out = []
        for p in np.atleast_2d(probs):
            frontal = bool(p[0] >= self.threshold)
            kind = FRONTAL if frontal else KINDS[1 + int(np.argmax(p[1:]))]
            out.append(InputType(kind, frontal, float(p[0]), {k: round(float(v), 4) for k, v in zip(KINDS, p)}))
        return out

    def check(self, images: Sequence[np.ndarray]) -> list[InputType]:
        """What each image looks like."""
        if not len(images):
            return []
        return self.decide(self.predict_proba_features(feature_matrix(images)))

    def save(self, stem: str | Path, info: dict[str, Any] | None = None) -> None:
        """Write ``<stem>.npz`` (arrays) and ``<stem>.json`` (settings, kinds and ``info``)."""
        self._check_fitted()
        stem = Path(stem)
        np.savez_compressed(stem.with_suffix(".npz"), mean=self.mean_, scale=self.scale_, w0=self.weights_[0],
                            b0=self.biases_[0], w1=self.weights_[1], b1=self.biases_[1], ct_coef=self.ct_coef_,
                            ct_intercept=np.array([self.ct_intercept_]))
        meta = {"kinds": list(KINDS), "hidden": self.hidden, "alpha": self.alpha, "threshold": self.threshold,
                "ct_check": self.ct_check, "thumb": THUMB, "feature_version": FEATURE_VERSION,
                "n_features": len(self.mean_), **(info or {})}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, stem: str | Path | None = None) -> InputTypeClassifier:
        """Read a saved classifier (default: the one shipped in the package).

        Raises:
            ModelError: A file is missing or corrupt, or was saved with other kinds.
        """
        stem = Path(stem) if stem is not None else default_stem()
        from covidcxr.io.files import read_npz

        try:
            meta = json.loads(stem.with_suffix(".json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{stem}.json: cannot read the input-type classifier ({exc})") from exc
        # The version first: an older file lacks arrays this version reads, and the refit command is the answer.
        saved = (meta.get("kinds"), meta.get("thumb"), meta.get("feature_version", 1))
        if (tuple(saved[0] or ()), saved[1], saved[2]) != (KINDS, THUMB, FEATURE_VERSION):
            raise ModelError(f"{stem}.json: saved for kinds {saved[0]} / thumbnail {saved[1]} / features version "
                             f"{saved[2]}, this version expects {list(KINDS)} / {THUMB} / {FEATURE_VERSION} (refit: "
                             "python benchmarks/input_gate.py --part type --install)")
        arrays = read_npz(stem.with_suffix(".npz"), ("mean", "scale", "w0", "b0", "w1", "b1", "ct_coef",
                                                     "ct_intercept"), "input-type classifier")
        obj = cls(hidden=int(meta["hidden"]), alpha=float(meta["alpha"]), threshold=float(meta["threshold"]),
                  ct_check=bool(meta.get("ct_check", True)))
        obj.mean_, obj.scale_ = arrays["mean"], arrays["scale"]
        obj.ct_coef_, obj.ct_intercept_ = arrays["ct_coef"], float(arrays["ct_intercept"][0])
        obj.weights_, obj.biases_ = [arrays["w0"], arrays["w1"]], [arrays["b0"], arrays["b1"]]
        return obj


def default_stem() -> Path:
    """Path stem of the shipped classifier (``weights/input_type.npz`` / ``.json`` in the package)."""
    return Path(__file__).resolve().parents[1] / "weights" / WEIGHTS_NAME


@lru_cache(maxsize=1)
def shipped() -> InputTypeClassifier:
    """The package's input-type classifier, loaded once per process."""
    return InputTypeClassifier.load()


def check_inputs(images: Sequence[np.ndarray]) -> list[InputType]:
    """What each image looks like, by the shipped classifier (the input gate's first question)."""
    return shipped().check(images)
