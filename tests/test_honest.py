"""The honest estimate where the user looks (predict, the page's model facts, the DICOM SR) and evaluate's warnings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from covidcxr.evaluation.honest import NO_ESTIMATE, describe_honest_estimate, honest_estimate, shortcut_warnings
from covidcxr.evaluation.metrics import evaluate_predictions

ESTIMATE = {"metric": "roc_auc_two_label_oof", "value": 0.7812, "ci": [0.701, 0.853], "n_pos": 88, "n_neg": 70}
TEXT = "out-of-fold ROC AUC on two-label rows 0.78 (95 % CI 0.70-0.85; 88 COVID-19 / 70 non-COVID)"


@pytest.mark.parametrize(("config", "expected"), [
    ({"honest_estimate": ESTIMATE}, TEXT),
    ({"honest_estimate": {**ESTIMATE, "ci": [None, None]}},
     "out-of-fold ROC AUC on two-label rows 0.78 (88 COVID-19 / 70 non-COVID)"),
    ({}, NO_ESTIMATE),
    (None, NO_ESTIMATE),
    ({"honest_estimate": {"value": "high"}}, NO_ESTIMATE),
    ({"honest_estimate": None}, NO_ESTIMATE),
])
def test_describe_honest_estimate(config, expected: str) -> None:
    assert describe_honest_estimate(config) == expected


def _shortcut_table(seed: int = 0) -> pd.DataFrame:
    """Sources A (all covid) and B (all non-covid) told apart perfectly; source C (both labels) a coin flip."""
    rng = np.random.default_rng(seed)
    parts = []
    for source, y, lo, hi in (("A", 1, 0.7, 1.0), ("B", 0, 0.0, 0.3), ("C", None, 0.3, 0.7)):
        n = 40
        labels = np.full(n, y) if y is not None else rng.integers(0, 2, n)
        parts.append(pd.DataFrame({"y": labels, "prob": rng.uniform(lo, hi, n), "source": source,
                                   "patient_id": [f"{source}{i}" for i in range(n)]}))
    return pd.concat(parts, ignore_index=True)


def test_evaluate_warns_when_the_two_label_auc_lies_far_below_the_overall(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="covidcxr.evaluation"):
        result = evaluate_predictions(_shortcut_table(), 0.5, tmp_path, n_boot=20)
    overall, two = result["overall"]["roc_auc"]["value"], result["both_label_sources"]["roc_auc"]["value"]
    assert overall - two > 0.1
    assert len(result["warnings"]) == 1
    message = result["warnings"][0]
    assert f"{overall:.3f}" in message and f"{two:.3f}" in message  # both figures named
    assert any(message in r.getMessage() for r in caplog.records)
    assert "WARNING" in (tmp_path / "report.md").read_text() and "WARNING" in (tmp_path / "report.html").read_text()
    from covidcxr.evaluation.report import format_metrics_table

    assert format_metrics_table(result).startswith("WARNING: ROC AUC on two-label rows")


def test_no_warning_without_a_gap_or_a_high_probe() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    table = pd.DataFrame({"y": y, "prob": np.clip(0.3 * y + rng.uniform(0, 0.7, 120), 0, 1),
                          "source": np.where(np.arange(120) % 2, "A", "B"), "patient_id": np.arange(120)})
    probe = {"roc_auc": 0.55, "accuracy": 0.52, "chance_accuracy": 0.5, "n": 120, "n_sources": 2}
    assert evaluate_predictions(table, 0.5, None, n_boot=20, source_probe=probe)["warnings"] == []


def test_high_source_probe_warns_naming_both_figures() -> None:
    result = evaluate_predictions(_shortcut_table(), 0.5, None, n_boot=20)
    probe = {"roc_auc": 0.97, "accuracy": 0.91, "chance_accuracy": 0.34, "n": 120, "n_sources": 3}
    warnings = shortcut_warnings(result, probe)
    assert len(warnings) == 2
    assert "source probe ROC AUC 0.970" in warnings[1] and f"{result['overall']['roc_auc']['value']:.3f}" in warnings[1]
    assert shortcut_warnings(result, {**probe, "roc_auc": 0.6}, auc_gap=1.0) == []


def test_honest_estimate_record_from_an_out_of_fold_result() -> None:
    result = evaluate_predictions(_shortcut_table(), 0.5, None, n_boot=50)
    est = honest_estimate(result)
    c = _shortcut_table()[lambda d: d["source"] == "C"]
    assert est["metric"] == "roc_auc_two_label_oof"
    assert est["n_pos"] == int(c["y"].sum()) and est["n_neg"] == int((c["y"] == 0).sum())
    assert est["value"] == pytest.approx(result["both_label_sources"]["roc_auc"]["value"])
    assert est["ci"] == pytest.approx(result["both_label_sources"]["roc_auc"]["ci"])
    single = evaluate_predictions(_shortcut_table()[lambda d: d["source"] != "C"], 0.5, None, n_boot=10)
    assert honest_estimate(single) is None  # no source holds both labels


# ------------------------------------------------------------------------------------------ where it is shown


@pytest.fixture(scope="module")
def models(make_tiny_artifact, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("honest_models")
    plain = make_tiny_artifact(root / "plain", 0)
    stated = make_tiny_artifact(root / "stated", 0)
    cfg = json.loads((stated / "config.json").read_text())
    (stated / "config.json").write_text(json.dumps({**cfg, "honest_estimate": ESTIMATE}))
    return {"plain": plain, "stated": stated}


@pytest.mark.parametrize(("which", "expected"), [("stated", TEXT), ("plain", NO_ESTIMATE)])
def test_predict_header_states_the_estimate(models, synth_cohort: Path, capsys, which: str, expected: str) -> None:
    from covidcxr.cli import main

    image = min((synth_cohort.parent / "images").glob("*.png"))
    assert main(["predict", str(image), "--model", str(models[which]), "--device", "cpu"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the table title may wrap
    assert expected in printed


@pytest.mark.parametrize(("which", "expected"), [("stated", TEXT), ("plain", NO_ESTIMATE)])
def test_model_facts_of_the_api_and_page_carry_the_estimate(models, which: str, expected: str) -> None:
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.service.case_service import CaseService

    art = load_artifact(models[which], "cpu")
    info = CaseService.model_info.fget(SimpleNamespace(artifact=art))
    assert info["honest_estimate"] == expected
    assert info["honest_estimate_record"] == (ESTIMATE if which == "stated" else None)
    page = (Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "web" / "static" / "app.js").read_text()
    assert 'rows.push(["Honest estimate", m.honest_estimate])' in page


@pytest.mark.parametrize(("which", "expected"), [("stated", TEXT), ("plain", NO_ESTIMATE)])
def test_dicom_sr_carries_the_estimate(models, tmp_path: Path, which: str, expected: str) -> None:
    import pydicom

    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.dicom import write_dicom
    from covidcxr.service.dicom_results import (
        DicomResult,
        ModelIdentity,
        build_sr,
        read_result_sr,
        reference_header,
    )

    model = ModelIdentity.from_artifact(load_artifact(models[which], "cpu"))
    assert model.honest_estimate == expected
    path = write_dicom(tmp_path / "x.dcm", draw_cxr(np.random.default_rng(0), "covid", size=64)[0], view="PA",
                       patient_id="PAT^One", study_date="20200401")
    source = pydicom.dcmread(path)
    result = DicomResult(str(source.SOPInstanceUID), str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                         "ok", 0.8, "covid", 0.5, [], 0.7, [], None)
    sr = build_sr(reference_header(source), result, model)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    params = read_result_sr(pydicom.dcmread(tmp_path / "sr.dcm"))["algorithm"]["parameters"]
    assert f"honest_estimate={expected}" in params


def test_evaluate_reports_the_source_probe(models, synth_cohort: Path, tmp_path: Path) -> None:
    from covidcxr.service import jobs

    result, _ = jobs.evaluate_manifest(synth_cohort, models["plain"], tmp_path, split="all", device="cpu",
                                       num_workers=1, n_boot=20)
    probe = result["source_probe"]
    assert probe is not None and probe["n_sources"] == 3 and probe["n"] == result["n_images"]
    assert "source probe" in (tmp_path / "report.md").read_text()
