"""Dice of predicted lung masks against references, per source."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.segmentation.segmenter import LungSegmenter

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- evaluation
def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty).

    Args:
        pred: Predicted mask (nonzero = foreground).
        target: Reference mask of the same shape.

    Returns:
        ``2 |P & T| / (|P| + |T|)``.

    Raises:
        ConfigError: Shapes differ.
    """
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape:
        raise ConfigError(f"mask shapes differ: prediction {p.shape} vs reference {t.shape}")
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def source_key(mask_source: str) -> str:
    """Short name of a mask source ('SCR (van Ginneken et al.)' -> 'scr', 'v7labs/...' -> 'v7labs')."""
    head = str(mask_source).strip().split("/")[0].split("(")[0].split()
    return "".join(ch for ch in (head[0] if head else "") if ch.isalnum()).lower() or "all"


def evaluate_masks(
    df: Any, segmenter: LungSegmenter, *, chunk: int = 32, progress: bool = False
) -> Any:
    """Dice of predicted against reference masks, at the reference mask's resolution.

    Args:
        df: Manifest table (absolute paths) with ``image`` and ``mask``; ``mask_source`` (or ``source``) groups
            the results.
        segmenter: The segmenter to evaluate.
        chunk: Images loaded and predicted at a time (bounds memory).
        progress: Show a tqdm progress bar.

    Returns:
        DataFrame with one row per image/mask pair: ``image, mask, mask_source, dice, lung_fraction,
        lung_fraction_true, qc_flags``.

    Raises:
        ManifestError: No ``mask`` column or no rows with a mask.
        ImageError: An image or mask cannot be read.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from covidcxr.errors import ManifestError
    from covidcxr.io.image import load_image
    from covidcxr.transforms.resize import resize_mask

    origin = df.attrs.get("manifest", "manifest")
    if "mask" not in df.columns:
        raise ManifestError(origin, ["no 'mask' column: evaluation needs reference lung masks"])
    rows = df[df["mask"].astype(str).str.len() > 0].reset_index(drop=True)
    if rows.empty:
        raise ManifestError(origin, ["no row has a mask"])
    group_col = "mask_source" if "mask_source" in rows.columns else "source" if "source" in rows.columns else None
    records = []
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not progress)
    for start in range(0, len(rows), chunk):
        part = rows.iloc[start : start + chunk]
        images = [load_image(p)[0] for p in part["image"]]
        results = segmenter.predict(images)
        for (_, row), res in zip(part.iterrows(), results):
            ref = load_image(row["mask"])[0] >= 0.5
            pred = res.mask if res.mask.shape == ref.shape else resize_mask(res.mask, ref.shape)
            records.append(
                {
                    "image": row["image"],
                    "mask": row["mask"],
                    "mask_source": row[group_col] if group_col else "all",
                    "dice": dice_score(pred, ref),
                    "lung_fraction": res.lung_fraction,
                    "lung_fraction_true": float(ref.mean()),
                    "qc_flags": ";".join(res.qc_flags),
                }
            )
        bar.update(len(part))
    bar.close()
    return pd.DataFrame.from_records(records)


def dice_table(per_image: Any) -> Any:
    """Summarise per-image Dice per mask source (and overall).

    Args:
        per_image: Output of :func:`evaluate_masks`.

    Returns:
        DataFrame indexed by mask source (plus ``all``) with ``n, mean, median, p05, min, qc_flagged``.
    """
    import pandas as pd

    def stats(d: pd.DataFrame) -> dict[str, float]:
        x = d["dice"].to_numpy(dtype=float)
        return {
            "n": len(x),
            "mean": float(x.mean()),
            "median": float(np.median(x)),
            "p05": float(np.percentile(x, 5)),
            "min": float(x.min()),
            "qc_flagged": int((d["qc_flags"].astype(str) != "").sum()),
        }

    table = {str(k): stats(g) for k, g in per_image.groupby("mask_source", sort=True)}
    table["all"] = stats(per_image)
    return pd.DataFrame.from_dict(table, orient="index")
