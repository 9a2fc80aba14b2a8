"""CLI smoke tests: ``covidcxr train | predict | evaluate | ensemble`` on a tiny synthetic cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.cli import main

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)


@pytest.fixture(scope="module")
def cohort(synth_cohort: Path) -> Path:
    """The shared synthetic cohort (tests/conftest.py)."""
    return synth_cohort


@pytest.fixture(scope="module")
def model_dir(cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    rc = main(["train", "--manifest", str(cohort), "--out", str(out), "--arch", "resnet18", "--image-size", "32",
               "--epochs", "1", "--batch-size", "32", "--num-workers", "0", "--no-progress", "--balance", "sampler",
               "--threshold-method", "sensitivity", "--target-sensitivity", "0.8"])
    assert rc == 0
    return out


def test_train_writes_artifact(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["arch"] == "resnet18" and cfg["threshold_method"] == "sensitivity"
    assert cfg["target_sensitivity"] == 0.8
    assert cfg["training"]["settings"]["balance"] == "sampler"


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_prints_and_writes(model_dir: Path, cohort: Path, tmp_path: Path, capsys, suffix: str) -> None:
    images = sorted((cohort.parent / "images").iterdir())[:3]
    out = tmp_path / f"preds{suffix}"
    assert main(["predict", *map(str, images), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert images[0].name in printed and "threshold" in printed
    table = pd.read_csv(out) if suffix == ".csv" else pd.DataFrame(json.loads(out.read_text()))
    assert len(table) == 3
    assert table["prob_covid"].between(0, 1).all()
    assert set(table["label"]) <= {"covid", "non_covid"}


def test_predict_rejects_unknown_output_format(model_dir: Path, cohort: Path, tmp_path: Path, capsys) -> None:
    image = min((cohort.parent / "images").iterdir())
    assert main(["predict", str(image), "--model", str(model_dir), "--out", str(tmp_path / "p.xlsx")]) == 2
    assert "--out must end in .csv or .json" in capsys.readouterr().err


def test_predict_missing_model_is_a_clean_error(cohort: Path, tmp_path: Path, capsys) -> None:
    image = min((cohort.parent / "images").iterdir())
    assert main(["predict", str(image), "--model", str(tmp_path / "none")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_train_refuses_existing_out_and_bad_arch(model_dir: Path, cohort: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--manifest", str(cohort), "--out", str(model_dir), "--epochs", "1"]) == 2
    assert "output folder exists and is not empty" in capsys.readouterr().err
    assert main(["train", "--manifest", str(cohort), "--out", str(tmp_path / "x"), "--arch", "resnet9"]) == 2
    assert "unknown architecture 'resnet9'; valid:" in capsys.readouterr().err


def test_train_help_documents_ddp(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--num-nodes" in text and "--strategy ddp" in text and "--resume" in text


def test_ensemble_then_evaluate(model_dir: Path, tmp_path: Path, capsys) -> None:
    ens = tmp_path / "ens"
    assert main(["ensemble", "--models", str(model_dir), str(model_dir), "--out", str(ens), "--weighted"]) == 0
    assert "threshold" in capsys.readouterr().out
    report = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ens), "--manifest", str(model_dir / "split.csv"), "--split", "test",
                 "--out", str(report), "--device", "cpu", "--num-workers", "0", "--n-boot", "50"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    cfg = json.loads((ens / "config.json").read_text())
    assert metrics["threshold"] == pytest.approx(cfg["threshold"])
    assert (report / "predictions.csv").is_file()
