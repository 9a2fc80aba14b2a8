"""Tests for covidcxr.evaluate: hand-computed metrics, threshold choice, patient bootstrap, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError
from covidcxr.evaluation.metrics import (
    METRICS,
    _weighted_metrics,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    expected_calibration_error,
)
from covidcxr.evaluation.report import format_metrics_table

# Hand-made prediction set: 4 COVID (y=1), 6 non-COVID, threshold 0.5 (positive when p >= 0.5).
HAND_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
HAND_P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.5])
HAND_T = 0.5
# positives 0.9, 0.8, 0.6 >= 0.5 -> TP = 3; 0.3 -> FN = 1
# negatives 0.7 and 0.5 (equal to the threshold counts as positive) -> FP = 2; 0.4, 0.2, 0.1, 0.05 -> TN = 4
# ROC AUC = P(p_pos > p_neg) over 4 x 6 = 24 pairs; negatives below each positive:
#   0.9 -> 6, 0.8 -> 6, 0.6 -> 5 (all but 0.7), 0.3 -> 3 (0.2, 0.1, 0.05): 20 / 24
# Average precision, ranking 0.9P 0.8P 0.7N 0.6P 0.5N 0.4N 0.3P: precision at each positive 1/1, 2/2, 3/4, 4/7
HAND_EXPECTED = {
    "tp": 3,
    "fn": 1,
    "fp": 2,
    "tn": 4,
    "n": 10,
    "n_pos": 4,
    "accuracy": (3 + 4) / 10,  # 0.7
    "sensitivity": 3 / 4,  # 0.75
    "specificity": 4 / 6,  # 0.6667
    "ppv": 3 / (3 + 2),  # 0.6
    "npv": 4 / (4 + 1),  # 0.8
    "f1": 2 * 3 / (2 * 3 + 2 + 1),  # 6 / 9 = 0.6667
    "roc_auc": 20 / 24,  # 0.8333
    "pr_auc": (1 / 1 + 2 / 2 + 3 / 4 + 4 / 7) / 4,  # 0.8304
}


def _cohort(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Synthetic predictions: 1-3 images per patient, informative but imperfect probabilities."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = int(rng.random() < 0.45)
        source = ["hospital_a", "hospital_b", "covid_only"][i % 3]
        if source == "covid_only":
            label = 1
        for j in range(int(rng.integers(1, 4))):
            prob = float(np.clip(rng.normal(0.3 + 0.4 * label, 0.18), 0, 1))
            rows.append(
                {
                    "prob": prob,
                    "y": label,
                    "patient_id": f"P{i:03d}",
                    "source": source,
                    "view": ["PA", "AP", None][j % 3],
                    "case_id": f"P{i:03d}_{j}",
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# point metrics


def test_binary_metrics_match_hand_computed_values():
    got = binary_metrics(HAND_Y, HAND_P, HAND_T)
    assert set(got) == set(HAND_EXPECTED)
    for name, expected in HAND_EXPECTED.items():
        assert got[name] == pytest.approx(expected, abs=1e-12), name


def test_binary_metrics_accept_lists_and_bools():
    got = binary_metrics(HAND_Y.astype(bool).tolist(), HAND_P.tolist(), HAND_T)
    assert got["tp"] == 3 and got["roc_auc"] == pytest.approx(20 / 24)


@pytest.mark.parametrize("label", [0, 1])
def test_binary_metrics_one_class_gives_nan_not_error(label):
    y = np.full(5, label)
    p = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    got = binary_metrics(y, p, 0.5)
    assert math.isnan(got["roc_auc"])
    if label == 0:
        assert math.isnan(got["sensitivity"]) and math.isnan(got["pr_auc"])
        assert got["npv"] == 1.0  # 0.1, 0.3 predicted negative and truly negative
        assert got["specificity"] == pytest.approx(2 / 5)  # 0.1, 0.3 below 0.5
    else:
        assert math.isnan(got["specificity"]) and got["pr_auc"] == pytest.approx(1.0)
        assert got["sensitivity"] == pytest.approx(3 / 5)  # 0.5, 0.7, 0.9


def test_ppv_without_predicted_positives_is_nan():
    got = binary_metrics(HAND_Y, HAND_P, 0.95)
    assert got["tp"] + got["fp"] == 0
    assert math.isnan(got["ppv"])
    assert got["f1"] == 0.0  # 2*0 / (0 + 0 + 4): defined, just zero


def test_expected_calibration_error_hand_computed():
    # One image per bin, so ECE = mean |y - p| = (0.1+0.2+0.4+0.7 + 0.7+0.4+0.2+0.1+0.05+0.5) / 10 = 0.335
    assert expected_calibration_error(HAND_Y, HAND_P) == pytest.approx(0.335)
    # bin 1 holds p=0.15 (y 0) and 0.15 (y 1): |0.5 - 0.15| * 2/4 = 0.175; bin 8: |1 - 0.85| * 1/4 = 0.0375;
    # bin 9 (p = 1.0 joins the last bin): |1 - 1.0| * 1/4 = 0 -> 0.2125
    assert expected_calibration_error([0, 1, 1, 1], [0.15, 0.15, 0.85, 1.0]) == pytest.approx(0.2125)
    # A perfectly calibrated set has ECE 0.
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# thresholds

# Toy set: positives at 0.3, 0.6, 0.7, 0.8; negatives at 0.1, 0.2, 0.4, 0.5.
TOY_Y = [0, 0, 1, 0, 0, 1, 1, 1]
TOY_P = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_youden_threshold_hand_computed():
    # J = TPR - FPR at each threshold t (positive when p >= t):
    #   0.8: 1/4-0 = .25   0.7: 2/4-0 = .50   0.6: 3/4-0 = .75   0.5: 3/4-1/4 = .50
    #   0.4: 3/4-2/4 = .25   0.3: 4/4-2/4 = .50   0.2: 1-3/4 = .25   0.1: 1-1 = 0   -> best t = 0.6
    assert choose_threshold(TOY_Y, TOY_P) == pytest.approx(0.6)


def test_youden_ties_take_highest_threshold():
    # t=0.8: J = 1/2 - 0 = .5; t=0.6: 1/2 - 1/2 = 0; t=0.4: 1 - 1/2 = .5 -> tie, the higher 0.8 wins
    assert choose_threshold([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.8)


@pytest.mark.parametrize(("target", "expected"), [(1.0, 0.3), (0.75, 0.6), (0.6, 0.6), (0.5, 0.7), (0.25, 0.8)])
def test_sensitivity_threshold_is_highest_reaching_target(target, expected):
    t = choose_threshold(TOY_Y, TOY_P, method="sensitivity", target_sensitivity=target)
    assert t == pytest.approx(expected)
    assert binary_metrics(TOY_Y, TOY_P, t)["sensitivity"] >= target


def test_chosen_threshold_reproduces_roc_point():
    df = _cohort()
    t = choose_threshold(df["y"], df["prob"])
    m = binary_metrics(df["y"], df["prob"], t)
    best = max(
        binary_metrics(df["y"], df["prob"], c)["sensitivity"] + binary_metrics(df["y"], df["prob"], c)["specificity"]
        for c in np.unique(df["prob"])
    )
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "f1"}, r"method must be one of .*'f1'"),
        ({"method": "sensitivity"}, r"needs target_sensitivity"),
        ({"method": "sensitivity", "target_sensitivity": 1.5}, r"target_sensitivity must be .*1\.5"),
        ({"method": "sensitivity", "target_sensitivity": 0}, r"target_sensitivity must be .*0"),
        ({"target_sensitivity": 0.9}, r"only used with method='sensitivity'"),
    ],
)
def test_choose_threshold_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        choose_threshold(TOY_Y, TOY_P, **kwargs)


def test_choose_threshold_needs_both_classes():
    with pytest.raises(ConfigError, match=r"both classes.*only class 1"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])


@pytest.mark.parametrize(
    ("y", "p", "t", "match"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], 0.5, r"only 0 and 1, got \[2\.0\]"),
        ([0, 1, 1], [0.1, 0.2], 0.5, r"same length, got 3 and 2"),
        ([0, 1], [0.1, float("nan")], 0.5, r"finite probabilities.*index \[1\]"),
        ([0, 1], [0.1, 1.2], 0.5, r"\[0, 1\], got \[1\.2\]"),
        ([], [], 0.5, r"empty"),
        ([0, 1], [0.1, 0.9], 1.5, r"threshold must be .*1\.5"),
        ([0, 1], [0.1, 0.9], "high", r"threshold must be .*'high'"),
        ([[0, 1]], [[0.1, 0.9]], 0.5, r"1-D"),
    ],
)
def test_binary_metrics_rejects_bad_input(y, p, t, match):
    with pytest.raises(ConfigError, match=match):
        binary_metrics(y, p, t)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.2, 0.8], n_bins=0)


# ---------------------------------------------------------------------------------------------------------------
# bootstrap


def test_weighted_metrics_equal_metrics_on_materialised_resample():
    # The vectorised bootstrap must give exactly what binary_metrics gives on the repeated images, ties included.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    p = np.round(rng.random(40), 1)  # rounding creates tied scores
    w = rng.integers(0, 4, size=(25, 40)).astype(float)
    got = _weighted_metrics(y, p, 0.5, w)
    for b in range(w.shape[0]):
        reps = w[b].astype(int)
        want = binary_metrics(np.repeat(y, reps), np.repeat(p, reps), 0.5)
        for name in METRICS:
            assert got[name][b] == pytest.approx(want[name], abs=1e-12, nan_ok=True), (b, name)


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    df = _cohort(n_patients=90)
    y, p, g = df["y"].to_numpy(), df["prob"].to_numpy(), df["patient_id"].to_numpy()
    t = 0.5
    point = binary_metrics(y, p, t)
    ci = bootstrap_ci(y, p, t, g, n_boot=500, seed=7)
    assert set(ci) == set(METRICS)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, name
        assert hi - lo > 0, name
    assert bootstrap_ci(y, p, t, g, n_boot=500, seed=7) == ci
    assert bootstrap_ci(y, p, t, g, n_boot=500, seed=8) != ci


def test_bootstrap_moves_a_patients_images_together():
    # All images from one patient: every patient-level replicate is the original data, so the CI collapses
    # onto the point estimate; resampling images instead gives a real spread.
    y, p = HAND_Y, HAND_P
    point = binary_metrics(y, p, HAND_T)
    ci = bootstrap_ci(y, p, HAND_T, groups=["same"] * y.size, n_boot=200, seed=0)
    for name in METRICS:
        assert ci[name] == pytest.approx((point[name], point[name])), name
    image_ci = bootstrap_ci(y, p, HAND_T, groups=None, n_boot=200, seed=0)
    assert image_ci["accuracy"][1] - image_ci["accuracy"][0] > 0.2


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_clustered_images():
    # 20 patients with 10 identical images each: 20 independent units, not 200, so the patient CI must be
    # about sqrt(10) ~ 3x wider than the (wrong) image-level one.
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 10)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    y, p = np.repeat(labels, 10), np.repeat(probs, 10)
    patients = np.repeat(np.arange(20), 10)
    by_patient = bootstrap_ci(y, p, 0.5, patients, n_boot=1000, seed=0)
    by_image = bootstrap_ci(y, p, 0.5, None, n_boot=1000, seed=0)
    for name in ("accuracy", "roc_auc"):
        width_patient = by_patient[name][1] - by_patient[name][0]
        width_image = by_image[name][1] - by_image[name][0]
        assert width_patient > 2 * width_image, (name, width_patient, width_image)


def test_bootstrap_skips_undefined_replicates():
    # One positive patient out of 30: many replicates draw no positive (sensitivity undefined) and are skipped.
    y = np.array([1] + [0] * 29)
    p = np.linspace(0.9, 0.0, 30)
    ci = bootstrap_ci(y, p, 0.5, np.arange(30), n_boot=300, seed=0)
    assert ci["sensitivity"] == pytest.approx((1.0, 1.0))
    assert np.isfinite(ci["roc_auc"]).all()


def test_bootstrap_with_one_class_gives_nan_intervals():
    ci = bootstrap_ci(np.zeros(6, int), np.linspace(0, 1, 6), 0.5, np.arange(6), n_boot=50, seed=0)
    assert all(math.isnan(v) for v in ci["sensitivity"] + ci["roc_auc"] + ci["pr_auc"])
    assert not math.isnan(ci["specificity"][0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_boot": 0}, r"n_boot must be a positive integer, got 0"),
        ({"n_boot": 10.5}, r"n_boot must be a positive integer, got 10\.5"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\), got 1\.5"),
        ({"groups": [1, 2]}, r"one patient id per prediction \(10\)"),
        ({"groups": [1, 2, 3, None, 5, 6, 7, 8, 9, 10]}, r"must not be missing.*index \[3\]"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    args = {"groups": np.arange(10), **kwargs}
    with pytest.raises(ConfigError, match=match):
        bootstrap_ci(HAND_Y, HAND_P, HAND_T, **args)


# ---------------------------------------------------------------------------------------------------------------
# evaluate_predictions, tables and reports


def test_evaluate_predictions_hand_set_values():
    df = pd.DataFrame({"prob": HAND_P, "y": HAND_Y, "patient_id": [f"p{i // 2}" for i in range(10)]})
    res = evaluate_predictions(df, HAND_T, n_boot=100)
    for name, expected in HAND_EXPECTED.items():
        assert res["overall"][name]["value"] == pytest.approx(expected), name
    assert res["overall"]["tp"]["ci"] is None
    assert res["n_images"] == 10 and res["n_patients"] == 5 and res["overall"]["n_patients"]["value"] == 5
    assert res["ece"] == pytest.approx(0.335)
    assert res["per_source"] == {} and res["per_view"] == {} and res["both_label_sources"] is None


def test_evaluate_predictions_groups_and_files(tmp_path):
    df = _cohort()
    out = tmp_path / "new" / "eval"  # missing parents are created
    res = evaluate_predictions(df, 0.5, out_dir=out, n_boot=200, seed=0, title="Synthetic <test>")

    assert set(res["per_source"]) == {"covid_only", "hospital_a", "hospital_b"}
    assert set(res["per_view"]) == {"AP", "PA", "unknown"}  # missing view reported as 'unknown'
    n_a = int((df["source"] == "hospital_a").sum())
    assert res["per_source"]["hospital_a"]["n"]["value"] == n_a
    # A single-label source has undefined AUC and specificity: NaN, not a crash.
    assert math.isnan(res["per_source"]["covid_only"]["roc_auc"]["value"])
    # Sources with both labels are pooled, the COVID-only source left out.
    assert res["both_label_source_names"] == ["hospital_a", "hospital_b"]
    both = df[df["source"] != "covid_only"]
    assert res["both_label_sources"]["n"]["value"] == len(both)
    assert res["both_label_sources"]["roc_auc"]["value"] == pytest.approx(
        binary_metrics(both["y"], both["prob"], 0.5)["roc_auc"]
    )
    lo, hi = res["overall"]["roc_auc"]["ci"]
    assert lo <= res["overall"]["roc_auc"]["value"] <= hi

    names = {"metrics.json", "roc.png", "pr.png", "confusion.png", "calibration.png", "report.md", "report.html"}
    assert {p.name for p in out.iterdir()} == names
    assert set(res["files"]) == names
    for png in ("roc.png", "pr.png", "confusion.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}, which is not JSON")

    saved = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    assert saved["per_source"]["covid_only"]["roc_auc"]["value"] is None
    assert saved["overall"]["accuracy"]["value"] == pytest.approx(res["overall"]["accuracy"]["value"])
    assert saved["threshold"] == 0.5 and "files" not in saved

    md = (out / "report.md").read_text()
    assert md.startswith("# Synthetic <test>")
    for text in ("## Per source", "## Per view", "hospital_b", "![roc](roc.png)", "calibration.png", "ECE"):
        assert text in md
    page = (out / "report.html").read_text()
    assert "Synthetic &lt;test&gt;" in page and "<table>" in page
    assert page.count("data:image/png;base64,") == 4

    # Rerunning into the same folder replaces the files.
    evaluate_predictions(df, 0.6, out_dir=out, n_boot=50)
    assert json.loads((out / "metrics.json").read_text())["threshold"] == 0.6


@pytest.mark.parametrize("flag", [[True, False], ["True", "False"], [1, 0]])
def test_both_label_sources_flag_column_wins(flag):
    df = _cohort()
    # The flag says hospital_a only (e.g. computed on the whole manifest, not just this split).
    df["source_has_both_labels"] = np.where(df["source"] == "hospital_a", flag[0], flag[1])
    res = evaluate_predictions(df, 0.5, n_boot=20)
    assert res["both_label_source_names"] == ["hospital_a"]
    assert res["both_label_sources"]["n"]["value"] == int((df["source"] == "hospital_a").sum())


def test_format_metrics_table():
    res = evaluate_predictions(_cohort(), 0.5, n_boot=50)
    table = format_metrics_table(res)
    lines = table.splitlines()
    assert lines[0].startswith("| group | n | patients | pos | accuracy")
    assert set(lines[1]) <= set("|-")
    # overall + both-label pool + 3 sources + 3 views
    assert len(lines) == 2 + 1 + 1 + 3 + 3
    assert lines[2].startswith("| overall |")
    lo, hi = res["overall"]["accuracy"]["ci"]
    assert f"{res['overall']['accuracy']['value']:.3f} [{lo:.3f}, {hi:.3f}]" in lines[2]
    assert "n/a" in table  # covid_only source has no specificity
    with pytest.raises(ConfigError, match="overall"):
        format_metrics_table({"per_source": {}})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.drop(columns=["patient_id"]), r"lacks column\(s\) \['patient_id'\]"),
        (lambda d: d.assign(y=d["y"] * 2), r"column 'y' must contain only 0 and 1"),
        (lambda d: d.assign(prob=d["prob"].where(d.index != 2)), r"column 'prob' .*index \[2\]"),
        (lambda d: d.assign(patient_id=d["patient_id"].where(d.index != 4)), r"'patient_id' .*row\(s\) \[4\]"),
        (lambda d: d.iloc[:0], r"empty"),
        (lambda d: d.assign(source_has_both_labels="maybe"), r"must be boolean, got \['maybe'\]"),
    ],
)
def test_evaluate_predictions_rejects_bad_tables(change, match):
    with pytest.raises(ConfigError, match=match):
        evaluate_predictions(change(_cohort(n_patients=10)), 0.5, n_boot=10)


def test_evaluate_predictions_rejects_bad_threshold():
    with pytest.raises(ConfigError, match=r"threshold must be .*-0\.1"):
        evaluate_predictions(_cohort(n_patients=10), -0.1)


def test_evaluate_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, covidcxr.evaluation.metrics, covidcxr.evaluation.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
