"""Archive-scale part of ``benchmarks/index_scale.py``: a streamed ``ivfpq`` index of 1-100 M synthetic cases.

The vectors are drawn chunk by chunk from the same gaussian mixture as the in-memory part (never all in RAM), fed
through :func:`covidcxr.retrieval.archive.build_streaming` (the code behind ``covidcxr index build
--from-embeddings``), and the exact top-10 of every query is kept up to date chunk by chunk (the ground truth for
recall). Search is measured with the lists and vectors in the page cache ("warm", the index in RAM) and with both
files evicted from the page cache before every query ("cold", an index larger than RAM read from disk).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from covidcxr.retrieval import compressed
from covidcxr.retrieval.archive import build_streaming
from covidcxr.retrieval.index import CaseIndex

logger = logging.getLogger("index_scale")
K = 10
CHUNK = 250_000


class _MemoryWatch:
    """Peak anonymous (heap) and file-backed resident memory of this process, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> _MemoryWatch:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def mb(self) -> dict[str, float]:
        return {k: v / 1024 for k, v in self.peak.items()}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed: posix_fadvise on our own files)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, q: np.ndarray, x: np.ndarray,
                offset: int) -> tuple[np.ndarray, np.ndarray]:
    for start in range(0, len(x), 20_000):  # blocks keep the ground truth's scratch memory small (~40 MB)
        s = q @ x[start:start + 20_000].T
        best_s, best_i = _merge_block(best_s, best_i, s, offset + start)
    return best_s, best_i


def _merge_block(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    part = np.argpartition(-s, K, axis=1)[:, :K]
    cs = np.take_along_axis(s, part, axis=1)
    allc_s = np.concatenate([best_s, cs], axis=1)
    allc_i = np.concatenate([best_i, part + offset], axis=1)
    order = np.argsort(-allc_s, axis=1)[:, :K]
    return np.take_along_axis(allc_s, order, axis=1), np.take_along_axis(allc_i, order, axis=1)


def run_archive(n: int, args: Any, mixture: Any, workdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build a streamed ivfpq index of ``n`` cases and measure it; returns (result rows, nprobe sweep)."""
    rng = np.random.default_rng(args.seed)
    axis_std = ((np.arange(args.dim) + 1.0) ** -args.decay).astype(np.float32)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) * axis_std
    scales = args.spread * axis_std
    q = mixture(args.archive_queries, centers, scales, np.random.default_rng(args.seed + 1))
    sample = mixture(min(n, args.archive_sample), centers, scales, np.random.default_rng(args.seed + 2))
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), K), -1, dtype=np.int64)
    truth_s = [0.0]

    def chunks():
        nonlocal best_s, best_i
        for c, start in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - start)
            x = mixture(m, centers, scales, np.random.default_rng([args.seed, 3, c]))
            t = time.perf_counter()
            best_s, best_i = _merge_topk(best_s, best_i, q, x, start)  # ground truth, off the build clock
            truth_s[0] += time.perf_counter() - t
            ids = np.arange(start, start + m)
            meta = pd.DataFrame({"case_id": [f"c{i}" for i in ids], "patient_id": [f"p{i // 2}" for i in ids],
                                 "label": np.where(ids % 2 == 1, "covid", "non_covid")})
            yield x, meta

    out = workdir / f"archive_{n}"
    shutil.rmtree(out, ignore_errors=True)
    params: dict[str, Any] = {"kind": "ivfpq", "nprobe": args.archive_nprobe[0]}
    if args.archive_nlist:
        params["nlist"] = args.archive_nlist
    faiss.omp_set_num_threads(args.threads)
    logger.info("archive n=%d: streamed ivfpq build into %s", n, out)
    gc.collect()
    heap0 = _status_mb("RssAnon")
    t0 = time.perf_counter()
    with _MemoryWatch() as mem:
        index = build_streaming(CaseIndex(**params), chunks(), n, sample, out)
    build_s = time.perf_counter() - t0 - truth_s[0]
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    ivf = faiss.extract_index_ivf(index.index_)
    nlist, pq_m = int(ivf.nlist), int(faiss.downcast_index(ivf).pq.M)
    index_bytes = files["index.ivfdata"] + files["index.faiss"]
    faiss.omp_set_num_threads(args.query_threads)
    data_files = [out / "index.ivfdata", out / compressed.VECTORS_FILE]

    def measure(nprobe: int, rerank: int, queries: np.ndarray, truth: np.ndarray, cold: bool,
                api: bool = False) -> dict[str, Any]:
        nonlocal index
        index.set_params(nprobe=nprobe, rerank=rerank)
        ms, rows = np.empty(len(queries)), np.empty((len(queries), K), dtype=np.int64)
        index.kneighbors(queries[:1], K)  # warm-up (SQLite connection, code paths)
        for i in range(len(queries)):
            if cold:
                # Pages a process has mapped stay resident under fadvise: unmap (drop the index), evict, map again.
                # Loading reads only the header, centroids and codebooks; the query then reads lists and vectors
                # from disk.
                index = None
                gc.collect()
                _evict(data_files)
                index = CaseIndex.load(out).set_params(nprobe=nprobe, rerank=rerank)
            t = time.perf_counter()
            if api:
                rows[i] = [int(mm.case_id[1:]) for mm in index.search(queries[i:i + 1], K)[0]]
            else:
                rows[i] = index.kneighbors(queries[i:i + 1], K)[1][0]
            ms[i] = (time.perf_counter() - t) * 1e3
        recall = float(np.mean([len(set(r.tolist()) & set(t.tolist())) / K for r, t in zip(rows, truth,
                                                                                          strict=True)]))
        return {"nprobe": nprobe, "rerank": rerank, "cold": cold, "api": api, "n_queries": len(queries),
                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()), "recall@10": recall}

    sweep = []
    for nprobe in args.archive_nprobe:
        for rerank in (0, 10, 30, 60):
            point = measure(nprobe, rerank, q, best_i, cold=False)
            sweep.append(point)
            logger.info("  nprobe=%d rerank=%d warm: recall@10 %.4f p50 %.2f ms p99 %.2f ms", nprobe, rerank,
                        point["recall@10"], point["p50_ms"], point["p99_ms"])
    ok = [s for s in sweep if s["rerank"] and s["recall@10"] >= args.archive_target_recall]
    chosen = ok[0] if ok else max(sweep, key=lambda s: s["recall@10"])
    api = measure(chosen["nprobe"], chosen["rerank"], q, best_i, cold=False, api=True)
    # Patient exclusion at this scale: exclude each query's true nearest case's patient.
    index.set_params(nprobe=chosen["nprobe"], rerank=chosen["rerank"])
    ex_ms = []
    for i in range(min(len(q), 200)):
        pid = f"p{int(best_i[i, 0]) // 2}"
        t = time.perf_counter()
        res = index.search(q[i:i + 1], K, exclude_patients=pid)[0]
        ex_ms.append((time.perf_counter() - t) * 1e3)
        if any(mm.patient_id == pid for mm in res):
            raise SystemExit(f"patient exclusion failed for {pid}")
    # Cold last: it leaves the page cache without the index files (warm figures above are not affected).
    nq_cold = min(len(q), args.archive_cold_queries)
    cold = measure(chosen["nprobe"], chosen["rerank"], q[:nq_cold], best_i[:nq_cold], cold=True)
    base = {"n": n, "dim": args.dim, "build_s": build_s, "index_bytes": index_bytes,
            "bytes_per_case": index_bytes / n, "vectors_bytes_per_case": files.get(compressed.VECTORS_FILE, 0) / n,
            "metadata_bytes_per_case": files["metadata.sqlite"] / n, "files": files,
            "peak_rss_mb": mem.mb()["VmRSS"], "peak_anon_mb": mem.mb()["RssAnon"],
            "peak_file_mb": mem.mb()["RssFile"], "ground_truth_s": truth_s[0],
            "params": {"kind": "ivfpq", "nlist": nlist, "pq_m": pq_m, "pq_bits": 8,
                       "nprobe": chosen["nprobe"], "rerank": chosen["rerank"], "train_sample": len(sample)}}
    rows = [
        {**base, "method": "CaseIndex[ivfpq] on disk, warm page cache (in RAM)",
         **{k: chosen[k] for k in ("n_queries", "p50_ms", "p99_ms", "recall@10")}},
        {**base, "method": "CaseIndex[ivfpq] on disk, cold (files evicted before each query)",
         **{k: cold[k] for k in ("n_queries", "p50_ms", "p99_ms", "recall@10")}},
    ]
    rows[0]["search_api_p50_ms"] = api["p50_ms"]
    rows[0]["heap_before_build_mb"] = heap0
    rows[0]["exclude_patient_p50_ms"] = float(np.percentile(ex_ms, 50))
    index = None  # unmap the files before they are removed
    if not args.keep_archive:
        shutil.rmtree(out, ignore_errors=True)
    return rows, sweep


def write_archive_markdown(path: Path, result: dict[str, Any]) -> None:
    """The archive table, the nprobe sweep and the 100 M extrapolation."""
    meta, args = result["meta"], result["meta"]["args"]
    lines = [
        "# Similar-case index at archive scale (streamed IVF-PQ, on-disk lists, re-ranking)",
        "",
        f"Generated {meta['date']} by `{meta['command']}`.",
        (f"Machine: {meta['cpu']} ({', '.join(meta.get('cpu_flags', []))}), {meta['cpu_count']} visible cores, "
         f"{meta.get('ram_gb', '?')} GB RAM; build {args['threads']} threads, single-query latency "
         f"{args['query_threads']} thread; faiss {meta['faiss']}."),
        f"**Note:** {meta['note']}",
        "",
        (f"Data: {args['dim']}-d L2-normalised gaussian mixture ({args['clusters']} clusters, spread {args['spread']}, "
         f"axis decay {args['decay']}), drawn in chunks of {CHUNK:,} and streamed through `build_streaming` (the "
         "code of `covidcxr index build --from-embeddings`); queries are fresh draws; recall@10 against the exact "
         "top-10 kept chunk by chunk. Index bytes = `index.ivfdata` (PQ codes + ids) + `index.faiss` (coarse "
         "centroids, codebooks). Re-ranking reads the float16 `vectors.npy` (separate column). Peak memory: "
         "process RSS sampled every 0.2 s, split into anonymous (heap) and file-backed (memory-mapped lists and "
         "vectors, reclaimable page cache) pages; heap before the build is in the JSON (`heap_before_build_mb`). "
         "Cold: before each query the index is dropped (unmapped), both files are evicted from the page cache "
         "(`posix_fadvise(DONTNEED)`) and the index is loaded again (header, centroids, codebooks; not timed)."),
        (f"Targets at 10 M: <= 100 bytes per case, p50 <= 10 ms, recall@10 >= {args['archive_target_recall']} "
         "after re-ranking."),
        "",
        ("| cases | method | params | build s | index B/case | vectors B/case | metadata B/case | peak RSS MB "
         "(heap / file) | queries | p50 ms | p99 ms | API p50 ms | exclude-patient p50 ms | recall@10 |"),
        "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["archive"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        api = f"{r['search_api_p50_ms']:.2f}" if "search_api_p50_ms" in r else "–"
        ex = f"{r['exclude_patient_p50_ms']:.2f}" if "exclude_patient_p50_ms" in r else "–"
        lines.append(
            f"| {r['n']:,} | {r['method']} | {params} | {r['build_s']:.0f} | {r['bytes_per_case']:.1f} | "
            f"{r['vectors_bytes_per_case']:.0f} | {r['metadata_bytes_per_case']:.0f} | {r['peak_rss_mb']:,.0f} "
            f"({r['peak_anon_mb']:,.0f} / {r['peak_file_mb']:,.0f}) | {r['n_queries']} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {api} | {ex} | {r['recall@10']:.4f} |")
    same = result.get("in_memory_same_run") or []
    if same:
        lines += ["", "In-memory kinds in the same run (`CaseIndex.fit` on all vectors in RAM, 1 query thread):", "",
                  "| cases | method | params | build s | index B/case | p50 ms | p99 ms | recall@10 |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in same:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            lines.append(f"| {r['n']:,} | {r['method']} | {params} | {r['build_s']:.1f} | "
                         f"{r['index_bytes'] / r['n']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{r['recall@10']:.4f} |")
    lines += ["", "## nprobe sweep (warm, all queries; rerank 0 = PQ order only)", ""]
    for n, sweep in result["archive_sweeps"].items():
        lines.append(f"- {int(n):,} cases: " + "; ".join(
            f"nprobe={s['nprobe']} rerank={s['rerank']}: recall {s['recall@10']:.3f}, p50 {s['p50_ms']:.2f} ms"
            for s in sweep))
    lines += ["", "## Verdict", "", result["archive_verdict"], "", "## 100 M cases, on paper", "",
              result["extrapolation"], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def extrapolate(rows: list[dict[str, Any]]) -> str:
    """Bytes and latency at 100 M from the largest measured archive."""
    warm = [r for r in rows if "warm" in r["method"]]
    if not warm:
        return "- no archive size was run"
    r = max(warm, key=lambda x: x["n"])
    cold = next(x for x in rows if x["n"] == r["n"] and "cold" in x["method"])
    scale = 100_000_000 / r["n"]
    # With nlist = 2 sqrt(n), lists get sqrt(scale) times longer and the coarse search sqrt(scale) times wider.
    grow = scale ** 0.5
    gb = 1e9
    return "\n".join([
        (f"- From the {r['n']:,}-case run (x{scale:g}): index {r['bytes_per_case'] * 1e8 / gb:.1f} GB "
        f"({r['bytes_per_case']:.1f} B/case), re-ranking vectors {r['vectors_bytes_per_case'] * 1e8 / gb:.0f} GB "
        f"(float16), SQLite metadata {r['metadata_bytes_per_case'] * 1e8 / gb:.0f} GB."),
        (f"- Latency model: p50 grows at most with the list length and the coarse search, both ~sqrt(n) with the "
        f"default nlist = 2 sqrt(n): {r['p50_ms']:.2f} ms x {grow:.2f} = {r['p50_ms'] * grow:.1f} ms warm; "
        f"cold (every list and vector read from disk) {cold['p50_ms']:.1f} ms x {grow:.2f} = "
        f"{cold['p50_ms'] * grow:.0f} ms on this disk."),
        (f"- Hardware: one machine with >= {max(16, int(r['bytes_per_case'] * 1e8 / gb * 2 + 4))} GB RAM keeps the "
        f"codes resident (warm latency), {int((r['bytes_per_case'] + r['vectors_bytes_per_case'] + r['metadata_bytes_per_case']) * 1e8 / gb * 1.2)}"
        " GB of SSD holds codes + vectors + metadata; the build's heap stays near the measured peak (one chunk + "
        "the quantisers), its time grows linearly (~x10 here) unless the coarse assignment runs on a GPU "
        "(faiss-gpu) or the shards are added by several machines into per-shard lists merged afterwards."),
    ])
