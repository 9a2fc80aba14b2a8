"""The operating point of a trained classifier: temperature scaling and the decision threshold, on validation.

Used by training and by the shipped model's build on out-of-fold predictions (``tools/ship_model.py``), so both
choose them the same way: temperature fitted on validation margins (NLL), threshold by the configured method on
the validation rows of sources holding both labels when each class has enough of them (hard negatives), else all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.manifest import as_flags
from covidcxr.evaluation.calibration import apply_temperature, fit_temperature, nll
from covidcxr.evaluation.metrics import expected_calibration_error, safe_auc
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)



MIN_THRESHOLD_ROWS_PER_CLASS = 5


def choose_val_threshold(val_pred: pd.DataFrame, cfg: Any, choose: Any = None) -> tuple[float, str]:
    """Threshold on validation: on two-label-source rows (hard negatives) when each class has enough, else all.

    Validation negatives from single-label archives (clean JSRT/RSNA films) are easy; a threshold chosen on them
    buys sensitivity with specificity that does not hold on the harder negatives of a mixed hospital archive.
    """
    if choose is None:
        from covidcxr.evaluation.metrics import choose_threshold as choose
    y, p = val_pred["y"].to_numpy(), val_pred["prob"].to_numpy()
    both = as_flags(val_pred["source_has_both_labels"])
    counts = np.bincount(y[both], minlength=2) if both.any() else np.zeros(2, dtype=int)
    if cfg.threshold_rows == "both_labels" and not both.all():
        if counts.min() >= MIN_THRESHOLD_ROWS_PER_CLASS:
            return choose(y[both], p[both], cfg.threshold_method, cfg.target_sensitivity), "both_labels"
        log.warning("only %d/%d validation rows of each class on two-label sources (< %d): threshold chosen on all "
                    "validation rows", counts[0], counts[1], MIN_THRESHOLD_ROWS_PER_CLASS)
    return choose(y, p, cfg.threshold_method, cfg.target_sensitivity), "all"



@dataclass
class OperatingPoint:
    """Temperature, threshold and the validation figures they come with (see :func:`fit_operating_point`)."""

    temperature: float
    threshold: float
    threshold_rows: str
    val_auc: float
    val_auc_both: float
    calibration: dict[str, Any] = field(default_factory=dict)


def fit_operating_point(val_pred: pd.DataFrame, cfg: Any) -> OperatingPoint:
    """Fit the temperature and choose the threshold on validation predictions; updates ``val_pred`` in place.

    Args:
        val_pred: Validation rows with ``y``, ``margin`` (logit_covid - logit_non_covid) and
            ``source_has_both_labels``; ``prob_uncalibrated``, ``prob`` and ``pred_label`` are (re)written.
        cfg: Settings with ``calibrate``, ``threshold_method``, ``target_sensitivity`` and ``threshold_rows``
            (a :class:`~covidcxr.classification.train.TrainConfig`).

    Returns:
        The :class:`OperatingPoint`.
    """
    y, margin = val_pred["y"].to_numpy(), val_pred["margin"].to_numpy(dtype=np.float64)
    two_classes = np.unique(y).size == 2
    temperature = fit_temperature(margin, y) if cfg.calibrate and two_classes else 1.0
    val_pred["prob_uncalibrated"] = apply_temperature(margin, 1.0)
    val_pred["prob"] = apply_temperature(margin, temperature)
    calibration: dict[str, Any] = {"temperature": temperature, "val_nll_before": None, "val_nll_after": None}
    if cfg.calibrate and two_classes:
        calibration.update(val_nll_before=nll(margin, y, 1.0), val_nll_after=nll(margin, y, temperature))
    if two_classes:
        calibration["val_ece_before"] = expected_calibration_error(y, val_pred["prob_uncalibrated"].to_numpy())
        calibration["val_ece_after"] = expected_calibration_error(y, val_pred["prob"].to_numpy())
    from covidcxr.evaluation.metrics import choose_threshold  # looked up per call (tests spy on it)

    threshold, rows = choose_val_threshold(val_pred, cfg, choose_threshold)
    prob = val_pred["prob"].to_numpy()
    both = as_flags(val_pred["source_has_both_labels"])
    point = OperatingPoint(temperature=float(temperature), threshold=float(threshold), threshold_rows=rows,
                           val_auc=safe_auc(y, prob),
                           val_auc_both=safe_auc(y[both], prob[both]) if both.any() else float("nan"),
                           calibration=calibration)
    val_pred["pred_label"] = np.where(prob >= point.threshold, LABELS[1], LABELS[0])
    log.info("validation ROC AUC %.4f (two-label sources %.4f); temperature %.3f; threshold %.4f (%s on %s rows)",
             point.val_auc, point.val_auc_both, point.temperature, point.threshold, cfg.threshold_method, rows)
    return point
