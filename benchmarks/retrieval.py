"""Benchmark: similar-case retrieval quality (covidcxr.search.evaluate_retrieval) on the development data.

The train split is indexed, the test split is queried, leave-patient-out (the query's own patient is excluded).
Reported: precision@1/5/10 and mAP@10 of label agreement (with the chance level of a retriever that ignores the
image), the ROC AUC of a similarity-weighted kNN vote (k=10) next to the network's own ROC AUC on the same test
images, both with 95% patient-bootstrap CIs; overall, on sources that have both labels and per source. Each PCA
dimension in ``--pca-dims`` (PCA fitted on the train split; 0 = none) is a run, with single-query search latency
(exact index, one FAISS thread).

Inputs, either:
  --embeddings NPZ       written by ``benchmarks/classification.py --save-embeddings`` (embeddings, prob, image,
                         patient_id, label, source, view, split, model_hash, model_dir); ``--manifest`` optional,
                         only to read its ``source_has_both_labels`` flag per source
  --model DIR --manifest M   embed here (the split is re-made as classification.py makes it when M has none)

Examples:
  python benchmarks/retrieval.py --embeddings /tmp/cls_bench/embeddings_c_aug_mask.npz \\
      --manifest /work/shared/data/cxr/manifest.csv
  python benchmarks/retrieval.py --model /tmp/cls_bench/c_aug_mask --manifest /work/shared/data/cxr/manifest.csv
Writes ``retrieval.json`` and ``retrieval.md`` into ``--results-dir`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("benchmarks.retrieval")
META_COLUMNS = ("image", "patient_id", "label", "source", "view", "split")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=Path, default=None, help="npz from classification.py --save-embeddings")
    p.add_argument("--model", type=Path, default=None, help="model artifact (with --manifest) to embed here")
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--k", type=int, default=10, help="kNN-vote neighbours and mAP cut-off")
    p.add_argument("--pca-dims", type=int, nargs="+", default=[0, 256, 64], help="PCA dimensions (0 = none)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-queries", type=int, default=200, help="single queries timed per run")
    # Split settings used when a manifest has no split column (same defaults as benchmarks/classification.py).
    p.add_argument("--group-col", default="split_group")
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if (args.embeddings is None) == (args.model is None):
        p.error("give either --embeddings NPZ or --model DIR --manifest M")
    if args.model is not None and args.manifest is None:
        p.error("--model needs --manifest")
    return args


def load_npz(path: Path) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Embeddings, per-row metadata (with ``prob`` when stored) and provenance from a saved npz."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("embeddings", "patient_id", "label", "split") if k not in z.files]
        if missing:
            raise SystemExit(f"{path}: npz lacks {missing} (has {z.files})")
        emb = np.asarray(z["embeddings"], dtype=np.float32)
        meta = pd.DataFrame({c: z[c].astype(str) for c in META_COLUMNS if c in z.files})
        if "prob" in z.files:
            meta["prob"] = z["prob"].astype(np.float64)
        info = {k: str(z[k]) for k in ("model_hash", "model_dir") if k in z.files}
    return emb, meta, info


def both_label_flags(meta: pd.DataFrame, manifest: Path | None) -> pd.DataFrame:
    """Add ``source_has_both_labels`` (a per-source flag): from the manifest when given, else from ``meta``."""
    if "source" not in meta.columns:
        return meta
    if manifest is not None:
        man = pd.read_csv(manifest, usecols=lambda c: c in ("source", "label", "source_has_both_labels"))
        if "source_has_both_labels" in man.columns:
            flag = man["source_has_both_labels"].astype(str).str.lower().isin({"true", "1", "1.0", "yes"})
            per_source = flag.groupby(man["source"].astype(str)).any()
        else:
            per_source = man.groupby(man["source"].astype(str))["label"].nunique() >= 2
    else:
        per_source = meta.groupby("source")["label"].nunique() >= 2
    return meta.assign(source_has_both_labels=meta["source"].map(per_source).fillna(False).astype(bool))


def embed_here(args: argparse.Namespace) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Embed every train and test image of the manifest with the model (this machine)."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.split import patient_split
    from covidcxr.retrieval.embed import embed_manifest

    df = read_manifest(args.manifest)
    if "split" not in df.columns:
        group = args.group_col if args.group_col in df.columns else None
        df = patient_split(df, args.val, args.test, group_col=group, seed=args.seed).reset_index(drop=True)
    df = df[df["split"].isin(["train", "test"])].reset_index(drop=True)
    art = load_artifact(args.model, args.device)
    t0 = time.perf_counter()
    emb, rows = embed_manifest(art, df, args.batch_size, args.progress, num_workers=args.num_workers)
    seconds = time.perf_counter() - t0
    info = {"model_hash": art.weights_hash, "model_dir": str(args.model), "embed_seconds": round(seconds, 2),
            "embed_images_per_s": round(len(rows) / seconds, 2), "device": str(art.device)}
    keep = [c for c in (*META_COLUMNS, "prob", "source_has_both_labels") if c in rows.columns]
    return emb, rows[keep].reset_index(drop=True), info


def search_latency(train_emb: np.ndarray, train_meta: pd.DataFrame, queries: np.ndarray, pca_dim: int | None,
                   k: int) -> dict[str, float]:
    """p50/p99 single-query latency (ms) of an exact index with one FAISS thread."""
    from covidcxr.retrieval.index import CaseIndex
    from covidcxr.retrieval.workflow import faiss_threads

    meta = pd.DataFrame({"case_id": [f"c{i}" for i in range(len(train_meta))],
                         "patient_id": train_meta["patient_id"].astype(str), "label": train_meta["label"].astype(str)})
    index = CaseIndex(kind="exact", pca_dim=pca_dim).fit(train_emb, meta)
    times = []
    with faiss_threads(1):
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None, :], k=k)
            times.append(1000 * (time.perf_counter() - t0))
    arr = np.asarray(times)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 4), "p99_ms": round(float(np.percentile(arr, 99)), 4),
            "n": int(arr.size)}


def environment() -> dict[str, Any]:
    """Versions and machine."""
    import faiss

    info = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return info


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def write_reports(report: dict[str, Any], results_dir: Path) -> None:
    """retrieval.json and retrieval.md."""
    from covidcxr.io.files import json_safe
    from covidcxr.retrieval.report import retrieval_markdown

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "retrieval.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    runs = report["runs"]
    primary = runs[0]
    src = report["input"]
    intro = (f"Input: {src['mode']} (`{src.get('embeddings') or src.get('model_dir')}`, model hash "
             f"{str(src.get('model_hash'))[:12]}). Data: {report['data']['n_images']} images, "
             f"{report['data']['n_patients']} patients, splits {report['data']['per_split']}. "
             f"Command: `{report['command']}`")
    pca = primary["settings"]["pca_dim"]
    md = retrieval_markdown(primary, title=f"Retrieval quality ({'no PCA' if pca is None else f'PCA {pca}'})",
                            intro=intro)
    ks = primary["settings"]["ks"]
    lines = [md, "## PCA dimension (fitted on the train split)", "",
             "| PCA dim | index dim | " + " | ".join(f"P@{x}" for x in ks) + f" | mAP@{primary['settings']['map_k']} | "
             "kNN AUC | both-label kNN AUC | "
             "search p50 ms | p99 ms |", "|" + "---|" * (len(ks) + 7)]
    for r in runs:
        ov, both = r["overall"], r.get("both_label_sources") or {}
        lat = r.get("latency", {})
        lines.append(
            f"| {r['settings']['pca_dim'] or 'none'} | {r['index']['index_dim']} | "
            + " | ".join(_fmt(ov.get(f"precision@{x}")) for x in ks)
            + f" | {_fmt(ov.get('map@' + str(r['settings']['map_k'])))} | {_fmt((ov.get('knn_auc') or {}).get('value'))}"
            f" | {_fmt((both.get('knn_auc') or {}).get('value'))} | {lat.get('p50_ms', 'n/a')} | {lat.get('p99_ms', 'n/a')} |"
        )
    env = report["environment"]
    machine = (f"Machine: {env.get('device', 'CPU')}, {env['cpu_count']} CPUs, faiss {env['faiss']}; latency = one "
               "query at a time on an exact index, one FAISS thread.")
    lines += ["", machine, ""]
    (results_dir / "retrieval.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("covidcxr.evaluation").setLevel(logging.WARNING)  # per-metric bootstrap notes are noise here
    from covidcxr.retrieval.metrics import evaluate_retrieval

    if args.embeddings is not None:
        emb, meta, info = load_npz(args.embeddings)
        mode = "embeddings"
    else:
        emb, meta, info = embed_here(args)
        mode = "model"
    if "source_has_both_labels" not in meta.columns:
        meta = both_label_flags(meta, args.manifest)
    train, test = (meta["split"] == "train").to_numpy(), (meta["split"] == "test").to_numpy()
    if not train.any() or not test.any():
        raise SystemExit(f"need train and test rows; splits are {meta['split'].value_counts().to_dict()}")
    m_train, m_test = meta[train].reset_index(drop=True), meta[test].reset_index(drop=True)
    e_train, e_test = emb[train], emb[test]
    prob = m_test["prob"].to_numpy() if "prob" in m_test.columns else None
    rng = np.random.default_rng(args.seed)
    lat_q = e_test[rng.permutation(len(e_test))[: args.latency_queries]]
    runs = []
    for d in args.pca_dims:
        pca = d or None
        if pca is not None and pca > min(len(e_train), emb.shape[1]):
            log.warning("pca_dim %d > min(n_train, dim) = %d: skipped", pca, min(len(e_train), emb.shape[1]))
            continue
        t0 = time.perf_counter()
        result = evaluate_retrieval(e_train, m_train, e_test, m_test, test_prob=prob, k=args.k, pca_dim=pca,
                                    n_boot=args.n_boot, seed=args.seed)
        result["latency"] = search_latency(e_train, m_train, lat_q, pca, args.k)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("pca %s: P@1 %.3f, kNN AUC %s", pca, result["overall"]["precision@1"],
                 (result["overall"]["knn_auc"] or {}).get("value"))
        runs.append(result)
    report = {
        "benchmark": "retrieval",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/retrieval.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "input": {"mode": mode, "embeddings": str(args.embeddings) if args.embeddings else None,
                  "manifest": str(args.manifest) if args.manifest else None, **info},
        "data": {"n_images": len(meta), "n_patients": int(meta["patient_id"].nunique()), "dim": int(emb.shape[1]),
                 "per_split": {str(k): int(v) for k, v in meta["split"].value_counts().items()}},
        "settings": {"k": args.k, "pca_dims": args.pca_dims, "n_boot": args.n_boot, "seed": args.seed},
        "runs": runs,
    }
    write_reports(report, args.results_dir)
    print(f"wrote {args.results_dir / 'retrieval.json'} and retrieval.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
