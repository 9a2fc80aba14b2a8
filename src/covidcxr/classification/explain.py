"""Grad-CAM heat maps for classifier and ensemble artifacts, and how much of their energy lies in the lungs.

The heat map explains the COVID class (index 1) by default. Each member of an ensemble is explained on its own
preprocessed input from the last feature map of its exported network (the Grad-CAM target layer its architecture
registers in :mod:`covidcxr.models`): with a global-average-pool + linear head Grad-CAM equals CAM, so no autograd
and no torch are needed (:func:`cam_forward`). The members' maps are mapped back to the original image geometry and
averaged with the ensemble's weights.

``lung_energy_fraction`` is the share of the heat map's total mass that falls inside the lung mask. A model that
looks at the lungs scores high; a low value flags shortcut learning (text markers, borders, devices, the
shoulders) and deserves a look before the prediction is trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.io.image import check_gray
from covidcxr.transforms.lung import lung_crop_box

log = logging.getLogger(__name__)

POSITIVE_CLASS = 1
"""Index of the class explained by default (covid)."""


@dataclass
class Explanation:
    """A Grad-CAM explanation of one image.

    Attributes:
        heatmap: float32 ``H x W`` in [0, 1] at the input image's size (1 = strongest evidence).
        overlay: uint8 ``H x W x 3`` RGB image with the heat map blended in (jet colour map).
        lung_energy_fraction: Share of the heat map's mass inside the lung mask, in [0, 1]; None without a mask
            or when the heat map is all zero.
        target_class: Class index that was explained.
        n_members: Number of networks whose maps were averaged (1 for a single model).
    """

    heatmap: np.ndarray
    overlay: np.ndarray
    lung_energy_fraction: float | None
    target_class: int = POSITIVE_CLASS
    n_members: int = 1


def explain(
    artifact: Any,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    target_class: int = POSITIVE_CLASS,
    image_weight: float = 0.6,
    mask_for_model: bool = True,
) -> Explanation:
    """Explain one image with Grad-CAM (one forward pass per network, see ``BaseArtifact.analyze``).

    Args:
        artifact: A loaded classifier or ensemble artifact.
        image: float32 ``H x W`` in [0, 1].
        mask: Lung mask ``H x W`` (nonzero = lung). Used for the lung-energy share and, for models trained with
            a segmentation mode, as their mask (so no second segmentation runs). None: no lung-energy share, and
            such models segment the image themselves.
        target_class: Class to explain (default 1 = covid).
        image_weight: Weight of the X-ray in the overlay (the heat map gets ``1 - image_weight``).
        mask_for_model: Hand ``mask`` to models that use a segmentation mode. False when it comes from another
            segmenter than the model's own: they then segment with their own weights, as in prediction.

    Returns:
        The :class:`Explanation`.

    Raises:
        ConfigError: The image is not a 2-D array, the mask does not match it, or ``target_class`` is invalid.
    """
    image = np.clip(check_gray(image), 0.0, 1.0)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ConfigError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    if not hasattr(artifact, "analyze"):
        raise ConfigError(f"cannot explain a {type(artifact).__name__}: expected a loaded model artifact")
    pred = artifact.analyze(image, mask if mask_for_model else None, explain=True, target_class=target_class)
    return explanation_from(pred, image, mask, image_weight=image_weight, target_class=target_class,
                            n_members=len(artifact.members))


def explanation_from(
    pred: Any, image: np.ndarray, mask: np.ndarray | None, *, image_weight: float = 0.6,
    target_class: int = POSITIVE_CLASS, n_members: int = 1,
) -> Explanation:
    """The :class:`Explanation` of an ``analyze(explain=True)`` prediction of one image."""
    heat = pred.heatmaps[0]
    return Explanation(
        heatmap=heat,
        overlay=overlay_heatmap(image, heat, image_weight=image_weight),
        lung_energy_fraction=lung_energy_fraction(heat, mask) if mask is not None else None,
        target_class=int(target_class),
        n_members=n_members,
    )


def cam_forward(
    member: Any, x: Any, target_class: int = POSITIVE_CLASS, *, mirror: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One forward pass of a classifier: logit margin, embedding, heat-map grid and (when the model has a mirror
    check) mirror score together (no autograd).

    The head after the last feature map ``A`` is global average pooling then a linear layer (checked at export,
    ``cam_exact``), so Grad-CAM's channel weights are the head's weights divided by the map's area and Grad-CAM equals
    CAM: ``relu(sum_k w_ck A_k)``. The exported network returns ``sum_k w_ck A_k`` as ``class_maps``; the map is then
    scaled to [0, 1] and resized to the input square exactly as pytorch-grad-cam does.

    Args:
        member: A loaded :class:`~covidcxr.classification.inference.ModelArtifact`.
        x: Its preprocessed input ``(1, 1, S, S)``.
        target_class: Class to explain.
        mirror: Also score the mirror check (ensembles skip it: the check is a single model's).

    Returns:
        ``(margin (1,), L2-normalised embedding (1, D), grid S x S in [0, 1], mirror score (1,) or None)``.

    Raises:
        ConfigError: ``target_class`` is not a class of the model.
    """
    from covidcxr.classification.inference import l2_normalise

    n_classes = int(member.config.get("num_classes", 2))
    if not 0 <= int(target_class) < n_classes:
        raise ConfigError(f"target_class={target_class}: the model has classes 0..{n_classes - 1}")
    check = member.mirror_check if mirror else None
    out = member.run_network(x, ["logits", "embedding", "class_maps"] + (["feature_map"] if check is not None else []))
    logits = out["logits"].astype(np.float64)
    margin = logits[:, 1] - logits[:, 0]
    size = int(np.shape(x)[-1])
    grid = cam_grid(out["class_maps"][0, int(target_class)], (size, size))
    mirror = check.scores(out["feature_map"]) if check is not None else None
    return margin, l2_normalise(out["embedding"]), grid, mirror


def cam_grid(class_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A class map ``h x w`` as a heat map: ReLU, shifted and scaled to [0, 1], resized (bilinear) to ``shape``.

    The same steps as pytorch-grad-cam's ``GradCAM`` (``np.maximum(cam, 0)`` then ``scale_cam_image``), so the grid
    equals its Grad-CAM of the torch model for a GAP + linear head.
    """
    import cv2

    cam = np.maximum(np.nan_to_num(np.asarray(class_map, dtype=np.float32), nan=0.0), 0.0)
    cam = cam - np.min(cam)
    cam = cam / (1e-7 + np.max(cam))
    grid = np.maximum(cv2.resize(cam, (shape[1], shape[0])), 0.0)  # then layers are aggregated and scaled again
    grid = grid - np.min(grid)
    grid = grid / (1e-7 + np.max(grid))
    return np.nan_to_num(np.asarray(grid, dtype=np.float32), nan=0.0)


def member_heatmap(
    member: Any, image: np.ndarray, mask: np.ndarray | None = None, *, target_class: int = POSITIVE_CLASS
) -> np.ndarray:
    """Grad-CAM map of one classifier artifact, in the geometry of ``image``.

    Args:
        member: A loaded :class:`~covidcxr.classification.inference.ModelArtifact`.
        image: float32 ``H x W`` in [0, 1].
        mask: Lung mask for models trained with a segmentation mode (None: the artifact's segmenter predicts it).
        target_class: Class to explain.

    Returns:
        float32 ``H x W`` in [0, 1].
    """
    by_key, qc = member.member_masks([image], [mask])
    used = by_key.get(member.segmenter_key) if member.segmenter_key else None
    _, _, grid, _ = cam_forward(member, member.preprocess_batch([image], used, qc), target_class, mirror=False)
    return to_image_geometry(grid, image, used[0] if used else None, member.seg_mode)


def lung_energy_fraction(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the heat map's mass inside the lung mask.

    Args:
        heatmap: Non-negative ``H x W`` map.
        mask: ``H x W`` lung mask (nonzero = lung).

    Returns:
        ``sum(heat * lung) / sum(heat)`` in [0, 1], or None when the heat map sums to zero.

    Raises:
        ConfigError: Shapes differ.
    """
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    lung = np.asarray(mask) > 0
    if heat.shape != lung.shape:
        raise ConfigError(f"heat map shape {heat.shape} differs from mask shape {lung.shape}")
    total = float(heat.sum())
    if total <= 0.0:
        return None
    return float(heat[lung].sum() / total)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.6) -> np.ndarray:
    """Blend a heat map (jet colour map) into a grey image (pytorch-grad-cam's ``show_cam_on_image``, in OpenCV).

    Args:
        image: float ``H x W`` in [0, 1].
        heatmap: float ``H x W`` in [0, 1].
        image_weight: Weight of the image in [0, 1].

    Returns:
        uint8 ``H x W x 3`` RGB.

    Raises:
        ConfigError: ``image_weight`` outside [0, 1] or shapes differ.
    """
    import cv2

    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"image_weight={image_weight}: expected a value in [0, 1]")
    if np.shape(image) != np.shape(heatmap):
        raise ConfigError(f"heat map shape {np.shape(heatmap)} differs from image shape {np.shape(image)}")
    rgb = np.repeat(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=2)
    heat = np.clip(heatmap, 0.0, 1.0).astype(np.float32)
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    cam = (1 - image_weight) * (np.float32(colour) / 255) + image_weight * rgb
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)


def heatmap_rgba(heatmap: np.ndarray, *, max_alpha: float = 0.6, full_at: float = 0.5) -> np.ndarray:
    """A transparent heat-map layer (jet colours, opacity rising with the heat) to lay over the X-ray.

    Args:
        heatmap: float ``H x W`` in [0, 1].
        max_alpha: Opacity of the hot pixels.
        full_at: Heat from which the opacity is ``max_alpha``; below it the opacity fades smoothly to 0, so weak
            evidence does not veil the image and the layer has no hard edges.

    Returns:
        uint8 ``H x W x 4`` RGBA.
    """
    import cv2

    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    rgb = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.rint(255 * heat)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    t = np.clip(heat / full_at, 0.0, 1.0)
    alpha = max_alpha * t * t * (3 - 2 * t)  # smoothstep
    return np.dstack([rgb, np.uint8(np.rint(255 * alpha))])


def outline_rgba(mask: np.ndarray, *, color: tuple[int, int, int] = (0, 230, 118), thickness: int | None = None) -> np.ndarray:
    """A transparent layer with the outline of the lung mask.

    Args:
        mask: ``H x W`` lung mask (nonzero = lung).
        color: RGB line colour.
        thickness: Line width in pixels; None scales it with the image (about 1/200 of the longer side).

    Returns:
        uint8 ``H x W x 4`` RGBA.
    """
    import cv2

    lung = (np.asarray(mask) > 0).astype(np.uint8)
    if thickness is None:
        thickness = max(1, round(max(lung.shape) / 200))
    contours, _ = cv2.findContours(lung, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    layer = np.zeros((*lung.shape, 4), dtype=np.uint8)
    cv2.drawContours(layer, contours, -1, (*color, 255), thickness=int(thickness), lineType=cv2.LINE_AA)
    return layer


def save_explanation(explanation: Explanation, out_dir: Any, stem: str = "explanation") -> dict[str, Any]:
    """Write the overlay and the heat map as PNGs.

    Args:
        explanation: Result of :func:`explain`.
        out_dir: Output folder (created).
        stem: File name stem.

    Returns:
        Paths written: ``overlay`` and ``heatmap``.
    """
    from pathlib import Path

    from covidcxr.io.files import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "overlay": save_png(out / f"{stem}_gradcam_overlay.png", explanation.overlay),
        "heatmap": save_png(out / f"{stem}_gradcam_heatmap.png", explanation.heatmap),
    }


# --------------------------------------------------------------------------------------------- helpers




def _resize(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = shape
    if grid.shape == (h, w):
        return grid.astype(np.float32, copy=False)
    return cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def to_image_geometry(grid: np.ndarray, image: np.ndarray, mask: np.ndarray | None, seg_mode: str) -> np.ndarray:
    """Undo the preprocessing geometry: the input square is the whole image squashed, or the lung box squashed."""
    h, w = image.shape
    lung = None if mask is None else np.asarray(mask) > 0
    if seg_mode != "crop" or lung is None or not lung.any():  # an empty mask makes the crop fall back to the image
        return np.clip(_resize(grid, (h, w)), 0.0, 1.0)
    if lung.shape != image.shape:
        lung = _resize(lung.astype(np.float32), (h, w)) > 0.5
    top, left, bh, bw = lung_crop_box(lung, image.shape)
    box = _resize(grid, (bh, bw))
    out = np.zeros((h, w), dtype=np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + bh, h), min(left + bw, w)
    out[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.clip(out, 0.0, 1.0)
