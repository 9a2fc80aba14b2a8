"""Embeddings from a model artifact: the feature interface run over manifests.

:func:`embed_manifest` runs a manifest through the artifact's feature interface (``forward_features``, exactly the
preprocessing stored in the artifact, L2-normalised, bf16 where the artifact and device allow it);
:func:`embed_splits` embeds the train and test splits; :func:`case_metadata` makes the per-case table an index
stores. Building and searching indexes from these embeddings lives in :mod:`covidcxr.retrieval.workflow`.
The loop itself is :func:`covidcxr.classification.loop.predict_manifest`, shared with predict and evaluate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.split import select_split
from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)

# Manifest columns copied into the index metadata when present (besides case_id, patient_id, label, image).
METADATA_COLUMNS = ("source", "view", "split", "study_date", "date")


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
    from covidcxr.classification.loop import predict_manifest

    if "image" in df.columns and df.empty:
        raise ConfigError("manifest table has no rows to embed")
    rows, emb = predict_manifest(artifact, df, embeddings=True, batch_size=batch_size, num_workers=max(1, num_workers),
                                 progress=progress, skip_bad=skip_bad, bf16=bf16)
    return emb, rows


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
        from covidcxr.data.split import patient_split

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
