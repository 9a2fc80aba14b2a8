"""Lung segmentation inference: the shipped U-Net, post-processing, quality control and mask/crop preprocessing.

:class:`LungSegmenter` runs the exported network ``lung_unet.onnx`` saved with the weights ``lung_unet.safetensors``
and their config ``lung_unet.json`` (the shipped set lives in ``covidcxr/weights/``; no network access, no torch) and
predicts, per image, a binary mask of both lungs at the image's own size. The probability map is cleaned at model resolution (two largest components, holes
filled) and then upsampled, so post-processing costs the same for a 256 px PNG and a 3000 px DICOM.

Every result carries QC flags (short strings, see :data:`QC_MESSAGES`) that downstream outputs keep, so an
implausible mask (blank or non-chest image, one lung missing, ...) is never used silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import file_sha256
from covidcxr.io.image import check_gray

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32")

# Plausible ranges, from the ground-truth masks of the lung-segmentation development data (594 masks, three
# annotation conventions): lung fraction 0.09-0.62, smaller/larger lung area 0.54-1.0, the two lung centroids
# always on opposite sides of the vertical midline. Limits sit outside those ranges so that only clearly wrong
# masks are flagged.
QC_LUNG_FRACTION = (0.08, 0.65)
QC_MIN_AREA_RATIO = 0.4
QC_MISSING_RATIO = 0.1
QC_MIN_CONFIDENCE = 0.8
QC_BLANK_STD = 0.01
QC_MESSAGES = {
    "blank_image": "the image is (nearly) uniform: no X-ray content",
    "no_lung": "no lung was found",
    "lung_area_low": f"lung area below {QC_LUNG_FRACTION[0]:.0%} of the image",
    "lung_area_high": f"lung area above {QC_LUNG_FRACTION[1]:.0%} of the image",
    "one_lung_missing": "only one lung was found",
    "lungs_same_side": "both lung regions lie on the same side of the image",
    "asymmetric": f"one lung is less than {QC_MIN_AREA_RATIO:.0%} of the other's area",
    "low_confidence": f"mean lung probability below {QC_MIN_CONFIDENCE:.0%}",
    "seg_fallback": "lung mask unusable: the full image was used instead of the mask/crop",
}


# --------------------------------------------------------------------------------------------- results
@dataclass
class SegResult:
    """One image's segmentation.

    Attributes:
        mask: uint8 ``H x W`` in {0, 1}, both lungs, at the input image's size.
        lung_fraction: Lung pixels / image pixels.
        qc_flags: Short QC flag names (keys of :data:`QC_MESSAGES`); empty when the mask looks plausible.
        qc_message: The flags in words ('' when there are none).
        confidence: Mean model probability inside the predicted lungs (0 when none).
        prob: float32 lung probability at model resolution (``S x S``).
    """

    mask: np.ndarray
    lung_fraction: float
    qc_flags: list[str] = field(default_factory=list)
    qc_message: str = ""
    confidence: float = 0.0
    prob: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when no QC flag was raised."""
        return not self.qc_flags


def qc_message(flags: Sequence[str]) -> str:
    """Describe QC flags in words.

    Args:
        flags: Flag names.

    Returns:
        One sentence per flag, joined with '; ' ('' when there are none).
    """
    return "; ".join(QC_MESSAGES.get(f, f) for f in flags)


def _label(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components (SciPy's ``ndimage.label`` default), numbered in raster order; OpenCV: no SciPy import
    on the inference path (~0.4 s of start-up)."""
    import cv2

    n, labels = cv2.connectedComponents(np.ascontiguousarray(binary, dtype=np.uint8), connectivity=4)
    return labels, int(n) - 1


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_label`'s labels and each component's pixel count (int64, ``np.bincount`` of the labels; about three
    times faster than OpenCV's ``connectedComponentsWithStats``)."""
    labels, n = _label(binary)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)


def _mean_column(labels: np.ndarray, label: int) -> float:
    """Mean column of one component: the exact integer sum / count (integers below 2**53 add up exactly)."""
    return float(np.nonzero(labels == label)[1].mean())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not 4-connected to the border become foreground (SciPy's ``binary_fill_holes``)."""
    background, n = _label(~mask)
    if n == 0:
        return mask.copy()
    touches_border = np.zeros(n + 1, bool)  # lookup table by label: the same set as np.isin, without sorting
    touches_border[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    holes = ~touches_border[background] & (background > 0)
    return mask | holes


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic in float32, ``0.5 * (1 + tanh(x / 2))``, in one new array (in-place steps)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.multiply(x, np.float32(0.5), out=np.empty(x.shape, np.float32))
    np.tanh(out, out=out)
    out += np.float32(1.0)
    out *= np.float32(0.5)
    return out


# --------------------------------------------------------------------------------------------- post-processing
def postprocess(prob: np.ndarray, threshold: float = 0.5, *, keep: int = 2, min_fraction: float = 0.002) -> np.ndarray:
    """Threshold a lung probability map, keep the largest components and fill their holes.

    Args:
        prob: ``H x W`` probabilities.
        threshold: Probability at or above which a pixel is lung.
        keep: Number of largest connected components kept (2 = both lungs).
        min_fraction: Components smaller than this fraction of the image are dropped as specks.

    Returns:
        uint8 mask in {0, 1}, same shape.

    Raises:
        ConfigError: ``prob`` is not 2-D.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ConfigError(f"probability map shape {prob.shape}: expected H x W")
    labels, sizes = _components(prob >= threshold)
    n = len(sizes)
    if n == 0:
        return np.zeros(prob.shape, np.uint8)
    # A stable sort: numpy's default may use SIMD sorts whose order of equal sizes depends on the CPU, and the mask must
    # not. Largest first; equal sizes: the component labelled later (raster order) first, as before on this CPU.
    order = np.argsort(sizes, kind="stable")[::-1][:keep]
    kept = np.zeros(n + 1, bool)  # lookup table by label
    kept[[i + 1 for i in order if sizes[i] >= min_fraction * prob.size]] = True
    mask = kept[labels]
    return _fill_holes(mask).astype(np.uint8)


def upsampled_probability(prob: np.ndarray, threshold: float, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The post-processed mask at the U-Net's size and the cleaned probabilities upsampled to ``shape`` (the full-size
    mask is ``up >= threshold``).

    The probabilities are cleaned with the small mask, then upsampled (not the binary mask) so the outline at full
    size stays smooth: specks removed -> 0, filled holes -> 1, lung borders keep their values.

    Returns:
        ``(small uint8 mask, up float32 of shape)``.
    """
    from covidcxr.transforms.resize import resize_image

    small = postprocess(prob, threshold)
    cleaned = prob.copy()
    binary = prob >= threshold
    cleaned[binary & (small == 0)] = 0.0
    cleaned[~binary & (small == 1)] = 1.0
    return small, resize_image(cleaned, (int(shape[0]), int(shape[1])))


def qc_flags(mask: np.ndarray, *, prob: np.ndarray | None = None, image: np.ndarray | None = None) -> list[str]:
    """Quality-control flags for a lung mask (and optionally its probabilities and image).

    Args:
        mask: ``H x W`` binary mask (nonzero = lung), as returned by :func:`postprocess`.
        prob: Probability map of the same shape; enables ``low_confidence``.
        image: The input image (any size); enables ``blank_image``.

    Returns:
        Flag names in a fixed order; empty when nothing looks wrong.
    """
    flags: list[str] = []
    if image is not None and float(np.std(image)) < QC_BLANK_STD:
        flags.append("blank_image")
    mask = np.asarray(mask) > 0
    area = int(mask.sum())
    if area == 0:
        return [*flags, "no_lung"]
    fraction = area / mask.size
    if fraction < QC_LUNG_FRACTION[0]:
        flags.append("lung_area_low")
    elif fraction > QC_LUNG_FRACTION[1]:
        flags.append("lung_area_high")
    labels, sizes = _components(mask)
    n = len(sizes)
    order = np.argsort(sizes, kind="stable")[::-1]  # CPU-independent order of equal sizes (see postprocess)
    if n < 2 or sizes[order[1]] < QC_MISSING_RATIO * sizes[order[0]]:
        flags.append("one_lung_missing")
    else:
        cx = [_mean_column(labels, int(i) + 1) for i in (order[0], order[1])]
        mid = (mask.shape[1] - 1) / 2
        if (cx[0] - mid) * (cx[1] - mid) > 0:
            flags.append("lungs_same_side")
        if sizes[order[1]] < QC_MIN_AREA_RATIO * sizes[order[0]]:
            flags.append("asymmetric")
    if prob is not None and float(np.asarray(prob)[mask].mean()) < QC_MIN_CONFIDENCE:
        flags.append("low_confidence")
    return flags


# --------------------------------------------------------------------------------------------- segmenter


class LungSegmenter:
    """Predict both-lung masks with an exported U-Net (ONNX, float32) whose config derives the preprocessing.

    Args:
        network: The exported U-Net (:class:`covidcxr.runtime.OnnxNetwork`, output ``logits``).
        config: Its config (``input_size``, ``normalisation``, ``threshold``, ...).
        device: Kept for callers that pass one; inference runs on the CPU (ONNX Runtime).
        precision: ``'auto'`` or ``'fp32'`` (both float32: the same masks on every CPU).
        batch_size: Images per forward pass.
        weights_hash: SHA-256 of the weights file, for provenance (the key masks are cached under).
        workers: Threads that post-process masks (upsampling, components, QC) while the next batch runs.
    """

    def __init__(
        self,
        network: Any,
        config: dict[str, Any],
        *,
        device: str = "cpu",
        precision: str = "auto",
        batch_size: int = 16,
        weights_hash: str = "",
        workers: int | None = None,
    ) -> None:
        from covidcxr.runtime import check_precision

        self.precision = check_precision(precision)
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        from covidcxr.models.unet import unet_config

        self.config = unet_config(config)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.weights_hash = weights_hash
        self.network = network
        from covidcxr.device import available_cpus

        self.workers = max(1, int(workers or available_cpus()))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        precision: str = "auto",
        batch_size: int = 16,
    ) -> LungSegmenter:
        """Load a saved segmenter (None = the shipped one): its config and its exported network.

        Args:
            path: Weights file (``lung_unet.safetensors``; the ``.json`` and ``.onnx`` beside it) or its folder.
            device: Accepted for compatibility; inference runs on the CPU.
            precision: ``'auto'`` or ``'fp32'``.
            batch_size: Images per forward pass.

        Returns:
            The segmenter.

        Raises:
            PretrainedWeightsError: No shipped weights (``path`` None).
            ModelError: Missing or invalid files; no exported network (the message names ``covidcxr export``).
        """
        import json

        from covidcxr.runtime import OnnxNetwork
        from covidcxr.segmentation.weights import _resolve_weights

        weights, config_path = _resolve_weights(path)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{config_path}: not a valid JSON config ({exc})") from exc
        entry = config.get("onnx") if isinstance(config, dict) else None
        onnx = weights.with_suffix(".onnx")
        if not entry or not onnx.is_file():
            raise ModelError(f"{onnx}: the lung segmenter has no exported network (ONNX); run `covidcxr export "
                             f"--segmenter {weights}` (needs `pip install 'covidcxr[train]'`) to write it")
        if entry.get("weights_sha256") and config.get("weights_sha256") and \
                entry["weights_sha256"] != config["weights_sha256"]:
            raise ModelError(f"{onnx}: exported from other weights than {weights.name}; run `covidcxr export "
                             f"--segmenter {weights}` again")
        try:
            cfg = dict(config)
            from covidcxr.models.unet import unet_config

            unet_config(cfg)
        except ConfigError as exc:
            raise ModelError(f"{config_path}: invalid U-Net config ({exc})") from exc
        network = OnnxNetwork(onnx, sha256=entry.get("sha256"))
        key = config.get("weights_sha256") or file_sha256(weights)
        return cls(network, config, device=device, precision=precision, batch_size=batch_size, weights_hash=key)

    @property
    def input_size(self) -> int:
        """Model input side in pixels."""
        return int(self.config["input_size"])

    @property
    def cache_key(self) -> str:
        """What cached masks are filed under: the SHA-256 of the exported graph that computes them (the weights'
        hash is not enough: a re-export with other numerics, as the float64 input statistics, moves mask pixels)."""
        return str(self.network.sha256)

    def predict_proba(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Lung probabilities at model resolution.

        Args:
            images: ``H x W`` float images in [0, 1] (one 2-D array or a sequence of them; sizes may differ).

        Returns:
            float32 array ``(N, S, S)``.

        Raises:
            ConfigError: An image is not a 2-D array.
        """
        return self.forward(self.network_input(images))

    def network_input(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """The U-Net's input batch ``(N, 1, S, S)`` (:func:`covidcxr.transforms.preprocess.segmenter_input`).

        Raises:
            ConfigError: An image is not a 2-D array of at least 8 x 8 pixels.
        """
        from covidcxr.transforms.preprocess import segmenter_input

        images = [images] if isinstance(images, np.ndarray) and images.ndim == 2 else list(images)
        arrays = [check_gray(im, i, min_side=8) for i, im in enumerate(images)]
        return segmenter_input(arrays, self.config)

    def forward(self, x: np.ndarray, *, split: int = 1) -> np.ndarray:
        """Lung probabilities ``(N, S, S)`` for a batch from :meth:`network_input` (the U-Net's forward pass;
        ``split`` as :meth:`covidcxr.runtime.OnnxNetwork.run`)."""
        if not len(x):
            return np.zeros((0, self.input_size, self.input_size), np.float32)
        logits = self.network.run(x, ["logits"], batch_size=self.batch_size, split=split)["logits"]
        return _sigmoid(logits[:, 0])

    def predict(self, images: Sequence[np.ndarray] | np.ndarray) -> list[SegResult]:
        """Segment both lungs, post-process, upsample to each image's size and run QC.

        Post-processing runs in :attr:`workers` threads (OpenCV, Pillow and SciPy release the GIL).

        Args:
            images: ``H x W`` float images in [0, 1] (one 2-D array or a sequence of them).

        Returns:
            One :class:`SegResult` per image, mask at that image's size.

        Raises:
            ConfigError: An image is not a 2-D array.
        """
        images = [images] if isinstance(images, np.ndarray) and images.ndim == 2 else list(images)
        return self.postprocess_batch(images, self.predict_proba(images))

    def postprocess_batch(self, images: Sequence[np.ndarray], probs: np.ndarray) -> list[SegResult]:
        """The second half of :meth:`predict`: post-process, upsample and QC probabilities from
        :meth:`predict_proba` of the same images (the manifest loop runs it while the U-Net runs the next chunk).

        Args:
            images: ``H x W`` float images in [0, 1], the ones ``probs`` was computed from.
            probs: ``(N, S, S)`` lung probabilities.

        Returns:
            One :class:`SegResult` per image, mask at that image's size.

        Raises:
            ConfigError: Images and probabilities differ in number.
        """
        if len(images) != len(probs):
            raise ConfigError(f"{len(images)} images but {len(probs)} probability maps")
        pairs = [(np.asarray(im, np.float32), p) for im, p in zip(images, probs)]
        if self.workers <= 1 or len(pairs) <= 1:
            return [self._result(im, p) for im, p in pairs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.workers, len(pairs))) as pool:
            return list(pool.map(lambda pair: self._result(*pair), pairs))

    def _result(self, image: np.ndarray, prob: np.ndarray) -> SegResult:
        threshold = float(self.config["threshold"])
        small, up = upsampled_probability(prob, threshold, image.shape)
        mask = (up >= threshold).astype(np.uint8)
        flags = qc_flags(small, prob=prob, image=image)
        confidence = float(prob[small > 0].mean()) if small.any() else 0.0
        return SegResult(
            mask=mask,
            lung_fraction=float(mask.mean()),
            qc_flags=flags,
            qc_message=qc_message(flags),
            confidence=confidence,
            prob=prob,
        )
