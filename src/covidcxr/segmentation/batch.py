"""Segment a folder or manifest of images and write masks and overlays."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from covidcxr.errors import ConfigError, CxrError
from covidcxr.io.files import unique_names
from covidcxr.segmentation.segmenter import LungSegmenter

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- batch outputs
def overlay_image(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (40, 220, 60)) -> np.ndarray:
    """RGB picture of the image with the lung outline drawn on it.

    Args:
        image: ``H x W`` float image in [0, 1].
        mask: Binary mask of the same shape.
        color: Outline colour.

    Returns:
        uint8 ``H x W x 3`` array.
    """
    gray = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    lung = np.asarray(mask) > 0
    width = max(1, round(max(lung.shape) / 256))
    outline = lung & ~ndi.binary_erosion(lung, iterations=width, border_value=0)
    rgb[outline] = color
    return rgb


def _collect_inputs(source: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(image path, output name) pairs from an image file, a folder of images or a manifest CSV."""
    from covidcxr.data.manifest import IMAGE_SUFFIXES, read_manifest
    from covidcxr.errors import ImageReadError, ManifestError

    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        df = read_manifest(path, validate=False)
        if "image" not in df.columns:
            raise ManifestError(path, ["no 'image' column"])
        images = [p for p in df["image"].astype(str) if p]
        names = list(df["case_id"].astype(str)) if "case_id" in df.columns else [Path(p).stem for p in images]
    elif path.is_dir():
        images = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ImageReadError(path, f"no image files in folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        names = [Path(p).relative_to(path).with_suffix("").as_posix().replace("/", "__") for p in images]
    elif path.is_file():
        images, names = [str(path)], [path.stem]
    else:
        raise ImageReadError(path, "file or folder not found")
    safe = ["".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "image" for name in names]
    return list(zip(images, unique_names(safe, first=1), strict=True))


def predict_to_dir(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    force: bool = False,
    segmenter: LungSegmenter | None = None,
    chunk: int = 16,
    progress: bool = False,
) -> Any:
    """Segment images and write ``masks/NAME_mask.png``, ``overlays/NAME_overlay.png`` and ``segmentation.csv``.

    Args:
        source: An image file, a folder of images, or a manifest CSV (``image`` column; ``case_id`` names outputs).
        out_dir: Output folder (created).
        weights: Weights file or folder; None = shipped weights (ignored when ``segmenter`` is given).
        force: Overwrite existing outputs.
        segmenter: A loaded segmenter to use.
        chunk: Images read and predicted at a time.
        progress: Show a tqdm progress bar.

    Returns:
        The CSV's table: ``image, name, mask_png, overlay_png, height, width, lung_fraction, confidence, qc_flags,
        qc_message, error`` (an unreadable image gets a row with ``error`` set and no outputs).

    Raises:
        ConfigError: Outputs exist and ``force`` is False.
        ImageReadError: ``source`` does not exist or holds no images.
        ManifestError, ModelError: Bad manifest or weights.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from covidcxr.io.files import save_png, write_text
    from covidcxr.io.image import load_image

    inputs = _collect_inputs(source)
    out = Path(out_dir)
    csv_path = out / "segmentation.csv"
    planned = [csv_path] + [p for _, n in inputs for p in (out / "masks" / f"{n}_mask.png",
                                                             out / "overlays" / f"{n}_overlay.png")]
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        listed = ", ".join(str(p) for p in existing[:3]) + (f" (+{len(existing) - 3} more)" if len(existing) > 3 else "")
        raise ConfigError(f"output(s) exist: {listed}; pass --force to overwrite")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    segmenter = segmenter or LungSegmenter.load(weights)
    records = []
    bar = tqdm(total=len(inputs), desc="segment", unit="img", disable=not progress)
    for start in range(0, len(inputs), chunk):
        loaded, part = [], inputs[start : start + chunk]
        for path, name in part:
            try:
                loaded.append((path, name, load_image(path)[0], ""))
            except CxrError as exc:
                log.error("%s", exc)
                loaded.append((path, name, None, str(exc)))
        good = [x for x in loaded if x[2] is not None]
        results = iter(segmenter.predict([x[2] for x in good]))
        for path, name, image, error in loaded:
            row: dict[str, Any] = {"image": path, "name": name, "error": error}
            if image is not None:
                res = next(results)
                mask_png, overlay_png = out / "masks" / f"{name}_mask.png", out / "overlays" / f"{name}_overlay.png"
                save_png(mask_png, res.mask * np.uint8(255))
                save_png(overlay_png, overlay_image(image, res.mask))
                row.update(
                    mask_png=str(mask_png),
                    overlay_png=str(overlay_png),
                    height=image.shape[0],
                    width=image.shape[1],
                    lung_fraction=round(res.lung_fraction, 4),
                    confidence=round(res.confidence, 4),
                    qc_flags=";".join(res.qc_flags),
                    qc_message=res.qc_message,
                )
            records.append(row)
        bar.update(len(part))
    bar.close()
    columns = ["image", "name", "mask_png", "overlay_png", "height", "width", "lung_fraction", "confidence",
               "qc_flags", "qc_message", "error"]
    table = pd.DataFrame.from_records(records).reindex(columns=columns)
    write_text(csv_path, table.to_csv(index=False))  # an earlier table stays whole until this one is
    return table
