"""The input-type check (classification/input_type.py): frontal CXR or a turned radiograph, a CT image, a lateral
view, another picture - learned on some patients and checked on others; the shipped check; its place in the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covidcxr.classification.input_type import (
    _OCTANT,
    KINDS,
    LOOKS_LIKE,
    N_CT_FEATURES,
    InputType,
    InputTypeClassifier,
    _percentiles,
    _shrink,
    check_inputs,
    default_stem,
    feature_matrix,
    image_features,
)
from covidcxr.classification.ood import gate
from covidcxr.data.synth import PICTURE_KINDS, draw_cxr, draw_picture
from covidcxr.errors import ConfigError, ModelError, NotFittedError

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "samples"
TURNS = {"rot90": lambda a: np.rot90(a, 1), "rot180": lambda a: np.rot90(a, 2), "rot270": lambda a: np.rot90(a, 3),
         "upside_down": lambda a: a[::-1]}


def synthetic_ct(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A crude axial chest CT slice: black air around a grey body ellipse, two near-black lungs, a bright spine."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / rng.uniform(0.40, 0.47)) ** 2 + ((yy - 0.5) / rng.uniform(0.28, 0.36)) ** 2 < 1
    img = np.where(body, rng.uniform(0.45, 0.6), 0.0)
    for cx in (0.5 - rng.uniform(0.15, 0.2), 0.5 + rng.uniform(0.15, 0.2)):
        lung = ((xx - cx) / rng.uniform(0.1, 0.14)) ** 2 + ((yy - 0.47) / rng.uniform(0.18, 0.24)) ** 2 < 1
        img = np.where(lung, rng.uniform(0.0, 0.08), img)
    img = np.where(((xx - 0.5) ** 2 + (yy - 0.75) ** 2) < 0.003, 0.95, img)
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def cohort(seed: int, n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` synthetic patients: each an upright CXR, one turned copy, a CT-like slice and a picture."""
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    for i in range(n):
        cxr = draw_cxr(rng, i % 2, size=int(rng.choice([64, 96, 128])))[0]
        turn = list(TURNS.values())[i % len(TURNS)]
        images += [cxr, np.ascontiguousarray(turn(cxr)), synthetic_ct(rng),
                   draw_picture(rng, PICTURE_KINDS[i % len(PICTURE_KINDS)])]
        kinds += ["frontal", "rotated", "ct", "other"]
    return images, kinds


@pytest.fixture(scope="module")
def held_out() -> dict:
    """A check trained on one set of synthetic patients (seed 1) and scored on others (seed 2)."""
    train_images, train_kinds = cohort(1, 40)
    test_images, test_kinds = cohort(2, 16)
    clf = InputTypeClassifier(hidden=32, max_iter=300).fit(feature_matrix(train_images), train_kinds, seed=0)
    return {"clf": clf, "checked": clf.check(test_images), "kinds": test_kinds}


@pytest.mark.parametrize("kind", ["frontal", "rotated", "ct", "other"])
def test_held_out_patients_are_told_apart(held_out: dict, kind: str) -> None:
    got = [c for c, k in zip(held_out["checked"], held_out["kinds"], strict=True) if k == kind]
    assert len(got) == 16
    if kind == "frontal":
        assert all(c.frontal and c.message == "" for c in got)
    else:
        assert not any(c.frontal for c in got), [c.p_frontal for c in got]
        assert sum(c.kind == kind for c in got) >= 14  # and it mostly says what they looked like


def test_a_check_without_that_kind_cannot_name_it(held_out: dict) -> None:
    images, kinds = cohort(3, 12)
    keep = [k != "ct" for k in kinds]
    clf = InputTypeClassifier(hidden=16).fit(feature_matrix([im for im, k in zip(images, keep) if k]),
                                             [k for k, ok in zip(kinds, keep) if ok])
    assert clf.predict_proba_features(feature_matrix(images[:2]))[:, KINDS.index("ct")].max() < 1e-6


def test_save_load_round_trip_gives_identical_probabilities(held_out: dict, tmp_path: Path) -> None:
    clf = held_out["clf"]
    clf.save(tmp_path / "check", info={"note": "test"})
    again = InputTypeClassifier.load(tmp_path / "check")
    x = feature_matrix(cohort(4, 3)[0])
    np.testing.assert_array_equal(clf.predict_proba_features(x), again.predict_proba_features(x))
    meta = json.loads((tmp_path / "check.json").read_text())
    assert meta["kinds"] == list(KINDS) and meta["note"] == "test"


def test_load_refuses_missing_or_foreign_files(held_out: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read the input-type classifier"):
        InputTypeClassifier.load(tmp_path / "none")
    held_out["clf"].save(tmp_path / "check")
    meta = json.loads((tmp_path / "check.json").read_text())
    (tmp_path / "check.json").write_text(json.dumps({**meta, "kinds": ["frontal", "ct"]}))
    with pytest.raises(ModelError, match="saved for kinds"):
        InputTypeClassifier.load(tmp_path / "check")


@pytest.mark.parametrize(("kwargs", "match"), [({"hidden": 0}, "hidden=0"), ({"alpha": -1.0}, "alpha=-1.0"),
                                               ({"threshold": 1.0}, "threshold=1.0")])
def test_bad_settings_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        InputTypeClassifier(**kwargs)


def test_fit_checks_its_input_and_use_before_fit_fails() -> None:
    x = np.zeros((4, 3))
    with pytest.raises(ConfigError, match="unknown input kinds"):
        InputTypeClassifier().fit(x, ["frontal", "xray", "other", "other"])
    with pytest.raises(ConfigError, match="needs frontal images"):
        InputTypeClassifier().fit(x, ["ct", "ct", "other", "other"])
    with pytest.raises(NotFittedError, match="not fitted"):
        InputTypeClassifier().predict_proba_features(x)


def test_features_are_finite_for_odd_images() -> None:
    for image in (np.zeros((5, 300), np.float32), np.ones((64, 64), np.float32), np.eye(3, dtype=np.float32)):
        assert np.isfinite(image_features(image)).all()
    with pytest.raises(ConfigError, match="expected a 2-D grey image"):
        image_features(np.zeros((4, 4, 3)))


def test_ct_second_opinion_only_takes_probability_from_frontal_to_ct(held_out: dict) -> None:
    images, kinds = cohort(5, 12)
    x = feature_matrix(images)
    train_images, train_kinds = cohort(1, 40)
    plain = InputTypeClassifier(hidden=32, max_iter=300, ct_check=False).fit(feature_matrix(train_images),
                                                                             train_kinds, seed=0)
    both = held_out["clf"]
    assert len(both.ct_coef_) == N_CT_FEATURES and len(plain.ct_coef_) == 0
    p_plain, p_both = plain.predict_proba_features(x), both.predict_proba_features(x)
    np.testing.assert_allclose(p_both.sum(axis=1), 1.0)
    assert (p_both[:, 0] <= p_plain[:, 0] + 1e-12).all()  # same perceptron (same seed), P(frontal) capped
    moved = p_plain[:, 0] - p_both[:, 0]
    np.testing.assert_allclose(p_both[:, KINDS.index("ct")] - p_plain[:, KINDS.index("ct")], moved, atol=1e-12)
    others = [KINDS.index(k) for k in ("rotated", "lateral", "other")]
    np.testing.assert_allclose(p_both[:, others], p_plain[:, others], atol=1e-12)
    ct_rows = [i for i, k in enumerate(kinds) if k == "ct"]
    assert p_both[ct_rows, 0].max() < 0.5


def test_load_refuses_a_check_of_other_features(held_out: dict, tmp_path: Path) -> None:
    held_out["clf"].save(tmp_path / "check")
    meta = json.loads((tmp_path / "check.json").read_text())
    (tmp_path / "check.json").write_text(json.dumps({**meta, "feature_version": 1}))
    with pytest.raises(ModelError, match="features version 1.*--install"):
        InputTypeClassifier.load(tmp_path / "check")


@pytest.mark.parametrize("n", [2, 7, 100, 4096])
def test_percentiles_match_numpy(n: int) -> None:
    values = np.random.default_rng(n).random(n)
    np.testing.assert_allclose(_percentiles(np.sort(values)), np.percentile(values, [1, 5, 25, 50, 75, 95, 99]))


def test_gradient_octants_match_the_angle() -> None:
    gy, gx = np.random.default_rng(0).normal(size=(2, 5000))
    by_angle = np.minimum((np.mod(np.arctan2(gy, gx), 2 * np.pi) / (2 * np.pi) * 8).astype(int), 7)
    assert (_OCTANT[4 * (gy < 0) + 2 * (gx < 0) + (np.abs(gy) > np.abs(gx))] == by_angle).all()


@pytest.mark.parametrize("shape", [(512, 512), (509, 512), (1024, 768), (2048, 1536)])
def test_shrink_averages_areas(shape: tuple[int, int]) -> None:
    # Left half black, right half white: the thumbnail keeps the split and the mean, whatever the size.
    image = np.zeros(shape, np.float32)
    image[:, shape[1] // 2:] = 1.0
    thumb = _shrink(image)
    assert thumb.shape == (128, 128) and thumb.dtype == np.float64
    assert abs(thumb.mean() - 0.5) < 0.01 and (thumb[:, :60] == 0).all() and (thumb[:, 68:] == 1).all()


# -- the shipped check -----------------------------------------------------------------------------------
def _samples() -> list[np.ndarray]:
    from covidcxr.io.image import load_image

    return [load_image(p)[0] for p in sorted(SAMPLES.glob("*.png"))]


def test_shipped_check_accepts_real_and_synthetic_cxrs_upright() -> None:
    rng = np.random.default_rng(7)
    images = _samples() + [draw_cxr(rng, i % 2, size=s)[0] for i, s in enumerate((64, 128, 256))]
    assert len(images) == 7
    assert all(c.frontal for c in check_inputs(images)), [c.probs for c in check_inputs(images)]


@pytest.mark.parametrize("turn", sorted(TURNS))
def test_shipped_check_refuses_turned_cxrs(turn: str) -> None:
    checked = check_inputs([np.ascontiguousarray(TURNS[turn](im)) for im in _samples()])
    assert not any(c.frontal for c in checked)
    assert {c.kind for c in checked} == {"rotated"}
    assert "turned on its side or upside down" in checked[0].message


def test_shipped_check_refuses_pictures() -> None:
    # Fresh pictures (not the benchmark's): the target is >= 99 % refused; measured on 1,800 of them, the shipped
    # check (and the one before it) let one through, a flat "shapes" collage.
    rng = np.random.default_rng(11)
    checked = check_inputs([draw_picture(rng, k) for _ in range(20) for k in PICTURE_KINDS])
    assert len(checked) == 180 and sum(c.frontal for c in checked) <= 1
    assert sum(c.kind == "other" for c in checked) >= 175  # and says what they looked like


def test_shipped_check_documents_cross_validated_targets() -> None:
    # The figures written by `benchmarks/input_gate.py --part type --install` (cross-validated by patient).
    meta = json.loads(default_stem().with_suffix(".json").read_text())
    cv = meta["cross_validated"]
    assert cv["dev_cxr_refused"]["rate"] <= 0.01 and cv["dev_cxr_refused"]["n"] >= 1000
    assert cv["non_frontal_refused"]["rate"] >= 0.99
    assert cv["turned_cxr_accepted"]["accepted"] == 0
    assert (default_stem().with_suffix(".npz").stat().st_size + default_stem().with_suffix(".json").stat().st_size
            <= 15 * 2**20)


def test_shipped_check_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np; from covidcxr.classification.input_type import check_inputs; "
            "check_inputs([np.zeros((64, 64), np.float32)]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- in the gate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "frontal"])
def test_gate_says_what_the_input_looked_like(kind: str) -> None:
    result = gate([], input_type=InputType(kind, False, 0.01))
    assert not result.usable and result.reasons == [f"looks_{kind}"]
    assert result.message.endswith(LOOKS_LIKE[kind]) and len(LOOKS_LIKE[kind]) <= 64  # DICOM code meaning (LO)


def test_gate_passes_a_frontal_input_and_keeps_other_reasons() -> None:
    assert gate([], input_type=InputType("frontal", True, 0.99)).usable
    both = gate(["no_lung"], input_type=InputType("ct", False, 0.0))
    assert both.reasons == ["looks_ct", "no_lung"]


def test_every_verdict_path_uses_the_check(make_tiny_artifact, tmp_path: Path) -> None:
    """The manifest loop (predict, evaluate, index) and the single analysis (API, page, explain, PACS)."""
    import pandas as pd

    from covidcxr.classification.artifact import load_artifact
    from covidcxr.io.files import save_png
    from covidcxr.service.analysis import analyze_one

    rng = np.random.default_rng(3)
    art = load_artifact(make_tiny_artifact(tmp_path / "m", 0), "cpu")
    cxr = _samples()[0]
    files = [save_png(tmp_path / "cxr.png", cxr), save_png(tmp_path / "turned.png", np.rot90(cxr).copy()),
             save_png(tmp_path / "stripes.png", draw_picture(rng, "stripes"))]
    pred, _ = art.predict_manifest(pd.DataFrame({"image": [str(f) for f in files]}), num_workers=1)
    assert pred["status"].tolist() == ["ok", "no_result", "no_result"]
    assert "turned on its side" in pred["no_result_reason"][1] and "other than a chest X-ray" in \
        pred["no_result_reason"][2]
    one = analyze_one(art, np.rot90(cxr).copy(), mask=np.ones_like(np.rot90(cxr), np.uint8))
    assert not one.usable and one.gate.reasons == ["looks_rotated"]
