"""Retrieval reports: contact sheets, tables, markdown, the model-level evaluation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ImageError
from covidcxr.retrieval.embed import case_metadata, embed_splits
from covidcxr.retrieval.index import Match
from covidcxr.retrieval.metrics import evaluate_retrieval
from covidcxr.retrieval.workflow import _model_info
from covidcxr.vocab import POSITIVE_LABEL

log = logging.getLogger(__name__)

def _case_image(match: Match, index_dir: Path | None) -> np.ndarray | None:
    from covidcxr.io.image import load_image

    for key in ("thumbnail", "image"):
        value = match.metadata.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value)
        if not path.is_absolute() and index_dir is not None:
            path = index_dir / path
        try:
            return load_image(path)[0]
        except ImageError as exc:
            log.debug("contact sheet: %s", exc)
    return None


def contact_sheet(
    query_image: np.ndarray,
    matches: Sequence[Match],
    out: str | Path,
    *,
    index_dir: str | Path | None = None,
    query_title: str = "query",
    ncols: int = 6,
) -> Path:
    """Write a PNG with the query and its neighbours, each titled with rank, label, similarity and patient.

    Args:
        query_image: float32 ``H x W`` in [0, 1].
        matches: Search results.
        out: PNG path (its folder is created).
        index_dir: Index folder; relative thumbnail paths are resolved against it.
        query_title: Title of the query tile.
        ncols: Tiles per row.

    Returns:
        ``out``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    index_dir = Path(index_dir) if index_dir is not None else None
    n = 1 + len(matches)
    cols = max(1, min(int(ncols), n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.3 * cols, 2.7 * rows), dpi=100)
    FigureCanvasAgg(fig)  # Figure + Agg canvas: no pyplot global state, safe in threads
    tiles: list[tuple[np.ndarray | None, str, str]] = [(query_image, query_title, "black")]
    for m in matches:
        colour = "#b2182b" if m.label == POSITIVE_LABEL else "#2166ac"
        tiles.append((_case_image(m, index_dir), f"#{m.rank} {m.label}  sim {m.score:.3f}\n{m.patient_id}", colour))
    for i, (image, title, colour) in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if image is None:
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        ax.set_title(title, fontsize=8, color=colour)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out




def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _fmt_auc(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    ci = entry.get("ci")
    return f"{_fmt(entry['value'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(entry["value"])


def retrieval_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (overall, both-label sources, per source) of a :func:`evaluate_retrieval` result."""
    ks = result["settings"]["ks"]
    map_k = result["settings"]["map_k"]
    k = result["settings"]["k"]
    header = ["subset", "queries", "patients", "covid", *[f"P@{x}" for x in ks], f"mAP@{map_k}", "chance P",
              f"kNN AUC (k={k})", "network AUC"]
    blocks = [("overall", result["overall"])]
    if result.get("both_label_sources"):
        blocks.append(("sources with both labels", result["both_label_sources"]))
    blocks += [(f"source: {s}", b) for s, b in result.get("per_source", {}).items()]
    rows = []
    for name, b in blocks:
        rows.append([name, str(b.get("n_queries", 0)), str(b.get("n_patients", 0)), str(b.get("n_covid", 0)),
                     *[_fmt(b.get(f"precision@{x}")) for x in ks], _fmt(b.get(f"map@{map_k}")),
                     _fmt(b.get("chance_precision")), _fmt_auc(b.get("knn_auc")), _fmt_auc(b.get("network_auc"))])
    return header, rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def retrieval_markdown(result: dict[str, Any], title: str = "Retrieval quality", intro: str = "") -> str:
    """Markdown report of a :func:`evaluate_retrieval` result."""
    header, rows = retrieval_table(result)
    s, ix, q = result["settings"], result["index"], result["queries"]
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        (f"Index: {ix['n_cases']} train images of {ix['n_patients']} patients ({_counts(ix['label_counts'])}), "
         f"{ix['dim']}-d embeddings -> {ix['index_dim']}-d {s['kind']} index. Queries: {q['n']} test images of "
         f"{q['n_patients']} patients ({_counts(q['label_counts'])}), leave-patient-out (the query's own patient is "
         "excluded)."),
        (f"P@k = share of the first k neighbours with the query's label; mAP@{s['map_k']} over label agreement; "
         "chance P = the same share for a retriever that ignores the image. kNN AUC = ROC AUC of the "
         f"similarity-weighted covid share among the {s['k']} nearest neighbours; network AUC = the classifier's own "
         f"probability on the same images. 95% patient-bootstrap CIs ({s['n_boot']} replicates)."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    bad = result.get("unreadable", [])
    if bad:
        lines += [f"Left out, unreadable ({len(bad)}):", "",
                  *[f"- {b['split']}: {b['reason']}" for b in bad], ""]
    return "\n".join(lines)


def evaluate_model_retrieval(
    artifact: Any,
    df: pd.DataFrame,
    *,
    k: int = 10,
    pca_dim: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Embed a manifest's train and test splits with ``artifact`` and run :func:`evaluate_retrieval`.

    Returns:
        The result dict, plus ``model`` (folder, hash), ``embedding`` (images, seconds) facts and ``unreadable``:
        each image left out (``skip_bad``) with its ``split``, ``image`` and ``reason``.
    """
    t0 = time.perf_counter()
    e_train, r_train, e_test, r_test = embed_splits(artifact, df, batch_size=batch_size, num_workers=num_workers,
                                                    progress=progress, skip_bad=skip_bad, seed=seed)
    seconds = time.perf_counter() - t0
    result = evaluate_retrieval(e_train, case_metadata(r_train), e_test, r_test, test_prob=r_test["prob"].to_numpy(),
                                k=k, pca_dim=pca_dim, n_boot=n_boot, seed=seed)
    n = len(r_train) + len(r_test)
    result["model"] = _model_info(artifact)
    result["embedding"] = {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2)}
    result["unreadable"] = [{"split": split, "image": bad["image"], "reason": bad["reason"]}
                            for split, rows in (("train", r_train), ("test", r_test))
                            for bad in rows.attrs.get("unreadable", [])]
    return result
