"""Source probe: how well a model's embeddings tell which archive (source) an image came from.

A high probe means the features carry the archive, which a classifier can use as a shortcut when label prevalence
differs between sources. The probe is a logistic regression scored only on rows it was not fitted on (grouped
cross-validation by patient), and, when the embeddings come from several models (cross-validation folds), within
the rows of one model at a time so that no head mixes two embedding spaces.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_HIGH_AUC = 0.80
"""Macro one-vs-rest ROC AUC of the source probe from which evaluations warn (0.5 = no source information)."""


def source_probe(
    embeddings: np.ndarray,
    sources: Any,
    groups: Any,
    *,
    blocks: Any = None,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Cross-validated logistic-regression probe of the source from embeddings.

    Args:
        embeddings: ``(N, D)`` embeddings.
        sources: Source name per row.
        groups: Patient (or linked group) per row: a group is never split between fit and score.
        blocks: Optional block per row (e.g. the fold model that produced the embedding); each block is probed on
            its own rows and the held-out scores are pooled.
        n_splits: Folds of the probe's grouped cross-validation inside each block.
        seed: Seed of the fold assignment.

    Returns:
        ``{"accuracy", "chance_accuracy", "roc_auc" (macro one-vs-rest), "n", "n_sources", "sources",
        "n_blocks", "skipped_rows"}``, or None when fewer than two sources could be probed.

    Raises:
        ConfigError: Mismatched lengths.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    x = np.asarray(embeddings, dtype=np.float64)
    src = pd.Series(sources).astype(str).to_numpy()
    grp = pd.Series(groups).astype(str).to_numpy()
    blk = np.zeros(len(src), dtype=np.int64) if blocks is None else pd.factorize(pd.Series(blocks))[0]
    if x.ndim != 2 or not len(x) == len(src) == len(grp) == len(blk):
        raise ConfigError(f"source_probe: embeddings {x.shape} and {len(src)} sources / {len(grp)} groups / "
                          f"{len(blk)} blocks do not match")
    names = sorted(set(src))
    if len(names) < 2:
        return None
    code = np.array([names.index(s) for s in src])
    scores = np.full((len(src), len(names)), np.nan)
    for b in np.unique(blk):
        rows = np.flatnonzero(blk == b)
        present = np.unique(code[rows])
        n_groups = len(np.unique(grp[rows]))
        if len(present) < 2 or n_groups < 2:
            continue
        splitter = GroupKFold(n_splits=min(n_splits, n_groups), shuffle=True, random_state=seed)
        for fit_idx, score_idx in splitter.split(x[rows], code[rows], grp[rows]):
            fit_rows, score_rows = rows[fit_idx], rows[score_idx]
            classes = np.unique(code[fit_rows])
            if len(classes) < 2:
                continue
            head = LogisticRegression(C=1.0, max_iter=2000).fit(x[fit_rows], code[fit_rows])
            part = np.zeros((len(score_rows), len(names)))
            part[:, head.classes_] = head.predict_proba(x[score_rows])
            scores[score_rows] = part
    done = ~np.isnan(scores).any(axis=1)
    if len(np.unique(code[done])) < 2:
        return None
    y, s = code[done], scores[done]
    seen = np.unique(y)
    pred = s.argmax(axis=1)
    if len(seen) == 2:
        auc = float(roc_auc_score(y == seen[1], s[:, seen[1]]))
    else:
        probs = s[:, seen] / np.clip(s[:, seen].sum(axis=1, keepdims=True), 1e-12, None)
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=seen))
    result = {
        "accuracy": float((pred == y).mean()),
        "chance_accuracy": float(np.bincount(y).max() / len(y)),
        "roc_auc": auc,
        "n": int(done.sum()),
        "n_sources": len(seen),
        "sources": [names[i] for i in seen],
        "n_blocks": len(np.unique(blk[done])),
        "skipped_rows": int((~done).sum()),
    }
    log.info("source probe: ROC AUC %.3f, accuracy %.3f (chance %.3f) on %d held-out rows of %d sources",
             result["roc_auc"], result["accuracy"], result["chance_accuracy"], result["n"], result["n_sources"])
    return result
