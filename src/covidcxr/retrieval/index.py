"""Similar-case index: FAISS vectors + SQLite metadata + a JSON header, saved as one directory.

:class:`CaseIndex` follows the scikit-learn estimator shape: ``__init__`` stores settings, :meth:`CaseIndex.fit`
learns the (optional) PCA and builds the FAISS index, learned state ends in ``_``. Search is exact inner product
on L2-normalised vectors (cosine similarity) by default; big archives switch to an approximate HNSW index
(``kind='auto'``, more than ``approx_threshold`` cases) or use IVF / HNSW on request.

On disk an index is one directory::

    header.json       format version, embedding-model hash, dimensions, index kind, count, settings
    index.faiss       the FAISS index (vectors after the optional PCA)
    pca.faiss         the fitted faiss.PCAMatrix (only when ``pca_dim`` is set)
    metadata.sqlite   table ``cases``: row_id (= FAISS id), case_id, patient_id, label, and any other columns
                      given (source, view, image, thumbnail, study_date, ...)

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
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError, IndexMismatchError, NotFittedError
from covidcxr.retrieval.metadata import _check_metadata, _exclusion_sets, _is_missing, _read_metadata, _write_metadata
from covidcxr.retrieval.storage import (
    FORMAT_VERSION,
    HEADER_FILE,
    INDEX_FILE,
    METADATA_FILE,
    PCA_FILE,
    REQUIRED_COLUMNS,
    _backup_path,
    _fsync_dir,
    _fsync_file,
    _import_faiss,
    _remove_stale,
    _swap_in,
    _tmp_prefix,
    _write_faiss,
    _write_header,
)

logger = logging.getLogger(__name__)

KINDS = ("auto", "exact", "hnsw", "ivf")
METRICS = ("ip", "l2")
# Mirrors covidcxr.data.LABELS; not imported from there because data.py pulls in torch.




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
        kind: ``'exact'`` (faiss IndexFlat), ``'hnsw'`` (IndexHNSWFlat), ``'ivf'`` (IndexIVFFlat) or ``'auto'``:
            exact up to ``approx_threshold`` cases, HNSW above (also when ``add`` grows an exact index past it).
        pca_dim: reduce embeddings to this many dimensions with a PCA fitted in :meth:`fit` (None = no PCA).
            At 1M cases 2048-d float32 vectors take 8 GB; 256 dimensions take 1 GB.
        whiten: whiten the PCA output (eigenvalue power -0.5); needs ``pca_dim``.
        metric: ``'ip'`` (vectors are L2-normalised before and after PCA, score = cosine similarity) or ``'l2'``
            (raw vectors, score = minus squared Euclidean distance).
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (raised to k when k is larger); 128 gave recall@10 0.98 at
            p50 0.5 ms on 1M 256-d cases in ``benchmarks/index_scale.py``.
        nlist: number of IVF lists; None = 4 * sqrt(n) capped so that each list gets >= 39 training points.
        nprobe: IVF lists visited per query.
        approx_threshold: with ``kind='auto'``, more cases than this use HNSW.
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
        self._refresh_lookup()
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
        x = _check_embeddings(embeddings, "embeddings", dim=self.dim_)
        meta = _check_metadata(metadata, len(x))
        dupes = sorted(set(meta["case_id"]) & self._case_id_set)
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
        self.metadata_ = pd.concat([self.metadata_, meta], ignore_index=True)
        self._refresh_lookup()
        return self

    def __len__(self) -> int:
        return int(self.index_.ntotal) if hasattr(self, "index_") else 0

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
        extra = [sum(self._patient_counts.get(p, 0) for p in ex) for ex in excluded]
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
            results.append([self._match(rank, score, row) for rank, (score, row) in enumerate(picked, start=1)])
        return results

    def _filter(self, scores: np.ndarray, rows: np.ndarray, excluded: frozenset, k: int) -> list[tuple[float, int]]:
        out = []
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            if row < 0 or (excluded and self._patient_ids[row] in excluded):
                continue
            out.append((score, row))
            if len(out) == k:
                break
        return out

    def _match(self, rank: int, score: float, row: int) -> Match:
        extra = {}
        for name, values in self._extra_columns.items():
            value = values[row]
            extra[name] = None if _is_missing(value) else value
        return Match(
            rank=rank,
            score=float(score),
            case_id=self._case_ids[row],
            patient_id=self._patient_ids[row],
            label=self._labels[row],
            metadata=extra,
        )

    def _prepare_queries(self, query_embeddings: np.ndarray) -> np.ndarray:
        xq = _check_embeddings(query_embeddings, "query_embeddings", dim=self.dim_)
        return _project(self._normalise(xq, "query_embeddings"), self.pca_, self.metric)

    def _search_prepared(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
        if (directory.exists() and not (directory / HEADER_FILE).is_file()
                and (directory.is_file() or any(directory.iterdir()))):
            raise CaseIndexError(f"{directory}: exists and is not a case index (no {HEADER_FILE}); refusing to "
                              "replace it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        faiss = _import_faiss()
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(directory), dir=directory.parent))
        try:
            _remove_stale(directory, in_flight=tmp)  # what killed saves left (never our own tmp)
            _write_faiss(tmp / INDEX_FILE, self.index_)
            if self.pca_ is not None:
                faiss.write_VectorTransform(self.pca_, str(tmp / PCA_FILE))
                _fsync_file(tmp / PCA_FILE)
            _write_metadata(tmp / METADATA_FILE, self.metadata_)
            _write_header(tmp / HEADER_FILE, self._header())  # last: a header means the rest is complete
            _fsync_dir(tmp)
            _swap_in(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved %s index of %d cases to %s", self.kind_, len(self), directory)
        return directory

    def _header(self) -> dict[str, Any]:
        faiss = _import_faiss()
        return {
            "format_version": FORMAT_VERSION,
            "model_hash": self.model_hash,
            "dim": int(self.dim_),
            "index_dim": int(self.index_dim_),
            "kind": self.kind_,
            "metric": self.metric,
            "count": int(self.index_.ntotal),
            "pca": self.pca_ is not None,
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
        metadata = _read_metadata(src / METADATA_FILE)
        if not (index.ntotal == len(metadata) == count):
            raise CaseIndexError(f"{src}: inconsistent counts: FAISS {index.ntotal}, metadata {len(metadata)}, "
                              f"header {count}")
        obj = cls(**params)
        obj._validate_params()
        obj.build_info = dict(header.get("build_info") or {})
        obj.dim_, obj.index_dim_, obj.kind_ = dim, index_dim, kind
        obj.index_, obj.pca_, obj.metadata_ = index, pca, metadata
        obj._set_search_params(index, kind)
        obj._refresh_lookup()
        return obj

    # ------------------------------------------------------------------ internals

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError("This CaseIndex is not fitted yet; call fit(embeddings, metadata) or "
                                 "CaseIndex.load(directory) first")

    def _resolve_kind(self, n: int) -> str:
        if self.kind == "auto":
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

    def _set_search_params(self, index: Any, kind: str) -> None:
        faiss = _import_faiss()
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efSearch = int(self.ef_search)
        elif kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(int(self.nprobe), int(ivf.nlist))

    def _refresh_lookup(self) -> None:
        meta = self.metadata_
        self._case_ids = meta["case_id"].to_numpy(dtype=object)
        self._patient_ids = meta["patient_id"].to_numpy(dtype=object)
        self._labels = meta["label"].to_numpy(dtype=object)
        self._extra_columns = {
            str(c): meta[c].to_numpy(dtype=object) for c in meta.columns if c not in REQUIRED_COLUMNS
        }
        self._case_id_set = set(self._case_ids.tolist())
        self._patient_counts = Counter(self._patient_ids.tolist())


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










