"""CLI smoke tests: ``covidcxr index build | add | evaluate | info`` and ``covidcxr search`` on a tiny cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.cli import main
from covidcxr.data.manifest import read_manifest
from covidcxr.data.split import patient_split

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)
SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_index")


@pytest.fixture(scope="module")
def model_dir(root: Path, make_tiny_artifact) -> Path:
    return make_tiny_artifact(root / "model", seed=0)


@pytest.fixture(scope="module")
def manifest(synth_cohort: Path, root: Path) -> Path:
    df = patient_split(read_manifest(synth_cohort), val=0.2, test=0.3, seed=0)
    path = root / "manifest.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def train_rows(manifest: Path) -> pd.DataFrame:
    df = read_manifest(manifest)
    return df[df["split"] == "train"].reset_index(drop=True)


@pytest.fixture(scope="module")
def index_dir(model_dir: Path, manifest: Path, root: Path) -> Path:
    out = root / "index"
    rc = main(["index", "build", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out),
               "--thumbnails", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return out


def test_build_writes_index_with_thumbnails_and_model(index_dir: Path, model_dir: Path, train_rows) -> None:
    header = json.loads((index_dir / "header.json").read_text())
    assert header["count"] == len(train_rows)
    assert header["build_info"]["model_dir"] == str(model_dir.resolve()) and header["build_info"]["split"] == "train"
    assert len(list((index_dir / "thumbnails").glob("*.png"))) == len(train_rows)


def test_build_refuses_existing_index_without_force(index_dir: Path, model_dir: Path, manifest: Path, tmp_path: Path,
                                                     capsys) -> None:
    args = ["index", "build", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(index_dir),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an index")
    args[args.index("--out") + 1] = str(tmp_path)
    assert main([*args, "--force"]) == 2  # --force never replaces a folder that is not an index
    assert "is not a case index" in capsys.readouterr().err and (tmp_path / "notes.txt").is_file()


def test_search_prints_table_and_writes_sheet(index_dir: Path, train_rows, tmp_path: Path, capsys) -> None:
    image = train_rows["image"].iloc[0]
    sheet = tmp_path / "sheet.png"
    # No --model: the model folder recorded in the index header is used.
    assert main(["search", image, "--index", str(index_dir), "-k", "3", "--sheet", str(sheet), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for word in ("rank", "similarity", "patient", "label", "P(covid)"):
        assert word in out
    assert train_rows["patient_id"].iloc[0] in out
    assert sheet.is_file() and sheet.stat().st_size > 1000


def test_search_gives_no_verdict_on_a_turned_image(index_dir: Path, train_rows, tmp_path: Path, capsys) -> None:
    import numpy as np

    from covidcxr.io.files import save_png
    from covidcxr.io.image import load_image

    turned = save_png(tmp_path / "turned.png", np.rot90(load_image(train_rows["image"].iloc[0])[0]).copy())
    assert main(["search", str(turned), "--index", str(index_dir), "-k", "3", "--json", "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["prob"] is None and found["label"] == "no result" and len(found["matches"]) == 3
    assert "turned on its side or upside down" in found["no_result_reason"]
    assert main(["search", str(turned), "--index", str(index_dir), "-k", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "P(covid)" not in out and "no result" in out


def test_search_exclude_patient(index_dir: Path, model_dir: Path, train_rows, capsys) -> None:
    image, patient = train_rows["image"].iloc[0], train_rows["patient_id"].iloc[0]
    base = ["search", image, "--index", str(index_dir), "--model", str(model_dir), "-k", "4", "--json",
            "--device", "cpu"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["matches"]
    assert plain[0]["patient_id"] == patient and plain[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert main([*base, "--exclude-patient", patient]) == 0
    excluded = json.loads(capsys.readouterr().out)["matches"]
    assert len(excluded) == 4 and patient not in {m["patient_id"] for m in excluded}


def test_add_then_refuse_duplicates_and_other_model(model_dir: Path, manifest: Path, root: Path, train_rows,
                                                     capsys, make_tiny_artifact) -> None:
    out = root / "grow"
    common = ["--model", str(model_dir), "--manifest", str(manifest), "--device", "cpu", "--no-progress"]
    assert main(["index", "build", *common, "--out", str(out)]) == 0
    assert main(["index", "add", "--index", str(out), *common, "--split", "test"]) == 0
    n_test = int((read_manifest(manifest)["split"] == "test").sum())
    assert json.loads((out / "header.json").read_text())["count"] == len(train_rows) + n_test
    capsys.readouterr()
    assert main(["index", "add", "--index", str(out), *common, "--split", "test"]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["index", "add", "--index", str(out), *common, "--split", "test", "--skip-existing"]) == 0
    assert "added 0 case(s)" in capsys.readouterr().out

    other = make_tiny_artifact(root / "other", seed=1)
    assert main(["index", "add", "--index", str(out), "--model", str(other), "--manifest", str(manifest),
                 "--split", "val", "--device", "cpu", "--no-progress"]) == 2
    assert "embedding model hash" in capsys.readouterr().err


def test_evaluate_writes_metrics(model_dir: Path, manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["index", "evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out),
                 "-k", "5", "--n-boot", "20", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "P@1" in printed and "kNN AUC" in printed
    result = json.loads((out / "retrieval.json").read_text())
    assert {"precision@1", "precision@5", "map@5", "knn_auc", "network_auc"} <= set(result["overall"])
    assert "| overall |" in (out / "retrieval.md").read_text()


def test_info_and_missing_index(index_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["index", "info", str(index_dir)]) == 0
    assert "model_dir" in capsys.readouterr().out
    assert main(["index", "info", str(tmp_path / "nope")]) == 2
    assert "no such index directory" in capsys.readouterr().err
