"""Binary-classification metrics with patient-level bootstrap CIs, threshold choice, plots and reports.

COVID (label 1) is the positive class and an image is called positive when ``p >= threshold``. Everything here
works on plain arrays of labels and probabilities, so it is independent of the model (no torch import).

Confidence intervals resample *patients* with replacement (all images of a drawn patient come along, as many
times as it is drawn), because images of one patient are not independent. The bootstrap is vectorised: each
replicate is a vector of per-image weights (how often the image's patient was drawn), and every metric,
including ROC AUC and average precision, is computed from those weights for all replicates at once. With
integer weights this equals computing the metric on the materialised resample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from covidcxr.data.manifest import both_label_mask
from covidcxr.errors import ConfigError
from covidcxr.evaluation.honest import shortcut_warnings
from covidcxr.vocab import LABELS

logger = logging.getLogger(__name__)


METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc")
"""Metrics that get a bootstrap CI, in report order."""

COUNTS: tuple[str, ...] = ("n", "n_pos", "tp", "fp", "tn", "fn")
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "sensitivity")

# Same order as covidcxr.data.LABELS; not imported so that evaluation never pulls in torch through data.py.
_REQUIRED_COLUMNS = ("prob", "y", "patient_id")
# Bound on replicates x images per chunk of the bootstrap, so a large test set does not need gigabytes.
_MAX_CHUNK_ELEMENTS = 2_000_000


# ----------------------------------------------------------------------------------------------------------------
# input validation


def _as_labels(y: Any, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array of 0/1 labels, got shape {arr.shape}")
    if arr.size == 0:
        raise ConfigError(f"{name} is empty: need at least one labelled prediction")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must contain only 0 and 1, got values of type {arr.dtype}") from exc
    bad = np.unique(num[~np.isin(num, (0.0, 1.0))])
    if bad.size:
        raise ConfigError(f"{name} must contain only 0 and 1, got {bad[:5].tolist()}")
    return num.astype(np.int64)


def _as_probs(p: Any, n: int, name: str = "p") -> np.ndarray:
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be numeric probabilities in [0, 1]: {exc}") from exc
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array of probabilities, got shape {arr.shape}")
    if arr.size != n:
        raise ConfigError(f"y and {name} must have the same length, got {n} and {arr.size}")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ConfigError(
            f"{name} must be finite probabilities in [0, 1], got {arr[idx[:5]].tolist()} at index {idx[:5].tolist()}"
        )
    return arr


def _as_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}") from exc
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return t


def _validate(y: Any, p: Any, threshold: Any | None = None) -> tuple[np.ndarray, np.ndarray, float | None]:
    y_arr = _as_labels(y)
    p_arr = _as_probs(p, y_arr.size)
    t = None if threshold is None else _as_threshold(threshold)
    return y_arr, p_arr, t


def _nan_div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------------
# point metrics


def choose_threshold(
    y: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> float:
    """Choose a decision threshold on validation predictions (never on test).

    ``youden`` maximises Youden's J = sensitivity + specificity - 1 over the ROC curve (ties go to the highest
    threshold). ``sensitivity`` returns the highest threshold whose sensitivity reaches ``target_sensitivity``.
    The result is one of the observed probabilities, so ``p >= threshold`` reproduces the chosen ROC point.

    Args:
        y: True labels, 0/1 (1 = COVID).
        p: Predicted probabilities of class 1, in [0, 1].
        method: ``'youden'`` or ``'sensitivity'``.
        target_sensitivity: Required sensitivity in (0, 1]; only with ``method='sensitivity'``.

    Returns:
        The threshold, a float in [0, 1].

    Raises:
        ConfigError: On an unknown method, a missing or invalid target, bad inputs, or a single class in ``y``.
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"method must be one of {list(THRESHOLD_METHODS)}, got {method!r}")
    if method == "sensitivity":
        if target_sensitivity is None:
            raise ConfigError("method='sensitivity' needs target_sensitivity, a number in (0, 1]; got None")
        try:
            target = float(target_sensitivity)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"target_sensitivity must be a number in (0, 1], got {target_sensitivity!r}") from exc
        if not (math.isfinite(target) and 0.0 < target <= 1.0):
            raise ConfigError(f"target_sensitivity must be a number in (0, 1], got {target_sensitivity!r}")
    elif target_sensitivity is not None:
        raise ConfigError(
            f"target_sensitivity={target_sensitivity!r} is only used with method='sensitivity', not {method!r}"
        )
    y_arr, p_arr, _ = _validate(y, p)
    classes = np.unique(y_arr)
    if classes.size < 2:
        raise ConfigError(
            f"choosing a threshold needs both classes in y, got only class {int(classes[0])} "
            f"({LABELS[int(classes[0])]}) in {y_arr.size} predictions"
        )
    fpr, tpr, thresholds = roc_curve(y_arr, p_arr, drop_intermediate=False)
    # Index 0 is the "predict nothing positive" point at threshold +inf; it is never a usable threshold.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if method == "youden":
        i = int(np.argmax(tpr - fpr))  # thresholds decrease, so argmax's first hit is the highest among ties
    else:
        # A tiny tolerance keeps e.g. target 0.9 reachable when tpr is 9/10 computed as 0.8999999999999999.
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    t = float(thresholds[i])
    logger.debug("threshold %.6f by %s: sensitivity %.4f, specificity %.4f", t, method, tpr[i], 1 - fpr[i])
    return t


def binary_metrics(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, threshold: float) -> dict[str, Any]:
    """Compute threshold and ranking metrics for one set of predictions.

    Undefined values (sensitivity without positives, PPV without predicted positives, AUC with one class, ...)
    are NaN rather than an error.

    Args:
        y: True labels, 0/1 (1 = COVID).
        p: Predicted probabilities of class 1, in [0, 1].
        threshold: Decision threshold in [0, 1]; an image is positive when ``p >= threshold``.

    Returns:
        Dict with floats ``accuracy, sensitivity, specificity, ppv, npv, f1, roc_auc, pr_auc`` (average
        precision) and ints ``n, n_pos, tp, fp, tn, fn``.

    Raises:
        ConfigError: If the labels, probabilities or threshold are invalid.
    """
    y_arr, p_arr, t = _validate(y, p, threshold)
    pred = (p_arr >= t).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_arr, pred, labels=[0, 1]).ravel())
    n, n_pos = int(y_arr.size), int(y_arr.sum())
    both = 0 < n_pos < n
    return {
        "accuracy": _nan_div(tp + tn, n),
        "sensitivity": _nan_div(tp, tp + fn),
        "specificity": _nan_div(tn, tn + fp),
        "ppv": _nan_div(tp, tp + fp),
        "npv": _nan_div(tn, tn + fn),
        "f1": _nan_div(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(y_arr, p_arr)) if both else math.nan,
        "pr_auc": float(average_precision_score(y_arr, p_arr)) if n_pos > 0 else math.nan,
        "n": n,
        "n_pos": n_pos,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: count, mean predicted probability, observed fraction of positives (NaN if empty)."""
    # floor(p * n_bins) puts each bin's lower edge inside it (0.3 -> bin 3); p == 1 joins the last bin.
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins) / count
    return count, mean_p, frac_pos


def expected_calibration_error(
    y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, n_bins: int = 10
) -> float:
    """Expected calibration error over equal-width probability bins.

    ECE = sum over bins of (bin size / n) * |fraction of positives - mean predicted probability|.

    Args:
        y: True labels, 0/1.
        p: Predicted probabilities of class 1, in [0, 1].
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        The ECE, in [0, 1].

    Raises:
        ConfigError: If the inputs are invalid or ``n_bins`` is not a positive integer.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    y_arr, p_arr, _ = _validate(y, p)
    count, mean_p, frac_pos = _calibration_bins(y_arr, p_arr, int(n_bins))
    keep = count > 0
    return float(np.sum(count[keep] / y_arr.size * np.abs(frac_pos[keep] - mean_p[keep])))


# ----------------------------------------------------------------------------------------------------------------
# bootstrap


def _weighted_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric in ``METRICS`` for each row of a (B, n) weight matrix, as (B,) arrays (NaN when undefined).

    With integer weights, row b equals ``binary_metrics`` on the data with image i repeated ``w[b, i]`` times.
    """
    pos = y.astype(bool)
    pred = p >= threshold
    tp = w @ (pos & pred).astype(np.float64)
    fn = w @ (pos & ~pred).astype(np.float64)
    fp = w @ (~pos & pred).astype(np.float64)
    tn = w @ (~pos & ~pred).astype(np.float64)

    # Ranking metrics: the order of the scores is the same in every replicate, only the weights change, so sort
    # once and sum the weights of positives and negatives per distinct score (ascending).
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ws = w[:, order]
    pos_u = np.add.reduceat(ws * pos[order], starts, axis=1)
    neg_u = np.add.reduceat(ws * ~pos[order], starts, axis=1)
    n_pos, n_neg = pos_u.sum(axis=1), neg_u.sum(axis=1)
    neg_below = np.cumsum(neg_u, axis=1) - neg_u
    # Mann-Whitney form of ROC AUC, ties count one half (what sklearn's trapezoidal AUC gives).
    auc_num = np.sum(pos_u * (neg_below + 0.5 * neg_u), axis=1)
    # Average precision as sklearn defines it: sum over descending thresholds of (recall step) x precision.
    tp_desc = np.cumsum(pos_u[:, ::-1], axis=1)
    fp_desc = np.cumsum(neg_u[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp_desc / (tp_desc + fp_desc)
        recall_step = pos_u[:, ::-1] / n_pos[:, None]
        ap = np.where(recall_step > 0, recall_step * precision, 0.0).sum(axis=1)
        out = {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "roc_auc": auc_num / (n_pos * n_neg),
            "pr_auc": np.where(n_pos > 0, ap, np.nan),
        }
    # 0/0 gives NaN already; x/0 with x > 0 cannot occur, but make "undefined" uniformly NaN anyway.
    return {k: np.where(np.isfinite(v), v, np.nan) for k, v in out.items()}


def _group_codes(groups: Any, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1 or arr.size != n:
        raise ConfigError(f"groups must be a 1-D array with one patient id per prediction ({n}), got shape {arr.shape}")
    codes, _ = pd.factorize(arr)
    if (codes < 0).any():
        idx = np.flatnonzero(codes < 0)
        raise ConfigError(f"groups (patient ids) must not be missing, got a missing id at index {idx[:5].tolist()}")
    return codes


def _bootstrap_replicates(
    y: np.ndarray, p: np.ndarray, threshold: float, codes: np.ndarray, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _MAX_CHUNK_ELEMENTS // max(y.size, n_groups)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        # Drawing n_groups patients with replacement = a multinomial count per patient; each image then
        # weighs as much as its patient was drawn.
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
        parts.append(_weighted_metrics(y, p, threshold, counts[:, codes].astype(np.float64)))
    return {m: np.concatenate([part[m] for part in parts]) for m in METRICS}


def bootstrap_ci(
    y: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    threshold: float,
    groups: Sequence[Any] | np.ndarray | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals, resampling patients with all their images.

    Replicates where a metric is undefined (e.g. no positives drawn) are skipped for that metric.

    Args:
        y: True labels, 0/1.
        p: Predicted probabilities of class 1, in [0, 1].
        threshold: Decision threshold in [0, 1].
        groups: Patient id per prediction; ``None`` resamples images independently (only for comparison).
        n_boot: Number of bootstrap replicates.
        seed: Seed of the replicate draws; the same seed gives the same intervals.
        alpha: 1 - confidence level (0.05 gives 95 % intervals).

    Returns:
        ``{metric: (lo, hi)}`` for every name in ``METRICS``; ``(nan, nan)`` when no replicate defines it.

    Raises:
        ConfigError: On invalid inputs, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    y_arr, p_arr, t = _validate(y, p, threshold)
    codes = _group_codes(groups, y_arr.size)
    reps = _bootstrap_replicates(y_arr, p_arr, t, codes, int(n_boot), int(seed))
    out: dict[str, tuple[float, float]] = {}
    for name in METRICS:
        vals = reps[name][np.isfinite(reps[name])]
        if vals.size == 0:
            out[name] = (math.nan, math.nan)
            continue
        if vals.size < 0.9 * n_boot:
            logger.info("%s: %d of %d bootstrap replicates undefined, skipped", name, n_boot - vals.size, n_boot)
        lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
        out[name] = (float(lo), float(hi))
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation of a prediction table


def _metric_block(
    y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, groups, n_boot=n_boot, seed=seed)
    block: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        block[name] = {"value": point[name], "ci": list(ci[name])}
    for name in COUNTS:
        block[name] = {"value": point[name], "ci": None}
    block["n_patients"] = {"value": int(pd.unique(groups).size), "ci": None}
    return block


def _prepare_frame(df: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"df must be a pandas DataFrame with columns {list(_REQUIRED_COLUMNS)}, got {type(df)}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"prediction table lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ConfigError("prediction table is empty: nothing to evaluate")
    out = df.reset_index(drop=True).copy()
    out["y"] = _as_labels(out["y"].to_numpy(), "column 'y'")
    out["prob"] = _as_probs(out["prob"].to_numpy(), len(out), "column 'prob'")
    if out["patient_id"].isna().any():
        rows = np.flatnonzero(out["patient_id"].isna().to_numpy())[:5].tolist()
        raise ConfigError(f"column 'patient_id' has missing values at row(s) {rows}")
    for col in ("source", "view"):
        if col in out.columns:
            out[col] = out[col].astype(object).where(out[col].notna(), "unknown").astype(str)
    return out


def evaluate_predictions(
    df: pd.DataFrame,
    threshold: float,
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    title: str = "",
    source_probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a table of predictions: metrics with patient-bootstrap CIs overall, per source and per view.

    Args:
        df: One row per image with columns ``prob`` (probability of COVID), ``y`` (0/1) and ``patient_id``;
            optional ``source``, ``view``, ``case_id``, ``source_has_both_labels`` (bool) and
            ``prob_uncalibrated`` (before temperature scaling: the report then shows ECE and the reliability
            diagram before and after).
        threshold: Decision threshold chosen beforehand (on validation), in [0, 1].
        out_dir: If given, a folder (created if missing; files inside are replaced) that receives
            ``metrics.json``, ``roc.png``, ``pr.png``, ``confusion.png``, ``calibration.png``, ``report.md`` and
            ``report.html``.
        n_boot: Bootstrap replicates per group.
        seed: Bootstrap seed (the same for every group, so results are reproducible).
        title: Title of the report.
        source_probe: A :func:`covidcxr.evaluation.probe.source_probe` result to report (and warn on).

    Returns:
        ``{"overall": {metric: {"value", "ci"}}, "per_source": {source: {...}}, "per_view": {view: {...}},
        "both_label_sources": {...} or None, "both_label_source_names": [...], "threshold", "n_images",
        "n_patients", "ece", "n_boot", "seed", "title", "source_probe", "warnings"}`` (``warnings``: see
        :func:`covidcxr.evaluation.honest.shortcut_warnings`, also logged); counts have ``"ci": None``; when ``out_dir`` is
        given also ``"files": {name: path}``. Undefined values are NaN (``null`` in ``metrics.json``).

    Raises:
        ConfigError: If columns are missing or hold invalid values, or the threshold is invalid.
    """
    t = _as_threshold(threshold)
    data = _prepare_frame(df)
    y, p = data["y"].to_numpy(), data["prob"].to_numpy()
    groups = data["patient_id"].to_numpy(dtype=object)

    def block(mask: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
        if mask is None:
            return _metric_block(y, p, t, groups, n_boot, seed)
        return _metric_block(y[mask], p[mask], t, groups[mask], n_boot, seed)

    result: dict[str, Any] = {
        "title": title,
        "threshold": t,
        "n_images": len(data),
        "n_patients": int(pd.unique(groups).size),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ece": expected_calibration_error(y, p),
        "overall": block(),
    }
    p_raw = None
    if "prob_uncalibrated" in data.columns:  # probabilities before temperature scaling, for the before/after view
        p_raw = _as_probs(data["prob_uncalibrated"].to_numpy(), len(data), "column 'prob_uncalibrated'")
        result["ece_uncalibrated"] = expected_calibration_error(y, p_raw)
    for col, key in (("source", "per_source"), ("view", "per_view")):
        result[key] = {}
        if col in data.columns:
            for value in sorted(data[col].unique()):
                result[key][value] = block((data[col] == value).to_numpy())
    both_mask, both_names = both_label_mask(data, label_col="y")
    result["both_label_source_names"] = both_names
    result["both_label_sources"] = block(both_mask) if both_mask is not None and both_mask.any() else None
    result["source_probe"] = source_probe
    result["warnings"] = shortcut_warnings(result, source_probe)
    for warning in result["warnings"]:
        logger.warning("%s%s", f"{title}: " if title else "", warning)

    if out_dir is not None:
        from covidcxr.evaluation.report import write_report

        result["files"] = write_report(Path(out_dir), result, y, p, t, p_raw)
    return result


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when ``y`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")
