"""The honest estimate and the shortcut warnings: what a model is worth where recognising the archive cannot help.

The honest estimate is the out-of-fold ROC AUC on rows of sources that hold both labels (``covidcxr crossval``),
with its patient-bootstrap CI; artifacts record it in ``config.json`` as ``honest_estimate``::

    {"metric": "roc_auc_two_label_oof", "value": V, "ci": [LO, HI], "n_pos": P, "n_neg": N}

:func:`describe_honest_estimate` is the one place that turns it into the sentence the page, ``predict`` and the
DICOM SR show. :func:`shortcut_warnings` says when an evaluation's overall figure flatters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

HONEST_METRIC = "roc_auc_two_label_oof"
NO_ESTIMATE = "no out-of-fold estimate recorded"
AUC_GAP_WARN = 0.10
"""Warn when the two-label ROC AUC lies more than this below the overall one."""


def honest_estimate(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``honest_estimate`` record from an out-of-fold ``evaluate_predictions`` result.

    Args:
        result: :func:`~covidcxr.evaluation.metrics.evaluate_predictions` on out-of-fold predictions.

    Returns:
        ``{"metric", "value", "ci", "n_pos", "n_neg"}``, or None without two-label rows holding both classes.
    """
    block = result.get("both_label_sources")
    if not block:
        return None
    value = block["roc_auc"]["value"]
    n, n_pos = int(block["n"]["value"]), int(block["n_pos"]["value"])
    if value is None or not math.isfinite(float(value)) or n_pos == 0 or n_pos == n:
        return None
    ci = [None if c is None or not math.isfinite(float(c)) else float(c) for c in block["roc_auc"]["ci"]]
    return {"metric": HONEST_METRIC, "value": float(value), "ci": ci, "n_pos": n_pos, "n_neg": n - n_pos}


def describe_honest_estimate(config: Mapping[str, Any] | None) -> str:
    """One line stating a model's honest estimate (from its artifact ``config``), or that none is recorded.

    Args:
        config: The artifact's ``config.json`` content (or None).

    Returns:
        E.g. ``out-of-fold ROC AUC on two-label rows 0.78 (95 % CI 0.70-0.85; 88 COVID-19 / 70 non-COVID)``.
    """
    est = (config or {}).get("honest_estimate")
    if not isinstance(est, Mapping):
        return NO_ESTIMATE
    try:
        value = float(est["value"])
    except (KeyError, TypeError, ValueError):
        log.warning("config honest_estimate has no numeric 'value' (%r); not shown", est)
        return NO_ESTIMATE
    if not math.isfinite(value):
        return NO_ESTIMATE
    what = ("out-of-fold ROC AUC on two-label rows" if est.get("metric", HONEST_METRIC) == HONEST_METRIC
            else f"out-of-fold {est.get('metric')}")
    parts = []
    ci = est.get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(c, int | float) for c in ci):
        parts.append(f"95 % CI {ci[0]:.2f}-{ci[1]:.2f}")
    if est.get("n_pos") is not None and est.get("n_neg") is not None:
        parts.append(f"{int(est['n_pos'])} COVID-19 / {int(est['n_neg'])} non-COVID")
    return f"{what} {value:.2f}" + (f" ({'; '.join(parts)})" if parts else "")


def shortcut_warnings(result: Mapping[str, Any], probe: Mapping[str, Any] | None = None,
                      *, auc_gap: float = AUC_GAP_WARN) -> list[str]:
    """Warnings that the overall figure flatters: a two-label AUC far below it, or a high source probe.

    Args:
        result: An ``evaluate_predictions`` result.
        probe: A :func:`~covidcxr.evaluation.probe.source_probe` result (or None).
        auc_gap: Largest acceptable drop of the two-label ROC AUC below the overall one (a probe warns from
            :data:`~covidcxr.evaluation.probe.PROBE_HIGH_AUC`).

    Returns:
        Messages naming both figures (empty when nothing is off).
    """
    from covidcxr.evaluation.probe import PROBE_HIGH_AUC

    out = []
    overall = result["overall"]["roc_auc"]["value"]
    both = result.get("both_label_sources")
    two = both["roc_auc"]["value"] if both else None
    if two is not None and overall is not None and math.isfinite(float(two)) and math.isfinite(float(overall)) \
            and float(overall) - float(two) > auc_gap:
        out.append(f"ROC AUC on two-label rows {float(two):.3f} lies {float(overall) - float(two):.3f} below the "
                   f"overall {float(overall):.3f}: the overall figure rewards recognising the source; trust the "
                   "two-label figure")
    if probe and probe.get("roc_auc") is not None and float(probe["roc_auc"]) >= PROBE_HIGH_AUC:
        out.append(f"source probe ROC AUC {float(probe['roc_auc']):.3f} (accuracy {float(probe['accuracy']):.3f}, "
                   f"chance {float(probe['chance_accuracy']):.3f}): the embedding tells the {probe['n_sources']} "
                   f"sources apart, so the model can score by the archive; overall ROC AUC "
                   f"{float(overall):.3f}" + (f", on two-label rows {float(two):.3f}" if two is not None else ""))
    return out
