"""Retrieval quality: kNN vote scores, precision@k, and the patient-aware evaluation with CIs."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.manifest import both_label_mask
from covidcxr.errors import ConfigError
from covidcxr.retrieval.index import CaseIndex, Match, _check_int
from covidcxr.retrieval.metadata import _normalise_label
from covidcxr.vocab import POSITIVE_LABEL

# ---------------------------------------------------------------------- retrieval scores and metrics


def knn_vote_scores(matches: Sequence[Sequence[Match]], positive_label: str = POSITIVE_LABEL) -> np.ndarray:
    """Similarity-weighted share of positive (covid) neighbours per query.

    Weights are the match scores clipped at 0; if all weights are 0 the plain share is used.

    Args:
        matches: result of :meth:`CaseIndex.search`.
        positive_label: the label counted as positive.

    Returns:
        float array (n_queries,) in [0, 1]; NaN for a query without matches.
    """
    out = np.full(len(matches), np.nan, dtype=np.float64)
    for i, ms in enumerate(matches):
        if not ms:
            continue
        pos = np.array([m.label == positive_label for m in ms], dtype=np.float64)
        w = np.clip(np.array([m.score for m in ms], dtype=np.float64), 0, None)
        out[i] = float(pos @ w / w.sum()) if w.sum() > 0 else float(pos.mean())
    return out


def retrieval_metrics(
    query_labels: Sequence[Any] | np.ndarray,
    matches: Sequence[Sequence[Match]],
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
) -> dict[str, float]:
    """Label-agreement precision@k and mAP@k of retrieval results.

    precision@k is the share of the first k matches whose label equals the query's label (over the matches
    returned, when fewer than k came back). AP@k averages precision@i over the ranks i <= k holding a same-label
    match (0 when none does); mAP@k is its mean over queries.

    Args:
        query_labels: label of each query (``'covid'``/``'non_covid'`` or 1/0).
        matches: result of :meth:`CaseIndex.search`, one list per query.
        ks: cut-offs for precision@k.
        map_k: cut-off for mAP.

    Returns:
        dict with ``precision@k`` per k, ``map@{map_k}`` and ``n_queries``.

    Raises:
        ConfigError: lengths differ or a cut-off is not a positive integer.
    """
    labels = [_normalise_label(v) for v in (query_labels.tolist() if isinstance(query_labels, np.ndarray)
                                              else list(query_labels))]
    if len(labels) != len(matches):
        raise ConfigError(f"query_labels has {len(labels)} entries but matches has {len(matches)}")
    ks = [_check_int("ks", k, 1) for k in ks]
    map_k = _check_int("map_k", map_k, 1)
    out: dict[str, float] = {}
    rel = [np.array([m.label == lab for m in ms], dtype=np.float64) for lab, ms in zip(labels, matches, strict=True)]
    for k in ks:
        vals = [r[:k].mean() for r in rel if len(r)]
        out[f"precision@{k}"] = float(np.mean(vals)) if vals else float("nan")
    aps = []
    for r in rel:
        top = r[:map_k]
        hits = np.flatnonzero(top)
        aps.append(float(np.mean(np.cumsum(top)[hits] / (hits + 1))) if hits.size else 0.0)
    out[f"map@{map_k}"] = float(np.mean(aps)) if aps else float("nan")
    out["n_queries"] = float(len(labels))
    return out


def _auc_with_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any] | None:
    from sklearn.metrics import roc_auc_score

    from covidcxr.evaluation.metrics import bootstrap_ci

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
