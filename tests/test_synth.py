"""covidcxr.synth: plausible synthetic CXRs with exact lung masks, and a reproducible demo cohort."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from covidcxr.data.synth import MANIFEST_COLUMNS, draw_cxr, make_cohort, sample_anatomy
from covidcxr.errors import ConfigError
from covidcxr.io.image import load_image


@pytest.mark.parametrize(("label", "size"), [("covid", 128), ("non_covid", 96), (1, 64), (0, 128)])
def test_draw_cxr_contract(label, size):
    image, mask, info = draw_cxr(np.random.default_rng(3), label, size)
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert info["label"] == ("covid" if label in ("covid", 1) else "non_covid")
    assert info["view"] in ("PA", "AP")
    assert (info["finding"] == "ggo") == (info["label"] == "covid")


@pytest.mark.parametrize("seed", range(4))
def test_anatomy_is_lung_like(seed):
    """Two lung fields, darker than the mediastinum and the sub-diaphragmatic area, in a plausible share."""
    image, mask, _ = draw_cxr(np.random.default_rng(seed), "non_covid", 128)
    labels, n = ndimage.label(mask)
    assert n == 2
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() > 0.3 * sizes.max()  # both lungs are real fields, not slivers
    assert 0.12 < mask.mean() < 0.45
    lungs = mask.astype(bool)
    rows = np.flatnonzero(lungs.any(1))
    mediastinum = image[rows[0] : rows[-1], 60:68][~lungs[rows[0] : rows[-1], 60:68]]
    below = image[rows[-1] + 3 : rows[-1] + 15, 20:108]
    assert image[lungs].mean() < mediastinum.mean() - 0.1
    assert image[lungs].mean() < below.mean() - 0.1
    assert not lungs[:, :10].any() and not lungs[:, -10:].any()  # inside the body


def test_draw_cxr_is_seeded():
    a = draw_cxr(np.random.default_rng(7), "covid", 96)
    b = draw_cxr(np.random.default_rng(7), "covid", 96)
    c = draw_cxr(np.random.default_rng(8), "covid", 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_covid_and_clear_pair_differ_only_in_the_lungs():
    """One seed gives a matched pair: the covid image is brighter in the lower lungs and identical elsewhere."""
    seeds = [s for s in range(40) if draw_cxr(np.random.default_rng(s), "non_covid", 64)[2]["finding"] == "clear"]
    lower_rows = np.arange(128)[:, None] > 64
    for seed in seeds[:4]:
        covid, mask_c, info = draw_cxr(np.random.default_rng(seed), "covid", 128)
        clear, mask_n, _ = draw_cxr(np.random.default_rng(seed), "non_covid", 128)
        assert np.array_equal(mask_c, mask_n) and info["extent"] > 0
        near_lungs = ndimage.binary_dilation(mask_c, iterations=6)
        assert np.array_equal(covid[~near_lungs], clear[~near_lungs])
        lower = mask_c.astype(bool) & lower_rows
        assert covid[lower].mean() > clear[lower].mean() + 0.005
        assert (covid - clear)[lower].max() > 0.05


def test_cardiomegaly_enlarges_heart():
    anatomy = sample_anatomy(np.random.default_rng(1))
    lung_share = {}
    for seed in range(40):
        _, mask, info = draw_cxr(np.random.default_rng(seed), "non_covid", 96, view="PA", anatomy=anatomy)
        lung_share.setdefault(info["finding"], []).append(mask.mean())
    assert np.mean(lung_share["cardiomegaly"]) < np.mean(lung_share["clear"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"label": "flu"}, "label='flu'"), ({"label": 2}, "label=2"), ({"size": 16}, "size=16"), ({"view": "LL"}, "LL")],
)
def test_draw_cxr_rejects_bad_arguments(kwargs, match):
    args = {"label": "covid", **kwargs}
    with pytest.raises(ConfigError, match=match):
        draw_cxr(np.random.default_rng(0), **args)


def _rows(manifest):
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_cohort_manifest(synth_cohort):
    fields, rows = _rows(synth_cohort)
    assert tuple(fields) == MANIFEST_COLUMNS
    root = synth_cohort.parent
    per_patient = {}
    for r in rows:
        assert not r["image"].startswith("/") and (root / r["image"]).is_file() and (root / r["mask"]).is_file()
        assert r["view"] in ("PA", "AP") and r["label"] in ("covid", "non_covid")
        per_patient.setdefault(r["patient_id"], set()).add(r["label"])
    assert len(per_patient) == 24
    assert all(len(labels) == 1 for labels in per_patient.values())  # label is per patient
    counts = [sum(r["patient_id"] == p for r in rows) for p in per_patient]
    assert min(counts) >= 1 and max(counts) <= 3
    sources = {r["source"] for r in rows}
    assert len(sources) >= 2
    for s in sources:
        assert {r["label"] for r in rows if r["source"] == s} == {"covid", "non_covid"}
    covid_share = np.mean([labels == {"covid"} for labels in per_patient.values()])
    assert 0.15 < covid_share < 0.7


def test_cohort_files_load(synth_cohort):
    _, rows = _rows(synth_cohort)
    root = synth_cohort.parent
    photometric = set()
    for r in rows:
        image, meta = load_image(root / r["image"])
        mask = np.asarray(Image.open(root / r["mask"]))
        assert image.shape == mask.shape == (128, 128)
        assert set(np.unique(mask)) == {0, 255}
        assert image[mask > 0].mean() < image[mask == 0].mean() + 0.1  # lungs are not brighter than the rest
        if meta.format == "dicom":
            assert meta.view == r["view"]
            ds = pydicom.dcmread(root / r["image"], stop_before_pixels=True)
            assert ds.PatientID == r["patient_id"]
            photometric.add(meta.photometric)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_cohort_is_reproducible(tmp_path):
    m1 = make_cohort(tmp_path / "a", n_patients=4, seed=5, size=64, dicom_fraction=0.5)
    m2 = make_cohort(tmp_path / "b", n_patients=4, seed=5, size=64, dicom_fraction=0.5)
    m3 = make_cohort(tmp_path / "c", n_patients=4, seed=6, size=64, dicom_fraction=0.5)
    assert m1.read_text() == m2.read_text()
    _, rows = _rows(m1)
    for r in rows:
        for col in ("image", "mask"):
            a, _ = load_image(m1.parent / r[col])
            b, _ = load_image(m2.parent / r[col])
            assert np.array_equal(a, b)
    first = rows[0]["image"]
    other = m3.parent / first
    assert not other.exists() or not np.array_equal(load_image(m1.parent / first)[0], load_image(other)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"n_patients": 0}, "n_patients=0"), ({"dicom_fraction": 1.5}, "dicom_fraction=1.5")]
)
def test_make_cohort_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_cohort(tmp_path, **kwargs)
