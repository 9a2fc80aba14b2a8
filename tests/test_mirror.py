"""The left-right mirror check: features, fitting, storage, the gate and every verdict path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.classification.mirror import MESSAGE, MIRROR_FILE, REASON, MirrorCheck, mirror_features
from covidcxr.classification.ood import gate
from covidcxr.errors import ConfigError, ModelError, NotFittedError

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "samples"


def _maps(rng: np.random.Generator, n: int, c: int = 16, w: int = 7) -> np.ndarray:
    """Feature maps whose left half is brighter in the first channels (an 'upright' signature)."""
    fm = rng.random((n, c, w, w))
    fm[:, :4, :, : w // 2] += 1.0
    return fm


def test_features_of_a_mirrored_map_are_the_negative() -> None:
    fm = np.random.default_rng(0).random((3, 5, 4, 7))
    f = mirror_features(fm)
    assert f.shape == (3, 5)
    np.testing.assert_allclose(mirror_features(fm[..., ::-1]), -f)


@pytest.mark.parametrize("width", [6, 7])
def test_features_are_the_float64_half_means_of_a_float32_map(width: int) -> None:
    # Summed with a float64 accumulator over float32 views: the mean of the float64 copy, without the copy.
    fm = np.random.default_rng(1).random((4, 8, 7, width), dtype=np.float32) * 6
    f64, half = fm.astype(np.float64), width // 2
    ref = f64[..., :half].mean(axis=(2, 3)) - f64[..., -half:].mean(axis=(2, 3))
    got = mirror_features(fm)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 1)])
def test_features_refuse_maps_that_cannot_have_halves(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"feature map of shape"):
        mirror_features(np.zeros(shape))


def test_fit_separates_and_the_threshold_is_the_quantile() -> None:
    rng = np.random.default_rng(1)
    up, held = _maps(rng, 60), _maps(rng, 200)
    check = MirrorCheck(quantile=0.05).fit(mirror_features(up), mirror_features(up[..., ::-1]))
    s_up, s_mi = check.scores(held), check.scores(held[..., ::-1])
    assert np.mean(s_up > 0) > 0.95 and np.mean(s_mi < 0) > 0.95
    assert check.threshold_ == pytest.approx(np.quantile(check.score_features(mirror_features(up)), 0.05))
    np.testing.assert_array_equal(check.mirrored(s_up), s_up < check.threshold_)
    assert check.mirrored(s_mi).all()
    given = MirrorCheck().fit(mirror_features(up), mirror_features(up[..., ::-1]), threshold=-1.5)
    assert given.threshold_ == -1.5


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    up = _maps(rng, 30)
    check = MirrorCheck().fit(mirror_features(up), mirror_features(up[..., ::-1]))
    entry = check.save(tmp_path, {"note": "x"})
    assert entry["file"] == MIRROR_FILE and entry["note"] == "x"
    back = MirrorCheck.load(tmp_path, json.loads(json.dumps(entry)))
    maps = _maps(rng, 5)
    np.testing.assert_array_equal(back.scores(maps), check.scores(maps))
    assert back.threshold_ == check.threshold_


def test_load_names_a_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"mirror_check.npz: cannot read the mirror check"):
        MirrorCheck.load(tmp_path, {"file": MIRROR_FILE, "threshold": 0.0})
    (tmp_path / MIRROR_FILE).write_text("not numpy")
    with pytest.raises(ModelError, match=r"cannot read the mirror check"):
        MirrorCheck.load(tmp_path, {"file": MIRROR_FILE, "threshold": 0.0})


@pytest.mark.parametrize(("kwargs", "match"), [({"C": 0}, r"C=0"), ({"quantile": 0.5}, r"quantile=0.5"),
                                               ({"quantile": 0}, r"quantile=0")])
def test_bad_settings_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MirrorCheck(**kwargs)


def test_bad_input_and_use_before_fit() -> None:
    with pytest.raises(NotFittedError, match=r"not fitted"):
        MirrorCheck().scores(np.zeros((1, 4, 2, 2)))
    with pytest.raises(ConfigError, match=r"shapes \(3, 4\) and \(3, 5\)"):
        MirrorCheck().fit(np.zeros((3, 4)), np.zeros((3, 5)))
    up = _maps(np.random.default_rng(3), 10)
    check = MirrorCheck().fit(mirror_features(up), mirror_features(up[..., ::-1]))
    with pytest.raises(ConfigError, match=r"8 features; the mirror check was fitted on 16"):
        check.score_features(np.zeros((1, 8)))


def test_gate_reason_and_order() -> None:
    from covidcxr.classification.input_type import InputType

    result = gate([], mirrored=True)
    assert not result.usable and result.reasons == [REASON] and result.message.endswith(MESSAGE)
    assert len(MESSAGE) <= 64  # the meaning of the reason's code in a DICOM SR (LO)
    assert gate([], mirrored=False).usable and gate([], mirrored=None).usable
    # What the input type check saw comes first; a lateral view is not also called mirrored.
    assert gate([], input_type=InputType("lateral", False, 0.0), mirrored=True).reasons == ["looks_lateral"]
    assert gate(["no_lung"], mirrored=True).reasons == [REASON, "no_lung"]


def _sample() -> np.ndarray:
    from covidcxr.io.image import load_image

    return load_image(min(SAMPLES.glob("*.png")))[0]


def test_every_verdict_path_uses_the_models_check(make_tiny_artifact, tmp_path: Path) -> None:
    """A model with a mirror check: the manifest loop (predict, evaluate, index) and the single analysis (API, page,
    explain, PACS) refuse the mirror image of a CXR and keep the upright one; the scores come from the same pass."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.io.files import save_png
    from covidcxr.service.analysis import analyze_one

    directory = make_tiny_artifact(tmp_path / "m", 0, size=64)
    art = load_artifact(directory, "cpu")
    rng = np.random.default_rng(4)
    cxr = _sample()
    # Fit a check on this network's own maps of jittered copies of the image (a tiny stand-in for the real fit).
    copies = [np.clip(cxr * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02, cxr.shape), 0, 1).astype(np.float32)
              for _ in range(8)]
    x = art.preprocess_batch(copies, None, [[] for _ in copies])
    up = mirror_features(art.run_network(x, ["feature_map"])["feature_map"])
    mi = mirror_features(art.run_network(np.ascontiguousarray(x[..., ::-1]), ["feature_map"])["feature_map"])
    check = MirrorCheck(C=1.0).fit(up, mi, threshold=0.0)
    config = json.loads((directory / "config.json").read_text())
    config["mirror"] = check.save(directory)
    (directory / "config.json").write_text(json.dumps(config))
    art = load_artifact(directory, "cpu")
    assert art.mirror_check is not None

    mirrored = np.ascontiguousarray(cxr[:, ::-1])
    pred = art.predict([cxr, mirrored], embeddings=True)
    want = check.scores(art.run_network(art.preprocess_batch([cxr, mirrored], None, [[], []]),
                                        ["feature_map"])["feature_map"])
    np.testing.assert_allclose(pred.mirror_scores, want, rtol=1e-6)
    assert want[0] > 0 > want[1]
    assert art.predict([cxr]).mirror_scores is None  # no embeddings asked: no extra output fetched

    files = [save_png(tmp_path / "cxr.png", cxr), save_png(tmp_path / "mirrored.png", mirrored)]
    table, _ = art.predict_manifest(pd.DataFrame({"image": [str(f) for f in files]}), num_workers=1)
    assert table["status"].tolist() == ["ok", "no_result"]
    assert MESSAGE in table["no_result_reason"][1]
    ones = np.ones(cxr.shape, np.uint8)
    one = analyze_one(art, mirrored, mask=ones)
    assert not one.usable and one.gate.reasons == [REASON]
    assert analyze_one(art, cxr, mask=ones).usable


def test_shipped_model_states_its_check_out_of_fold() -> None:
    """The figures in the shipped config are recomputed from the stored out-of-fold scores."""
    from covidcxr.classification.artifact import shipped_model_dir

    directory = shipped_model_dir()
    cfg = json.loads((directory / "config.json").read_text())
    entry = cfg["mirror"]
    oof = pd.read_csv(directory / "oof_predictions.csv")
    up, mi = oof["mirror_score"].to_numpy(), oof["mirror_score_mirrored"].to_numpy()
    assert len(up) >= 1000 and np.isfinite(up).all() and np.isfinite(mi).all()
    assert entry["threshold"] == pytest.approx(np.quantile(up, entry["quantile"]))
    assert entry["oof_upright_refused"] == pytest.approx(np.mean(up < entry["threshold"]))
    assert entry["oof_mirrored_refused"] == pytest.approx(np.mean(mi < entry["threshold"]))
    assert entry["oof_upright_refused"] <= 0.01
    check = MirrorCheck.load(directory, entry)
    assert check.threshold_ == entry["threshold"]
