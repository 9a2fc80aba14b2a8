"""The shipped classifier's honest estimate is reproduced from the out-of-fold predictions it ships with."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from covidcxr.classification.artifact import shipped_model_dir
from covidcxr.evaluation.calibration import apply_temperature
from covidcxr.evaluation.honest import HONEST_METRIC, honest_estimate
from covidcxr.evaluation.metrics import evaluate_predictions


@pytest.fixture(scope="module")
def shipped() -> tuple[dict, pd.DataFrame]:
    folder = shipped_model_dir()
    config = json.loads((folder / "config.json").read_text())
    oof = pd.read_csv(folder / config["honest_estimate"]["predictions"])
    return config, oof


def test_every_development_image_has_one_out_of_fold_prediction(shipped) -> None:
    config, oof = shipped
    assert oof["image"].is_unique and len(oof) == config["training"]["n_images"]
    assert oof["fold"].nunique() == config["honest_estimate"]["folds"]
    # Folds never split a patient.
    assert (oof.groupby("patient_id")["fold"].nunique() == 1).all()
    # The stored probabilities are the stored margins through the stored temperature.
    np.testing.assert_allclose(oof["prob"], apply_temperature(oof["margin"].to_numpy(), config["temperature"]),
                               rtol=1e-9, atol=1e-12)


def test_honest_estimate_and_operating_point_are_reproduced(shipped) -> None:
    config, oof = shipped
    est = config["honest_estimate"]
    assert est["metric"] == HONEST_METRIC
    result = evaluate_predictions(oof, config["threshold"], None, n_boot=est["n_boot"], seed=0)
    again = honest_estimate(result)
    assert again["value"] == pytest.approx(est["value"], abs=1e-12)
    assert again["ci"] == pytest.approx(est["ci"], abs=1e-12)
    assert (again["n_pos"], again["n_neg"]) == (est["n_pos"], est["n_neg"])
    two = result["both_label_sources"]
    assert two["sensitivity"]["value"] == pytest.approx(est["sensitivity_at_threshold"])
    assert two["specificity"]["value"] == pytest.approx(est["specificity_at_threshold"])
    # The threshold was chosen on the out-of-fold two-label rows: it reaches the target sensitivity there.
    assert two["sensitivity"]["value"] >= config["target_sensitivity"]
    assert config["calibration_rows"] == "out_of_fold" and config["threshold_rows"] == "both_labels"


def test_model_card_leads_with_the_reproduced_figures(shipped) -> None:
    config, _ = shipped
    card = (shipped_model_dir() / "MODEL_CARD.md").read_text()
    est = config["honest_estimate"]
    first = card.split("## ")[1]  # the first section
    assert first.lower().startswith("the honest estimate")
    assert f"{est['value']:.3f}" in first and f"{est['ci'][0]:.3f}" in first and f"{est['ci'][1]:.3f}" in first
    assert re.search(rf"sensitivity {est['sensitivity_at_threshold']:.3f}", first)
    assert re.search(rf"specificity {est['specificity_at_threshold']:.3f}", first)
    # The overall figure comes after, with why it flatters.
    assert "flatters" in first and first.index("flatters") > first.index(f"{est['value']:.3f}")


def test_input_gate_threshold_is_the_out_of_fold_quantile(shipped) -> None:
    config, oof = shipped
    assert config["ood"]["threshold"] == pytest.approx(float(np.quantile(oof["ood_distance"], 0.995)))
