"""Embeddings from a model artifact: the feature interface run over manifests.

:func:`embed_manifest` runs a manifest through the artifact's feature interface (``forward_features``, exactly the
preprocessing stored in the artifact, L2-normalised, bf16 where the artifact and device allow it);
:func:`embed_splits` embeds the train and test splits; :func:`case_metadata` makes the per-case table an index
stores. Building and searching indexes from these embeddings lives in :mod:`covidcxr.search`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

# Manifest columns copied into the index metadata when present (besides case_id, patient_id, label, image).
METADATA_COLUMNS = ("source", "view", "split", "study_date", "date")


def _load_row(path: str, mask_path: str | None) -> tuple[np.ndarray | None, np.ndarray | None, ImageError | None]:
    from covidcxr.io import load_image

    try:
        image = load_image(path)[0]
    except ImageError as exc:
        return None, None, exc
    mask = None
    if mask_path:
        from covidcxr.artifact import read_mask

        try:
            mask = read_mask(mask_path)
        except ImageError as exc:
            return None, None, exc
        except (OSError, ValueError) as exc:
            from covidcxr.errors import ImageReadError

            return None, None, ImageReadError(mask_path, f"cannot read mask ({exc})")
    return image, mask, None


def _mask_paths(df: pd.DataFrame, artifact: Any) -> list[str | None]:
    # Manifest masks are used exactly as artifact.predict_manifest (and training) use them; otherwise the
    # artifact's own segmenter makes them.
    if "mask" not in df.columns or getattr(artifact, "seg_mode", "none") == "none":
        return [None] * len(df)
    return [m if isinstance(m, str) and m not in ("", "nan", "None") else None for m in df["mask"].tolist()]


def embed_manifest(
    artifact: Any,
    df: pd.DataFrame,
    batch_size: int = 32,
    progress: bool = True,
    *,
    skip_bad: bool = False,
    num_workers: int = 2,
    bf16: bool | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Embed every image of a manifest table with a model artifact.

    Images are read with :func:`covidcxr.io.load_image` and preprocessed exactly as the artifact stores it
    (segmentation mode, size, normalisation); embeddings come from ``forward_features`` and are L2-normalised.

    Args:
        artifact: Loaded classifier or ensemble artifact (:func:`covidcxr.artifact.load_artifact`).
        df: Table with an ``image`` column of paths (``mask`` used when present and the model uses masks).
        batch_size: Images decoded and run through the network per step.
        progress: Show a tqdm progress bar.
        skip_bad: Skip unreadable images with a warning instead of raising.
        num_workers: Decoding threads.
        bf16: Force bf16 autocast on/off; None = the artifact's setting where the device supports it.

    Returns:
        ``(embeddings, rows)``: float32 ``(n, D)`` unit-norm rows and the table rows they belong to (all rows, or
        the readable ones with ``skip_bad``; index reset) with the model's ``prob`` of COVID added.

    Raises:
        ConfigError: No ``image`` column, empty table, bad batch size, or no readable image left.
        ImageError: An unreadable image (without ``skip_bad``); the message names the file and manifest row.
    """
    from tqdm.auto import tqdm

    if "image" not in df.columns:
        raise ConfigError(f"manifest table needs an 'image' column, has {list(map(str, df.columns))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows_all = df.reset_index(drop=True)
    if rows_all.empty:
        raise ConfigError("manifest table has no rows to embed")
    paths = rows_all["image"].astype(str).tolist()
    mask_paths = _mask_paths(rows_all, artifact)
    embs: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[str] = []
    bar = tqdm(total=len(paths), desc="embed", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
            for start in range(0, len(paths), batch_size):
                idx = list(range(start, min(len(paths), start + batch_size)))
                loaded = list(pool.map(_load_row, [paths[i] for i in idx], [mask_paths[i] for i in idx]))
                images, masks, ok = [], [], []
                for i, (image, mask, err) in zip(idx, loaded, strict=True):
                    if err is not None:
                        if not skip_bad:
                            raise type(err)(err.path, f"{err.reason} (manifest row {i}; skip_bad=True / --skip-bad "
                                                      "skips unreadable images)") from err
                        log.warning("skipping manifest row %d: %s", i, err)
                        skipped.append(str(err))
                        continue
                    images.append(image)
                    masks.append(mask)
                    ok.append(i)
                if images:
                    given = masks if any(m is not None for m in masks) else None
                    pred = artifact.predict(images, given, embeddings=True, bf16=bf16, batch_size=batch_size)
                    embs.append(np.asarray(pred.embeddings, dtype=np.float32))
                    probs.append(np.asarray(pred.prob, dtype=np.float64))
                    kept.extend(ok)
                bar.update(len(idx))
    finally:
        bar.close()
    if not kept:
        raise ConfigError(f"none of the {len(paths)} images could be read (first problem: {skipped[0]})")
    if skipped:
        log.warning("skipped %d of %d unreadable image(s)", len(skipped), len(paths))
    rows = rows_all.iloc[kept].reset_index(drop=True)
    rows.attrs = dict(df.attrs)
    rows["prob"] = np.concatenate(probs)
    return np.concatenate(embs), rows


def case_metadata(df: pd.DataFrame, root: str | Path | None = None) -> pd.DataFrame:
    """Index metadata for manifest rows.

    Args:
        df: Manifest rows with ``image``, ``patient_id`` and ``label`` (``case_id`` optional).
        root: Folder that case ids are made relative to (default ``df.attrs['root']``, the manifest's folder).

    Returns:
        Table with ``case_id`` (the ``case_id`` column, else the image path relative to ``root``), ``patient_id``,
        ``label``, ``image`` (absolute path) and ``source``, ``view``, ``split``, ``study_date``, ``date`` when
        present.

    Raises:
        ConfigError: A required column is missing.
    """
    missing = [c for c in ("image", "patient_id", "label") if c not in df.columns]
    if missing:
        raise ConfigError(f"manifest table lacks column(s) {missing}; has {list(map(str, df.columns))}")
    root = root if root is not None else df.attrs.get("root")
    images = [os.path.abspath(str(p)) for p in df["image"].tolist()]
    if "case_id" in df.columns and df["case_id"].notna().all() and (df["case_id"].astype(str) != "").all():
        case_ids = df["case_id"].astype(str).tolist()
    else:
        case_ids = [_relative_id(p, root) for p in images]
    meta = pd.DataFrame({
        "case_id": case_ids,
        "patient_id": df["patient_id"].astype(str).tolist(),
        "label": df["label"].astype(str).tolist(),
        "image": images,
    })
    for col in METADATA_COLUMNS:
        if col in df.columns:
            meta[col] = df[col].tolist()
    return meta


def _relative_id(path: str, root: str | Path | None) -> str:
    if root is None:
        return Path(path).as_posix()
    rel = os.path.relpath(path, os.path.abspath(root))
    return Path(path).as_posix() if rel.startswith("..") else Path(rel).as_posix()


def select_split(df: pd.DataFrame, split: str | None, source: str | Path | None = None) -> pd.DataFrame:
    """Rows of one split (``None`` or ``'all'`` = every row).

    Raises:
        ConfigError: No ``split`` column or no row in that split.
    """
    if split in (None, "all"):
        return df
    name = source or df.attrs.get("manifest", "manifest")
    if "split" not in df.columns:
        raise ConfigError(f"{name}: no 'split' column; use --split all or split it first (covidcxr data split)")
    out = df[df["split"].astype(str) == split]
    if out.empty:
        raise ConfigError(f"{name}: no rows with split {split!r} (splits: {sorted(df['split'].astype(str).unique())})")
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


def embed_splits(
    artifact: Any,
    df: pd.DataFrame,
    *,
    index_split: str = "train",
    query_split: str = "test",
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Embed the index split and the query split of a manifest (split by patient with ``seed`` when unsplit).

    Returns:
        ``(train_embeddings, train_rows, test_embeddings, test_rows)``; the rows carry the model's ``prob``.
    """
    if "split" not in df.columns:
        from covidcxr.data import patient_split

        log.warning("manifest has no 'split' column: splitting by patient (seed %d)", seed)
        attrs = dict(df.attrs)
        df = patient_split(df, seed=seed)
        df.attrs = attrs
    train = select_split(df, index_split)
    test = select_split(df, query_split)
    e_train, r_train = embed_manifest(artifact, train, batch_size, progress, skip_bad=skip_bad,
                                      num_workers=num_workers)
    e_test, r_test = embed_manifest(artifact, test, batch_size, progress, skip_bad=skip_bad, num_workers=num_workers)
    return e_train, r_train, e_test, r_test


__all__ = ["case_metadata", "embed_manifest", "embed_splits", "select_split"]
