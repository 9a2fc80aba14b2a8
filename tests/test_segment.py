"""Lung U-Net factory, weights I/O, post-processing, QC flags, seg modes and the ``segment`` CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.demo import run_segmentation_demo
from covidcxr.errors import ConfigError, ModelError, PretrainedWeightsError
from covidcxr.models.unet import DEFAULT_UNET_CONFIG, build_unet, unet_config
from covidcxr.segmentation.evaluate import dice_score, source_key
from covidcxr.segmentation.segmenter import LungSegmenter, postprocess, qc_flags
from covidcxr.segmentation.weights import load_unet, save_unet, shipped_weights_available
from covidcxr.transforms.lung import apply_seg_mode

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "input_size": 32}
NO_SHIPPED = "shipped weights not trained yet"


def _lungs(size: int = 64, left: tuple = (0.3, 0.5), right: tuple = (0.7, 0.5), r: float = 0.16) -> np.ndarray:
    """Two elliptic 'lungs' (centres as fractions of the side)."""
    yy, xx = np.mgrid[:size, :size] / size
    mask = np.zeros((size, size), bool)
    for cx, cy in (left, right):
        if cx is not None:
            mask |= ((xx - cx) / (0.7 * r)) ** 2 + ((yy - cy) / (1.6 * r)) ** 2 <= 1
    return mask.astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny U-Net saved like the real one."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_unet")
    save_unet(build_unet(TINY), unet_config(TINY), folder)
    return folder


# --------------------------------------------------------------------------------------------- model + weights
@pytest.mark.parametrize(
    "config",
    [TINY, {"arch": "basic_unet", "channels": [4, 4, 8, 8, 16, 4], "input_size": 32}],
    ids=["unet", "basic_unet"],
)
def test_build_unet_shapes(config: dict) -> None:
    model = build_unet(config).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"arch": "segformer"}, "arch"),
        ({"input_size": 100}, "multiple of 16"),
        ({"channels": [16, 32], "strides": [2, 2]}, "one stride fewer"),
        ({"arch": "basic_unet", "channels": [8, 16]}, "6 feature sizes"),
        ({"threshold": 1.5}, "threshold"),
        ({"normalisation": "imagenet"}, "normalisation"),
    ],
)
def test_unet_config_rejects_bad_values(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_unet(None, **overrides)


def test_default_unet_fits_size_budget_and_round_trips(tmp_path: Path) -> None:
    model = build_unet(DEFAULT_UNET_CONFIG).eval()
    weights = save_unet(model, DEFAULT_UNET_CONFIG, tmp_path)
    assert weights.stat().st_size <= 15 * 1024 * 1024
    loaded, config, path = load_unet(tmp_path)
    assert path == weights and config["input_size"] == 256 and config["weights_dtype"] == "float32"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_fp16_storage_loads_into_fp32_model(tmp_path: Path) -> None:
    model = build_unet(TINY).eval()
    save_unet(model, TINY, tmp_path, half=True)
    loaded, config, _ = load_unet(tmp_path / "lung_unet.safetensors")
    assert config["weights_dtype"] == "float16"
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=2e-2)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_unet(tmp_path / "nothing.safetensors")
    save_unet(build_unet(TINY), TINY, tmp_path)
    config = json.loads((tmp_path / "lung_unet.json").read_text())
    config["channels"] = [8, 16, 32]
    (tmp_path / "lung_unet.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_unet(tmp_path)
    (tmp_path / "lung_unet.json").unlink()
    with pytest.raises(ModelError, match="config file missing"):
        load_unet(tmp_path)


def test_missing_shipped_weights_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from covidcxr.segmentation import weights as segment

    monkeypatch.setattr(segment, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(PretrainedWeightsError, match="segment train"):
        LungSegmenter.load()
    assert run_segmentation_demo(tmp_path / "m.csv", tmp_path / "out") == {
        "skipped": "shipped lung U-Net weights not trained yet"
    }


def test_predict_returns_masks_at_input_size(tiny_weights: Path) -> None:
    segmenter = LungSegmenter.load(tiny_weights, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.random((50, 70), dtype=np.float32), rng.random((32, 32), dtype=np.float32), np.zeros((90, 40))]
    results = segmenter.predict(images)
    assert [r.mask.shape for r in results] == [(50, 70), (32, 32), (90, 40)]
    for r in results:
        assert r.mask.dtype == np.uint8 and set(np.unique(r.mask)) <= {0, 1}
        assert r.lung_fraction == pytest.approx(r.mask.mean())
        assert r.prob.shape == (32, 32)
    assert "blank_image" in results[2].qc_flags and results[2].qc_message
    assert len(segmenter.predict(images[0])) == 1
    with pytest.raises(ConfigError, match="expected a 2-D grey image"):
        segmenter.predict([np.zeros((4, 4, 3))])


def test_inference_is_float32_only(tiny_weights: Path) -> None:
    image = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    auto = LungSegmenter.load(tiny_weights).predict_proba([image])
    fp32 = LungSegmenter.load(tiny_weights, precision="fp32").predict_proba([image])
    np.testing.assert_array_equal(auto, fp32)
    with pytest.raises(ConfigError, match="float32 on ONNX Runtime"):
        LungSegmenter.load(tiny_weights, precision="bf16")
    with pytest.raises(ConfigError, match="precision"):
        LungSegmenter.load(tiny_weights, precision="fp8")


# --------------------------------------------------------------------------------------------- post-processing + QC
@pytest.mark.parametrize("seed", range(5))
def test_components_and_hole_filling_match_scipy(seed: int) -> None:
    # Post-processing uses OpenCV (no SciPy import at start-up); it must label and fill exactly as SciPy did.
    from scipy import ndimage as ndi

    from covidcxr.segmentation.segmenter import _components, _fill_holes, _label, _mean_column

    rng = np.random.default_rng(seed)
    for _ in range(40):
        mask = rng.random((33, 41)) > rng.uniform(0.3, 0.7)
        labels, n = ndi.label(mask)
        got, m = _label(mask)
        assert m == n and np.array_equal(got, labels)
        got, sizes = _components(mask)  # QC's sizes and mean columns, bit for bit as numpy computes them
        assert np.array_equal(got, labels)
        assert sizes.dtype == np.int64 and np.array_equal(sizes, np.bincount(labels.ravel())[1:])
        cx = [_mean_column(labels, i) for i in range(1, n + 1)]  # as SciPy's centres of mass (an independent sum)
        np.testing.assert_allclose(cx, [c[1] for c in ndi.center_of_mass(mask, labels, range(1, n + 1))], rtol=1e-12)
        np.testing.assert_array_equal(_fill_holes(mask), ndi.binary_fill_holes(mask))


def test_postprocess_keeps_two_largest_and_fills_holes() -> None:
    prob = _lungs().astype(np.float32) * 0.9
    prob[30:33, 18:21] = 0.1  # a hole in the left lung
    prob[2:5, 2:5] = 0.9  # a speck
    mask = postprocess(prob)
    assert mask[31, 19] == 1 and mask[3, 3] == 0
    assert mask.sum() == _lungs().sum()
    assert postprocess(np.zeros((8, 8))).sum() == 0


def test_postprocess_breaks_ties_by_position_not_by_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three equal components and keep=2: the two labelled last (raster order) are kept, whatever sort numpy's
    # default picks on this CPU (simulated: an argsort that reverses the order of equal keys).
    prob = np.zeros((40, 40), np.float32)
    for x in (2, 15, 28):
        prob[5:15, x : x + 8] = 0.9
    want = postprocess(prob, min_fraction=0.0)
    assert want[5:15, 2:10].sum() == 0 and want[5:15, 15:23].all() and want[5:15, 28:36].all()
    real = np.argsort

    def unstable(a, *args, kind=None, **kwargs):
        if kind == "stable":
            return real(a, *args, kind=kind, **kwargs)
        order = real(np.asarray(a)[::-1], kind="stable")
        return len(a) - 1 - order  # equal keys come out in the opposite order

    monkeypatch.setattr(np, "argsort", unstable)
    np.testing.assert_array_equal(postprocess(prob, min_fraction=0.0), want)
    assert qc_flags(want) == qc_flags(want.copy())


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (_lungs(), []),
        (np.zeros((64, 64), np.uint8), ["no_lung"]),
        (_lungs(left=(None, None)), ["one_lung_missing"]),
        (_lungs(left=(0.2, 0.3), right=(0.35, 0.75)), ["lungs_same_side"]),
        (_lungs(r=0.06), ["lung_area_low"]),
        (np.pad(np.ones((60, 60), np.uint8), 2), ["lung_area_high", "one_lung_missing"]),
        (_lungs() & ~(_lungs(right=(None, None)) & (np.mgrid[:64, :64][0] < 38)), ["asymmetric"]),
    ],
    ids=["plausible", "empty", "one_lung", "same_side", "small", "whole_image", "asymmetric"],
)
def test_qc_flags_on_known_masks(mask: np.ndarray, expected: list[str]) -> None:
    assert qc_flags(mask) == expected


def test_qc_flags_low_confidence_and_blank_image() -> None:
    mask = _lungs()
    assert qc_flags(mask, prob=mask * 0.6) == ["low_confidence"]
    assert qc_flags(mask, prob=mask * 0.99) == []
    assert qc_flags(mask, image=np.full((100, 100), 0.5)) == ["blank_image"]


def test_dice_score() -> None:
    a = _lungs()
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ConfigError, match="shapes differ"):
        dice_score(a, a[:10])


@pytest.mark.parametrize(
    ("name", "key"),
    [("SCR (van Ginneken et al.)", "scr"), ("v7labs/covid-19-xray-dataset", "v7labs"),
     ("GeneralBlockchain/covid-19-chest-xray-segmentations-dataset", "generalblockchain"), ("", "all")],
)
def test_source_key(name: str, key: str) -> None:
    assert source_key(name) == key


# --------------------------------------------------------------------------------------------- seg modes
def _graded_image(size: int = 64) -> np.ndarray:
    return (np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size)) * 0.8 + 0.1


@pytest.mark.parametrize("out_size", [None, 32, (48, 40)])
def test_seg_mode_none(out_size: int | tuple | None) -> None:
    image = _graded_image()
    out = apply_seg_mode(image, _lungs(), "none", out_size)
    expected = image.shape if out_size is None else (out_size, out_size) if isinstance(out_size, int) else out_size
    assert out.shape == expected and out.dtype == np.float32
    if out_size is None:
        assert np.array_equal(out, image)


def test_seg_mode_mask_zeroes_outside_dilated_lungs() -> None:
    image, lung = _graded_image(), _lungs()
    exact = apply_seg_mode(image, lung, "mask", dilate=0.0)
    assert np.array_equal(exact, image * lung)
    dilated = apply_seg_mode(image, lung, "mask", dilate=0.05)
    kept = dilated > 0
    assert kept[lung > 0].all() and kept.sum() > lung.sum()
    assert not kept[0, 0] and not kept[32, 32]  # corner and mediastinum stay black
    np.testing.assert_array_equal(dilated[kept], image[kept])


def test_seg_mode_crop_frames_both_lungs() -> None:
    image = np.zeros((100, 100), np.float32)
    lung = np.zeros((100, 100), np.uint8)
    lung[20:60, 30:70] = 1  # a 40 x 40 box of 'lungs' (two lungs joined for a simple check)
    image[20:60, 30:70] = 1.0
    tight = apply_seg_mode(image, lung, "crop", margin=0.0)
    assert tight.shape == (100, 100) and tight.min() > 0.9  # the box fills the whole output
    framed = apply_seg_mode(image, lung, "crop", 50, margin=0.25)
    assert framed.shape == (50, 50)
    inner = framed[9:41, 9:41]  # the box sits in the middle 2/3 of the output (margin 0.25 of its side each way)
    assert inner.min() > 0.9 and framed[:5].max() < 0.1 and framed[:, :5].max() < 0.1
    wide = apply_seg_mode(image, lung, "crop", (40, 80), margin=0.0)
    assert wide.shape == (40, 80) and wide[:, 35:45].min() > 0.9 and wide[:, :10].max() < 0.1  # no stretching


def test_seg_mode_crop_outside_image_is_zero_padded() -> None:
    image = np.ones((64, 64), np.float32)
    lung = np.zeros((64, 64), np.uint8)
    lung[0:20, 0:20] = 1
    out = apply_seg_mode(image, lung, "crop", margin=0.5)
    assert out.shape == (64, 64) and out[0, 0] == 0.0 and out[32, 32] == 1.0


@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_seg_mode_empty_mask_falls_back(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    image, flags = _graded_image(), ["asymmetric"]
    with caplog.at_level(logging.WARNING, logger="covidcxr.segmentation"):
        out = apply_seg_mode(image, np.zeros((64, 64)), mode, flags=flags)
    assert np.array_equal(out, image)
    assert flags == ["asymmetric", "seg_fallback"]
    assert "falls back to the full image" in caplog.text


def test_seg_mode_resizes_a_mask_of_other_size() -> None:
    image = _graded_image(128)
    out = apply_seg_mode(image, _lungs(64), "mask", dilate=0.0)
    expected = image * (np.kron(_lungs(64), np.ones((2, 2))) > 0)
    assert np.mean(out != expected) < 0.02


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((8, 8)), np.zeros((8, 8)), "blur"), "seg mode"),
        ((np.zeros((8, 8, 3)), np.zeros((8, 8)), "mask"), "2-D"),
        ((np.zeros((8, 8)), np.zeros((8, 8)), "crop", 0), "out_size"),
    ],
)
def test_seg_mode_errors(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_seg_mode(*args)


# --------------------------------------------------------------------------------------------- shipped weights
@pytest.mark.skipif(not shipped_weights_available(), reason=NO_SHIPPED)
def test_shipped_weights_give_plausible_mask_on_synthetic_cxr() -> None:
    from covidcxr.data.synth import draw_cxr

    segmenter = LungSegmenter.load()
    rng = np.random.default_rng(3)
    pairs = [draw_cxr(rng, "non_covid", size=256, view="PA")[:2] for _ in range(4)]
    results = segmenter.predict([image for image, _ in pairs])
    dice = [dice_score(r.mask, mask) for r, (_, mask) in zip(results, pairs)]
    assert np.median(dice) > 0.75
    assert sum(r.ok for r in results) >= 3


@pytest.mark.skipif(not shipped_weights_available(), reason=NO_SHIPPED)
@pytest.mark.parametrize("kind", ["blank", "noise", "checkerboard"])
def test_shipped_weights_flag_non_cxr_images(kind: str) -> None:
    rng = np.random.default_rng(4)
    image = {
        "blank": np.zeros((256, 256), np.float32),
        "noise": rng.random((256, 256), dtype=np.float32),
        "checkerboard": (np.indices((256, 256)) // 32).sum(0) % 2 * 1.0,
    }[kind]
    result = LungSegmenter.load().predict(image)[0]
    assert result.qc_flags, f"{kind}: no QC flag raised"


# --------------------------------------------------------------------------------------------- CLI + demo
def test_cli_predict_writes_outputs_and_refuses_overwrite(
    synth_cohort: Path, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidcxr.cli import main

    out = tmp_path / "pred"
    image = pd.read_csv(synth_cohort)["image"].iloc[0]
    image_path = synth_cohort.parent / image
    assert main(["segment", "predict", str(image_path), "--out", str(out), "--weights", str(tiny_weights)]) == 0
    table = pd.read_csv(out / "segmentation.csv", keep_default_na=False)
    assert len(table) == 1 and table.loc[0, "error"] == ""
    assert {"lung_fraction", "qc_flags", "qc_message", "confidence"} <= set(table.columns)
    assert Path(table.loc[0, "mask_png"]).is_file() and Path(table.loc[0, "overlay_png"]).is_file()
    assert main(["segment", "predict", str(image_path), "--out", str(out), "--weights", str(tiny_weights)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["segment", "predict", str(synth_cohort), "--out", str(out), "--weights", str(tiny_weights),
                 "--force"]) == 0
    table = pd.read_csv(out / "segmentation.csv", keep_default_na=False)
    assert len(table) == len(pd.read_csv(synth_cohort))
    assert len(list((out / "overlays").glob("*_overlay.png"))) == len(table)


def test_cli_evaluate_prints_dice_table(synth_cohort: Path, tiny_weights: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    from covidcxr.cli import main

    code = main(["segment", "evaluate", "--manifest", str(synth_cohort), "--weights", str(tiny_weights),
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Lung Dice" in printed and "all" in printed
    per_image = pd.read_csv(tmp_path / "dice_per_image.csv")
    assert per_image["dice"].between(0, 1).all()


def test_cli_install_copies_weights(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr.cli import main
    from covidcxr.segmentation import weights as segment

    monkeypatch.setattr(segment, "WEIGHTS_DIR", tmp_path / "pkg")
    assert main(["segment", "install", str(tiny_weights)]) == 0
    assert segment.shipped_weights_available()
    assert LungSegmenter.load().config["input_size"] == 32
    assert main(["segment", "install", str(tmp_path / "nowhere")]) == 2


def test_segmentation_demo_reports_dice(synth_cohort: Path, tiny_weights: Path, tmp_path: Path) -> None:
    result = run_segmentation_demo(synth_cohort, tmp_path / "seg", weights=tiny_weights, max_images=6, n_overlays=2)
    assert result["n_images"] == 6 and 0.0 <= result["dice_mean"] <= 1.0
    assert len(result["overlays"]) == 2 and all(Path(p).is_file() for p in result["overlays"])
    assert json.loads((tmp_path / "seg" / "summary.json").read_text())["n_images"] == 6


def test_mask_mode_keeps_the_exact_euclidean_dilation() -> None:
    """The fast OpenCV distance transform keeps exactly the pixels scipy's exact EDT keeps."""
    from scipy import ndimage as ndi

    from covidcxr.transforms.lung import apply_seg_mode

    rng = np.random.default_rng(3)
    image = rng.random((180, 150), dtype=np.float32) + 0.01
    yy, xx = np.mgrid[:180, :150]
    lung = (((yy - 90) / 50) ** 2 + ((xx - 45) / 20) ** 2 < 1) | (((yy - 80) / 60) ** 2 + ((xx - 110) / 22) ** 2 < 1)
    out = apply_seg_mode(image, lung.astype(np.uint8), "mask", dilate=0.05)
    expected = ndi.distance_transform_edt(~lung) <= 0.05 * 180
    np.testing.assert_array_equal(out > 0, expected)


@pytest.mark.parametrize("seed", range(4))
def test_disc_dilation_equals_the_thresholded_distance_transform(seed: int) -> None:
    """The mask mode's dilation keeps exactly the pixels within the radius by OpenCV's exact distance transform."""
    import cv2

    from covidcxr.transforms.lung import dilate_disc

    rng = np.random.default_rng(seed)
    for _ in range(30):
        h, w = rng.integers(5, 90, 2)
        mask = rng.random((h, w)) < rng.choice([0.002, 0.02, 0.3, 0.9])
        radius = float(rng.choice([0.03 * max(h, w), rng.uniform(0.2, 25.0), 1.0, np.sqrt(2), 7.0]))
        expected = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= radius
        got = dilate_disc(mask, radius)
        assert got.dtype == bool and np.array_equal(got, expected if mask.any() else np.zeros_like(mask))
