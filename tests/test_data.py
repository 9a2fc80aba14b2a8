"""Tests for covidcxr.data: manifests, validation, patient-level split, near-duplicates, summaries."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.data.duplicates import find_near_duplicates
from covidcxr.data.manifest import manifest_from_folder, read_manifest, summarize, validate_manifest, write_manifest
from covidcxr.data.split import patient_groups, patient_split, split_balance
from covidcxr.errors import ConfigError, ManifestError, SplitError
from covidcxr.vocab import LABELS, SPLITS


def _png(path: Path, rng: np.random.Generator) -> Path:
    """A random 32x32 block image: distinct images correlate weakly, so only planted copies look alike."""
    image = np.kron(rng.random((8, 8)), np.ones((4, 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).astype(np.uint8)).save(path)
    return path


def _write_cohort(root: Path, n_patients: int = 8, seed: int = 0, **extra: list) -> Path:
    """Write ``n_patients`` PNGs (alternating labels) and a manifest with relative paths; return the CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        rel = f"images/p{i}.png"
        _png(root / rel, rng)
        rows.append({"image": rel, "label": LABELS[i % 2], "patient_id": f"p{i}"})
    df = pd.DataFrame(rows)
    for col, values in extra.items():
        df[col] = values
    csv = root / "manifest.csv"
    df.to_csv(csv, index=False)
    return csv


def _table(n_patients: int, covid_share: float, seed: int, max_images: int = 3) -> pd.DataFrame:
    """An in-memory manifest (no files): the split never opens images."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n_patients) < covid_share, "covid", "non_covid")
    rows = [
        (f"/data/p{p}_{k}.png", labels[p], f"p{p}")
        for p in range(n_patients)
        for k in range(rng.integers(1, max_images + 1))
    ]
    return pd.DataFrame(rows, columns=["image", "label", "patient_id"])


# ---------------------------------------------------------------------------------------------------------
# read / validate
# ---------------------------------------------------------------------------------------------------------


def test_read_manifest_resolves_relative_paths(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path, mask=["", "images/p0.png", *[""] * 6])
    df = read_manifest(csv)
    assert df.attrs["root"] == str(tmp_path)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in df["image"])
    assert df.loc[0, "image"] == str(tmp_path / "images" / "p0.png")
    assert df.loc[0, "mask"] == "" and df.loc[1, "mask"] == str(tmp_path / "images" / "p0.png")
    assert df["patient_id"].tolist() == [f"p{i}" for i in range(8)]


def test_read_manifest_keeps_absolute_paths_and_text_ids(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path / "a")
    df = pd.read_csv(csv)
    df["image"] = [str(tmp_path / "a" / p) for p in df["image"]]
    df["patient_id"] = [f"{i:03d}" for i in range(len(df))]  # must stay text: "001" is not 1
    other = tmp_path / "b" / "m.csv"
    other.parent.mkdir()
    df.to_csv(other, index=False)
    out = read_manifest(other)
    assert out["image"].tolist() == df["image"].tolist()
    assert out.loc[1, "patient_id"] == "001"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.assign(image=d.image.where(d.index != 2, "images/nope.png")), r"row 4: image file not found"),
        (lambda d: d.assign(label=d.label.where(d.index != 1, "COVID-19")), r"unknown label 'COVID-19'.*covid"),
        (lambda d: d.assign(label=d.label.where(d.index != 1, "Covid")), r"valid labels: non_covid, covid"),
        (lambda d: d.assign(label="covid"), r"no images with label 'non_covid'"),
        (lambda d: pd.concat([d, d.iloc[[3]]]), r"rows 5, 10: the same image is listed 2 times"),
        (lambda d: d.drop(columns="patient_id"), r"missing required column\(s\): patient_id"),
        (lambda d: d.assign(patient_id=d.patient_id.where(d.index != 0, "")), r"empty patient_id in row\(s\) 2"),
        (lambda d: d.assign(mask=["images/none.png"] + [""] * 7), r"row 2: mask file not found"),
        (lambda d: d.assign(split=["train"] * 7 + ["holdout"]), r"unknown split 'holdout'"),
        (
            lambda d: pd.concat([d, d.iloc[[0]].assign(image="images/p1.png", split="test")]).assign(
                split=lambda x: ["train"] * 8 + ["test"]
            ),
            r"patient 'p0' is in several splits",
        ),
        (lambda d: d.iloc[0:0], r"manifest has no rows"),
    ],
    ids=[
        "missing-file",
        "unknown-label",
        "strict-case",
        "empty-class",
        "duplicate",
        "missing-column",
        "empty-patient",
        "missing-mask",
        "bad-split",
        "patient-leak",
        "no-rows",
    ],
)
def test_validation_failures(tmp_path: Path, mutate, match: str) -> None:
    csv = _write_cohort(tmp_path)
    mutate(pd.read_csv(csv)).to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=match):
        read_manifest(csv)
    df = read_manifest(csv, validate=False)  # loading without validation still works
    assert len(df) >= 0


def test_validation_reports_all_problems_at_once(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path)
    df = pd.read_csv(csv)
    df.loc[0, "image"] = "images/missing.png"
    df.loc[1, "label"] = "positive"
    df.loc[2, "patient_id"] = np.nan
    pd.concat([df, df.iloc[[4]]]).to_csv(csv, index=False)
    with pytest.raises(ManifestError) as info:
        read_manifest(csv)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4, problems
    for needle in ("image file not found", "unknown label 'positive'", "empty patient_id", "listed 2 times"):
        assert needle in problems
    assert str(csv) in str(info.value)


def test_many_missing_files_are_capped_not_dropped(tmp_path: Path) -> None:
    df = pd.DataFrame({"image": [f"x{i}.png" for i in range(30)], "label": LABELS * 15, "patient_id": range(30)})
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match=r"and 10 more rows with missing image files"):
        read_manifest(tmp_path / "m.csv")


def test_missing_or_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="not a readable CSV"):
        read_manifest(tmp_path / "empty.csv")


def test_conflicting_labels_same_date_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dates = ["2020-03-01"] * 8
    csv = _write_cohort(tmp_path, study_date=dates)
    df = pd.read_csv(csv)
    df.loc[1, "patient_id"] = "p0"  # p0: covid and non_covid on the same day
    df.loc[3, ["patient_id", "study_date"]] = ["p2", "2020-04-01"]  # p2: labels differ on different days: fine
    df.to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING, logger="covidcxr.data"):
        df = read_manifest(csv)
    assert validate_manifest(df) == ["patient 'p0' has both labels on 2020-03-01"]
    assert "patient 'p0' has both labels" in caplog.text


def test_conflicting_labels_without_date_column(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path)
    df = pd.read_csv(csv)
    df.loc[1, "patient_id"] = "p0"
    df.to_csv(csv, index=False)
    (warning,) = validate_manifest(read_manifest(csv))
    assert "p0" in warning and "no study_date" in warning


# ---------------------------------------------------------------------------------------------------------
# folder -> manifest, writing
# ---------------------------------------------------------------------------------------------------------


def _class_folders(root: Path, names: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(1)
    for label, files in names.items():
        for name in files:
            _png(root / label / name, rng)
    return root


def test_manifest_from_folder(tmp_path: Path) -> None:
    root = _class_folders(tmp_path, {"covid": ["a.png", "b.png"], "non_covid": ["c.png", "sub/d.png"]})
    (tmp_path / "covid" / "notes.txt").write_text("not an image")
    df = manifest_from_folder(root)
    assert df["label"].tolist() == ["non_covid", "non_covid", "covid", "covid"]
    assert df["patient_id"].tolist() == ["c", "d", "a", "b"]
    assert df.attrs["root"] == str(tmp_path)
    assert validate_manifest(df) == []


@pytest.mark.parametrize(
    ("regex", "expected"),
    [(r"^(?P<patient>[^/]+)/", ["p1", "p1", "p2", "p3"]), (r"(p\d)", ["p1", "p1", "p2", "p3"]), (None, list("xyzw"))],
)
def test_manifest_from_folder_patient_regex(tmp_path: Path, regex: str | None, expected: list[str]) -> None:
    layout = {"covid": ["p1/x.png", "p1/y.png"], "non_covid": ["p2/z.png", "p3/w.png"]}
    df = manifest_from_folder(_class_folders(tmp_path, layout), patient_regex=regex)
    assert sorted(df["patient_id"]) == sorted(expected)


@pytest.mark.parametrize(
    ("layout", "regex", "match"),
    [
        ({"covid": ["a.png"], "non_covid": ["b.png"], "COVID-19": ["c.png"]}, None, "unknown class folder.*COVID-19"),
        ({"covid": ["a.png"]}, None, "missing class folder 'non_covid/'"),
        ({"covid": ["a.png"], "non_covid": ["b.txt"]}, None, "no image files in 'non_covid/'"),
        ({"covid": ["a.png"], "non_covid": ["b.png"]}, r"patient-(\d+)", "does not match"),
    ],
)
def test_manifest_from_folder_failures(tmp_path: Path, layout: dict, regex: str | None, match: str) -> None:
    for label, files in layout.items():
        for name in files:
            (tmp_path / label).mkdir(exist_ok=True)
            (tmp_path / label / name).write_bytes(b"x")
    with pytest.raises(ManifestError, match=match):
        manifest_from_folder(tmp_path, patient_regex=regex)


def test_manifest_from_folder_bad_regex_or_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        manifest_from_folder(tmp_path, patient_regex="(unclosed")
    with pytest.raises(ManifestError, match="not a folder"):
        manifest_from_folder(tmp_path / "nope")


def test_write_manifest_keeps_relative_paths(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path / "data")
    df = read_manifest(csv)
    write_manifest(df, tmp_path / "data" / "copy.csv")
    assert pd.read_csv(tmp_path / "data" / "copy.csv")["image"].tolist() == pd.read_csv(csv)["image"].tolist()
    # Elsewhere, paths are re-based so the new CSV still finds the same files (and stays relative).
    write_manifest(df, tmp_path / "elsewhere" / "m.csv")
    moved = pd.read_csv(tmp_path / "elsewhere" / "m.csv")["image"]
    assert moved[0] == "../data/images/p0.png"
    assert read_manifest(tmp_path / "elsewhere" / "m.csv")["image"].tolist() == df["image"].tolist()


def test_write_manifest_refuses_overwrites(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path)
    df = read_manifest(csv)
    with pytest.raises(ConfigError, match="refusing to overwrite the input manifest"):
        write_manifest(df, csv, force=True)
    write_manifest(df, tmp_path / "out.csv")
    with pytest.raises(ConfigError, match="file exists; pass --force"):
        write_manifest(df, tmp_path / "out.csv")
    write_manifest(df.iloc[:2], tmp_path / "out.csv", force=True)
    assert len(pd.read_csv(tmp_path / "out.csv")) == 2


# ---------------------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------------------


def test_split_invariants_and_ratios() -> None:
    df = _table(300, 0.35, seed=3)
    out = patient_split(df, seed=0)
    assert set(out["split"]) == set(SPLITS)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    patients = out.groupby("split")["patient_id"].nunique() / 300
    assert patients["train"] == pytest.approx(0.70, abs=0.02)
    assert patients["val"] == pytest.approx(0.15, abs=0.02)
    assert patients["test"] == pytest.approx(0.15, abs=0.02)
    y = out["label"] == "covid"
    for split in SPLITS:
        part = out["split"] == split
        assert abs(y[part].mean() - y.mean()) < 0.05
    assert split_balance(out) == []
    assert out.drop(columns="split").equals(df)  # nothing else changes


def test_split_is_deterministic_and_seeded() -> None:
    df = _table(120, 0.35, seed=5)
    a, b = patient_split(df, seed=7), patient_split(df, seed=7)
    assert a["split"].tolist() == b["split"].tolist()
    c = patient_split(df, seed=8)
    assert a["split"].tolist() != c["split"].tolist()


def test_split_keeps_groups_together_transitively() -> None:
    df = _table(200, 0.35, seed=1, max_images=1)
    groups = np.array([f"g{i}" for i in range(len(df))], dtype=object)
    # chain p0 -g1- p1 -g2- p2 -g3- p3: all four must share a split
    groups[[0, 1]] = "g1"
    df.loc[1, "patient_id"] = "chain-b"
    groups[2] = "g2"
    df.loc[2, "patient_id"] = "chain-b"
    groups[[3, 4]] = "g2", "g3"
    df.loc[3, "patient_id"] = df.loc[4, "patient_id"] = "chain-d"
    groups[10:40] = "big"  # one big group of 30 patients
    groups[50] = ""  # empty group values link nothing
    df["grp"] = groups
    comp = patient_groups(df, "grp")
    assert len(set(comp[:5])) == 1 and len(set(comp[10:40])) == 1
    for seed in range(4):
        out = patient_split(df, group_col="grp", seed=seed)
        assert out["split"].iloc[:5].nunique() == 1
        assert out["split"].iloc[10:40].nunique() == 1
        assert out.groupby("patient_id")["split"].nunique().max() == 1
        assert out.groupby("grp")["split"].nunique().max() == 1


@pytest.mark.parametrize(
    ("val", "test", "match"),
    [
        (-0.1, 0.15, r"val fraction must be in \[0, 1\)"),
        (0.15, 1.0, r"test fraction must be in \[0, 1\)"),
        (0.5, 0.5, r"val \+ test = 1 leaves no patients for training"),
        (float("nan"), 0.1, "val fraction must be a number"),
        ("0.1", 0.1, "val fraction must be a number"),
    ],
)
def test_split_fraction_errors(val, test, match: str) -> None:
    with pytest.raises(SplitError, match=match):
        patient_split(_table(20, 0.5, seed=0), val=val, test=test)


def test_split_zero_val_and_other_errors(caplog: pytest.LogCaptureFixture) -> None:
    out = patient_split(_table(40, 0.5, seed=0), val=0.0, test=0.25)
    assert set(out["split"]) == {"train", "test"}
    with pytest.raises(SplitError, match="too few patients"):
        patient_split(_table(2, 0.5, seed=0))
    with pytest.raises(SplitError, match="column 'site' not in manifest"):
        patient_split(_table(20, 0.5, seed=0), group_col="site")
    with pytest.raises(SplitError, match="unknown label"):
        patient_split(_table(20, 0.5, seed=0).assign(label="covid19"))
    with caplog.at_level(logging.WARNING, logger="covidcxr.data"):
        patient_split(_table(9, 0.3, seed=2, max_images=1), seed=0)  # far too small to balance: warns, no error
    assert "more than 5% off" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# near-duplicates and summary
# ---------------------------------------------------------------------------------------------------------


def test_near_duplicate_across_splits_is_found(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path, n_patients=10, split=["train"] * 6 + ["val"] * 2 + ["test"] * 2)
    # plant: patient p9 (test) holds a re-saved, larger, slightly noisy copy of p0's (train) image
    source = np.asarray(Image.open(tmp_path / "images" / "p0.png"), dtype=np.float64)
    copy = np.kron(source, np.ones((2, 2))) + np.random.default_rng(0).normal(0, 3, (64, 64))
    Image.fromarray(np.clip(copy, 0, 255).astype(np.uint8)).save(tmp_path / "images" / "p9.png")
    df = read_manifest(csv)
    pairs = find_near_duplicates(df, progress=False)
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    assert {pair.patient_a, pair.patient_b} == {"p0", "p9"}
    assert bool(pair.cross_split) and {pair.split_a, pair.split_b} == {"train", "test"}
    assert 0.97 <= pair["corr"] <= 1.0
    # the same copy under the same patient is not a leak
    df.loc[9, "patient_id"] = "p0"
    assert find_near_duplicates(df, progress=False).empty


def test_near_duplicates_errors(tmp_path: Path) -> None:
    csv = _write_cohort(tmp_path, n_patients=4)
    (tmp_path / "images" / "p1.png").write_bytes(b"not a png")
    df = read_manifest(csv)
    with pytest.raises(ManifestError, match=r"unreadable image: .*p1\.png"):
        find_near_duplicates(df, progress=False)
    with pytest.raises(ConfigError, match="threshold must be in"):
        find_near_duplicates(df, threshold=1.5)
    with pytest.raises(ConfigError, match="3 thumbnails given for 4 images"):
        find_near_duplicates(df, thumbnails=np.zeros((3, 1024), np.float32))


def test_summarize() -> None:
    df = _table(30, 0.4, seed=0).assign(source="s1")
    out = patient_split(df, seed=0)
    table = summarize(out)
    assert list(table.columns) == ["split", "source", "covid", "non_covid", "images", "patients"]
    assert table["split"].tolist() == ["train", "val", "test", "total"]
    total = table.iloc[-1]
    assert total["images"] == len(df) and total["patients"] == 30
    assert total["covid"] == (df["label"] == "covid").sum()
    assert table["images"].iloc[:-1].sum() == len(df)
    plain = summarize(df.drop(columns="source"))
    assert plain.columns.tolist() == ["covid", "non_covid", "images", "patients"] and len(plain) == 1
