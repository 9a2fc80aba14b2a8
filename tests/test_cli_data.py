"""Tests for ``covidcxr data manifest|check|split|synth`` through covidcxr.cli.main."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort written by ``covidcxr data synth``; tests must not modify it."""
    out = tmp_path_factory.mktemp("synth") / "cohort"
    assert main(["data", "synth", "--out", str(out), "--patients", "16", "--seed", "1", "--size", "64"]) == 0
    return out / "manifest.csv"


def _png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.kron(rng.random((8, 8)), np.ones((4, 4))) * 255).astype(np.uint8)).save(path)


def test_synth_writes_a_valid_cohort(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(cohort)
    assert {"image", "mask", "label", "patient_id", "source", "view"} <= set(df.columns)
    assert df["patient_id"].nunique() == 16
    assert main(["data", "check", str(cohort), "--no-duplicates"]) == 0
    out = capsys.readouterr().out
    assert "manifest OK" in out and "total" in out and "patients" in out
    assert str(len(df)) in out


def test_check_lists_all_problems_and_exits_2(tmp_path: Path, cohort: Path, capsys) -> None:
    df = pd.read_csv(cohort)
    df["image"] = [str(cohort.parent / p) for p in df["image"]]
    df["mask"] = [str(cohort.parent / p) for p in df["mask"]]
    df.loc[0, "image"] = str(tmp_path / "gone.png")
    df.loc[1, "label"] = "COVID-19"
    df.loc[2, "patient_id"] = None
    df.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["data", "check", str(tmp_path / "bad.csv")]) == 2
    captured = capsys.readouterr()
    assert "3 problem(s)" in captured.err
    for needle in ("gone.png", "unknown label 'COVID-19'", "valid labels: non_covid, covid", "empty patient_id"):
        assert needle in captured.err
    assert "total" in captured.out  # the table is still printed
    assert main(["data", "check", str(tmp_path / "missing.csv")]) == 2
    assert "manifest file not found" in capsys.readouterr().err


def test_split_command(tmp_path: Path, cohort: Path, capsys) -> None:
    out = tmp_path / "split.csv"
    args = ["data", "split", str(cohort), "--out", str(out), "--seed", "3", "--val", "0.2", "--test", "0.2"]
    assert main([*args, "--no-duplicates"]) == 0
    assert "train" in capsys.readouterr().out
    written, original = pd.read_csv(out), pd.read_csv(cohort)
    assert set(written["split"]) == {"train", "val", "test"}
    assert written.groupby("patient_id")["split"].nunique().max() == 1
    # relative paths stay relative, re-based on the new CSV's folder
    assert not any(Path(p).is_absolute() for p in written["image"])
    assert [(out.parent / p).resolve() for p in written["image"]] == [
        (cohort.parent / p).resolve() for p in original["image"]
    ]
    # the same seed gives the same split; an existing --out needs --force
    assert main([*args, "--no-duplicates"]) == 2
    assert "file exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--no-duplicates", "--force"]) == 0
    assert pd.read_csv(out)["split"].tolist() == written["split"].tolist()
    assert main(["data", "check", str(out), "--no-duplicates"]) == 0


def test_split_refuses_input_and_bad_fractions(tmp_path: Path, cohort: Path, capsys) -> None:
    before = cohort.read_bytes()
    assert main(["data", "split", str(cohort), "--out", str(cohort), "--force"]) == 2
    assert "refusing to overwrite the input manifest" in capsys.readouterr().err
    assert cohort.read_bytes() == before
    assert main(["data", "split", str(cohort), "--out", str(tmp_path / "x.csv"), "--val", "0.6", "--test", "0.5"]) == 2
    assert "leaves no patients for training" in capsys.readouterr().err
    assert main(["data", "split", str(cohort), "--out", str(tmp_path / "x.csv"), "--group-col", "site"]) == 2
    assert "column 'site' not in manifest" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_split_and_check_report_cross_split_duplicates(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        _png(tmp_path / "img" / f"{i}.png", rng)
        rows.append((f"img/{i}.png", "covid" if i % 3 == 0 else "non_covid", f"p{i}"))
    pd.DataFrame(rows, columns=["image", "label", "patient_id"]).to_csv(tmp_path / "m.csv", index=False)
    assert main(["data", "split", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.csv")]) == 0
    assert "in different splits: 0" in capsys.readouterr().out
    # plant: copy one train image over one test image of another patient
    split = pd.read_csv(tmp_path / "s.csv")
    a = split.loc[split["split"] == "train", "image"].iloc[0]
    b = split.loc[split["split"] == "test", "image"].iloc[0]
    (tmp_path / b).write_bytes((tmp_path / a).read_bytes())
    assert main(["data", "check", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "in different splits: 1" in out
    assert Path(a).name in out and Path(b).name in out


def test_manifest_command(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for name in ("covid/pat1_a.png", "covid/pat1_b.png", "non_covid/pat2_a.png", "non_covid/pat3_a.png"):
        _png(tmp_path / "folder" / name, rng)
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", str(tmp_path / "folder"), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert df.columns.tolist() == ["image", "label", "patient_id"]
    assert df["image"].tolist()[0] == "folder/non_covid/pat2_a.png"
    assert df["patient_id"].tolist() == ["pat2_a", "pat3_a", "pat1_a", "pat1_b"]
    assert "m.csv: 4 images" in capsys.readouterr().out
    assert main(["data", "manifest", str(tmp_path / "folder"), "--out", str(out), "--patient-regex", "^(pat\\d)"]) == 2
    assert "file exists" in capsys.readouterr().err
    assert pd.read_csv(out)["patient_id"].nunique() == 4  # untouched
    args = ["data", "manifest", str(tmp_path / "folder"), "--out", str(out), "--patient-regex", "^(pat\\d)", "--force"]
    assert main(args) == 0
    assert pd.read_csv(out)["patient_id"].tolist() == ["pat2", "pat3", "pat1", "pat1"]
    assert main(["data", "check", str(out), "--no-duplicates"]) == 0
    (tmp_path / "folder" / "Normal").mkdir()
    assert main(["data", "manifest", str(tmp_path / "folder"), "--out", str(tmp_path / "n.csv")]) == 2
    assert "unknown class folder(s): Normal" in capsys.readouterr().err
