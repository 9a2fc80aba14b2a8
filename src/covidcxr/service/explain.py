"""``covidcxr explain``: the analysis of one image file written as PNG overlays and a JSON summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.service.analysis import analyze_one, pick_segmenter


def explain_file(
    image_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    mask_path: str | Path | None = None,
    segmenter_weights: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Explain one image file: write the Grad-CAM overlay, heat map and lung mask, and a JSON summary.

    Args:
        image_path: PNG, JPEG, TIFF or DICOM file.
        model_dir: Classifier or ensemble artifact folder.
        out_dir: Output folder (created).
        mask_path: Lung mask image (nonzero = lung); None predicts it with the model's or the shipped segmenter.
        segmenter_weights: Lung-segmenter weights to use instead.
        device: Inference device.

    Returns:
        The summary (also written to ``<stem>_explanation.json``): probability, label, threshold,
        lung_energy_fraction, qc_flags and the files written.

    Raises:
        ImageError: Unreadable image or mask.
        ModelError: Missing or corrupt model.
        ConfigError: The mask does not match the image size.
    """
    import json

    from covidcxr.classification.artifact import load_artifact
    from covidcxr.classification.explain import explanation_from, outline_rgba, save_explanation
    from covidcxr.io.files import save_png
    from covidcxr.io.image import load_image

    image_path, out = Path(image_path), Path(out_dir)
    artifact = load_artifact(model_dir, device)
    image, _ = load_image(image_path)
    if mask_path is not None:
        mask_img, _ = load_image(mask_path)
        try:
            result = analyze_one(artifact, image, mask=(mask_img > 0.5).astype(np.uint8))
        except ConfigError as exc:
            raise ConfigError(f"{mask_path}: {exc}") from exc
    else:
        segmenter, key = pick_segmenter(artifact, segmenter_weights)
        result = analyze_one(artifact, image, segmenter=segmenter, segmenter_key=key)
    pred, mask = result.prediction, result.mask
    expl = explanation_from(pred, image, mask, n_members=len(artifact.members))
    stem = image_path.stem
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
