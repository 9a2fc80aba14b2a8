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
import json
import logging
import math
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

from covidcxr.data import both_label_mask  # public here too: the retrieval report's groups
from covidcxr.embed import case_metadata, embed_manifest, embed_splits
from covidcxr.errors import ConfigError, ImageError, IndexError_, IndexMismatchError
from covidcxr.index import CaseIndex, Match, knn_vote_scores, retrieval_metrics

log = logging.getLogger(__name__)


THUMBNAIL_DIR = "thumbnails"


THUMBNAIL_SIZE = 128


POSITIVE_LABEL = "covid"


def thumbnail_name(case_id: str) -> str:
    """Relative path (inside the index folder) of a case's thumbnail; hashed, so any case id is a safe name."""
    return f"{THUMBNAIL_DIR}/{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:24]}.png"


def _write_thumbnail(path: str, dest: Path, size: int) -> str | None:
    from PIL import Image

    from covidcxr.io import load_image

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


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_file() or not (out / "header.json").is_file():
        raise IndexError_(f"{out}: exists and is not a case index; refusing to replace it (choose another folder)")
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
        IndexError_: ``out`` exists and is not a case index (never replaced).
    """
    out = Path(out)
    _check_out(out, force)
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
    _check_out(out, force)
    CaseIndex(kind=kind, pca_dim=pca_dim, whiten=whiten).set_params()  # validates the settings before the long part
    n_max = min(len(df), int(artifact.num_features))
    if pca_dim is not None and pca_dim > n_max:
        raise ConfigError(f"pca_dim={pca_dim} must be <= min(n_cases, embedding dim) = {n_max}")
    t0 = time.perf_counter()
    emb, rows = embed_manifest(artifact, df, batch_size, progress, skip_bad=skip_bad, num_workers=num_workers)
    seconds = time.perf_counter() - t0
    extra = {"n_skipped": len(df) - len(rows), "embed_seconds": round(seconds, 2), **(info or {})}
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
    meta = case_metadata(df)
    existing = set(index.metadata_["case_id"].astype(str))
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
        ModelError, IndexError_: Missing or corrupt model or index.
    """
    from covidcxr.artifact import load_artifact

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
) -> tuple[list[Match], float]:
    """The k most similar indexed cases of one image.

    Args:
        artifact: The model the index was built with.
        index: Loaded index.
        image: float32 ``H x W`` in [0, 1].
        k: Number of neighbours.
        exclude_patients: A patient id or a collection of ids whose cases are skipped.

    Returns:
        ``(matches, prob)``: the matches, best first, and the model's probability of COVID for the image.
    """
    pred = artifact.predict([image], embeddings=True)
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


def _case_image(match: Match, index_dir: Path | None) -> np.ndarray | None:
    from covidcxr.io import load_image

    for key in ("thumbnail", "image"):
        value = match.metadata.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value)
        if not path.is_absolute() and index_dir is not None:
            path = index_dir / path
        try:
            return load_image(path)[0]
        except ImageError as exc:
            log.debug("contact sheet: %s", exc)
    return None


def contact_sheet(
    query_image: np.ndarray,
    matches: Sequence[Match],
    out: str | Path,
    *,
    index_dir: str | Path | None = None,
    query_title: str = "query",
    ncols: int = 6,
) -> Path:
    """Write a PNG with the query and its neighbours, each titled with rank, label, similarity and patient.

    Args:
        query_image: float32 ``H x W`` in [0, 1].
        matches: Search results.
        out: PNG path (its folder is created).
        index_dir: Index folder; relative thumbnail paths are resolved against it.
        query_title: Title of the query tile.
        ncols: Tiles per row.

    Returns:
        ``out``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    index_dir = Path(index_dir) if index_dir is not None else None
    n = 1 + len(matches)
    cols = max(1, min(int(ncols), n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.3 * cols, 2.7 * rows), dpi=100)
    FigureCanvasAgg(fig)  # Figure + Agg canvas: no pyplot global state, safe in threads
    tiles: list[tuple[np.ndarray | None, str, str]] = [(query_image, query_title, "black")]
    for m in matches:
        colour = "#b2182b" if m.label == POSITIVE_LABEL else "#2166ac"
        tiles.append((_case_image(m, index_dir), f"#{m.rank} {m.label}  sim {m.score:.3f}\n{m.patient_id}", colour))
    for i, (image, title, colour) in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if image is None:
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        ax.set_title(title, fontsize=8, color=colour)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _auc_with_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any] | None:
    from sklearn.metrics import roc_auc_score

    from covidcxr.evaluate import bootstrap_ci

    if np.unique(y).size < 2:
        return None
    value = float(roc_auc_score(y, p))
    ci = None
    if n_boot > 0:
        lo, hi = bootstrap_ci(y, np.clip(p, 0, 1), 0.5, groups, n_boot=n_boot, seed=seed)["roc_auc"]
        ci = [lo, hi] if math.isfinite(lo) and math.isfinite(hi) else None
    return {"value": value, "ci": ci}


def _block(
    sel: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    matches: list[list[Match]],
    votes: np.ndarray,
    probs: np.ndarray | None,
    index_share: dict[str, float],
    ks: Sequence[int],
    map_k: int,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    idx = np.flatnonzero(sel)
    lab = labels[idx]
    y = (lab == POSITIVE_LABEL).astype(int)
    out: dict[str, Any] = {"n_queries": int(idx.size), "n_patients": int(pd.unique(patients[idx]).size),
                           "n_covid": int(y.sum())}
    if idx.size == 0:
        return out
    out.update(retrieval_metrics(lab, [matches[i] for i in idx], ks=ks, map_k=map_k))
    out.pop("n_queries", None)
    out["n_queries"] = int(idx.size)
    # Expected precision of a retriever that ignores the image: P(neighbour label = query label).
    out["chance_precision"] = float(np.mean([index_share.get(str(v), 0.0) for v in lab]))
    out["knn_auc"] = _auc_with_ci(y, votes[idx], patients[idx], n_boot, seed)
    out["network_auc"] = _auc_with_ci(y, probs[idx], patients[idx], n_boot, seed) if probs is not None else None
    return out


def evaluate_retrieval(
    train_embeddings: np.ndarray,
    train_meta: pd.DataFrame,
    test_embeddings: np.ndarray,
    test_meta: pd.DataFrame,
    *,
    test_prob: np.ndarray | None = None,
    k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    pca_dim: int | None = None,
    whiten: bool = False,
    kind: str = "exact",
    n_boot: int = 1000,
    seed: int = 0,
    min_source_queries: int = 1,
) -> dict[str, Any]:
    """Retrieval quality: index the train rows, query with the test rows, leave-patient-out.

    Reports precision@k and mAP@k of label agreement, the ROC AUC of a similarity-weighted kNN vote
    (:func:`~covidcxr.index.knn_vote_scores`, ``k`` neighbours) and, given ``test_prob``, the network's own ROC AUC
    on the same images; AUCs with patient-bootstrap 95 % CIs. Overall, on sources with both labels and per source.

    Args:
        train_embeddings: ``(n_train, D)`` indexed embeddings.
        train_meta: Their rows (``patient_id``, ``label``; ``case_id``/``image``, ``source`` optional).
        test_embeddings: ``(n_test, D)`` query embeddings.
        test_meta: Their rows (``patient_id``, ``label``; ``source``, ``source_has_both_labels`` optional).
        test_prob: Network probability of COVID per test row.
        k: Neighbours of the kNN vote and cut-off of mAP.
        ks: Cut-offs of precision@k.
        pca_dim: Optional PCA dimension fitted on the train embeddings.
        whiten: Whiten the PCA output.
        kind: Index kind (exact by default: quality should not depend on approximation).
        n_boot: Bootstrap replicates for the AUC CIs (0 = no CIs).
        seed: Bootstrap seed.
        min_source_queries: Sources with fewer test queries are left out of ``per_source``.

    Returns:
        JSON-ready dict with ``settings``, ``index``, ``queries``, ``overall``, ``both_label_sources``,
        ``per_source`` and ``timing``.

    Raises:
        ConfigError: Misaligned inputs or bad settings.
    """
    train_meta = train_meta.reset_index(drop=True)
    test_meta = test_meta.reset_index(drop=True)
    for name, emb, meta in (("train", train_embeddings, train_meta), ("test", test_embeddings, test_meta)):
        if len(emb) != len(meta):
            raise ConfigError(f"{name}: {len(emb)} embeddings but {len(meta)} metadata rows")
        missing = [c for c in ("patient_id", "label") if c not in meta.columns]
        if missing:
            raise ConfigError(f"{name} metadata lacks column(s) {missing}")
    if test_prob is not None and len(test_prob) != len(test_meta):
        raise ConfigError(f"test_prob has {len(test_prob)} entries but there are {len(test_meta)} test rows")
    ks = sorted({int(x) for x in ks})
    fetch = max(k, *ks)
    meta = pd.DataFrame({
        "case_id": (train_meta["case_id"] if "case_id" in train_meta.columns
                    else train_meta["image"] if "image" in train_meta.columns
                    else pd.Series([f"row{i}" for i in range(len(train_meta))])).astype(str),
        "patient_id": train_meta["patient_id"].astype(str),
        "label": train_meta["label"].astype(str),
    })
    t0 = time.perf_counter()
    index = CaseIndex(kind=kind, pca_dim=pca_dim, whiten=whiten).fit(train_embeddings, meta)
    fit_s = time.perf_counter() - t0
    patients = test_meta["patient_id"].astype(str).to_numpy(dtype=object)
    labels = test_meta["label"].astype(str).to_numpy(dtype=object)
    t0 = time.perf_counter()
    matches = index.search(test_embeddings, k=fetch, exclude_patients=patients.tolist())
    search_s = time.perf_counter() - t0
    votes = knn_vote_scores([m[:k] for m in matches])
    votes = np.where(np.isfinite(votes), votes, 0.5)
    probs = None if test_prob is None else np.asarray(test_prob, dtype=np.float64)
    share = meta["label"].value_counts(normalize=True).to_dict()
    args = (labels, patients, matches, votes, probs, share, ks, k, n_boot, seed)

    both, both_names = both_label_mask(test_meta, pd.concat([train_meta, test_meta], ignore_index=True))
    per_source: dict[str, Any] = {}
    if "source" in test_meta.columns:
        sources = test_meta["source"].astype(str).to_numpy()
        for src in sorted(pd.unique(sources)):
            sel = sources == src
            if sel.sum() >= min_source_queries:
                per_source[src] = _block(sel, *args)
    return {
        "settings": {"k": k, "ks": ks, "map_k": k, "pca_dim": pca_dim, "whiten": whiten, "kind": index.kind_,
                     "n_boot": n_boot, "seed": seed, "leave_patient_out": True,
                     "knn_vote": "similarity-weighted share of covid among the k neighbours"},
        "index": {"n_cases": len(index), "n_patients": int(meta["patient_id"].nunique()), "dim": int(index.dim_),
                  "index_dim": int(index.index_dim_),
                  "label_counts": {str(a): int(b) for a, b in meta["label"].value_counts().items()}},
        "queries": {"n": len(test_meta), "n_patients": int(pd.unique(patients).size),
                    "label_counts": {str(a): int(b) for a, b in pd.Series(labels).value_counts().items()}},
        "overall": _block(np.ones(len(test_meta), bool), *args),
        "both_label_sources": ({"sources": both_names, **_block(both, *args)} if both is not None else None),
        "per_source": per_source,
        "timing": {"index_fit_s": round(fit_s, 4), "search_s": round(search_s, 4),
                   "search_ms_per_query": round(1000 * search_s / max(1, len(test_meta)), 4)},
    }


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _fmt_auc(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    ci = entry.get("ci")
    return f"{_fmt(entry['value'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(entry["value"])


def retrieval_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (overall, both-label sources, per source) of a :func:`evaluate_retrieval` result."""
    ks = result["settings"]["ks"]
    map_k = result["settings"]["map_k"]
    k = result["settings"]["k"]
    header = ["subset", "queries", "patients", "covid", *[f"P@{x}" for x in ks], f"mAP@{map_k}", "chance P",
              f"kNN AUC (k={k})", "network AUC"]
    blocks = [("overall", result["overall"])]
    if result.get("both_label_sources"):
        blocks.append(("sources with both labels", result["both_label_sources"]))
    blocks += [(f"source: {s}", b) for s, b in result.get("per_source", {}).items()]
    rows = []
    for name, b in blocks:
        rows.append([name, str(b.get("n_queries", 0)), str(b.get("n_patients", 0)), str(b.get("n_covid", 0)),
                     *[_fmt(b.get(f"precision@{x}")) for x in ks], _fmt(b.get(f"map@{map_k}")),
                     _fmt(b.get("chance_precision")), _fmt_auc(b.get("knn_auc")), _fmt_auc(b.get("network_auc"))])
    return header, rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def retrieval_markdown(result: dict[str, Any], title: str = "Retrieval quality", intro: str = "") -> str:
    """Markdown report of a :func:`evaluate_retrieval` result."""
    header, rows = retrieval_table(result)
    s, ix, q = result["settings"], result["index"], result["queries"]
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        (f"Index: {ix['n_cases']} train images of {ix['n_patients']} patients ({_counts(ix['label_counts'])}), "
         f"{ix['dim']}-d embeddings -> {ix['index_dim']}-d {s['kind']} index. Queries: {q['n']} test images of "
         f"{q['n_patients']} patients ({_counts(q['label_counts'])}), leave-patient-out (the query's own patient is "
         "excluded)."),
        (f"P@k = share of the first k neighbours with the query's label; mAP@{s['map_k']} over label agreement; "
         "chance P = the same share for a retriever that ignores the image. kNN AUC = ROC AUC of the "
         f"similarity-weighted covid share among the {s['k']} nearest neighbours; network AUC = the classifier's own "
         f"probability on the same images. 95% patient-bootstrap CIs ({s['n_boot']} replicates)."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    return "\n".join(lines)


def evaluate_model_retrieval(
    artifact: Any,
    df: pd.DataFrame,
    *,
    k: int = 10,
    pca_dim: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Embed a manifest's train and test splits with ``artifact`` and run :func:`evaluate_retrieval`.

    Returns:
        The result dict, plus ``model`` (folder, hash) and ``embedding`` (images, seconds) facts.
    """
    t0 = time.perf_counter()
    e_train, r_train, e_test, r_test = embed_splits(artifact, df, batch_size=batch_size, num_workers=num_workers,
                                                    progress=progress, skip_bad=skip_bad, seed=seed)
    seconds = time.perf_counter() - t0
    result = evaluate_retrieval(e_train, case_metadata(r_train), e_test, r_test, test_prob=r_test["prob"].to_numpy(),
                                k=k, pca_dim=pca_dim, n_boot=n_boot, seed=seed)
    n = len(r_train) + len(r_test)
    result["model"] = _model_info(artifact)
    result["embedding"] = {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2)}
    return result


def run_index_demo(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    k: int = 5,
    *,
    device: str = "auto",
    evaluate: bool = True,
    n_boot: int = 200,
    force: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The demo's index stage: index the train split, search one test image, write a contact sheet.

    Args:
        model_dir: Model artifact folder.
        manifest: Manifest CSV with a ``split`` column (split by patient when absent).
        out_dir: Folder for ``index/`` (with thumbnails), ``similar_cases.png`` and ``retrieval.json``.
        k: Neighbours shown.
        device: Inference device.
        evaluate: Also measure retrieval quality on the whole test split (:func:`evaluate_retrieval`).
        n_boot: Bootstrap replicates for the AUC CIs.
        force: Replace a previous demo index in ``out_dir/index``.
        progress: Progress bars.

    Returns:
        JSON-ready dict: ``index_dir``, ``n_cases``, ``query`` (image, patient, label, prob), ``rows`` (the
        neighbour table, see :func:`match_rows`), ``sheet`` (PNG path), ``retrieval`` (overall metrics or None),
        ``seconds``.
    """
    from covidcxr.artifact import load_artifact
    from covidcxr.data import read_manifest
    from covidcxr.io import load_image

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = load_artifact(model_dir, device)
    df = read_manifest(manifest)
    e_train, r_train, e_test, r_test = embed_splits(artifact, df, progress=progress, skip_bad=True)
    index = index_from_embeddings(artifact, e_train, r_train, out / "index", thumbnails=True, force=force,
                                  info={"split": "train"})
    q = 0
    query = r_test.iloc[q]
    with faiss_threads(1):
        matches = index.search(e_test[q : q + 1], k=k, exclude_patients=str(query["patient_id"]))[0]
    image = load_image(query["image"])[0]
    title = f"query ({query['label']})\nP(covid) {float(query['prob']):.3f}"
    sheet = contact_sheet(image, matches, out / "similar_cases.png", index_dir=out / "index", query_title=title)
    retrieval = None
    if evaluate:
        result = evaluate_retrieval(e_train, case_metadata(r_train), e_test, r_test,
                                    test_prob=r_test["prob"].to_numpy(), k=10, n_boot=n_boot)
        (out / "retrieval.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
        retrieval = json_safe(result["overall"])
    return {
        "index_dir": str(out / "index"),
        "n_cases": len(index),
        "query": {"image": str(query["image"]), "patient_id": str(query["patient_id"]), "label": str(query["label"]),
                  "prob": float(query["prob"])},
        "rows": match_rows(matches),
        "sheet": str(sheet),
        "retrieval": retrieval,
        "seconds": round(time.perf_counter() - t0, 1),
    }


__all__ = [
    "add_to_index",
    "build_index",
    "contact_sheet",
    "evaluate_model_retrieval",
    "evaluate_retrieval",
    "index_from_embeddings",
    "load_index_and_model",
    "match_rows",
    "retrieval_markdown",
    "run_index_demo",
    "search_image",
    "write_thumbnails",
]
