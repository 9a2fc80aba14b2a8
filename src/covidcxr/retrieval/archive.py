"""Archive-scale index builds: quantiser trained on a sample, cases streamed in, memory bounded by one chunk.

:func:`build_streaming` writes an ``ivfpq`` :class:`~covidcxr.retrieval.index.CaseIndex` folder without ever
holding all vectors or all metadata: the PQ codes go to file-backed inverted lists, the re-ranking vectors to a
memory-mapped ``vectors.npy``, the metadata to SQLite in chunks (:class:`~covidcxr.retrieval.metadata.MetadataWriter`).
:func:`build_from_shards` feeds it the shards of ``covidcxr index embed``
(:mod:`covidcxr.retrieval.shards`); smaller archives are fitted in memory with the usual kinds.

Like :meth:`CaseIndex.save`, the folder is built beside the target and swapped in when complete, so a crash never
leaves a half index under the target name. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError
from covidcxr.retrieval import compressed, shards
from covidcxr.retrieval.index import CaseIndex, _check_embeddings, _project
from covidcxr.retrieval.metadata import MetadataWriter
from covidcxr.retrieval.storage import (
    HEADER_FILE,
    INDEX_FILE,
    METADATA_FILE,
    PCA_FILE,
    _fsync_file,
    _import_faiss,
    _write_header,
    check_replaceable,
    staged_index,
)

log = logging.getLogger(__name__)

_BUILDING_FILE = "building.ivfdata"


def build_streaming(
    index: CaseIndex,
    chunks: Iterable[tuple[np.ndarray, pd.DataFrame]],
    n_total: int,
    sample: np.ndarray,
    directory: str | Path,
) -> CaseIndex:
    """Build and save an ``ivfpq`` index from chunks of ``(embeddings, metadata)``; return it loaded from disk.

    Args:
        index: Unfitted index whose settings are used (``kind`` must be ``'ivfpq'`` or ``'auto'``).
        chunks: ``(embeddings (n, D), metadata)`` pairs, metadata as for :meth:`CaseIndex.fit`.
        n_total: Number of cases all chunks hold together (sizes the lists and the vector file).
        sample: Embeddings ``(m, D)`` to train the PCA (if any) and the coarse + product quantisers on.
        directory: Index folder (replaced only once the new index is complete).

    Returns:
        The index, loaded with :meth:`CaseIndex.load` (metadata and lists stay on disk).

    Raises:
        ConfigError: bad settings, embeddings or metadata; chunks that hold more or fewer than ``n_total`` cases.
        CaseIndexError: ``directory`` exists and is not a case index; duplicate case ids.
    """
    if index.kind not in ("ivfpq", "auto"):
        raise ConfigError(f"a streamed build makes an ivfpq index; kind={index.kind!r} is fitted in memory instead")
    index.set_params(kind="ivfpq")
    directory = Path(directory)
    check_replaceable(directory)  # before the slow training
    x = index._normalise(_check_embeddings(sample, "sample"), "sample")
    dim = x.shape[1]
    pca = index._fit_pca(x) if index.pca_dim is not None else None
    xs = _project(x, pca, index.metric)
    t0 = time.perf_counter()
    faiss_index = index.new_ivfpq(xs.shape[1], int(n_total))
    faiss_index.train(xs)
    log.info("trained ivfpq quantisers on %d sampled cases in %.1f s", len(xs), time.perf_counter() - t0)
    with staged_index(directory) as tmp:
        with compressed.native_stdout_to_stderr():
            compressed.ondisk_lists(faiss_index, tmp / _BUILDING_FILE)
        vectors = None
        if index.rerank:
            vectors = np.lib.format.open_memmap(tmp / compressed.VECTORS_FILE, mode="w+",
                                                dtype=compressed.VECTOR_DTYPE, shape=(int(n_total), xs.shape[1]))
        writer = MetadataWriter(tmp / METADATA_FILE)
        pos = 0
        for emb, meta in chunks:
            e = _check_embeddings(emb, "embeddings", dim=dim)
            if pos + len(e) > n_total:
                raise ConfigError(f"the chunks hold more than n_total={n_total} cases")
            xt = _project(index._normalise(e, "embeddings"), pca, index.metric)
            writer.append(meta if isinstance(meta, pd.DataFrame) else pd.DataFrame(meta))
            with compressed.native_stdout_to_stderr():
                faiss_index.add(xt)
            if vectors is not None:
                vectors[pos:pos + len(xt)] = xt
            pos += len(xt)
            log.info("indexed %d / %d cases", pos, n_total)
        if pos != n_total:
            raise ConfigError(f"the chunks held {pos} cases but n_total={n_total}")
        writer.close()
        if vectors is not None:
            vectors.flush()
            del vectors
            _fsync_file(tmp / compressed.VECTORS_FILE)
        compressed.write_ondisk(faiss_index, tmp, INDEX_FILE)  # the lists, exactly sized (growth left slack)
        del faiss_index
        (tmp / _BUILDING_FILE).unlink()
        if pca is not None:
            _import_faiss().write_VectorTransform(pca, str(tmp / PCA_FILE))
            _fsync_file(tmp / PCA_FILE)
        header = index.header_for(dim=dim, index_dim=xs.shape[1], kind="ivfpq", count=pos, pca=pca is not None,
                                  vectors=bool(index.rerank))
        _write_header(tmp / HEADER_FILE, header)
    log.info("saved ivfpq index of %d cases to %s", pos, directory)
    return CaseIndex.load(directory)


def build_from_shards(
    directory: str | Path,
    out: str | Path,
    *,
    index: CaseIndex | None = None,
    sample_size: int = 200_000,
    build_info: dict[str, Any] | None = None,
    seed: int = 0,
) -> CaseIndex:
    """Index the shards of ``covidcxr index embed``: streamed ``ivfpq`` above ``archive_threshold``, else in memory.

    Args:
        directory: A finished shard folder (:func:`covidcxr.retrieval.shards.complete_shards`).
        out: Index folder.
        index: Unfitted index with the settings (default ``CaseIndex(kind='auto')``); its ``model_hash`` is taken
            from the shard plan.
        sample_size: Embeddings sampled across shards to train the quantisers.
        build_info: Facts for the header's ``build_info``.
        seed: Seed of the sample.

    Returns:
        The saved index.

    Raises:
        CaseIndexError: unfinished or unreadable shards.
        ConfigError: bad settings or metadata.
    """
    from covidcxr.retrieval.embed import case_metadata

    plan, paths = shards.complete_shards(directory)
    n_total = sum(shards.shard_lengths(paths))
    if n_total == 0:
        raise ConfigError(f"{directory}: the shards hold no embeddings (every image was skipped)")
    index = index if index is not None else CaseIndex()
    index.set_params(model_hash=plan.model_hash)
    info = {"embeddings": str(Path(directory).resolve()), "n_rows": plan.n_rows, "n_skipped": plan.n_rows - n_total,
            **(build_info or {})}

    def chunks() -> Iterable[tuple[np.ndarray, pd.DataFrame]]:
        for emb, rows in shards.iter_shards(directory):
            yield emb, case_metadata(rows.drop(columns=["row"]))

    streamed = index.kind == "ivfpq" or (index.kind == "auto" and n_total > index.archive_threshold)
    if not streamed:
        parts = list(chunks())
        emb = np.concatenate([e for e, _ in parts])
        meta = pd.concat([m for _, m in parts], ignore_index=True)
        index.fit(emb, meta)
        index.build_info = info
        index.save(out)
        return index
    index.build_info = info
    sample = shards.sample_embeddings(directory, sample_size, seed=seed)
    return build_streaming(index, chunks(), n_total, sample, out)
