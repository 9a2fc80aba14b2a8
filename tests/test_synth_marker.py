"""``covidcxr data synth --plant-marker``: a site mark that predicts the label, for shortcut and debiasing tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.cli import main
from covidcxr.data.synth import MARKER_CORNERS, make_cohort, plant_site_marker
from covidcxr.errors import ConfigError
from covidcxr.io.image import load_image


def _mark_brightness(image: np.ndarray, source: str) -> float:
    n = image.shape[0]
    top, left = (round(f * n) for f in MARKER_CORNERS[source])
    return float(image[top:top + max(4, n // 12), left:left + max(6, n * 3 // 16)].max())


def test_zero_strength_leaves_the_cohort_unchanged(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", n_patients=6, seed=2, size=64, dicom_fraction=0.0)
    b = make_cohort(tmp_path / "b", n_patients=6, seed=2, size=64, dicom_fraction=0.0, plant_marker=0.0)
    assert a.read_text() == b.read_text()
    for name in pd.read_csv(a)["image"]:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


def test_planted_marker_is_site_specific_and_predicts_the_label(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "m", n_patients=60, seed=1, size=64, dicom_fraction=0.0, plant_marker=1.0)
    df = pd.read_csv(manifest)
    marked = {s: [] for s in MARKER_CORNERS}
    for row in df.itertuples():
        image, _ = load_image(manifest.parent / row.image)
        for site in MARKER_CORNERS:
            marked[site].append(_mark_brightness(image, site) > 0.99 if site == row.source else None)
        mask = load_image(manifest.parent / row.mask)[0] > 0.5
        assert not mask[:2].any()  # the marks sit outside the lungs
    for site, flags in marked.items():
        assert all(f for f in flags if f is not None)  # every image of a site carries its mark
    share = df.assign(y=df["label"] == "covid").groupby("source")["y"].mean()
    assert share["synth-siteA"] > 0.7 and share["synth-siteB"] < 0.25  # the mark tells the label


def test_marker_is_drawn_where_the_site_says() -> None:
    image = np.zeros((64, 64), np.float32)
    for site in MARKER_CORNERS:
        out = plant_site_marker(image, site)
        assert _mark_brightness(out, site) == 1.0
        assert all(_mark_brightness(out, other) < 1.0 for other in MARKER_CORNERS if other != site)
    assert image.max() == 0.0  # the input is not modified
    with pytest.raises(ConfigError, match="no marker"):
        plant_site_marker(image, "elsewhere")


@pytest.mark.parametrize("strength", [-0.1, 1.5, True])
def test_bad_strength_is_refused(tmp_path: Path, strength) -> None:
    with pytest.raises(ConfigError, match="plant_marker"):
        make_cohort(tmp_path, n_patients=2, size=64, plant_marker=strength)


def test_cli_plants_a_marker(tmp_path: Path) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--patients", "9", "--size", "64",
                 "--dicom-fraction", "0", "--plant-marker", "1"]) == 0
    df = pd.read_csv(tmp_path / "c" / "manifest.csv")
    image, _ = load_image(tmp_path / "c" / df.loc[0, "image"])
    assert _mark_brightness(image, df.loc[0, "source"]) == 1.0
