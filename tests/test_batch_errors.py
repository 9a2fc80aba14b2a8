"""Batch commands answer per file: two unreadable files among good ones give two ``error`` rows (the file and the
reason), answers for the rest, the outputs written and exit status 1 (README: 0 all answered, 1 some inputs could not
be read, 2 the command could not run); a failed run leaves an earlier output as it was; no hint names a missing flag."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from covidcxr.cli import main
from covidcxr.data.manifest import read_manifest

torch.set_num_threads(1)  # 2 shared cores
BAD = (1, 3)  # rows replaced by unreadable files


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch_errors")


@pytest.fixture(scope="module")
def model_dir(root: Path, make_tiny_artifact) -> Path:
    return make_tiny_artifact(root / "model", seed=0)


@pytest.fixture(scope="module")
def bad_files(root: Path) -> list[Path]:
    text = root / "notes.png"
    text.write_text("this is text, not an image\n")
    truncated = root / "cut.dcm"
    truncated.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    return [text, truncated]


@pytest.fixture(scope="module")
def manifest(synth_cohort: Path, root: Path, bad_files: list[Path]) -> Path:
    df = read_manifest(synth_cohort).head(8).copy()
    df["image"] = df["image"].astype(str)
    for row, bad in zip(BAD, bad_files, strict=True):
        df.loc[row, "image"] = str(bad)
    df = df.drop(columns=["mask"])
    path = root / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def _images(manifest: Path) -> list[str]:
    return pd.read_csv(manifest)["image"].tolist()


def _check_error_rows(table: pd.DataFrame, images: list[str], reason_col: str) -> None:
    assert table["image"].astype(str).tolist() == images  # every input, in order
    errors = table[table["status"] == "error"]
    assert errors.index.tolist() == list(BAD)
    for i in BAD:
        assert images[i] in table.loc[i, reason_col] and "not a recognised image file" in table.loc[i, reason_col] \
            or "DICOM" in table.loc[i, reason_col]
    assert (table.drop(index=list(BAD))["status"] != "error").all()


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_answers_the_good_files_and_reports_the_bad(model_dir: Path, manifest: Path, tmp_path: Path, capsys,
                                                             caplog, suffix: str) -> None:
    images = _images(manifest)
    out = tmp_path / f"p{suffix}"
    assert main(["predict", *images, "--model", str(model_dir), "--out", str(out), "--device", "cpu"]) == 1
    table = pd.read_csv(out) if suffix == ".csv" else pd.DataFrame(json.loads(out.read_text()))
    _check_error_rows(table, images, "no_result_reason")
    assert table.drop(index=list(BAD))["prob_covid"].notna().any()
    assert table.loc[list(BAD), "prob_covid"].isna().all()
    captured = capsys.readouterr()
    assert "--skip-bad" not in captured.out + captured.err + caplog.text
    assert "2 of 8 input(s) could not be read" in caplog.text


def test_predict_of_good_files_exits_0(model_dir: Path, manifest: Path, tmp_path: Path) -> None:
    good = [im for i, im in enumerate(_images(manifest)) if i not in BAD]
    assert main(["predict", *good, "--model", str(model_dir), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0


def test_a_run_that_cannot_start_leaves_the_earlier_output(model_dir: Path, manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text("earlier results\n")
    assert main(["predict", *_images(manifest), "--model", str(tmp_path / "no_model"), "--out", str(out)]) == 2
    assert out.read_text() == "earlier results\n"


def test_a_run_with_errors_says_it_replaced_an_output(model_dir: Path, manifest: Path, tmp_path: Path,
                                                      caplog) -> None:
    out = tmp_path / "p.csv"
    out.write_text("earlier results\n")
    assert main(["predict", *_images(manifest), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]) == 1
    assert f"{out}: replaced by this run's table, in which 2 of 8 input(s) could not be read" in caplog.text
    assert len(pd.read_csv(out)) == 8


def test_evaluate_reports_the_bad_rows_and_scores_the_rest(model_dir: Path, manifest: Path, tmp_path: Path,
                                                           caplog) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--split", "all",
                 "--out", str(out), "--device", "cpu", "--n-boot", "20", "--num-workers", "1"]) == 1
    table = pd.read_csv(out / "predictions.csv")
    _check_error_rows(table, _images(manifest), "no_result_reason")
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 6
    assert "2 of 8 image(s) could not be read: the metrics are of the other 6" in caplog.text


def test_explain_goes_on_past_unreadable_files(model_dir: Path, manifest: Path, tmp_path: Path, capsys) -> None:
    images = _images(manifest)[:5]
    assert main(["explain", *images, "--model", str(model_dir), "--out", str(tmp_path / "x"), "--device", "cpu",
                 "--json"]) == 1
    summaries = json.loads(capsys.readouterr().out)
    assert [s["image"] for s in summaries] == images
    assert [i for i, s in enumerate(summaries) if s["status"] == "error"] == list(BAD)
    for i in BAD:
        assert images[i] in summaries[i]["no_result_reason"]
    assert all(Path(f).is_file() for s in summaries if s["status"] != "error" for f in s["files"].values())


def test_index_build_indexes_the_readable_and_lists_the_rest(model_dir: Path, manifest: Path, tmp_path: Path,
                                                             caplog) -> None:
    from covidcxr.retrieval.index import CaseIndex

    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(model_dir), "--manifest", str(manifest), "--split", "all",
                 "--out", str(out), "--device", "cpu", "--no-progress", "--num-workers", "1"]) == 1
    index = CaseIndex.load(out)
    assert len(index) == 6
    listed = index.build_info["unreadable"]
    assert [b["row"] for b in listed] == list(BAD) and [b["image"] for b in listed] == [_images(manifest)[i]
                                                                                        for i in BAD]
    assert "left out (manifest row 1)" in caplog.text


def test_index_build_can_still_stop_at_the_first_bad_file(model_dir: Path, manifest: Path, tmp_path: Path,
                                                          capsys) -> None:
    assert main(["index", "build", "--model", str(model_dir), "--manifest", str(manifest), "--split", "all",
                 "--out", str(tmp_path / "index"), "--device", "cpu", "--no-progress", "--stop-on-bad"]) == 2
    err = capsys.readouterr().err
    assert "manifest row 1" in err and "--skip-bad" not in err and "notes.png" in err
    assert not (tmp_path / "index").exists()


def test_segment_predict_reports_each_bad_file(manifest: Path, tmp_path: Path, capsys) -> None:
    from covidcxr.models.unet import build_unet, unet_config
    from covidcxr.segmentation.weights import save_unet

    tiny = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "input_size": 32}
    torch.manual_seed(0)
    save_unet(build_unet(tiny), unet_config(tiny), tmp_path / "unet")
    out = tmp_path / "seg"
    assert main(["segment", "predict", str(manifest), "--out", str(out), "--weights", str(tmp_path / "unet")]) == 1
    table = pd.read_csv(out / "segmentation.csv", keep_default_na=False)
    assert [i for i, e in enumerate(table["error"]) if e] == list(BAD)
    assert "2 unreadable" in capsys.readouterr().out


def test_the_library_default_still_raises_without_naming_a_missing_flag(model_dir: Path, manifest: Path) -> None:
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.errors import ImageError

    art = load_artifact(model_dir, "cpu")
    with pytest.raises(ImageError, match=r"manifest row 1\)$"):
        art.predict_manifest(pd.read_csv(manifest), num_workers=1)


def test_exit_rule_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| 1 | some inputs could not be read or processed" in readme
    from covidcxr.service.jobs import batch_exit_code

    assert batch_exit_code(["ok", "no_result"]) == 0 and batch_exit_code(["ok", "error"]) == 1


def test_index_evaluate_scores_the_readable_and_exits_1(model_dir: Path, synth_cohort: Path, bad_files: list[Path],
                                                        tmp_path: Path, caplog) -> None:
    from covidcxr.data.split import patient_split

    df = patient_split(read_manifest(synth_cohort), val=0.2, test=0.3, seed=0).drop(columns=["mask"])
    df["image"] = df["image"].astype(str)
    rows = [df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][0]]  # one bad file in each split
    df.loc[rows, "image"] = [str(b) for b in bad_files]
    manifest = tmp_path / "manifest.csv"
    df.to_csv(manifest, index=False)
    common = ["index", "evaluate", "--model", str(model_dir), "--manifest", str(manifest), "-k", "3", "--n-boot", "10",
              "--device", "cpu", "--no-progress", "--num-workers", "1"]
    out = tmp_path / "eval"
    assert main([*common, "--out", str(out)]) == 1
    result = json.loads((out / "retrieval.json").read_text())
    assert [(b["split"], b["image"]) for b in result["unreadable"]] == [("train", str(bad_files[0])),
                                                                         ("test", str(bad_files[1]))]
    assert result["embedding"]["images"] == int(df["split"].isin(["train", "test"]).sum()) - 2
    assert "2 image(s) could not be read" in caplog.text and "left out (test split)" in caplog.text
    assert str(bad_files[0]) in (out / "retrieval.md").read_text()
    assert main([*common, "--stop-on-bad"]) == 2

    good = tmp_path / "good.csv"
    df.drop(index=rows).to_csv(good, index=False)
    assert main([*common[:5], str(good), *common[6:]]) == 0
