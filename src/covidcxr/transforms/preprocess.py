"""The one classifier preprocessing function, derived from the model's stored config.

A classifier's input is fixed by three settings saved in its artifact: the segmentation mode (how the lung mask
enters), the intensity standardisation and the input size. :class:`PreprocessCfg` carries them and
:func:`preprocess` applies them: segmentation mode on the full-resolution image, one antialiased squash to the
target size, intensity standardisation. Training validation, inference, embedding and Grad-CAM all call it, so a
model sees the same pixels in all four (normalisation happens in the network's stem).

Training's augmentation cache calls the same function at a larger size (:func:`to_uint8` then stores it), so
random crops have room to move. Everything here is numpy/OpenCV/Pillow: inference runs it without torch, and
training runs the very same code (it wraps the arrays in tensors afterwards).

:func:`segmenter_input` is the lung U-Net's counterpart (resize to the U-Net's input size; its normalisation is
part of the exported network).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.transforms.resize import resize_image
from covidcxr.vocab import INTENSITY_MODES, SEG_MODES


@dataclass(frozen=True)
class PreprocessCfg:
    """What a classifier expects of its input (typed view of the artifact config).

    Attributes:
        input_size: Side of the square network input.
        seg_mode: One of :data:`covidcxr.vocab.SEG_MODES`.
        intensity: One of :data:`covidcxr.vocab.INTENSITY_MODES`.
    """

    input_size: int
    seg_mode: str = "none"
    intensity: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 8:
            raise ConfigError(f"input_size={self.input_size!r}: expected an integer >= 8")
        if self.seg_mode not in SEG_MODES:
            raise ConfigError(f"unknown segmentation mode {self.seg_mode!r}; valid: {', '.join(SEG_MODES)}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"unknown intensity mode {self.intensity!r}; valid: {', '.join(INTENSITY_MODES)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PreprocessCfg:
        """Read the settings from an artifact config (``input_size``, ``seg_mode``, optional ``intensity``)."""
        try:
            return cls(int(config["input_size"]), str(config["seg_mode"]), str(config.get("intensity", "none")))
        except KeyError as exc:
            raise ConfigError(f"model config lacks {exc.args[0]!r}") from exc

    @property
    def needs_mask(self) -> bool:
        """Whether :func:`preprocess` needs a lung mask."""
        return self.seg_mode != "none"


def preprocess(
    image: np.ndarray,
    mask: np.ndarray | None,
    cfg: PreprocessCfg,
    *,
    size: int | None = None,
    flags: list[str] | None = None,
) -> np.ndarray:
    """Turn a decoded image into the classifier's input.

    Segmentation mode (zero outside the lungs, or crop to their box) at full resolution, then one antialiased
    squash to a square (squashing, not padding, keeps the whole field of view and drops the aspect ratio, itself a
    source cue), then the intensity standardisation.

    Args:
        image: float32 ``H x W`` in [0, 1].
        mask: Lung mask ``H x W`` (nonzero = lung); required when ``cfg.needs_mask``.
        cfg: The model's preprocessing settings.
        size: Output side; default ``cfg.input_size`` (training's augmentation cache asks for more).
        flags: QC flag list; ``seg_fallback`` is appended when an empty mask forces the full image.

    Returns:
        float32 array ``(1, S, S)`` in [0, 1].

    Raises:
        ConfigError: A 3-D image, or a missing mask.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ConfigError(f"expected a 2-D grey image, got shape {image.shape}")
    if cfg.needs_mask:
        if mask is None:
            raise ConfigError(f"segmentation mode {cfg.seg_mode!r} needs a lung mask")
        from covidcxr.transforms.lung import apply_seg_mode

        image = apply_seg_mode(image, mask, cfg.seg_mode, flags=flags)
    out = np.clip(resize_image(image, int(size or cfg.input_size)), 0.0, 1.0)
    return standardise_intensity(out, cfg.intensity)[None]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Quantise a float image in [0, 1] to uint8 (training's compact augmentation cache; CLAHE's 8-bit input)."""
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def segmenter_input(images: Any, config: Mapping[str, Any]) -> np.ndarray:
    """The lung U-Net's input batch: each gray image resized to the config's ``input_size``.

    The U-Net's normalisation (``zscore``/``unit``) is part of its exported network, so this is all inference
    and training share on the way in.

    Args:
        images: ``H x W`` float images in [0, 1]; sizes may differ.
        config: The U-Net config (``input_size``).

    Returns:
        float32 ``(N, 1, S, S)``.
    """
    size = int(config["input_size"])
    if len(images) == 0:
        return np.zeros((0, 1, size, size), np.float32)
    return np.stack([resize_image(im, size) for im in images])[:, None]


def standardise_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Intensity standardisation of a resized float image in [0, 1].

    ``clahe``: contrast-limited adaptive histogram equalisation (OpenCV, clip limit 2, 8 x 8 tiles, on 8 bits). It
    evens out the contrast and brightness curves that differ between scanners and archives, cues a model could
    otherwise use to recognise the source instead of the disease.

    Args:
        image: float32 array ``(S, S)`` in [0, 1].
        mode: One of :data:`covidcxr.vocab.INTENSITY_MODES`.

    Returns:
        float32 array ``(S, S)`` in [0, 1].

    Raises:
        ConfigError: Unknown mode.
    """
    if mode not in INTENSITY_MODES:
        raise ConfigError(f"unknown intensity mode {mode!r}; valid: {', '.join(INTENSITY_MODES)}")
    if mode == "none":
        return image
    import cv2

    eight = np.ascontiguousarray(to_uint8(image))
    out = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(eight)
    return out.astype(np.float32) / 255.0
