"""Metric reports: tables, plots, markdown/HTML/JSON files."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from covidcxr.errors import ConfigError
from covidcxr.evaluation.metrics import METRICS, _calibration_bins, expected_calibration_error
from covidcxr.io.files import json_safe
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)

_PLOTS = ("roc.png", "pr.png", "confusion.png", "calibration.png")


# ----------------------------------------------------------------------------------------------------------------
# tables


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def _fmt_ci(entry: Mapping[str, Any]) -> str:
    text = _fmt(entry["value"])
    ci = entry.get("ci")
    if ci is not None and not any(c is None or math.isnan(float(c)) for c in ci):
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def _group_rows(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = [("overall", result["overall"])]
    if result.get("both_label_sources") is not None:
        rows.append(("sources with both labels", result["both_label_sources"]))
    rows += [(f"source: {k}", v) for k, v in result.get("per_source", {}).items()]
    rows += [(f"view: {k}", v) for k, v in result.get("per_view", {}).items()]
    return rows


def _table(rows: list[tuple[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    header = ["group", "n", "patients", "pos", *METRICS]
    body = []
    for name, blk in rows:
        counts = [_fmt(blk[c]["value"]) if c in blk else "-" for c in ("n", "n_patients", "n_pos")]
        body.append([name, *counts, *(_fmt_ci(blk[m]) for m in METRICS)])
    return header, body


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def format_metrics_table(result: Mapping[str, Any]) -> str:
    """Render an ``evaluate_predictions`` result as one compact Markdown table.

    One row per group (overall, sources with both labels, each source, each view); each metric cell reads
    ``value [lo, hi]`` with the 95 % bootstrap CI.

    Args:
        result: The dict returned by :func:`evaluate_predictions`.

    Returns:
        The Markdown table (no trailing newline), after one ``WARNING:`` line per shortcut warning.

    Raises:
        ConfigError: If ``result`` lacks the ``overall`` block.
    """
    if not isinstance(result, Mapping) or "overall" not in result:
        raise ConfigError("format_metrics_table needs the dict returned by evaluate_predictions (no 'overall' key)")
    return "\n".join([*_warning_lines(result), _markdown(*_table(_group_rows(result)))])


# ----------------------------------------------------------------------------------------------------------------
# plots and reports


def _new_figure(size: tuple[float, float] = (5.0, 4.5)) -> Any:
    # The object-oriented API renders with Agg without touching pyplot's global state or the user's backend.
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _plot_roc(path: Path, y: np.ndarray, p: np.ndarray, t: float, overall: Mapping[str, Any]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"ROC, AUC {_fmt_ci(overall['roc_auc'])}")
    sens, spec = overall["sensitivity"]["value"], overall["specificity"]["value"]
    if not (math.isnan(sens) or math.isnan(spec)):
        ax.plot([1 - spec], [sens], "o", color="C3", label=f"threshold {t:.3f}")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_pr(path: Path, y: np.ndarray, p: np.ndarray, t: float, overall: Mapping[str, Any]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    if y.sum() > 0:
        prec, rec, _ = precision_recall_curve(y, p)
        ax.step(rec, prec, where="post", lw=2, label=f"PR, AP {_fmt_ci(overall['pr_auc'])}")
    ax.axhline(y.mean(), ls="--", color="0.6", lw=1, label=f"prevalence {y.mean():.3f}")
    sens, ppv = overall["sensitivity"]["value"], overall["ppv"]["value"]
    if not (math.isnan(sens) or math.isnan(ppv)):
        ax.plot([sens], [ppv], "o", color="C3", label=f"threshold {t:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("Precision-recall curve")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_confusion(path: Path, overall: Mapping[str, Any], t: float) -> None:
    cm = np.array([[overall["tn"]["value"], overall["fp"]["value"]], [overall["fn"]["value"], overall["tp"]["value"]]])
    fig = _new_figure((4.5, 4.0))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=14, color="white" if v > cm.max() / 2 else "k")
    ax.set_xticks([0, 1], [f"pred {c}" for c in LABELS])
    ax.set_yticks([0, 1], [f"true {c}" for c in LABELS])
    ax.set_title(f"Confusion matrix (p >= {t:.3f})")
    fig.savefig(path, dpi=110)


def _plot_calibration(path: Path, y: np.ndarray, p: np.ndarray, ece: float, n_bins: int = 10,
                      p_raw: np.ndarray | None = None) -> None:
    count, mean_p, frac_pos = _calibration_bins(y, p, n_bins)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    fig = _new_figure((5.0, 5.5))
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    keep = count > 0
    ax.bar(centers[keep], frac_pos[keep], width=1 / n_bins, edgecolor="k", alpha=0.7, label="observed fraction")
    ax.plot(mean_p[keep], frac_pos[keep], "o-", color="C3", label="calibrated: mean predicted vs observed")
    title = f"Reliability diagram, ECE {ece:.3f} ({n_bins} bins)"
    if p_raw is not None:
        c_raw, m_raw, f_raw = _calibration_bins(y, p_raw, n_bins)
        ax.plot(m_raw[c_raw > 0], f_raw[c_raw > 0], "s--", color="C0", label="before temperature scaling")
        title = (f"Reliability diagram ({n_bins} bins)\nECE {expected_calibration_error(y, p_raw, n_bins):.3f} "
                 f"before, {ece:.3f} after temperature scaling")
    ax.set(ylabel="fraction positive (COVID)", ylim=(0, 1.02))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, count, width=1 / n_bins, edgecolor="k", color="0.7")
    hist.set(xlabel="predicted probability", ylabel="images", xlim=(0, 1))
    fig.savefig(path, dpi=110)




def _summary_lines(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    both = result.get("both_label_source_names") or []
    return [
        ("threshold (p >= t is COVID)", f"{result['threshold']:.4f}"),
        ("images", str(result["n_images"])),
        ("patients", str(result["n_patients"])),
        ("ECE (10 bins)", f"{result['ece']:.4f}" + (
            f" (before temperature scaling: {result['ece_uncalibrated']:.4f})"
            if result.get("ece_uncalibrated") is not None else "")),
        ("bootstrap", f"{result['n_boot']} patient-level replicates, seed {result['seed']}, 95 % percentile CI"),
        ("sources with both labels", ", ".join(both) if both else "-"),
        *_probe_line(result),
    ]


def _probe_line(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    probe = result.get("source_probe")
    if not probe:
        return []
    text = (f"ROC AUC {_fmt(probe['roc_auc'])}, accuracy {_fmt(probe['accuracy'])} (chance "
            f"{_fmt(probe['chance_accuracy'])}), {probe['n']} images, {probe['n_sources']} sources")
    return [("source probe (held-out logistic regression on embeddings)", text)]


def _warning_lines(result: Mapping[str, Any]) -> list[str]:
    return [f"WARNING: {w}" for w in result.get("warnings") or []]


def _overall_rows(overall: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name in METRICS:
        lo, hi = overall[name]["ci"]
        rows.append([name, _fmt(overall[name]["value"]), f"{_fmt(lo)} - {_fmt(hi)}"])
    for name in ("n", "n_patients", "n_pos", "tp", "fp", "tn", "fn"):
        rows.append([name, _fmt(overall[name]["value"]), ""])
    return rows


def _report_sections(result: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    sections = [("Overall", ["metric", "value", "95 % CI"], _overall_rows(result["overall"]))]
    sections.append(("All groups", *_table(_group_rows(result))))
    if result.get("both_label_sources") is not None:
        sections.append(("Sources with both labels", *_table([("both labels", result["both_label_sources"])])))
    if result.get("per_source"):
        sections.append(("Per source", *_table([(k, v) for k, v in result["per_source"].items()])))
    if result.get("per_view"):
        sections.append(("Per view", *_table([(k, v) for k, v in result["per_view"].items()])))
    return sections


def _write_markdown(path: Path, result: Mapping[str, Any]) -> None:
    title = result.get("title") or "covidcxr evaluation"
    parts = [f"# {title}", ""]
    parts += [f"> **{w}**" for w in _warning_lines(result)] + ([""] if _warning_lines(result) else [])
    parts += [f"- **{k}**: {v}" for k, v in _summary_lines(result)]
    parts.append("")
    for heading, header, body in _report_sections(result):
        parts += [f"## {heading}", "", _markdown(header, body), ""]
    parts += ["## Plots", ""]
    parts += [f"![{name[:-4]}]({name})" for name in _PLOTS]
    parts.append("")
    path.write_text("\n".join(parts), encoding="utf-8")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_CSS = (
    "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right;font-size:0.9em}td:first-child,th:first-child{text-align:left}"
    "th{background:#f0f0f0}figure{display:inline-block;margin:0.5em}img{max-width:480px}</style>"
)


def _write_html(path: Path, result: Mapping[str, Any]) -> None:
    title = html.escape(result.get("title") or "covidcxr evaluation")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        _CSS,
        f"</head><body><h1>{title}</h1>",
        *(f'<p class="warning"><b>{html.escape(w)}</b></p>' for w in _warning_lines(result)),
        "<ul>",
    ]
    parts += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in _summary_lines(result)]
    parts.append("</ul>")
    for heading, header, body in _report_sections(result):
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, body)]
    parts.append("<h2>Plots</h2>")
    for name in _PLOTS:
        # Embedded so the report is one self-contained file; the PNGs next to it are the same images.
        data = base64.b64encode((path.parent / name).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><a href="{name}"><img alt="{name[:-4]}" src="data:image/png;base64,{data}"></a>'
            f"<figcaption>{name}</figcaption></figure>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_report(out: Path, result: dict[str, Any], y: np.ndarray, p: np.ndarray, t: float,
                   p_raw: np.ndarray | None = None) -> dict[str, str]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output folder: {exc}") from exc
    overall = result["overall"]
    _plot_roc(out / "roc.png", y, p, t, overall)
    _plot_pr(out / "pr.png", y, p, t, overall)
    _plot_confusion(out / "confusion.png", overall, t)
    _plot_calibration(out / "calibration.png", y, p, result["ece"], p_raw=p_raw)
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False), encoding="utf-8")
    _write_markdown(out / "report.md", result)
    _write_html(out / "report.html", result)
    names = ("metrics.json", *_PLOTS, "report.md", "report.html")
    log.info("wrote evaluation report to %s", out)
    return {name: str(out / name) for name in names}
