"""Near-duplicate images across patients (thumbnail correlation)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from covidcxr.data.manifest import _capped, _text
from covidcxr.errors import ConfigError, ImageError, ManifestError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Near-duplicate check
# ---------------------------------------------------------------------------------------------------------


def _thumbnail(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from covidcxr.io.image import load_image

    image, _ = load_image(path)
    # Area averaging (BOX) like the data build's check; the aspect ratio is squashed on purpose so that copies
    # saved at another resolution still line up.
    thumb = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((size, size), Image.BOX))
    thumb = thumb.ravel().astype(np.float64)
    thumb -= thumb.mean()
    norm = np.linalg.norm(thumb)
    return (thumb / norm if norm > 0 else thumb).astype(np.float32)


def image_thumbnails(
    paths: Sequence[str], size: int = 32, *, workers: int | None = None, progress: bool = True
) -> np.ndarray:
    """Load images and turn each into a centred, unit-norm ``size*size`` thumbnail (dot product = Pearson r).

    Args:
        paths: Image files.
        size: Thumbnail side.
        workers: Loader threads; default ``min(8, cpu count)``.
        progress: Show a progress bar (only on a terminal).

    Returns:
        float32 array (len(paths), size*size); an image of constant grey gives a zero row.

    Raises:
        ManifestError: Listing every image that could not be read.
    """
    from tqdm.auto import tqdm

    def load(path: str) -> np.ndarray | str:
        try:
            return _thumbnail(path, size)
        except ImageError as exc:
            return str(exc)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(load, paths),
                total=len(paths),
                desc="thumbnails",
                unit="img",
                disable=None if progress else True,
            )
        )
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise ManifestError(
            "near-duplicate check", _capped([f"unreadable image: {f}" for f in failed], "unreadable images")
        )
    return np.stack(results) if results else np.zeros((0, size * size), np.float32)


def find_near_duplicates(
    df: pd.DataFrame,
    *,
    threshold: float = 0.97,
    size: int = 32,
    thumbnails: np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Find pairs of near-identical images that belong to different patients.

    Each image is loaded with :func:`covidcxr.io.load_image`, reduced to a ``size`` x ``size`` thumbnail, and pairs
    whose thumbnails correlate with Pearson r >= ``threshold`` are reported. Public COVID collections hold such
    copies under different patient ids; across splits they leak test images into training.

    Args:
        df: Manifest table (absolute ``image`` paths, ``patient_id``; ``split`` and ``label`` used if present).
        threshold: Smallest correlation reported.
        size: Thumbnail side.
        thumbnails: Precomputed :func:`image_thumbnails` of ``df.image`` (skips loading).
        workers: Loader threads.
        progress: Show a progress bar.

    Returns:
        Pairs sorted by decreasing ``corr``: ``image_a, image_b, patient_a, patient_b`` (+ ``label_*``,
        ``split_*`` and ``cross_split`` when those columns exist) and ``corr``.

    Raises:
        ManifestError: Some images could not be read.
        ConfigError: ``threshold`` is not in (0, 1] or ``thumbnails`` does not match ``df``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-duplicate threshold must be in (0, 1], got {threshold!r}")
    images = _text(df["image"]).to_numpy()
    if thumbnails is None:
        thumbnails = image_thumbnails(list(images), size, workers=workers, progress=progress)
    elif len(thumbnails) != len(df):
        raise ConfigError(f"{len(thumbnails)} thumbnails given for {len(df)} images")
    patients = _text(df["patient_id"]).to_numpy()
    a_idx, b_idx, corr = [], [], []
    block = 2048  # bounds memory at block x N floats for large manifests
    for start in range(0, len(thumbnails), block):
        sims = thumbnails[start : start + block] @ thumbnails[start:].T
        i, j = np.nonzero(sims >= threshold - 1e-6)
        keep = (j > i) & (patients[start + i] != patients[start + j])
        a_idx.append(start + i[keep])
        b_idx.append(start + j[keep])
        corr.append(np.minimum(sims[i[keep], j[keep]], 1.0))
    a = np.concatenate(a_idx) if a_idx else np.zeros(0, int)
    b = np.concatenate(b_idx) if b_idx else np.zeros(0, int)
    out = pd.DataFrame({"image_a": images[a], "image_b": images[b], "patient_a": patients[a], "patient_b": patients[b]})
    for col in ("label", "split"):
        if col in df.columns:
            values = _text(df[col]).to_numpy()
            out[f"{col}_a"], out[f"{col}_b"] = values[a], values[b]
    if "split" in df.columns:
        out["cross_split"] = out["split_a"] != out["split_b"]
    out["corr"] = np.round((np.concatenate(corr) if corr else np.zeros(0)).astype(np.float64), 4)
    return out.sort_values("corr", ascending=False, kind="stable").reset_index(drop=True)
