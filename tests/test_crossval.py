"""``covidcxr crossval``: folds by patient, out-of-fold predictions for every row, report, probe, plan, ensemble."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.cli import main
from covidcxr.errors import ConfigError

torch.set_num_threads(1)  # 2 shared cores

TINY = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
        "--no-progress", "--n-boot", "50", "--patience", "0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """30 patients, 64 px, a planted site marker (sources hold both labels, prevalences differ)."""
    from covidcxr.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cv_cohort"), n_patients=30, seed=3, size=64, dicom_fraction=0.0,
                       plant_marker=0.6)


@pytest.fixture(scope="module")
def run(cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv"
    assert main(["crossval", "--manifest", str(cohort), "--out", str(out), "--folds", "3", *TINY]) == 0
    return out


def test_every_row_has_exactly_one_out_of_fold_prediction(run: Path, cohort: Path) -> None:
    manifest = pd.read_csv(cohort)
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == len(manifest)
    assert sorted(oof["row"]) == list(range(len(manifest)))
    assert (oof["image"].map(lambda p: Path(p).name).to_numpy()
            == manifest["image"].map(lambda p: Path(p).name).to_numpy()).all()
    assert oof["prob"].between(0, 1).all() and set(oof["fold"]) == {0, 1, 2}
    for col in ("label", "source", "view", "patient_id", "prob_uncalibrated", "threshold", "pred_label"):
        assert col in oof.columns


def test_no_fold_model_saw_its_held_out_rows(run: Path) -> None:
    oof = pd.read_csv(run / "oof.csv")
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1  # a patient never straddles folds
    for fold in range(3):
        used = pd.read_csv(run / f"fold_{fold}" / "split.csv")  # train + val rows of the fold's model
        held = set(oof.loc[oof["fold"] == fold, "image"])
        assert held and not held & set(used["image"])
        assert not set(oof.loc[oof["fold"] == fold, "patient_id"]) & set(used["patient_id"])
        assert set(used["split"]) == {"train", "val"}  # validation came from the training folds
        assert set(used["image"]) == set(oof.loc[oof["fold"] != fold, "image"])


def test_report_estimate_probe_and_summary(run: Path) -> None:
    summary = json.loads((run / "crossval.json").read_text())
    est = summary["honest_estimate"]
    oof = pd.read_csv(run / "oof.csv")
    assert est["metric"] == "roc_auc_two_label_oof"
    assert est["n_pos"] == int(oof["y"].sum()) and est["n_neg"] == int((oof["y"] == 0).sum())
    from sklearn.metrics import roc_auc_score

    assert est["value"] == pytest.approx(roc_auc_score(oof["y"], oof["prob"]))  # every synth source has both labels
    assert est["ci"][0] <= est["value"] <= est["ci"][1]
    probe = summary["source_probe"]
    assert probe["n_sources"] == 3 and probe["n"] == len(oof) and 0 <= probe["roc_auc"] <= 1
    assert len(summary["folds"]) == 3 and all(f["n_held_out"] > 0 for f in summary["folds"])
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert set(metrics["per_source"]) == set(oof["source"]) and set(metrics["per_view"]) == set(oof["view"])
    assert metrics["source_probe"]["roc_auc"] == pytest.approx(probe["roc_auc"])
    assert "source probe" in (run / "report" / "report.md").read_text()
    assert (run / "report" / "calibration.png").is_file()


def test_fold_models_form_an_ensemble_that_states_the_estimate(run: Path, cohort: Path) -> None:
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.manifest import read_manifest

    cfg = json.loads((run / "ensemble" / "config.json").read_text())
    summary = json.loads((run / "crossval.json").read_text())
    assert cfg["kind"] == "ensemble" and len(cfg["members"]) == 3
    assert cfg["honest_estimate"]["value"] == summary["honest_estimate"]["value"]
    art = load_artifact(run / "ensemble", "cpu")
    pred, _ = art.predict_manifest(read_manifest(cohort).head(4), num_workers=1)
    assert pred["prob"].between(0, 1).all()


def test_resume_of_a_finished_run_skips_every_fold_and_gives_the_same_result(run: Path, cohort: Path,
                                                                             caplog) -> None:
    before = pd.read_csv(run / "oof.csv")
    with caplog.at_level(logging.INFO, logger="covidcxr"):
        assert main(["crossval", "--manifest", str(cohort), "--out", str(run), "--folds", "3", *TINY,
                     "--resume"]) == 0
    assert sum("finished earlier" in r.getMessage() for r in caplog.records) == 3
    pd.testing.assert_frame_equal(pd.read_csv(run / "oof.csv"), before)


@pytest.mark.parametrize(("extra", "match"), [
    (["--epochs", "2"], r"settings\.epochs: 1 -> 2"),
    (["--seed", "1"], "seed: 0 -> 1"),
])
def test_resume_with_other_settings_is_refused(run: Path, cohort: Path, capsys, extra: list[str],
                                               match: str) -> None:
    args = ["crossval", "--manifest", str(cohort), "--out", str(run), "--folds", "3", *TINY, *extra, "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "plan.json" in err and re.search(match, err), err


def test_occupied_out_is_refused_and_nothing_is_lost(run: Path, cohort: Path, capsys) -> None:
    before = (run / "oof.csv").read_bytes()
    assert main(["crossval", "--manifest", str(cohort), "--out", str(run), "--folds", "3", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "oof.csv").read_bytes() == before


def test_leave_one_source_out(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "loso"
    assert main(["crossval", "--manifest", str(cohort), "--out", str(out), "--leave-out-col", "source", *TINY,
                 "--no-ensemble"]) == 0
    oof = pd.read_csv(out / "oof.csv")
    summary = json.loads((out / "crossval.json").read_text())
    assert len(oof) == len(pd.read_csv(cohort)) and summary["kind"] == "leave-one-source-out"
    assert oof.groupby("source")["fold"].nunique().max() == 1 and oof["fold"].nunique() == 3
    assert set(oof["held_out"]) == {f"source={s}" for s in oof["source"].unique()}
    assert summary["source_probe"] is None  # each fold model saw one source only: no probe within a fold
    assert not (out / "ensemble").exists()


def test_resume_without_a_plan_is_refused(cohort: Path, tmp_path: Path) -> None:
    from covidcxr.classification.crossval import run_crossval

    with pytest.raises(ConfigError, match="nothing to resume"):
        run_crossval(cohort, tmp_path / "cv", folds=2, resume=True, arch="resnet18", num_workers=0)


def test_too_many_folds_is_refused(cohort: Path, tmp_path: Path) -> None:
    from covidcxr.classification.crossval import run_crossval
    from covidcxr.errors import SplitError

    with pytest.raises(SplitError, match="cannot fill 100 folds"):
        run_crossval(cohort, tmp_path / "cv", folds=100, arch="resnet18", num_workers=0)
    assert not (tmp_path / "cv").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------ fold tables


def _table(n_patients: int = 12) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for k in range(2):
            rows.append({"image": f"p{p}_{k}.png", "patient_id": f"P{p}", "label": ["covid", "non_covid"][p % 2],
                         "source": ["a", "b"][(p // 2) % 2], "site": ["s1", "s2", "s3"][p % 3]})
    return pd.DataFrame(rows)


def test_fold_table_holds_out_linked_rows_and_validates_on_training_folds() -> None:
    from covidcxr.classification.config import TrainConfig
    from covidcxr.classification.crossval import assign_folds, fold_table

    df = _table()
    df.loc[0, "site"] = "s3"  # patient P0 now has one image at s1 and one at s3: leave-one-site-out must not leak
    folds, names = assign_folds(df, 0, leave_out_col="site")
    assert names == ["site=s1", "site=s2", "site=s3"]
    cfg = TrainConfig(arch="resnet18", num_workers=0)
    for fold in range(3):
        table = fold_table(df, folds, fold, cfg, seed=0)
        held = df[folds == fold]
        assert not set(table["patient_id"]) & set(held["patient_id"])
        assert set(table["split"]) == {"train", "val"}


def test_kfold_assignment_keeps_patients_together_and_is_seeded() -> None:
    from covidcxr.classification.crossval import assign_folds

    df = _table(20)
    a, _ = assign_folds(df, 4, seed=1)
    b, _ = assign_folds(df, 4, seed=1)
    assert (a == b).all() and set(a) == {0, 1, 2, 3}
    assert pd.Series(a).groupby(df["patient_id"]).nunique().max() == 1


# ------------------------------------------------------------------------------------------------ source probe


def test_probe_is_never_scored_on_rows_it_was_fitted_on() -> None:
    from covidcxr.evaluation.probe import source_probe

    rng = np.random.default_rng(0)
    n = 120
    patients = np.repeat(np.arange(n // 2), 2)
    emb = rng.normal(size=(n // 2, 64))[patients]  # one random vector per patient, shared by its two images
    sources = np.array(["a", "b"])[rng.integers(0, 2, n // 2)][patients]  # unrelated to the vector
    probe = source_probe(emb, sources, patients, seed=0)
    # A head scored on its own training rows (or on a patient's other image) would memorise them: AUC ~1.
    assert probe["roc_auc"] < 0.75 and probe["n"] == n


def test_probe_finds_source_information() -> None:
    from covidcxr.evaluation.probe import source_probe

    rng = np.random.default_rng(1)
    sources = np.repeat(["a", "b", "c"], 40)
    emb = rng.normal(size=(120, 16))
    emb[:, 0] += np.repeat([0.0, 3.0, 6.0], 40)
    probe = source_probe(emb, sources, np.arange(120), blocks=np.tile([0, 1], 60))
    assert probe["roc_auc"] > 0.95 and probe["accuracy"] > 0.8 and probe["chance_accuracy"] == pytest.approx(1 / 3)
    assert probe["n_blocks"] == 2
    assert source_probe(emb, ["a"] * 120, np.arange(120)) is None


def test_probe_refuses_mismatched_inputs() -> None:
    from covidcxr.evaluation.probe import source_probe

    with pytest.raises(ConfigError, match="do not match"):
        source_probe(np.zeros((4, 2)), ["a", "b", "a"], [1, 2, 3])
