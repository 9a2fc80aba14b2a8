"""The similar-case workflow: case indexes built from a model artifact's embeddings, search, retrieval quality.

:func:`build_index` / :func:`add_to_index` turn manifests into a :class:`~covidcxr.index.CaseIndex` directory (with
optional 128-px thumbnails in ``INDEX/thumbnails/`` for the web page); :func:`search_image` and
:func:`contact_sheet` answer one query; :func:`evaluate_retrieval` measures retrieval quality (train split
indexed, test split queried, leave-patient-out); :func:`run_index_demo` is the demo's index stage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError, ImageError, IndexMismatchError
from covidcxr.retrieval.embed import case_metadata, embed_manifest
from covidcxr.retrieval.index import CaseIndex, Match

log = logging.getLogger(__name__)

THUMBNAIL_DIR = "thumbnails"


THUMBNAIL_SIZE = 128




def thumbnail_name(case_id: str) -> str:
    """Relative path (inside the index folder) of a case's thumbnail; hashed, so any case id is a safe name."""
    return f"{THUMBNAIL_DIR}/{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:24]}.png"


def _write_thumbnail(path: str, dest: Path, size: int) -> str | None:
    from PIL import Image

    from covidcxr.io.image import load_image

    try:
        image = load_image(path)[0]
    except ImageError as exc:
        log.warning("no thumbnail for %s", exc)
        return str(exc)
    im = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    im.save(dest, format="PNG", optimize=True)
    return None


def write_thumbnails(
    meta: pd.DataFrame, folder: str | Path, size: int = THUMBNAIL_SIZE, num_workers: int = 2
) -> list[str | None]:
    """Write a PNG thumbnail (longer side ``size``) per case into ``folder``.

    Args:
        meta: Index metadata with ``case_id`` and ``image``.
        folder: Target folder (the index's ``thumbnails/``, or a staging folder moved there later).
        size: Longer side in pixels.
        num_workers: Threads.

    Returns:
        Per case the relative thumbnail path (see :func:`thumbnail_name`), or None when its image was unreadable.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [thumbnail_name(c) for c in meta["case_id"].astype(str)]
    dests = [folder / Path(n).name for n in names]
    with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        errors = list(pool.map(_write_thumbnail, meta["image"].astype(str).tolist(), dests, [size] * len(dests)))
    return [None if e else n for n, e in zip(names, errors, strict=True)]


def _stage_thumbnails(directory: Path, keep_existing: bool) -> Path:
    """A staging folder next to the index for thumbnails, pre-filled (hard links) with the current ones.

    ``CaseIndex.save`` swaps in a complete new directory, so files beside the index must be staged and moved in
    after the save; hard links keep the old index's thumbnails intact until then.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.thumbs-", dir=directory.parent))
    old = directory / THUMBNAIL_DIR
    if keep_existing and old.is_dir():
        for f in old.iterdir():
            try:
                os.link(f, staging / f.name)
            except OSError:  # file systems without hard links
                shutil.copy2(f, staging / f.name)
    return staging


def _save_index(index: CaseIndex, directory: Path, staging: Path | None) -> Path:
    try:
        index.save(directory)
        if staging is not None:
            os.replace(staging, directory / THUMBNAIL_DIR)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _model_info(artifact: Any) -> dict[str, Any]:
    cfg = getattr(artifact, "config", {}) or {}
    members = getattr(artifact, "members", None)
    return {
        "model_dir": str(Path(artifact.directory).resolve()),
        "model_hash": artifact.weights_hash,
        "model_kind": getattr(artifact, "kind", "classifier"),
        "arch": "+".join(m.config["arch"] for m in members) if members else cfg.get("arch"),
        "seg_mode": getattr(artifact, "seg_mode", cfg.get("seg_mode")),
    }


def check_index_out(out: Path, force: bool) -> None:
    """Refuse to write an index over a folder that is not one, or over an index without ``force``."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_file() or not (out / "header.json").is_file():
        raise CaseIndexError(f"{out}: exists and is not a case index; refusing to replace it (choose another folder)")
    if not force:
        raise ConfigError(f"{out}: already exists; pass --force (force=True) to replace the index there")


def index_from_embeddings(
    artifact: Any,
    embeddings: np.ndarray,
    rows: pd.DataFrame,
    out: str | Path,
    *,
    pca_dim: int | None = None,
    whiten: bool = False,
    kind: str = "auto",
    thumbnails: bool = False,
    force: bool = False,
    num_workers: int = 2,
    info: dict[str, Any] | None = None,
) -> CaseIndex:
    """Fit and save a case index from embeddings already made by :func:`embed_manifest`.

    Args:
        artifact: The artifact the embeddings came from (its hash and folder go into the index header).
        embeddings: ``(n, D)`` array.
        rows: Manifest rows aligned with ``embeddings``.
        out: Index folder.
        pca_dim: Reduce to this many dimensions with a PCA fitted on these embeddings.
        whiten: Whiten the PCA output.
        kind: Index kind (``auto``, ``exact``, ``hnsw``, ``ivf``).
        thumbnails: Write 128-px PNG thumbnails into ``out/thumbnails/``.
        force: Replace an existing index at ``out``.
        num_workers: Threads for thumbnails.
        info: Extra facts for the header's ``build_info``.

    Returns:
        The fitted, saved index.

    Raises:
        ConfigError: ``out`` exists without ``force``; bad settings.
        CaseIndexError: ``out`` exists and is not a case index (never replaced).
    """
    out = Path(out)
    check_index_out(out, force)
    meta = case_metadata(rows)
    index = CaseIndex(kind=kind, pca_dim=pca_dim, whiten=whiten, model_hash=artifact.weights_hash)
    staging = None
    try:
        if thumbnails:
            staging = _stage_thumbnails(out, keep_existing=False)
            meta = meta.assign(thumbnail=write_thumbnails(meta, staging, num_workers=num_workers))
        index.fit(embeddings, meta)
        index.build_info = {
            **_model_info(artifact),
            "manifest": rows.attrs.get("manifest"),
            "thumbnails": bool(thumbnails),
            "thumbnail_size": THUMBNAIL_SIZE if thumbnails else None,
            "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "additions": [],
            **(info or {}),
        }
        _save_index(index, out, staging)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("index of %d cases written to %s", len(index), out)
    return index


def build_index(
    artifact: Any,
    df: pd.DataFrame,
    out: str | Path,
    *,
    pca_dim: int | None = None,
    whiten: bool = False,
    kind: str = "auto",
    thumbnails: bool = False,
    force: bool = False,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
    info: dict[str, Any] | None = None,
) -> CaseIndex:
    """Embed manifest rows and save them as a case index (see :func:`index_from_embeddings` for the arguments).

    Args:
        artifact: Loaded model artifact.
        df: Manifest rows to index (e.g. the train split, see :func:`select_split`).
        out: Index folder.
        pca_dim: Optional PCA dimension, fitted on these rows.
        whiten: Whiten the PCA output.
        kind: Index kind.
        thumbnails: Write thumbnails into ``out/thumbnails/``.
        force: Replace an existing index.
        batch_size: Embedding batch size.
        num_workers: Decoding threads.
        progress: Progress bar.
        skip_bad: Skip unreadable images with a warning.
        info: Extra ``build_info`` facts.

    Returns:
        The saved index.

    Raises:
        ConfigError: ``out`` exists without ``force``; bad settings (checked before embedding).
        ImageError: An unreadable image without ``skip_bad``.
    """
    out = Path(out)
    check_index_out(out, force)
    CaseIndex(kind=kind, pca_dim=pca_dim, whiten=whiten).set_params()  # validates the settings before the long part
    n_max = min(len(df), int(artifact.num_features))
    if pca_dim is not None and pca_dim > n_max:
        raise ConfigError(f"pca_dim={pca_dim} must be <= min(n_cases, embedding dim) = {n_max}")
    t0 = time.perf_counter()
    emb, rows = embed_manifest(artifact, df, batch_size, progress, skip_bad=skip_bad, num_workers=num_workers)
    seconds = time.perf_counter() - t0
    extra = {"n_skipped": len(df) - len(rows), "unreadable": rows.attrs.get("unreadable", []),
             "embed_seconds": round(seconds, 2), **(info or {})}
    return index_from_embeddings(artifact, emb, rows, out, pca_dim=pca_dim, whiten=whiten, kind=kind,
                                 thumbnails=thumbnails, force=force, num_workers=num_workers, info=extra)


def add_to_index(
    index_dir: str | Path,
    artifact: Any,
    df: pd.DataFrame,
    *,
    thumbnails: bool | None = None,
    skip_existing: bool = False,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
) -> tuple[CaseIndex, int]:
    """Embed manifest rows and add them to a saved index (saved again atomically).

    Args:
        index_dir: Existing index folder.
        artifact: The model the index was built with (its weights hash must match the header's).
        df: Manifest rows to add.
        thumbnails: Write thumbnails for the new cases; None = when the index has thumbnails.
        skip_existing: Skip rows whose case id is already indexed instead of refusing them.
        batch_size: Embedding batch size.
        num_workers: Decoding threads.
        progress: Progress bar.
        skip_bad: Skip unreadable images with a warning.

    Returns:
        ``(index, n_added)``.

    Raises:
        IndexMismatchError: The index was built with another model (hash or dimension differ).
        ConfigError: Case ids already in the index (without ``skip_existing``).
    """
    index_dir = Path(index_dir)
    index = CaseIndex.load(index_dir, expect_model_hash=artifact.weights_hash, expect_dim=int(artifact.num_features))
    if not index.appendable:
        raise CaseIndexError(f"{index_dir}: an archive index (ivfpq, metadata on disk) cannot grow in place; embed "
                             "the new cases into shards and rebuild with `covidcxr index build --from-embeddings`")
    meta = case_metadata(df)
    existing = index.existing_case_ids(meta["case_id"].astype(str).tolist())
    dupes = meta["case_id"].isin(existing).to_numpy()
    if dupes.any():
        shown = ", ".join(repr(c) for c in meta.loc[dupes, "case_id"].head(10))
        if not skip_existing:
            raise ConfigError(f"{int(dupes.sum())} case(s) already in the index {index_dir}: {shown}; use "
                              "--skip-existing to add only the new ones")
        log.warning("skipping %d case(s) already in the index: %s", int(dupes.sum()), shown)
        attrs = dict(df.attrs)
        df = df.reset_index(drop=True)[~dupes].reset_index(drop=True)
        df.attrs = attrs
    if df.empty:
        return index, 0
    emb, rows = embed_manifest(artifact, df, batch_size, progress, skip_bad=skip_bad, num_workers=num_workers)
    meta = case_metadata(rows)
    if thumbnails is None:
        thumbnails = bool(index.build_info.get("thumbnails")) or "thumbnail" in index.metadata_.columns
    staging = None
    try:
        if thumbnails:
            staging = _stage_thumbnails(index_dir, keep_existing=True)
            meta = meta.assign(thumbnail=write_thumbnails(meta, staging, num_workers=num_workers))
        elif (index_dir / THUMBNAIL_DIR).is_dir():
            staging = _stage_thumbnails(index_dir, keep_existing=True)  # keep the old cases' thumbnails
        index.add(emb, meta)
        index.build_info = dict(index.build_info)
        index.build_info["additions"] = [*index.build_info.get("additions", []), {
            "manifest": rows.attrs.get("manifest"), "n": len(rows), "n_skipped": len(df) - len(rows),
            "unreadable": rows.attrs.get("unreadable", []),
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }]
        _save_index(index, index_dir, staging)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return index, len(rows)


def load_index_and_model(
    index_dir: str | Path, model_dir: str | Path | None = None, device: str = "auto"
) -> tuple[CaseIndex, Any]:
    """Load an index and the model that made it (``model_dir`` or the folder recorded in the index header).

    Returns:
        ``(index, artifact)``.

    Raises:
        ConfigError: No ``model_dir`` given and none recorded in the header.
        IndexMismatchError: The model's weights hash or embedding dimension differ from the index's.
        ModelError, CaseIndexError: Missing or corrupt model or index.
    """
    from covidcxr.classification.artifact import load_artifact

    index = CaseIndex.load(index_dir)
    if model_dir is None:
        model_dir = index.build_info.get("model_dir")
        if not model_dir:
            raise ConfigError(f"{index_dir}: the index header records no model folder; pass --model DIR")
        log.info("using the model recorded in the index header: %s", model_dir)
    artifact = load_artifact(model_dir, device)
    if index.model_hash != artifact.weights_hash:
        raise IndexMismatchError(f"{index_dir}: index was built with embedding model hash {index.model_hash!r} but "
                                 f"{model_dir} has {artifact.weights_hash!r}; rebuild the index with this model")
    if index.dim_ != int(artifact.num_features):
        raise IndexMismatchError(f"{index_dir}: index takes {index.dim_}-d embeddings but {model_dir} makes "
                                 f"{artifact.num_features}-d ones")
    return index, artifact


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Temporarily set FAISS's OpenMP threads (1 for single queries: threads only add overhead there)."""
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def search_image(
    artifact: Any,
    index: CaseIndex,
    image: np.ndarray,
    k: int = 5,
    exclude_patients: Any = None,
    prediction: Any = None,
) -> tuple[list[Match], float]:
    """The k most similar indexed cases of one image.

    Args:
        artifact: The model the index was built with.
        index: Loaded index.
        image: float32 ``H x W`` in [0, 1].
        k: Number of neighbours.
        exclude_patients: A patient id or a collection of ids whose cases are skipped.
        prediction: The model's prediction of ``image`` with embeddings, when the caller already has it.

    Returns:
        ``(matches, prob)``: the matches, best first, and the model's probability of COVID for the image.
    """
    pred = prediction if prediction is not None else artifact.predict([image], embeddings=True)
    if exclude_patients is not None and not isinstance(exclude_patients, str | int):
        exclude_patients = [list(exclude_patients)]
    with faiss_threads(1):
        matches = index.search(pred.embeddings[:1], k=k, exclude_patients=exclude_patients)[0]
    return matches, float(pred.prob[0])


def match_rows(matches: Sequence[Match]) -> list[dict[str, Any]]:
    """Flat, JSON-ready rows of a result list: rank, similarity, case_id, patient_id, label, source, view, image."""
    return [{
        "rank": m.rank, "similarity": round(float(m.score), 6), "case_id": m.case_id, "patient_id": m.patient_id,
        "label": m.label, "source": m.metadata.get("source"), "view": m.metadata.get("view"),
        "image": m.metadata.get("image"), "thumbnail": m.metadata.get("thumbnail"),
    } for m in matches]
