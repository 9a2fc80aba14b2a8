"""The one loop that runs a model over a manifest: decode in threads, masks from the manifest/cache/segmenter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.classification.inference import Artifact
from covidcxr.data.manifest import has_path
from covidcxr.errors import ConfigError, CxrError, ImageError
from covidcxr.io.files import write_json
from covidcxr.io.image import read_mask

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Manifest-level prediction with a mask cache
# ---------------------------------------------------------------------------------------------------------


class MaskCache:
    """Predicted lung masks stored as PNGs under ``root/<segmenter sha[:16]>/``, keyed by image path.

    Computed once per (segmenter, image), so resumed runs, other variants and evaluation reuse them.

    Args:
        root: Cache folder (None disables caching).
        segmenter_sha: SHA-256 of the segmenter weights.
    """

    def __init__(self, root: str | Path | None, segmenter_sha: str) -> None:
        self.dir = Path(root) / segmenter_sha[:16] if root is not None else None
        self._qc: dict[str, list[str]] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            qc_file = self.dir / "qc.json"
            if qc_file.is_file():
                try:
                    self._qc = json.loads(qc_file.read_text())
                except (OSError, json.JSONDecodeError):
                    log.warning("%s: unreadable QC cache, recomputing masks", qc_file)

    @staticmethod
    def key(image_path: str) -> str:
        """File stem of an image's cached mask."""
        return hashlib.sha1(os.path.abspath(image_path).encode()).hexdigest()[:20]

    def cached_path(self, image_path: str) -> Path | None:
        """The cached mask PNG of an image, or None when not cached."""
        if self.dir is None:
            return None
        k = self.key(image_path)
        path = self.dir / f"{k}.png"
        return path if k in self._qc and path.is_file() else None

    def flags(self, image_path: str) -> list[str]:
        """Cached QC flags of an image (empty when not cached)."""
        return list(self._qc.get(self.key(image_path), []))

    def get(self, image_path: str) -> tuple[np.ndarray, list[str]] | None:
        """Cached ``(mask, qc_flags)`` or None."""
        if self.dir is None:
            return None
        k = self.key(image_path)
        path = self.dir / f"{k}.png"
        if k not in self._qc or not path.is_file():
            return None
        try:
            return read_mask(path), list(self._qc[k])
        except CxrError:
            return None

    def put_many(self, items: Sequence[tuple[str, np.ndarray, list[str]]]) -> None:
        """Store ``(image_path, mask, qc_flags)`` entries and persist the QC table."""
        if self.dir is None or not items:
            return
        from covidcxr.io.files import save_png

        for image_path, mask, flags in items:
            k = self.key(image_path)
            tmp = self.dir / f"{k}.tmp.png"
            save_png(tmp, (np.asarray(mask) > 0).astype(np.float32), bit_depth=8)
            os.replace(tmp, self.dir / f"{k}.png")
            self._qc[k] = list(flags)
        write_json(self.dir / "qc.json", self._qc)


def load_masks_for_rows(
    rows: pd.DataFrame,
    images: Sequence[np.ndarray],
    segment: Callable[[list[np.ndarray]], tuple[list[np.ndarray], list[list[str]]]],
    cache: MaskCache | None,
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Lung masks for manifest rows: the ``mask`` column when given, else the cache, else ``segment`` (batched).

    Args:
        rows: Manifest rows (``image``, optional ``mask``), aligned with ``images``.
        images: Decoded images.
        segment: Function returning ``(masks, qc_flags)`` for a list of images.
        cache: Mask cache or None.

    Returns:
        ``(masks, qc_flags)`` per row.
    """
    n = len(rows)
    masks: list[np.ndarray | None] = [None] * n
    qc: list[list[str]] = [[] for _ in range(n)]
    paths = rows["image"].astype(str).tolist()
    given = rows["mask"].tolist() if "mask" in rows.columns else [""] * n
    todo = []
    for i in range(n):
        if has_path(given[i]):
            masks[i] = read_mask(given[i])
            continue
        hit = cache.get(paths[i]) if cache is not None else None
        if hit is not None:
            masks[i], qc[i] = hit
        else:
            todo.append(i)
    if todo:
        pred, flags = segment([images[i] for i in todo])
        for i, m, f in zip(todo, pred, flags):
            masks[i], qc[i] = np.asarray(m), list(f)
        if cache is not None:
            cache.put_many([(paths[i], masks[i], qc[i]) for i in todo])
    return masks, qc  # type: ignore[return-value]


def decode_images(paths: Sequence[str], num_workers: int) -> list[np.ndarray]:
    """Read images with :func:`covidcxr.io.image.load_image`, in a thread pool when ``num_workers > 1``.

    Args:
        paths: Image files.
        num_workers: Decoding threads (``<= 1`` reads in the calling thread).

    Returns:
        float32 ``H x W`` arrays in [0, 1], in the order of ``paths``.

    Raises:
        ImageError: A file cannot be read (the first failure in order).
    """
    from covidcxr.io.image import load_image

    return [im for im, _ in _map_threads(load_image, paths, num_workers)]


def _map_threads(fn: Callable[[str], Any], paths: Sequence[str], num_workers: int) -> list[Any]:
    if num_workers <= 1 or len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(num_workers) as pool:
        return list(pool.map(fn, paths))


def _decode_rows(paths: Sequence[str], num_workers: int, on_error: str, offset: int
                 ) -> tuple[list[np.ndarray], list[int], list[str]]:
    from covidcxr.io.image import load_image

    def one(path: str) -> np.ndarray | ImageError:
        try:
            return load_image(path)[0]
        except ImageError as exc:
            return exc

    loaded = _map_threads(one, paths, num_workers)
    images, ok, problems = [], [], []
    for i, item in enumerate(loaded):
        if isinstance(item, ImageError):
            if on_error == "raise":
                raise type(item)(item.path, f"{item.reason} (manifest row {offset + i})") from item
            log.warning("%s manifest row %d: %s", "skipping" if on_error == "skip" else "no answer for",
                        offset + i, item)
            problems.append(str(item))
            continue
        images.append(item)
        ok.append(i)
    return images, ok, problems


ON_ERROR = ("raise", "skip", "report")
"""What the manifest loop does with an unreadable image: stop, drop its row, or keep it as a ``status`` ``error`` row."""


def _predict_chunk(artifact: Artifact, rows: pd.DataFrame, start: int, images: list[np.ndarray], ok: list[int],
                   bad: list[str], caches: dict[str, Any], segmenters: dict[str, Any], embeddings: bool, gating: bool,
                   bf16: bool | None, out_lists: tuple[list[Any], ...]) -> None:
    """Masks, prediction and gate of one decoded chunk, appended to ``out_lists``."""
    probs, raws, embs, qcs, kept, problems, gates = out_lists
    problems += bad
    if not images:
        return
    rows = rows.iloc[ok]
    masks_by_key: dict[str, list[np.ndarray]] = {}
    qc: list[list[str]] = [[] for _ in images]
    for key, cache in caches.items():
        got, flags = load_masks_for_rows(rows, images, segmenters[key], cache)
        masks_by_key[key] = got
        qc = [sorted(set(a) | set(b)) for a, b in zip(qc, flags, strict=True)]
    out = artifact.predict(images, masks_by_key, embeddings=embeddings or gating, bf16=bf16)
    probs.append(out.prob)
    raws.append(out.prob_uncalibrated)
    out.qc_flags = [sorted(set(a) | set(b)) for a, b in zip(qc, out.qc_flags, strict=True)]
    qcs.extend(out.qc_flags)
    gates.extend(artifact.gate(out, images))
    kept.extend(start + i for i in ok)
    if embeddings:
        embs.append(out.embeddings)


def predict_manifest(
    artifact: Artifact,
    df: pd.DataFrame,
    *,
    embeddings: bool = False,
    batch_size: int = 64,
    num_workers: int = 4,
    mask_dir: str | Path | None = None,
    progress: bool = False,
    skip_bad: bool = False,
    bf16: bool | None = None,
    on_error: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Predict (and embed) every row of a manifest table: the one loop behind predict, evaluate, embed and index.

    Images are decoded in threads chunk by chunk, the next chunk while the networks run on this one; lung masks
    come from the ``mask`` column, else the mask cache, else the artifact's segmenter (batched, then cached); the
    artifact preprocesses exactly as in training.

    Args:
        artifact: Loaded classifier or ensemble artifact.
        df: Table with ``image`` paths (``mask`` used when present and non-empty).
        embeddings: Also return L2-normalised embeddings ``(N, D)``.
        batch_size: Rows per chunk (decode, segment, forward).
        num_workers: Decoding threads.
        mask_dir: Mask cache folder shared with training (None: masks are not cached).
        progress: Show a tqdm progress bar.
        skip_bad: Skip unreadable images with a warning (their rows are dropped) instead of raising
            (``on_error='skip'``).
        bf16: Kept for callers: None/False compute in float32 (every inference does); True is refused.
        on_error: One of :data:`ON_ERROR` (default ``skip`` with ``skip_bad``, else ``raise``). ``report`` keeps
            every row: an unreadable image gets ``status`` ``error``, its reason in ``no_result_reason`` and no
            probability (its embedding row, with ``embeddings``, is left out: use ``skip`` there).

    Returns:
        ``(rows + prob, [prob_uncalibrated,] pred_label, qc_flags, status (``ok`` / ``no_result`` from the input
        gate), no_result_reason, [ood_distance] (index reset), embeddings or None)``. ``prob`` and ``pred_label``
        stay filled for evaluation; presenters withhold them where ``status`` is ``no_result``.

    Raises:
        ConfigError: No ``image`` column, a bad batch size, an unknown ``on_error``, or (with ``skip``) no
            readable image at all.
        ImageError: An unreadable image (``raise``); the message names the file and the manifest row.
    """
    from tqdm.auto import tqdm

    if "image" not in df.columns:
        raise ConfigError(f"manifest table needs an 'image' column, has {list(map(str, df.columns))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    on_error = on_error or ("skip" if skip_bad else "raise")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
    caches = {key: MaskCache(mask_dir, key) for key in sorted(artifact.segmenter_keys)}
    segmenters = {m.segmenter_key: m.segment for m in reversed(artifact.members) if m.segmenter_key is not None}
    out_lists: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    failed: dict[int, str] = {}
    gating = artifact.ood_reference is not None or artifact.mirror_check is not None
    rows_all = df.reset_index(drop=True)
    paths_all = rows_all["image"].astype(str).tolist()
    starts = list(range(0, len(rows_all), batch_size))
    # Decoding the next chunk overlaps the networks on this one (ONNX Runtime, OpenCV and Pillow release the GIL).
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="covidcxr-decode")
    try:
        pending = prefetch.submit(_decode_rows, paths_all[:batch_size], num_workers, on_error, 0) if starts else None
        for k, start in enumerate(tqdm(starts, desc="predict", unit="batch", disable=not progress)):
            images, ok, bad = pending.result()
            if k + 1 < len(starts):
                nxt = starts[k + 1]
                pending = prefetch.submit(_decode_rows, paths_all[nxt : nxt + batch_size], num_workers, on_error,
                                          nxt)
            n_rows = len(paths_all[start : start + batch_size])
            failed.update((start + i, why) for i, why in zip(sorted(set(range(n_rows)) - set(ok)), bad, strict=True))
            _predict_chunk(artifact, rows_all.iloc[start : start + batch_size], start, images, ok, bad, caches,
                           segmenters, embeddings, gating, bf16, out_lists)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    probs, raws, embs, qcs, kept, problems, gates = out_lists
    if problems:
        if not kept and on_error == "skip":
            raise ConfigError(f"none of the {len(rows_all)} images could be read (first problem: {problems[0]})")
        log.warning("%d of %d image(s) unreadable: %s", len(problems), len(rows_all),
                    "rows skipped" if on_error == "skip" else "rows kept with status error")
    report = on_error == "report"
    result = rows_all.iloc[kept].reset_index(drop=True) if problems and not report else rows_all.copy()
    result.attrs = dict(df.attrs)
    # Each unreadable input with its reason, also where its row was dropped (``skip``): callers report them.
    result.attrs["unreadable"] = [{"row": i, "image": str(rows_all["image"].iloc[i]), "reason": why}
                                  for i, why in sorted(failed.items())]
    at = np.asarray(kept if report else range(len(kept)), dtype=int)

    def spread(values: Sequence[Any], fill: Any) -> list[Any]:  # one value per result row, ``fill`` on errors
        out = [fill] * len(result)
        for i, v in zip(at, values, strict=True):
            out[i] = v
        return out

    prob = np.concatenate(probs) if probs else np.zeros(0)
    result["prob"] = np.asarray(spread(prob.tolist(), np.nan), dtype=np.float64)
    if probs and all(r is not None for r in raws) and len(artifact.members) == 1 and \
            artifact.members[0].temperature != 1.0:
        result["prob_uncalibrated"] = np.asarray(spread(np.concatenate(raws).tolist(), np.nan), dtype=np.float64)
    result["pred_label"] = spread(artifact.labels(prob), "")
    result["qc_flags"] = spread([";".join(f) for f in qcs], "")
    # The input gate: no verdict on what is not a usable frontal chest X-ray (classification.ood).
    result["status"] = spread(["ok" if g.usable else "no_result" for g in gates], "error")
    result["no_result_reason"] = spread([g.message for g in gates], "")
    if report:
        for i, why in failed.items():
            result.loc[i, "no_result_reason"] = f"error: {why}"
    if gating:
        result["ood_distance"] = spread([g.distance for g in gates], None)
    emb_all = (np.concatenate(embs) if embs else np.zeros((0, artifact.num_features), np.float32)) if embeddings \
        else None
    return result, emb_all
