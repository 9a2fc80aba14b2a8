"""Grad-CAM explanations (covidcxr.explain) and ``covidcxr explain`` on a tiny untrained toy model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr.classification import explain as explain_mod
from covidcxr.classification.artifact import load_artifact, save_artifact
from covidcxr.classification.ensemble import build_ensemble
from covidcxr.classification.explain import (
    Explanation,
    explain,
    heatmap_rgba,
    lung_energy_fraction,
    member_heatmap,
    outline_rgba,
    overlay_heatmap,
)
from covidcxr.cli import main
from covidcxr.data.synth import draw_cxr
from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import save_png
from covidcxr.io.image import load_image
from covidcxr.transforms.lung import lung_crop_box
from covidcxr.web.toy import ToyAssets, make_toy_assets, toy_classifier

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyAssets:
    return make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=6, image_size=80, seg_mode="mask")


@pytest.fixture(scope="module")
def cxr() -> tuple[np.ndarray, np.ndarray]:
    image, mask, _ = draw_cxr(np.random.default_rng(3), "covid", size=96)
    return image, mask


def _variant(toy: ToyAssets, root: Path, seg_mode: str, seed: int = 0) -> Path:
    """Another artifact of the toy architecture with a given segmentation mode (and fresh weights per seed)."""
    model = toy_classifier("resnet18", [load_image(p)[0] for p in toy.images], 64, seed)
    cfg = {"arch": "resnet18", "input_size": 64, "normalization": {"name": "gray", "mean": [0.5], "std": [0.25]},
           "seg_mode": seg_mode, "threshold": 0.5}
    return save_artifact(root / f"{seg_mode}_{seed}", model, cfg, segmenter_weights=toy.segmenter_weights)


# ---------------------------------------------------------------------------------------------- lung energy
def test_lung_energy_fraction_counts_heat_mass_inside_the_mask() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5] = 1
    inside = np.zeros((10, 10), np.float32)
    inside[2:8, 1:4] = 1.0
    assert lung_energy_fraction(inside, mask) == pytest.approx(1.0)
    assert lung_energy_fraction(1.0 - mask, mask) == pytest.approx(0.0)
    assert lung_energy_fraction(np.ones((10, 10)), mask) == pytest.approx(0.5)
    half = np.where(mask > 0, 0.25, 0.75)
    assert lung_energy_fraction(half, mask) == pytest.approx(0.25)


def test_lung_energy_fraction_of_an_empty_map_is_none_and_shapes_must_match() -> None:
    assert lung_energy_fraction(np.zeros((4, 4)), np.ones((4, 4))) is None
    with pytest.raises(ConfigError, match=r"heat map shape \(4, 4\) differs from mask shape \(5, 5\)"):
        lung_energy_fraction(np.ones((4, 4)), np.ones((5, 5)))


# ---------------------------------------------------------------------------------------------- layers
def test_overlay_and_layers_have_the_image_geometry(cxr) -> None:
    image, mask = cxr
    heat = np.linspace(0, 1, image.size, dtype=np.float32).reshape(image.shape)
    overlay = overlay_heatmap(image, heat)
    assert overlay.shape == (*image.shape, 3) and overlay.dtype == np.uint8
    rgba = heatmap_rgba(heat)
    assert rgba.shape == (*image.shape, 4)
    assert rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] > 150  # cold is transparent, hot is opaque
    line = outline_rgba(mask)
    drawn = line[..., 3] > 0
    assert drawn.any() and drawn.mean() < 0.2  # an outline, not a filled mask
    with pytest.raises(ConfigError, match="image_weight"):
        overlay_heatmap(image, heat, image_weight=1.5)
    with pytest.raises(ConfigError, match="differs from image shape"):
        overlay_heatmap(image, heat[:10])


def test_lung_crop_box_matches_the_classifier_crop() -> None:
    from covidcxr.transforms.lung import _crop_to_lungs

    lung = np.zeros((90, 120), bool)
    lung[20:70, 15:50] = True
    lung[25:75, 70:105] = True
    coords = np.arange(90 * 120, dtype=np.float32).reshape(90, 120) + 1  # +1: 0 marks padding in the crop
    crop = _crop_to_lungs(coords, lung, lung.shape, 0.1)
    top, left, h, w = lung_crop_box(lung, lung.shape)
    assert crop.shape == (h, w)
    inside = crop > 0
    r, c = np.argwhere(inside)[0]
    assert (crop[r, c] - 1) // 120 == top + r and (crop[r, c] - 1) % 120 == left + c


# ---------------------------------------------------------------------------------------------- explain()
def test_explain_single_model(toy, cxr) -> None:
    image, mask = cxr
    art = load_artifact(toy.model_dir, "cpu")
    result = explain(art, image, mask)
    assert isinstance(result, Explanation)
    assert result.heatmap.shape == image.shape and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert result.overlay.shape == (*image.shape, 3) and result.overlay.dtype == np.uint8
    assert result.n_members == 1 and result.target_class == 1
    assert result.heatmap.max() == pytest.approx(1.0)  # the toy head makes the map non-empty
    assert result.lung_energy_fraction == pytest.approx(lung_energy_fraction(result.heatmap, mask))
    assert explain(art, image).lung_energy_fraction is None  # no mask, no lung share
    again = explain(art, image, mask)
    np.testing.assert_allclose(again.heatmap, result.heatmap, atol=1e-5)


def test_explain_uses_the_registry_target_layer(toy, cxr, tmp_path, monkeypatch) -> None:
    # The heat map comes from the feature map of the layer the registry names, fixed when the network is exported.
    import shutil

    from covidcxr.classification.export import export_model
    from covidcxr.models import classifier as models

    image, mask = cxr
    default = explain(load_artifact(toy.model_dir, "cpu"), image, mask).heatmap
    other_dir = tmp_path / "other"
    shutil.copytree(toy.model_dir, other_dir)
    seen = []

    def spy(model):
        seen.append(model.arch)
        return model.backbone.layer4[0]  # another 512-channel map: a different heat map (and no longer exact CAM)

    monkeypatch.setattr(models, "gradcam_target_layer", spy)
    export_model(other_dir)
    other = explain(load_artifact(other_dir, "cpu"), image, mask).heatmap
    assert seen == ["resnet18"]
    assert not np.allclose(default, other)
    assert json.loads((other_dir / "config.json").read_text())["onnx"]["cam_exact"] is False
    assert json.loads((toy.model_dir / "config.json").read_text())["onnx"]["cam_exact"] is True
    monkeypatch.setattr(models, "gradcam_target_layer", lambda model: model.backbone.layer3)
    with pytest.raises(ModelError, match=r"heat-map layer's output has shape \(2, 256"):
        export_model(other_dir)


@pytest.mark.parametrize("seg_mode", ["mask", "crop"])
def test_cam_equals_the_plain_library_gradcam_of_the_torch_model(toy, cxr, tmp_path, seg_mode) -> None:
    # The exported network's CAM (no autograd, no torch) against pytorch-grad-cam's Grad-CAM of the torch model
    # in float32 on the same input: the same map, up to float rounding.
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from covidcxr.classification.export import load_torch_classifier
    from covidcxr.models.classifier import gradcam_target_layer

    image, mask = cxr
    art = load_artifact(_variant(toy, tmp_path, seg_mode, seed=3), "cpu")
    ours = member_heatmap(art, image, mask)
    model = load_torch_classifier(art.directory)
    x = torch.from_numpy(art.preprocess(image, mask)[None])
    with GradCAM(model=model, target_layers=[gradcam_target_layer(model)]) as cam:
        grid = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
    plain = explain_mod.to_image_geometry(grid, image, mask, seg_mode)
    assert plain.max() > 0.5  # a real map, not an all-zero one
    corr = float(np.corrcoef(ours.ravel(), plain.ravel())[0, 1])
    assert corr >= 0.999, corr
    np.testing.assert_allclose(ours, plain, atol=1e-3)


def test_explain_rejects_bad_input(toy, cxr) -> None:
    image, mask = cxr
    art = load_artifact(toy.model_dir, "cpu")
    with pytest.raises(ConfigError, match=r"mask shape \(10, 10\) differs from image shape \(96, 96\)"):
        explain(art, image, np.ones((10, 10)))
    with pytest.raises(ConfigError, match="expected a 2-D grey image"):
        explain(art, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="target_class=5"):
        explain(art, image, mask, target_class=5)


def test_crop_mode_heat_stays_inside_the_crop_box(toy, cxr, tmp_path) -> None:
    image, mask = cxr
    art = load_artifact(_variant(toy, tmp_path, "crop"), "cpu")
    heat = member_heatmap(art, image, mask)
    top, left, h, w = lung_crop_box(mask > 0, image.shape)
    outside = np.ones(image.shape, bool)
    outside[max(top, 0) : top + h, max(left, 0) : left + w] = False
    assert heat.shape == image.shape
    assert np.all(heat[outside] == 0)


def test_ensemble_heatmap_is_the_weighted_mean_of_its_members(toy, cxr, tmp_path) -> None:
    image, mask = cxr
    members = [_variant(toy, tmp_path, "none", seed=1), _variant(toy, tmp_path, "mask", seed=2)]
    ens = load_artifact(build_ensemble(members, tmp_path / "ensemble"), "cpu")
    result = explain(ens, image, mask)
    assert result.n_members == 2
    maps = [member_heatmap(m, image, mask) for m in ens.members]
    mean = np.average(np.stack(maps), axis=0, weights=ens.member_weights)
    expected = mean / mean.max() if mean.max() > 0 else mean
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_explain_writes_overlay_and_summary(toy, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["explain", str(toy.images[1]), "--model", str(toy.model_dir), "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    stem = toy.images[1].stem
    for key in ("overlay", "heatmap", "overlay_with_lungs", "mask", "summary"):
        assert Path(summary["files"][key]).is_file(), key
    overlay, _ = load_image(summary["files"]["overlay"])
    image, _ = load_image(toy.images[1])
    assert overlay.shape == image.shape
    assert (out / f"{stem}_explanation.json").is_file()
    assert 0.0 <= summary["probability"] <= 1.0
    assert summary["label"] in ("covid", "non_covid")
    energy = summary["lung_energy_fraction"]
    assert energy is None or 0.0 <= energy <= 1.0


def test_cli_explain_keeps_apart_inputs_with_the_same_name(toy, tmp_path) -> None:
    import shutil

    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(shutil.copy(toy.images[1], tmp_path / folder / "scan.png"))
    out = tmp_path / "out"
    assert main(["explain", *map(str, paths), "--model", str(toy.model_dir), "--out", str(out)]) == 0
    first = json.loads((out / "scan_explanation.json").read_text())
    second = json.loads((out / "scan_2_explanation.json").read_text())
    assert first["image"] == str(paths[0]) and second["image"] == str(paths[1])
    assert Path(first["files"]["overlay"]) != Path(second["files"]["overlay"])
    assert all(Path(f).is_file() for f in [*first["files"].values(), *second["files"].values()])


def test_cli_explain_with_a_mask_of_the_wrong_size_fails_with_a_message(toy, tmp_path, capsys) -> None:
    bad = save_png(tmp_path / "mask.png", np.ones((10, 12), np.float32))
    code = main(["explain", str(toy.images[0]), "--model", str(toy.model_dir), "--out", str(tmp_path / "o"),
                 "--mask", str(bad)])
    assert code == 2
    assert "mask is 12x10 but the image is 80x80" in capsys.readouterr().err


def test_explain_module_has_no_hardcoded_layer_names() -> None:
    source = Path(explain_mod.__file__).read_text()
    assert "layer4" not in source and "features." not in source
