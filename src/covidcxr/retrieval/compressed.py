"""The compressed index for whole archives: FAISS IVF + product quantisation, on-disk lists, exact re-ranking.

An ``ivfpq`` :class:`~covidcxr.retrieval.index.CaseIndex` keeps, per case, one PQ code (``pq_m`` bytes at 8 bits)
and its 8-byte id in FAISS inverted lists. On disk the lists live in ``index.ivfdata``
(:class:`faiss.OnDiskInvertedLists`, memory-mapped when loaded), so an index larger than RAM is searched from the
page cache. Beside it ``vectors.npy`` keeps every indexed vector in float16: the top ``rerank x k`` PQ candidates
of a query are re-scored exactly from those rows (a memory-mapped read of a few kilobytes per query), which is what
lifts recall@10 from PQ's approximate order to near-exact (``benchmarks/index_scale.py``).

No torch here (see :mod:`covidcxr.retrieval.index`).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import CaseIndexError, ConfigError
from covidcxr.retrieval.storage import _fsync_file, _import_faiss

IVFDATA_FILE = "index.ivfdata"
VECTORS_FILE = "vectors.npy"
VECTOR_DTYPE = np.float16
"""Stored re-ranking vectors: unit-norm rows lose < 1e-3 in cosine at half the bytes of float32."""
TRAIN_POINTS_PER_LIST = 32
"""k-means sample per inverted list (faiss warns under 39; measured recall cost at 10 M in the benchmark)."""


def default_pq_m(dim: int) -> int:
    """Bytes per PQ code: the largest divisor of ``dim`` that is at most ``min(64, dim // 4)``.

    64 one-byte codes + the 8-byte id keep an archive at 72 bytes per case; at least 4 dimensions per
    sub-quantiser keep the 256 centroids of each one meaningful.
    """
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` cases: ``2 * sqrt(n)`` (k-means cost on a CPU grows with it), >= 39 cases per list."""
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def new_ivfpq(dim: int, nlist: int, pq_m: int, pq_bits: int, metric: str, opq: bool, seed: int) -> Any:
    """An untrained IVF-PQ index (behind an OPQ rotation when ``opq``).

    Raises:
        ConfigError: ``pq_m`` does not divide ``dim``.
    """
    faiss = _import_faiss()
    if dim % pq_m:
        raise ConfigError(f"pq_m={pq_m} must divide the indexed dimension {dim}")
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    quantizer = faiss.IndexFlat(dim, fmetric)
    ivf = faiss.IndexIVFPQ(quantizer, dim, int(nlist), int(pq_m), int(pq_bits), fmetric)
    ivf.own_fields = True
    quantizer.this.disown()  # the IVF index owns (and frees) its quantiser
    ivf.cp.seed = int(seed)
    ivf.cp.spherical = metric == "ip"
    ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    if not opq:
        return ivf
    rotation = faiss.OPQMatrix(dim, int(pq_m))
    index = faiss.IndexPreTransform(rotation, ivf)
    index.own_fields = True
    rotation.this.disown()
    ivf.this.disown()
    return index


def train_sample(n: int, nlist: int, seed: int) -> np.ndarray:
    """Sorted row numbers of the k-means training sample (all rows when few)."""
    want = min(n, max(nlist * TRAIN_POINTS_PER_LIST, 10_000))
    return np.sort(np.random.default_rng(seed).choice(n, size=want, replace=False))


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what FAISS's C++ code prints (``resizing ...``, on-disk file notes) to stderr, not to stdout.

    ``covidcxr search --json`` and other commands write results to stdout; a stray native line would corrupt them.
    Works on the file descriptors (1 -> 2), since the C++ code never sees Python's ``sys.stdout``.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def ondisk_lists(index: Any, path: Path) -> Any:
    """Give ``index`` (trained, empty) file-backed inverted lists at ``path``; later ``add`` calls write there."""
    faiss = _import_faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    return lists


def write_ondisk(index: Any, directory: Path, index_file: str) -> None:
    """Write ``index`` as ``directory/index_file`` + ``directory/index.ivfdata`` (lists exactly sized, fsynced).

    The in-memory index is unchanged (its lists are swapped back after writing).
    """
    faiss = _import_faiss()
    ivf = faiss.extract_index_ivf(index)
    data = directory / IVFDATA_FILE
    with native_stdout_to_stderr():
        packed = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
        sources = faiss.InvertedListsPtrVector()
        sources.push_back(ivf.invlists)
        packed.merge_from_multiple(sources.data(), sources.size(), False)
    original, owned = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # replace_invlists would free the lists it replaces
    ivf.replace_invlists(packed, False)
    try:
        faiss.write_index(index, str(directory / index_file))
    finally:
        ivf.replace_invlists(original, owned)
    del packed  # unmaps the data file before it is fsynced
    _fsync_file(data)
    _fsync_file(directory / index_file)


def read_ondisk(directory: Path, index_file: str) -> Any:
    """Load an index whose lists live in ``directory/index.ivfdata`` (memory-mapped, wherever the folder moved)."""
    faiss = _import_faiss()
    with native_stdout_to_stderr():
        return faiss.read_index(str(directory / index_file), faiss.IO_FLAG_ONDISK_SAME_DIR)


def rerank(xq: np.ndarray, rows: np.ndarray, vectors: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate rows exactly from the stored vectors; keep the best ``k``.

    Args:
        xq: float32 queries ``(nq, d)`` (already projected/normalised like the stored vectors).
        rows: candidate rows ``(nq, c)`` from the PQ search; -1 pads.
        vectors: stored vectors ``(n, d)`` (array or memory map).
        metric: ``'ip'`` (score = inner product) or ``'l2'`` (score = minus squared distance).
        k: results per query.

    Returns:
        ``(scores, rows)`` of shape ``(nq, k)``, best first; -inf / -1 pad.
    """
    nq = len(xq)
    _prefetch(vectors, rows)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_r = np.full((nq, k), -1, dtype=np.int64)
    for qi in range(nq):
        cand = np.unique(rows[qi][rows[qi] >= 0])  # sorted: sequential-ish reads from the memory map
        if cand.size == 0:
            continue
        v = np.asarray(vectors[cand], dtype=np.float32)
        if metric == "ip":
            s = v @ xq[qi]
        else:
            s = -((v - xq[qi]) ** 2).sum(axis=1)
        top = np.argsort(-s, kind="stable")[:k]
        out_s[qi, : top.size] = s[top]
        out_r[qi, : top.size] = cand[top]
    return out_s, out_r


def _prefetch(vectors: np.ndarray, rows: np.ndarray) -> None:
    """Ask the kernel to read all candidate rows of a memory-mapped vector file at once (``MADV_WILLNEED``).

    Without it the gather faults the rows in one by one, each waiting for the disk: when the file is not in the page
    cache (an archive larger than RAM), the reads then overlap instead of queueing behind each other.
    """
    mm = getattr(vectors, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
        return
    row_bytes = vectors.shape[1] * vectors.itemsize
    base = vectors.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 starts inside the mapping
    page = mmap.PAGESIZE
    for r in np.unique(rows[rows >= 0]).tolist():
        start = base + r * row_bytes
        first = start - start % page
        try:
            mm.madvise(mmap.MADV_WILLNEED, first, start + row_bytes - first)
        except (OSError, ValueError):  # advice only: never fail a search over it
            return


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    """Store the re-ranking vectors (float16 ``.npy``) and fsync."""
    np.save(path, np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE))
    _fsync_file(path)


def read_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """Memory-map the stored re-ranking vectors; their shape must be ``(count, dim)``.

    Raises:
        CaseIndexError: wrong shape or dtype.
    """
    vectors = np.load(path, mmap_mode="r")
    if vectors.shape != (count, dim) or vectors.dtype != VECTOR_DTYPE:
        raise CaseIndexError(f"{path}: stored vectors are {vectors.shape} {vectors.dtype}, expected ({count}, {dim}) "
                          f"{np.dtype(VECTOR_DTYPE)}")
    return vectors
