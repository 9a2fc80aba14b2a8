"""The one loop that runs a model over a manifest: decode in threads, masks from the manifest/cache/segmenter.

The loop is a bounded pipeline over chunks of rows (:func:`predict_manifest`): one thread decodes chunk ``k+2`` and
resizes it for the U-Net, one runs the U-Net on chunk ``k+1`` and one post-processes its masks, preprocesses it for
the classifier and checks what each input looks like, while the calling thread runs the classifier and the input
gate on chunk ``k``. ONNX Runtime, OpenCV, Pillow and numpy release the GIL, so the stages overlap; each stage sees
the same chunks in the same order as the serial loop (``pipeline=False``), so the results are identical. The
networks run each chunk in parts at once on a single-threaded session (:meth:`covidcxr.runtime.OnnxNetwork.run`), and
OpenCV and BLAS run in the calling threads (:func:`covidcxr.runtime.kernel_threads`): the loop's threads already use
the cores, and the libraries' own thread pools would only wait for each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.classification.inference import Artifact, map_threads
from covidcxr.data.manifest import has_path
from covidcxr.errors import ConfigError, CxrError, ImageError
from covidcxr.io.files import write_json
from covidcxr.io.image import read_mask
from covidcxr.runtime import inference_threads, kernel_threads

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Manifest-level prediction with a mask cache
# ---------------------------------------------------------------------------------------------------------


class MaskCache:
    """Predicted lung masks stored as PNGs under ``root/<segmenter sha[:16]>/``, keyed by image path.

    Computed once per (segmenter, image), so resumed runs, other variants and evaluation reuse them.

    Args:
        root: Cache folder (None disables caching).
        segmenter_sha: The segmenter's :attr:`~covidcxr.segmentation.segmenter.LungSegmenter.cache_key` (the
            SHA-256 of the graph that computes the masks).
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


def _known_masks(rows: pd.DataFrame, cache: MaskCache | None
                 ) -> tuple[list[np.ndarray | None], list[list[str]], list[int]]:
    """Masks from the ``mask`` column or the cache; ``(masks, qc_flags, rows still to segment)``."""
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
    return masks, qc, todo


def _fill_masks(rows: pd.DataFrame, masks: list[np.ndarray | None], qc: list[list[str]], todo: Sequence[int],
                pred: Sequence[np.ndarray], flags: Sequence[Sequence[str]], cache: MaskCache | None) -> None:
    """Put segmented masks (rows ``todo``) into ``masks``/``qc`` and the cache."""
    paths = rows["image"].astype(str).tolist()
    for i, m, f in zip(todo, pred, flags, strict=True):
        masks[i], qc[i] = np.asarray(m), list(f)
    if cache is not None and todo:
        cache.put_many([(paths[i], masks[i], qc[i]) for i in todo])


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

    return [im for im, _ in map_threads(load_image, paths, num_workers)]


def _decode_rows(paths: Sequence[str], num_workers: int, on_error: str, offset: int
                 ) -> tuple[list[np.ndarray], list[int], list[str]]:
    from covidcxr.io.image import load_image

    def one(path: str) -> np.ndarray | ImageError:
        try:
            return load_image(path)[0]
        except ImageError as exc:
            return exc

    loaded = map_threads(one, paths, num_workers)
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


@dataclass
class _Chunk:
    """One chunk of manifest rows on its way through the pipeline (filled stage by stage)."""

    start: int
    n_rows: int
    images: list[np.ndarray] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    rows: pd.DataFrame | None = None
    masks: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    qc: dict[str, list[list[str]]] = field(default_factory=dict)
    todo: dict[str, list[int]] = field(default_factory=dict)
    unet_input: dict[str, np.ndarray] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    prepared: Any = None
    input_types: list[Any] | None = None


class _Stages:
    """The manifest loop's steps for one chunk, in order: :meth:`decode`, :meth:`unet`, :meth:`prepare` and
    :meth:`classify` (the serial loop calls them one after the other; the pipeline runs each in its own thread)."""

    def __init__(self, artifact: Artifact, rows_all: pd.DataFrame, *, num_workers: int, on_error: str,
                 mask_dir: str | Path | None, embeddings: bool, gating: bool, bf16: bool | None) -> None:
        self.artifact = artifact
        self.rows_all = rows_all
        self.paths = rows_all["image"].astype(str).tolist()
        self.num_workers = num_workers
        self.on_error = on_error
        self.embeddings = embeddings
        self.gating = gating
        self.bf16 = bf16
        # Each network call is split into one part per inference thread, run at once on a single-threaded session
        # (OnnxNetwork.run): a chunk is many images, and whole images in parallel waste less than every operator
        # spread over the threads.
        self.split = inference_threads()
        # The first member with a given segmenter segments for all of them (as BaseArtifact.member_masks).
        self.segmenters = {m.segmenter_key: m for m in reversed(artifact.members) if m.segmenter_key is not None}
        self.caches = {key: MaskCache(mask_dir, self.segmenters[key].segmenter.cache_key if mask_dir else key)
                       for key in sorted(artifact.segmenter_keys)}

    def decode(self, chunk: _Chunk) -> _Chunk:
        """Decode the chunk's images, look up given or cached masks, resize the rest for the U-Net."""
        paths = self.paths[chunk.start : chunk.start + chunk.n_rows]
        chunk.images, chunk.ok, chunk.bad = _decode_rows(paths, self.num_workers, self.on_error, chunk.start)
        if not chunk.images:
            return chunk
        chunk.rows = self.rows_all.iloc[chunk.start : chunk.start + chunk.n_rows].iloc[chunk.ok]
        for key, cache in self.caches.items():
            chunk.masks[key], chunk.qc[key], chunk.todo[key] = _known_masks(chunk.rows, cache)
            if chunk.todo[key]:
                seg = self.segmenters[key].segmenter
                chunk.unet_input[key] = seg.network_input([chunk.images[i] for i in chunk.todo[key]])
        return chunk

    def unet(self, chunk: _Chunk) -> _Chunk:
        """The U-Net's forward pass on the images without a mask."""
        for key, x in chunk.unet_input.items():
            chunk.probs[key] = self.segmenters[key].segmenter.forward(x, split=self.split)
        chunk.unet_input = {}
        return chunk

    def prepare(self, chunk: _Chunk) -> _Chunk:
        """Mask post-processing and QC, the classifiers' inputs and what each image looks like."""
        if not chunk.images:
            return chunk
        for key, probs in chunk.probs.items():
            todo = chunk.todo[key]
            results = self.segmenters[key].segmenter.postprocess_batch([chunk.images[i] for i in todo], probs)
            _fill_masks(chunk.rows, chunk.masks[key], chunk.qc[key], todo, [np.asarray(r.mask) for r in results],
                        [list(r.qc_flags) for r in results], self.caches[key])
        chunk.probs = {}
        prepared = self.artifact.prepare(chunk.images, chunk.masks)
        from covidcxr.classification.input_type import check_inputs

        chunk.input_types = check_inputs(prepared.images)
        # Past here only the networks' inputs count: the full-size images and masks are freed before the chunk
        # waits for the classifier (large DICOMs).
        chunk.prepared = dataclasses.replace(prepared, images=[], masks={})
        chunk.images, chunk.masks = [], {}
        return chunk

    def classify(self, chunk: _Chunk, out_lists: tuple[list[Any], ...]) -> None:
        """The classifier networks and the input gate; results appended to ``out_lists``."""
        probs, raws, embs, qcs, kept, problems, gates = out_lists
        problems += chunk.bad
        if chunk.prepared is None:  # no readable image in the chunk
            return
        qc: list[list[str]] = [[] for _ in chunk.ok]
        for key in self.caches:
            qc = [sorted(set(a) | set(b)) for a, b in zip(qc, chunk.qc[key], strict=True)]
        out = self.artifact.predict_prepared(chunk.prepared, embeddings=self.embeddings or self.gating, bf16=self.bf16,
                                             split=self.split)
        probs.append(out.prob)
        raws.append(out.prob_uncalibrated)
        out.qc_flags = [sorted(set(a) | set(b)) for a, b in zip(qc, out.qc_flags, strict=True)]
        qcs.extend(out.qc_flags)
        gates.extend(self.artifact.gate(out, input_types=chunk.input_types))
        kept.extend(chunk.start + i for i in chunk.ok)
        if self.embeddings:
            embs.append(out.embeddings)


class _Failed:
    """An exception raised by a pipeline stage, passed on in order instead of the item it failed on."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def pipelined(items: Iterable[Any], stages: Sequence[Callable[[Any], Any]], *,
              in_flight: int | None = None) -> Generator[Any, None, None]:
    """Yield ``stages[-1](...stages[0](item))`` for each item, in order, each stage running in its own thread.

    At most ``in_flight`` items are between the start of the first stage and the caller's next request (default:
    one per stage plus the one the caller holds), so memory stays bounded by that many items. An exception in a
    stage is raised to the caller when the item it failed on comes up (items before it are yielded first, later ones
    are not processed any further); closing the generator early stops the threads.

    Args:
        items: Inputs of the first stage.
        stages: Functions, each taking the previous one's result.
        in_flight: Items alive at once (>= 1).

    Yields:
        The last stage's result per item.
    """
    in_flight = len(stages) + 1 if in_flight is None else in_flight
    if in_flight < 1:
        raise ConfigError(f"in_flight={in_flight}: must be at least 1")
    stop = threading.Event()
    slots = threading.Semaphore(in_flight)
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=1) for _ in range(len(stages) + 1)]

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        for item in items:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if not put(queues[0], item):
                return
        put(queues[0], _DONE)

    def work(fn: Callable[[Any], Any], inbox: queue.Queue[Any], outbox: queue.Queue[Any]) -> None:
        while not stop.is_set():
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is not _DONE and not isinstance(item, _Failed):
                try:
                    item = fn(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there in order
                    item = _Failed(exc)
            if not put(outbox, item) or item is _DONE or isinstance(item, _Failed):
                return

    threads = [threading.Thread(target=feed, name="covidcxr-pipeline-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(fn, queues[i], queues[i + 1]), daemon=True,
                                 name=f"covidcxr-pipeline-{getattr(fn, '__name__', i)}") for i, fn in enumerate(stages)]
    for t in threads:
        t.start()
    try:
        while True:
            item = queues[-1].get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
            slots.release()  # the caller is done with it
    finally:
        stop.set()
        for t in threads:
            t.join()


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
    pipeline: bool = True,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Predict (and embed) every row of a manifest table: the one loop behind predict, evaluate, embed and index.

    Chunks of ``batch_size`` rows go through a bounded pipeline (see the module docstring): decoding and mask
    post-processing of one chunk overlap the networks on the next and previous ones. Lung masks come from the
    ``mask`` column, else the mask cache, else the artifact's segmenter (batched, then cached); the artifact
    preprocesses exactly as in training.

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
        pipeline: Overlap the stages in threads (default); False runs them one after the other (same results).

    Returns:
        ``(rows + prob, [prob_uncalibrated,] pred_label, qc_flags, status (``ok`` / ``no_result`` from the input
        gate), no_result_reason, [ood_distance] (index reset), embeddings or None)``. ``prob`` and ``pred_label``
        stay filled for evaluation; presenters withhold them where ``status`` is ``no_result``.

    Raises:
        ConfigError: No ``image`` column, a bad batch size, an unknown ``on_error``, or (with ``skip``) no
            readable image at all.
        ImageError: An unreadable image (``raise``); the message names the file and the manifest row.
    """
    if "image" not in df.columns:
        raise ConfigError(f"manifest table needs an 'image' column, has {list(map(str, df.columns))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    on_error = on_error or ("skip" if skip_bad else "raise")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
    out_lists: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    failed: dict[int, str] = {}
    gating = artifact.ood_reference is not None or artifact.mirror_check is not None
    rows_all = df.reset_index(drop=True)
    steps = _Stages(artifact, rows_all, num_workers=num_workers, on_error=on_error, mask_dir=mask_dir,
                    embeddings=embeddings, gating=gating, bf16=bf16)
    chunks = [_Chunk(start, min(batch_size, len(rows_all) - start))
              for start in range(0, len(rows_all), batch_size)]
    front = (steps.decode, steps.unet, steps.prepare)
    if pipeline and len(chunks) > 1:
        done: Generator[_Chunk, None, None] = pipelined(chunks, front)
    else:
        done = (steps.prepare(steps.unet(steps.decode(c))) for c in chunks)
    # The loop's own threads and ONNX Runtime's pool use the cores; OpenCV's and BLAS's pools would only spin.
    with kernel_threads(1):
        try:
            shown: Iterable[_Chunk] = done
            if progress:  # tqdm only when shown: its import is ~5 % of a one-image predict
                from tqdm.auto import tqdm

                shown = tqdm(done, total=len(chunks), desc="predict", unit="batch")
            for chunk in shown:
                failed.update((chunk.start + i, why) for i, why in
                              zip(sorted(set(range(chunk.n_rows)) - set(chunk.ok)), chunk.bad, strict=True))
                steps.classify(chunk, out_lists)
        finally:
            done.close()  # stops the pipeline's threads when the loop ends early
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
