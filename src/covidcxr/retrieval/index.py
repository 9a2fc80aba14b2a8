"""Similar-case index: FAISS vectors + SQLite metadata + a JSON header, saved as one directory.

:class:`CaseIndex` follows the scikit-learn estimator shape: ``__init__`` stores settings, :meth:`CaseIndex.fit`
learns the (optional) PCA and builds the FAISS index, learned state ends in ``_``. Search is exact inner product
on L2-normalised vectors (cosine similarity) by default; big archives switch to an approximate HNSW index
(``kind='auto'``, more than ``approx_threshold`` cases), whole archives to the compressed IVF-PQ index with on-disk
lists and exact re-ranking (more than ``archive_threshold`` cases, :mod:`covidcxr.retrieval.compressed`), or use
IVF / HNSW / IVF-PQ on request.

On disk an index is one directory::

    header.json       format version, embedding-model hash, dimensions, index kind, count, settings
    index.faiss       the FAISS index (vectors after the optional PCA)
    index.ivfdata     ivfpq only: the inverted lists (PQ codes + ids), memory-mapped when loaded
    vectors.npy       ivfpq only: the indexed vectors in float16, read for exact re-ranking
    pca.faiss         the fitted faiss.PCAMatrix (only when ``pca_dim`` is set)
    metadata.sqlite   table ``cases``: row_id (= FAISS id), case_id, patient_id, label, and any other columns
                      given (source, view, image, thumbnail, study_date, ...); an ivfpq index leaves it on disk
                      and reads only the rows a search returns

Saves are atomic: the new directory is written next to the old one and swapped in with renames, so a crash at any
point leaves a loadable index (the previous one, or the new one once complete). What a killed save leaves beside
the index (``.NAME.tmp-PID-*``, ``.NAME.old``) is removed by the next save or load (``storage._remove_stale``).

This module never imports torch, so search can be served and tested without it. It is longer than most: the
estimator's fit, add, search, save and load share one set of invariants (dimension, PCA, kind, metadata rows =
FAISS ids), and splitting the class would scatter them; file writing and metadata live in ``storage`` and
``metadata``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError, IndexMismatchError, NotFittedError
from covidcxr.retrieval import compressed
from covidcxr.retrieval.metadata import (
    FrameCases,
    SqliteCases,
    _check_metadata,
    _exclusion_sets,
    _read_metadata,
    _write_metadata,
)
from covidcxr.retrieval.storage import (
    FORMAT_VERSION,
    HEADER_FILE,
    INDEX_FILE,
    METADATA_FILE,
    PCA_FILE,
    _backup_path,
    _fsync_file,
    _import_faiss,
    _remove_stale,
    _write_faiss,
    _write_header,
    check_replaceable,
    staged_index,
)

logger = logging.getLogger(__name__)

KINDS = ("auto", "exact", "hnsw", "ivf", "ivfpq")
METRICS = ("ip", "l2")




@dataclass(frozen=True)
class Match:
    """One retrieved case.

    Attributes:
        rank: 1-based position in the result list (1 = most similar).
        score: similarity, higher is closer (cosine for ``metric='ip'``, minus squared distance for ``'l2'``).
        case_id: the case's unique id.
        patient_id: the patient the case belongs to.
        label: ``'covid'`` or ``'non_covid'`` (or whatever label string the index was built with).
        metadata: the case's other metadata columns (source, view, image, thumbnail, dates, ...).
    """

    rank: int
    score: float
    case_id: str
    patient_id: str
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of all fields."""
        return asdict(self)


class CaseIndex:
    """Similar-case index over embeddings, with per-case metadata.

    Args:
        kind: ``'exact'`` (faiss IndexFlat), ``'hnsw'`` (IndexHNSWFlat), ``'ivf'`` (IndexIVFFlat), ``'ivfpq'``
            (IndexIVFPQ, optional OPQ, on-disk lists, re-ranked from stored vectors) or ``'auto'``: exact up to
            ``approx_threshold`` cases, HNSW above (also when ``add`` grows an exact index past it), IVF-PQ above
            ``archive_threshold``.
        pca_dim: reduce embeddings to this many dimensions with a PCA fitted in :meth:`fit` (None = no PCA).
            At 1M cases 2048-d float32 vectors take 8 GB; 256 dimensions take 1 GB.
        whiten: whiten the PCA output (eigenvalue power -0.5); needs ``pca_dim``.
        metric: ``'ip'`` (vectors are L2-normalised before and after PCA, score = cosine similarity) or ``'l2'``
            (raw vectors, score = minus squared Euclidean distance).
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (raised to k when k is larger); 128 gave recall@10 0.98 at
            p50 0.5 ms on 1M 256-d cases in ``benchmarks/index_scale.py``.
        nlist: number of IVF lists; None = 4 * sqrt(n) (ivf) or 2 * sqrt(n) (ivfpq), capped so that each list gets
            >= 39 training points.
        nprobe: IVF lists visited per query (ivf, ivfpq).
        approx_threshold: with ``kind='auto'``, more cases than this use HNSW.
        pq_m: ivfpq bytes per code (sub-quantisers; must divide the indexed dimension); None =
            :func:`~covidcxr.retrieval.compressed.default_pq_m` (64 for 256-d: 72 bytes per case with the id).
        pq_bits: ivfpq bits per sub-quantiser code.
        opq: ivfpq behind a learned OPQ rotation (better codes for correlated dimensions, slower training).
        rerank: ivfpq re-scores the best ``rerank * k`` PQ candidates exactly from the stored vectors (0 = off,
            and then no vectors are stored); 30 lifted recall@10 at 10 M cases from 0.31 (PQ order) and 0.81
            (rerank 10) to 0.95 for 0.3 ms (``benchmarks/results/index_scale_archive.md``).
        archive_threshold: with ``kind='auto'``, more cases than this use IVF-PQ; above it HNSW needs > 2 GB of
            RAM and over 15 minutes to build on two cores (``benchmarks/results/index_scale.md``).
        model_hash: hash of the embedding model's weights, stored in the header and checked by :meth:`load`.
        seed: seed of the IVF k-means.

    Serving note: for one query at a time call ``faiss.omp_set_num_threads(1)``; OpenMP over two busy cores made
    a single exact query ~40x slower in ``benchmarks/index_scale.py`` (batches still profit from threads).

    Attributes:
        dim_: input embedding dimension.
        index_dim_: dimension of the indexed vectors (``pca_dim`` or ``dim_``).
        kind_: the index kind actually built (``'exact'``, ``'hnsw'`` or ``'ivf'``).
        index_: the FAISS index; row i of ``metadata_`` is FAISS id i.
        pca_: the fitted ``faiss.PCAMatrix`` or None.
        metadata_: pandas DataFrame with one row per indexed case.
        build_info: free-form JSON-ready facts stored in the header under ``build_info`` (e.g. the model
            directory the embeddings came from); set it before :meth:`save`, :meth:`load` restores it.
    """

    def __init__(
        self,
        kind: str = "auto",
        pca_dim: int | None = None,
        whiten: bool = False,
        metric: str = "ip",
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
        approx_threshold: int = 200_000,
        model_hash: str | None = None,
        seed: int = 0,
        pq_m: int | None = None,
        pq_bits: int = 8,
        opq: bool = False,
        rerank: int = 30,
        archive_threshold: int = 2_000_000,
    ) -> None:
        self.kind = kind
        self.pca_dim = pca_dim
        self.whiten = whiten
        self.metric = metric
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nlist = nlist
        self.nprobe = nprobe
        self.approx_threshold = approx_threshold
        self.model_hash = model_hash
        self.seed = seed
        self.pq_m = pq_m
        self.pq_bits = pq_bits
        self.opq = opq
        self.rerank = rerank
        self.archive_threshold = archive_threshold
        self.build_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ settings

    def get_params(self) -> dict[str, Any]:
        """Return the constructor settings (scikit-learn style)."""
        return {
            "kind": self.kind,
            "pca_dim": self.pca_dim,
            "whiten": self.whiten,
            "metric": self.metric,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "approx_threshold": self.approx_threshold,
            "model_hash": self.model_hash,
            "seed": self.seed,
            "pq_m": self.pq_m,
            "pq_bits": self.pq_bits,
            "opq": self.opq,
            "rerank": self.rerank,
            "archive_threshold": self.archive_threshold,
        }

    def set_params(self, **params: Any) -> CaseIndex:
        """Change settings (scikit-learn style); on a fitted index ``ef_search``/``nprobe`` apply at once.

        Other settings take effect at the next :meth:`fit`.

        Args:
            **params: constructor settings to change.

        Returns:
            self.

        Raises:
            ConfigError: an unknown setting or an invalid value.
        """
        unknown = sorted(set(params) - set(self.get_params()))
        if unknown:
            raise ConfigError(f"unknown CaseIndex setting(s) {unknown}; valid: {sorted(self.get_params())}")
        old = self.get_params()
        for name, value in params.items():
            setattr(self, name, value)
        try:
            self._validate_params()
        except ConfigError:
            for name, value in old.items():
                setattr(self, name, value)
            raise
        if hasattr(self, "index_"):
            self._set_search_params(self.index_, self.kind_)
        return self

    def __repr__(self) -> str:
        defaults = CaseIndex().get_params()
        changed = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v != defaults[k])
        return f"CaseIndex({changed})"

    def _validate_params(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r} is not one of {KINDS}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric={self.metric!r} is not one of {METRICS}")
        if self.pca_dim is not None:
            _check_int("pca_dim", self.pca_dim, 1)
        if self.whiten and self.pca_dim is None:
            raise ConfigError("whiten=True requires pca_dim (the whitening is part of the PCA)")
        _check_int("hnsw_m", self.hnsw_m, 2)
        _check_int("ef_construction", self.ef_construction, 1)
        _check_int("ef_search", self.ef_search, 1)
        if self.nlist is not None:
            _check_int("nlist", self.nlist, 1)
        _check_int("nprobe", self.nprobe, 1)
        _check_int("approx_threshold", self.approx_threshold, 1)
        _check_int("seed", self.seed, 0)
        if self.pq_m is not None:
            _check_int("pq_m", self.pq_m, 1)
        _check_int("pq_bits", self.pq_bits, 1)
        if self.pq_bits > 16:
            raise ConfigError(f"pq_bits must be <= 16, got {self.pq_bits}")
        _check_int("rerank", self.rerank, 0)
        _check_int("archive_threshold", self.archive_threshold, 1)
        if not isinstance(self.opq, bool):
            raise ConfigError(f"opq must be True or False, got {self.opq!r}")
        if self.model_hash is not None and not isinstance(self.model_hash, str):
            raise ConfigError(f"model_hash must be a string or None, got {type(self.model_hash).__name__}")

    # ------------------------------------------------------------------ fitting

    def fit(self, embeddings: np.ndarray, metadata: pd.DataFrame | Sequence[Mapping[str, Any]]) -> CaseIndex:
        """Fit the optional PCA and build the index from scratch.

        Args:
            embeddings: finite float array (n_cases, dim).
            metadata: DataFrame or list of dicts with one row per embedding; needs ``case_id`` (unique),
                ``patient_id`` and ``label``; other columns are kept.

        Returns:
            self.

        Raises:
            ConfigError: bad settings, embeddings or metadata.
        """
        self._validate_params()
        x = _check_embeddings(embeddings, "embeddings")
        meta = _check_metadata(metadata, len(x))
        n, dim = x.shape
        if self.pca_dim is not None and self.pca_dim > min(n, dim):
            raise ConfigError(
                f"pca_dim={self.pca_dim} must be <= min(n_cases, dim) = min({n}, {dim}) to fit the PCA"
            )
        x = self._normalise(x, "embeddings")
        pca = self._fit_pca(x) if self.pca_dim is not None else None
        xt = _project(x, pca, self.metric)
        kind = self._resolve_kind(n)
        index = self._build_index(kind, xt)
        # Learned state is set only once everything succeeded, so a failed refit leaves the old index usable.
        self.pca_, self.dim_, self.index_dim_, self.kind_ = pca, dim, xt.shape[1], kind
        self.index_, self.metadata_ = index, meta
        self.vectors_ = self._stored_vectors(kind, xt)
        logger.info("built %s index of %d cases (dim %d -> %d)", self.kind_, n, dim, self.index_dim_)
        return self

    def add(self, embeddings: np.ndarray, metadata: pd.DataFrame | Sequence[Mapping[str, Any]]) -> CaseIndex:
        """Add cases to a fitted index (the PCA and IVF lists are not refitted).

        Args:
            embeddings: finite float array (n_new, dim_).
            metadata: one row per new embedding, same rules as in :meth:`fit`.

        Returns:
            self.

        Raises:
            NotFittedError: the index is not fitted.
            ConfigError: bad embeddings/metadata, or case_ids already in the index (all of them are named).
        """
        self._check_fitted()
        if not self.appendable:
            raise CaseIndexError(
                "this archive index keeps its metadata on disk and cannot grow in place; add the new cases' "
                "embedding shards and rebuild it with `covidcxr index build --from-embeddings DIR`")
        x = _check_embeddings(embeddings, "embeddings", dim=self.dim_)
        meta = _check_metadata(metadata, len(x))
        dupes = sorted(self._cases.existing(meta["case_id"]))
        if dupes:
            shown = ", ".join(repr(d) for d in dupes[:20]) + (" ..." if len(dupes) > 20 else "")
            raise ConfigError(f"{len(dupes)} case_id(s) already in the index: {shown}")
        xt = _project(self._normalise(x, "embeddings"), self.pca_, self.metric)
        n_after = self.index_.ntotal + len(xt)
        if self.kind == "auto" and self.kind_ == "exact" and n_after > self.approx_threshold:
            logger.info("index grows to %d cases > approx_threshold=%d: rebuilding as HNSW", n_after,
                        self.approx_threshold)
            old = self.index_.reconstruct_n(0, self.index_.ntotal)
            self.index_ = self._build_index("hnsw", np.concatenate([old, xt]))
            self.kind_ = "hnsw"
        else:
            self.index_.add(xt)
        if self.vectors_ is not None:
            self.vectors_ = np.concatenate([self.vectors_, self._stored_vectors(self.kind_, xt)])
        self.metadata_ = pd.concat([self.metadata_, meta], ignore_index=True)
        return self

    @property
    def metadata_(self) -> pd.DataFrame:
        """One row per indexed case (row i = FAISS id i); an archive index reads its whole table for this."""
        self._check_fitted()
        return self._cases.frame()

    @metadata_.setter
    def metadata_(self, frame: pd.DataFrame) -> None:
        self._cases = FrameCases(frame)

    def _stored_vectors(self, kind: str, xt: np.ndarray) -> np.ndarray | None:
        if kind != "ivfpq" or not self.rerank:
            return None
        return xt.astype(compressed.VECTOR_DTYPE)

    def __len__(self) -> int:
        return int(self.index_.ntotal) if hasattr(self, "index_") else 0

    @property
    def appendable(self) -> bool:
        """Whether :meth:`add` can grow this index (archive indexes with on-disk metadata are rebuilt instead)."""
        self._check_fitted()
        return not self._cases.read_only

    def existing_case_ids(self, case_ids: Sequence[str]) -> set[str]:
        """Those of ``case_ids`` already indexed (an SQL lookup for archive indexes)."""
        self._check_fitted()
        return self._cases.existing([str(c) for c in case_ids])

    def label_counts(self) -> dict[str, int]:
        """Indexed cases per label (from SQLite for archive indexes, without loading the metadata)."""
        self._check_fitted()
        return self._cases.label_counts()

    @property
    def n_patients_(self) -> int:
        """Number of distinct indexed patients."""
        self._check_fitted()
        return self._cases.n_patients()

    @property
    def n_cases_(self) -> int:
        """Number of indexed cases."""
        self._check_fitted()
        return int(self.index_.ntotal)

    # ------------------------------------------------------------------ search

    def kneighbors(self, query_embeddings: np.ndarray, n_neighbors: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours as arrays (like scikit-learn's ``kneighbors``, but with similarities).

        Args:
            query_embeddings: finite float array (n_queries, dim_).
            n_neighbors: number of neighbours.

        Returns:
            (scores, indices), both (n_queries, n_neighbors); scores are similarities sorted descending
            (not distances), indices are rows of ``metadata_``; -1 / -inf pad missing results.

        Raises:
            NotFittedError: the index is not fitted.
            ConfigError: bad queries (wrong dimension, non-finite, not 2-D) or n_neighbors.
        """
        self._check_fitted()
        k = _check_int("n_neighbors", n_neighbors, 1)
        xq = self._prepare_queries(query_embeddings)
        return self._search_prepared(xq, k)

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int = 10,
        exclude_patients: Any = None,
    ) -> list[list[Match]]:
        """Find the k most similar cases of each query.

        Args:
            query_embeddings: finite float array (n_queries, dim_).
            k: results per query (fewer only when the index has fewer eligible cases).
            exclude_patients: None; one patient id (applied to every query); or a list with one entry per query,
                each None, a patient id or a collection of patient ids. Excluded patients' cases are skipped and
                the search over-fetches so that k results still come back.

        Returns:
            One list of :class:`Match` per query, best first.

        Raises:
            NotFittedError: the index is not fitted.
            ConfigError: bad queries, k or exclude_patients.
        """
        self._check_fitted()
        k = _check_int("k", k, 1)
        xq = self._prepare_queries(query_embeddings)
        excluded = _exclusion_sets(exclude_patients, len(xq))
        ntotal = int(self.index_.ntotal)
        # The exact number of cases the exclusions can remove bounds the over-fetch for an exact index.
        extra = [self._cases.patient_count(ex) for ex in excluded]
        fetch = min(ntotal, k + max(extra, default=0))
        scores, rows = self._search_prepared(xq, fetch)
        results = []
        for qi in range(len(xq)):
            picked = self._filter(scores[qi], rows[qi], excluded[qi], k)
            want = min(k, ntotal - extra[qi])
            more = fetch
            # Approximate indexes may return fewer valid rows than asked; widen until enough or exhausted.
            while len(picked) < want and more < ntotal:
                more = min(ntotal, more * 2)
                s, r = self._search_prepared(xq[qi : qi + 1], more)
                picked = self._filter(s[0], r[0], excluded[qi], k)
            records = self._cases.records([row for _, row in picked])
            results.append([Match(rank=rank, score=float(score), **rec)
                            for rank, ((score, _), rec) in enumerate(zip(picked, records, strict=True), start=1)])
        return results

    def _filter(self, scores: np.ndarray, rows: np.ndarray, excluded: frozenset, k: int) -> list[tuple[float, int]]:
        pairs = [(s, r) for s, r in zip(scores.tolist(), rows.tolist(), strict=True) if r >= 0]
        if excluded:
            patients = self._cases.patients([r for _, r in pairs])
            pairs = [pr for pr, p in zip(pairs, patients, strict=True) if p not in excluded]
        return pairs[:k]

    def _prepare_queries(self, query_embeddings: np.ndarray) -> np.ndarray:
        xq = _check_embeddings(query_embeddings, "query_embeddings", dim=self.dim_)
        return _project(self._normalise(xq, "query_embeddings"), self.pca_, self.metric)

    def _search_prepared(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors_ is not None and self.rerank:
            fetch = min(int(self.index_.ntotal), k * int(self.rerank))
            _, cand = self.index_.search(xq, fetch)
            return compressed.rerank(xq, cand, self.vectors_, self.metric, k)
        dist, rows = self.index_.search(xq, k)
        if self.metric == "l2":
            dist = -dist
        dist[rows < 0] = -np.inf
        return dist, rows

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (a crash leaves the previous index loadable).

        Args:
            directory: target directory; an existing index there is replaced only once the new one is complete.

        Returns:
            The directory path.

        Raises:
            NotFittedError: the index is not fitted.
            CaseIndexError: ``directory`` exists and is not a case index (it is never overwritten).
        """
        self._check_fitted()
        directory = Path(directory)
        check_replaceable(directory)
        faiss = _import_faiss()
        with staged_index(directory) as tmp:
            if self.kind_ == "ivfpq":
                compressed.write_ondisk(self.index_, tmp, INDEX_FILE)
            else:
                _write_faiss(tmp / INDEX_FILE, self.index_)
            if self.vectors_ is not None:
                compressed.write_vectors(tmp / compressed.VECTORS_FILE, self.vectors_)
            if self.pca_ is not None:
                faiss.write_VectorTransform(self.pca_, str(tmp / PCA_FILE))
                _fsync_file(tmp / PCA_FILE)
            if isinstance(self._cases, SqliteCases):  # an archive index saved elsewhere: copy its table as is
                shutil.copyfile(self._cases.path, tmp / METADATA_FILE)
                _fsync_file(tmp / METADATA_FILE)
            else:
                _write_metadata(tmp / METADATA_FILE, self.metadata_)
            _write_header(tmp / HEADER_FILE, self._header())  # last: a header means the rest is complete
        logger.info("saved %s index of %d cases to %s", self.kind_, len(self), directory)
        return directory

    def _header(self) -> dict[str, Any]:
        return self.header_for(dim=self.dim_, index_dim=self.index_dim_, kind=self.kind_,
                               count=self.index_.ntotal, pca=self.pca_ is not None, vectors=self.vectors_ is not None)

    def header_for(self, *, dim: int, index_dim: int, kind: str, count: int, pca: bool,
                   vectors: bool) -> dict[str, Any]:
        """The ``header.json`` of an index with these settings and this learned state (also for streamed builds)."""
        faiss = _import_faiss()
        return {
            "format_version": FORMAT_VERSION,
            "model_hash": self.model_hash,
            "dim": int(dim),
            "index_dim": int(index_dim),
            "kind": kind,
            "metric": self.metric,
            "count": int(count),
            "pca": bool(pca),
            "vectors": bool(vectors),
            "params": self.get_params(),
            "build_info": dict(self.build_info),
            "faiss_version": getattr(faiss, "__version__", "unknown"),
            "saved_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expect_model_hash: str | None = None,
        expect_dim: int | None = None,
    ) -> CaseIndex:
        """Load an index saved by :meth:`save`.

        Args:
            directory: the index directory.
            expect_model_hash: when given, the index must have been built with this embedding-model hash.
            expect_dim: when given, the index must take embeddings of this dimension.

        Returns:
            The fitted index.

        Raises:
            CaseIndexError: the directory is missing, incomplete or corrupt.
            IndexMismatchError: format version, dimension or model hash differ from what is expected.
        """
        directory = Path(directory)
        _remove_stale(directory)  # leftovers of killed saves; a backup is kept while it is the only index
        src = directory
        if not (directory / HEADER_FILE).is_file():
            backup = _backup_path(directory)
            if (backup / HEADER_FILE).is_file():
                # A save crashed between its two renames: the previous index is intact under the backup name.
                logger.warning("%s: incomplete; loading the previous index from %s", directory, backup)
                src = backup
            elif not directory.exists():
                raise CaseIndexError(f"{directory}: no such index directory")
            else:
                raise CaseIndexError(f"{directory}: not a case index (missing {HEADER_FILE})")
        try:
            header = json.loads((src / HEADER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CaseIndexError(f"{src / HEADER_FILE}: unreadable index header ({exc})") from exc
        if not isinstance(header, dict):
            raise CaseIndexError(f"{src / HEADER_FILE}: index header is not a JSON object")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexMismatchError(
                f"{src}: index format version is {version!r} but this covidcxr reads version {FORMAT_VERSION}; "
                "rebuild the index"
            )
        try:
            dim, index_dim, count = int(header["dim"]), int(header["index_dim"]), int(header["count"])
            params, kind = dict(header["params"]), str(header["kind"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CaseIndexError(f"{src / HEADER_FILE}: index header lacks or garbles a field ({exc})") from exc
        if expect_model_hash is not None and header.get("model_hash") != expect_model_hash:
            raise IndexMismatchError(
                f"{src}: index was built with embedding model hash {header.get('model_hash')!r} but "
                f"{expect_model_hash!r} is expected; rebuild the index with this model"
            )
        if expect_dim is not None and dim != expect_dim:
            raise IndexMismatchError(
                f"{src}: index takes {dim}-d embeddings but {expect_dim}-d embeddings are expected"
            )
        faiss = _import_faiss()
        try:
            if kind == "ivfpq":
                index = compressed.read_ondisk(src, INDEX_FILE)
            else:
                index = faiss.read_index(str(src / INDEX_FILE))
            pca = faiss.read_VectorTransform(str(src / PCA_FILE)) if header.get("pca") else None
        except RuntimeError as exc:
            raise CaseIndexError(f"{src}: cannot read the FAISS files ({str(exc).splitlines()[0]})") from exc
        if index.d != index_dim:
            raise IndexMismatchError(f"{src / INDEX_FILE}: FAISS index has dimension {index.d} but the header "
                                     f"says {index_dim}")
        if pca is not None and (pca.d_in != dim or pca.d_out != index_dim):
            raise IndexMismatchError(f"{src / PCA_FILE}: PCA maps {pca.d_in} -> {pca.d_out} dimensions but the "
                                     f"header says {dim} -> {index_dim}")
        if pca is None and dim != index_dim:
            raise CaseIndexError(f"{src}: header says {dim} -> {index_dim} dimensions but {PCA_FILE} is missing")
        if kind == "ivfpq":  # archive scale: metadata stays in SQLite, vectors stay on disk
            cases: FrameCases | SqliteCases = SqliteCases(src / METADATA_FILE)
            vectors = (compressed.read_vectors(src / compressed.VECTORS_FILE, count, index_dim)
                       if header.get("vectors") else None)
        else:
            cases, vectors = FrameCases(_read_metadata(src / METADATA_FILE)), None
        if not (index.ntotal == len(cases) == count):
            raise CaseIndexError(f"{src}: inconsistent counts: FAISS {index.ntotal}, metadata {len(cases)}, "
                              f"header {count}")
        obj = cls(**params)
        obj._validate_params()
        obj.build_info = dict(header.get("build_info") or {})
        obj.dim_, obj.index_dim_, obj.kind_ = dim, index_dim, kind
        obj.index_, obj.pca_, obj._cases, obj.vectors_ = index, pca, cases, vectors
        obj._set_search_params(index, kind)
        return obj

    # ------------------------------------------------------------------ internals

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError("This CaseIndex is not fitted yet; call fit(embeddings, metadata) or "
                                 "CaseIndex.load(directory) first")

    def _resolve_kind(self, n: int) -> str:
        if self.kind == "auto":
            if n > self.archive_threshold:
                return "ivfpq"
            return "hnsw" if n > self.approx_threshold else "exact"
        return self.kind

    def _normalise(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.metric != "ip":
            return x
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            raise ConfigError(f"{name}: row(s) {zero[:10].tolist()} have zero norm and cannot be L2-normalised "
                              "for metric='ip'")
        return x / norms

    def _fit_pca(self, x: np.ndarray) -> Any:
        faiss = _import_faiss()
        pca = faiss.PCAMatrix(x.shape[1], int(self.pca_dim), -0.5 if self.whiten else 0.0, False)
        if self.whiten:
            pca.epsilon = 1e-6  # keeps near-zero eigenvalues from blowing up under whitening
        pca.train(x)
        return pca

    def _build_index(self, kind: str, xt: np.ndarray) -> Any:
        faiss = _import_faiss()
        n, d = xt.shape
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        if kind == "exact":
            index = faiss.IndexFlat(d, metric)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(self.hnsw_m), metric)
            index.hnsw.efConstruction = int(self.ef_construction)
        elif kind == "ivfpq":
            index = self.new_ivfpq(d, n)
            index.train(xt[compressed.train_sample(n, faiss.extract_index_ivf(index).nlist, self.seed)])
        else:
            nlist = self.nlist if self.nlist is not None else max(1, min(int(4 * math.sqrt(n)), n // 39))
            if nlist > n:
                raise ConfigError(f"nlist={nlist} exceeds the number of cases ({n}); lower nlist")
            if n < 39 * nlist:
                logger.warning("IVF: %d cases for nlist=%d lists is under 39 per list; k-means may be poor", n, nlist)
            quantizer = faiss.IndexFlat(d, metric)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
            index.cp.seed = int(self.seed)
            index.cp.spherical = self.metric == "ip"
            # 64 training points per list (faiss default 256): k-means ~3x faster at 300k cases for ~0.003 recall@10.
            index.cp.max_points_per_centroid = 64
            index.train(xt)
        self._set_search_params(index, kind)
        index.add(xt)
        return index

    def new_ivfpq(self, d: int, n: int) -> Any:
        """The untrained IVF-PQ index these settings give for ``n`` cases of dimension ``d``.

        Raises:
            ConfigError: nlist above n, or pq_m not dividing d.
        """
        nlist = self.nlist if self.nlist is not None else compressed.default_nlist(n)
        if nlist > n:
            raise ConfigError(f"nlist={nlist} exceeds the number of cases ({n}); lower nlist")
        pq_m = self.pq_m if self.pq_m is not None else compressed.default_pq_m(d)
        if n < 2 ** int(self.pq_bits):
            raise ConfigError(f"ivfpq needs at least 2**pq_bits = {2 ** int(self.pq_bits)} cases to train its "
                              f"codebooks, got {n}; use kind='exact' or lower pq_bits")
        return compressed.new_ivfpq(d, nlist, pq_m, int(self.pq_bits), self.metric, self.opq, self.seed)

    def _set_search_params(self, index: Any, kind: str) -> None:
        faiss = _import_faiss()
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efSearch = int(self.ef_search)
        elif kind in ("ivf", "ivfpq"):
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(int(self.nprobe), int(ivf.nlist))


# ---------------------------------------------------------------------- validation helpers


def _project(x: np.ndarray, pca: Any, metric: str) -> np.ndarray:
    """Apply the optional PCA (re-normalising for the inner-product metric); return float32 C-ordered rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if pca is None:
        return x
    xt = pca.apply(x)
    if metric == "ip":
        norms = np.linalg.norm(xt, axis=1, keepdims=True)
        xt = xt / np.where(norms == 0, 1, norms)
    return np.ascontiguousarray(xt, dtype=np.float32)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_embeddings(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ConfigError(f"{name} must be a real-valued numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = "; use x.reshape(1, -1) for a single vector" if arr.ndim == 1 else ""
        raise ConfigError(f"{name} must be a 2-D array (n, dim), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"{name} is empty (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigError(f"{name} have dimension {arr.shape[1]} but the index expects {dim}")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below with the row numbers
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ConfigError(f"{name}: {bad.size} row(s) contain NaN/inf or overflow float32, e.g. rows "
                          f"{bad[:10].tolist()}")
    return arr
