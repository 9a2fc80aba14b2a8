"""``covidcxr explain``: the analysis of one image file written as PNG overlays and a JSON summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.service.analysis import analyze_one, pick_segmenter

log = logging.getLogger(__name__)


def explain_files(
    image_paths: list[str | Path],
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    mask_path: str | Path | None = None,
    segmenter_weights: str | Path | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Explain image files with one model: per image the Grad-CAM overlay, heat map and lung mask (PNG) and a JSON
    summary ``<stem>_explanation.json`` (probability, label, threshold, lung_energy_fraction, qc_flags, the files
    written). An unreadable image gets a summary with ``status`` ``error`` and the reason, and the others go on.

    Args:
        image_paths: PNG, JPEG, TIFF or DICOM files.
        model_dir: Classifier or ensemble artifact folder.
        out_dir: Output folder (created).
        mask_path: Lung mask image (nonzero = lung) for a single image; None predicts it with the model's or the
            shipped segmenter.
        segmenter_weights: Lung-segmenter weights to use instead.
        device: Inference device.

    Raises:
        ConfigError: ``mask_path`` with more than one image, or a mask that does not fit its image.
        ImageError: With ``mask_path``: an unreadable image or mask.
        ModelError: Missing or corrupt model.
    """
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.errors import ImageError

    if mask_path is not None and len(image_paths) != 1:
        raise ConfigError(f"a lung mask ({mask_path}) fits one image, got {len(image_paths)}")
    artifact = load_artifact(model_dir, device)
    segmenter, key = pick_segmenter(artifact, segmenter_weights) if mask_path is None else (None, None)
    summaries = []
    for image_path, stem in zip(image_paths, output_stems(image_paths), strict=True):
        try:
            summaries.append(_explain_one(artifact, image_path, Path(out_dir), mask_path, segmenter, key, stem))
        except (ImageError, ConfigError) as exc:
            if mask_path is not None:  # with --mask: one image, its arguments are wrong
                raise
            log.error("%s", exc)
            reason = str(exc) if str(image_path) in str(exc) else f"{image_path}: {exc}"
            summaries.append({"image": str(image_path), "status": "error", "no_result_reason": f"error: {reason}",
                              "probability": None, "label": None, "files": {}})
    return summaries


def output_stems(image_paths: list[str | Path]) -> list[str]:
    """The name each image's outputs start with: its file stem, or ``<stem>_<n>`` when an earlier image of the batch
    took that name (``a/scan.png`` and ``b/scan.png`` must not overwrite each other's outputs)."""
    from covidcxr.io.files import unique_names

    stems = [Path(path).stem for path in image_paths]
    unique = unique_names(stems)
    for path, stem, new in zip(image_paths, stems, unique, strict=True):
        if new != stem:
            log.warning("%s: another input has the name %r; its outputs are named %r", path, stem, new)
    return unique


def _explain_one(artifact: Any, image_path: str | Path, out: Path, mask_path: str | Path | None, segmenter: Any,
                 key: str | None, stem: str) -> dict[str, Any]:
    import json

    from covidcxr.classification.explain import explanation_from, outline_rgba, save_explanation
    from covidcxr.io.files import save_png
    from covidcxr.io.image import load_image

    image_path = Path(image_path)
    image, _ = load_image(image_path)
    if mask_path is not None:
        mask_img, _ = load_image(mask_path)
        try:
            result = analyze_one(artifact, image, mask=(mask_img > 0.5).astype(np.uint8))
        except ConfigError as exc:
            raise ConfigError(f"{mask_path}: {exc}") from exc
    else:
        result = analyze_one(artifact, image, segmenter=segmenter, segmenter_key=key)
    pred, mask = result.prediction, result.mask
    expl = explanation_from(pred, image, mask, n_members=len(artifact.members))
    files = {k: str(v) for k, v in save_explanation(expl, out, stem).items()}
    outline = outline_rgba(mask)
    alpha = outline[..., 3:4].astype(np.float32) / 255.0
    with_outline = np.uint8(np.rint(expl.overlay * (1 - alpha) + outline[..., :3] * alpha))
    files["overlay_with_lungs"] = str(save_png(out / f"{stem}_gradcam_overlay_lungs.png", with_outline))
    files["mask"] = str(save_png(out / f"{stem}_lung_mask.png", mask.astype(bool)))
    summary = {
        "image": str(image_path),
        "status": "ok" if result.usable else "no_result",
        "no_result_reason": result.gate.message if result.gate is not None else "",
        "probability": float(pred.prob[0]) if result.usable else None,
        "label": pred.label[0] if result.usable else None,
        "threshold": float(artifact.threshold),
        "lung_energy_fraction": result.lung_energy_fraction,
        "explanation_flags": result.explanation_flags,
        "qc_flags": result.qc_flags,
        "n_members": expl.n_members,
        "model": artifact.weights_hash[:12],
        "files": files,
    }
    summary_path = out / f"{stem}_explanation.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["files"]["summary"] = str(summary_path)
    return summary
