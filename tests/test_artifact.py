"""Model artifacts: save/load round trip, preprocessing, embeddings, bf16, corrupt files, ensembles, seg modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.classification.artifact import copy_artifact, load_artifact, save_artifact
from covidcxr.classification.ensemble import build_ensemble
from covidcxr.classification.inference import EnsembleArtifact
from covidcxr.classification.loop import MaskCache
from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import file_sha256
from covidcxr.models.classifier import create_classifier
from covidcxr.models.registry import IMAGENET_MEAN, IMAGENET_STD
from covidcxr.transforms.augment import cache_size_for
from covidcxr.transforms.preprocess import PreprocessCfg, preprocess

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)
SIZE = 32


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(70, 60), (64, 64), (50, 80), (90, 72)]
    return [rng.random(shapes[i % len(shapes)], dtype=np.float32) for i in range(n)]


def _config(seg_mode: str = "none", threshold: float = 0.5, **extra) -> dict:
    return {
        "arch": "resnet18",
        "input_size": SIZE,
        "cache_size": cache_size_for(SIZE),
        "normalization": {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "seg_mode": seg_mode,
        "threshold": threshold,
        "threshold_method": "youden",
        "bf16_inference": True,
        **extra,
    }


def _make(directory: Path, seed: int, *, val: pd.DataFrame | None = None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = create_classifier("resnet18").eval()
    return save_artifact(directory, model, _config(**cfg), val_predictions=val)


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("art") / "model", seed=0, val_auc=0.8)


def test_round_trip_matches_torch_float32(art_dir: Path) -> None:
    # The loaded artifact runs the exported network (ONNX Runtime); the torch model it was saved from, fed the
    # same preprocessed inputs in float32, gives the same probabilities.
    torch.manual_seed(0)
    model = create_classifier("resnet18").eval()  # same seed = the saved network
    images = _images(5)
    loaded = load_artifact(art_dir, "cpu")
    x = torch.from_numpy(loaded.preprocess_batch(images, None))
    with torch.no_grad():
        logits = model(x).double().numpy()
    expected = 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0]) / loaded.temperature))
    got = loaded.predict_proba(images)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(load_artifact(art_dir, "cpu").predict_proba(images), got)  # deterministic


def test_artifact_without_onnx_names_the_export_command(tmp_path: Path, art_dir: Path) -> None:
    d = copy_artifact(art_dir, tmp_path / "old")
    (d / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"covidcxr export --model"):
        load_artifact(d, "cpu")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["onnx"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"no exported network \(ONNX\).*covidcxr export --model"):
        load_artifact(d, "cpu")


def test_replaced_onnx_is_refused(tmp_path: Path, art_dir: Path) -> None:
    d = copy_artifact(art_dir, tmp_path / "bad")
    data = bytearray((d / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_artifact(d, "cpu")


def test_config_records_provenance(art_dir: Path) -> None:
    cfg = json.loads((art_dir / "config.json").read_text())
    art = load_artifact(art_dir, "cpu")
    assert art.weights_hash == cfg["weights_sha256"] == file_sha256(art_dir / "model.safetensors")
    assert cfg["class_names"] == ["non_covid", "covid"]
    assert cfg["num_features"] == 512 and cfg["package_version"]
    assert cfg["segmenter"] is None


def test_preprocess_is_the_one_function_of_the_stored_config(art_dir: Path) -> None:
    art = load_artifact(art_dir, "cpu")
    image = _images(1)[0]
    x = art.preprocess(image)
    assert x.shape == (1, SIZE, SIZE) and x.dtype == np.float32
    expected = preprocess(image, None, PreprocessCfg.from_config(art.config))
    np.testing.assert_array_equal(x, expected)
    assert art.preprocess_cfg == PreprocessCfg(SIZE, "none", "none")


def test_embed_is_l2_normalised(art_dir: Path) -> None:
    art = load_artifact(art_dir, "cpu")
    emb = art.embed(_images(3))
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_predict_labels_use_stored_threshold(tmp_path: Path) -> None:
    images = _images(4)
    probs = load_artifact(_make(tmp_path / "a", seed=1), "cpu").predict_proba(images)
    cut = float(np.sort(probs)[1])  # two images below, two at/above
    art = load_artifact(_make(tmp_path / "b", seed=1, threshold=cut), "cpu")
    pred = art.predict(images)
    assert pred.label == ["covid" if p >= cut else "non_covid" for p in probs]
    assert pred.qc_flags == [[], [], [], []]


def test_inference_is_float32_and_refuses_bf16(art_dir: Path) -> None:
    art = load_artifact(art_dir, "cpu")
    images = _images(4)
    np.testing.assert_array_equal(art.predict_proba(images, bf16=False), art.predict_proba(images))
    with pytest.raises(ConfigError, match="float32 on ONNX Runtime"):
        art.predict_proba(images, bf16=True)


def test_bad_image_shape_raises(art_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"image 0: shape \(8, 8, 3\): expected a 2-D grey image"):
        load_artifact(art_dir, "cpu").predict_proba([np.zeros((8, 8, 3), np.float32)])


# -- missing and corrupt files ------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda d: (d / "config.json").unlink(), r"config\.json: config file missing"),
        (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: corrupt config"),
        (lambda d: (d / "model.onnx").unlink(), r"model\.onnx: the model has no exported network"),
        (lambda d: (d / "model.onnx").write_bytes(b"garbage"), r"model\.onnx: exported network is corrupt"),
    ],
)
def test_missing_or_corrupt_files_name_the_file(art_dir: Path, tmp_path: Path, damage, pattern: str) -> None:
    d = _copy(art_dir, tmp_path / "copy")
    damage(d)
    with pytest.raises(ModelError, match=pattern):
        load_artifact(d, "cpu")


def test_corrupt_onnx_without_hash_check(art_dir: Path, tmp_path: Path) -> None:
    d = _copy(art_dir, tmp_path / "copy")
    (d / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelError, match=r"model\.onnx: ONNX Runtime cannot load the network"):
        load_artifact(d, "cpu", verify=False)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors: weights file missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), r"model\.safetensors: weights file is corrupt"),
    ],
)
def test_export_names_missing_or_corrupt_weights(art_dir: Path, tmp_path: Path, damage, pattern: str) -> None:
    from covidcxr.classification.export import export_model

    d = _copy(art_dir, tmp_path / "copy")
    damage(d)
    load_artifact(d, "cpu")  # inference needs only the exported network
    with pytest.raises(ModelError, match=pattern):
        export_model(d)


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model directory not found"):
        load_artifact(tmp_path / "nothing", "cpu")


# -- ensembles ------------------------------------------------------------------------------------------------


def _val_frame(probs: np.ndarray, images: list[str] | None = None) -> pd.DataFrame:
    n = len(probs)
    return pd.DataFrame({
        "image": images or [f"img{i}.png" for i in range(n)],
        "patient_id": [f"P{i}" for i in range(n)],
        "y": [i % 2 for i in range(n)],
        "prob": probs,
    })


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    rng = np.random.default_rng(3)
    return [
        _make(root / f"m{i}", seed=10 + i, val=_val_frame(rng.random(12)), threshold=0.3 + 0.2 * i, val_auc=0.6 + 0.2 * i)
        for i in range(2)
    ]


def test_ensemble_averages_member_probabilities(members: list[Path], tmp_path: Path) -> None:
    out = build_ensemble(members, tmp_path / "ens")
    ens = load_artifact(out, "cpu")
    assert isinstance(ens, EnsembleArtifact)
    images = _images(3)
    expected = np.mean([load_artifact(m, "cpu").predict_proba(images) for m in members], axis=0)
    np.testing.assert_allclose(ens.predict_proba(images), expected, rtol=0, atol=1e-12)
    cfg = json.loads((out / "config.json").read_text())
    assert [m["weight"] for m in cfg["members"]] == [0.5, 0.5]
    assert all((out / m["dir"] / "model.safetensors").is_file() for m in cfg["members"])  # self-contained


def test_ensemble_threshold_rechosen_on_shared_validation(members: list[Path], tmp_path: Path) -> None:
    from covidcxr.evaluation.metrics import choose_threshold

    out = build_ensemble(members, tmp_path / "ens")
    vals = [pd.read_csv(m / "val_predictions.csv") for m in members]
    mean_prob = (vals[0]["prob"] + vals[1]["prob"]) / 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threshold_source"] == "validation"
    assert cfg["threshold"] == pytest.approx(choose_threshold(vals[0]["y"], mean_prob))


def test_ensemble_weighted_by_validation_auc(members: list[Path], tmp_path: Path) -> None:
    ens = load_artifact(build_ensemble(members, tmp_path / "ens", weighted=True), "cpu")
    np.testing.assert_allclose(ens.member_weights, [0.6 / 1.4, 0.8 / 1.4])
    images = _images(2)
    probs = np.stack([m.predict_proba(images) for m in ens.members])
    np.testing.assert_allclose(ens.predict_proba(images), ens.member_weights @ probs)


def test_ensemble_without_shared_validation_uses_mean_threshold(members: list[Path], tmp_path: Path) -> None:
    other = _make(tmp_path / "other", seed=99, val=_val_frame(np.linspace(0, 1, 12), [f"x{i}" for i in range(12)]),
                  threshold=0.9)
    cfg = json.loads((build_ensemble([members[0], other], tmp_path / "ens") / "config.json").read_text())
    assert cfg["threshold_source"] == "mean_of_members"
    assert cfg["threshold"] == pytest.approx((0.3 + 0.9) / 2)


def test_ensemble_embedding_concatenates_and_renormalises(members: list[Path], tmp_path: Path) -> None:
    ens = load_artifact(build_ensemble(members, tmp_path / "ens"), "cpu")
    images = _images(2)
    emb = ens.embed(images)
    assert emb.shape == (2, 1024)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    parts = np.concatenate([m.embed(images) for m in ens.members], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(emb, parts, atol=1e-5)
    assert ens.weights_hash != ens.members[0].weights_hash


def test_ensemble_refuses_single_member_and_existing_out(members: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 models"):
        build_ensemble(members[:1], tmp_path / "one")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="busy: output folder exists"):
        build_ensemble(members, tmp_path / "busy")


# -- segmentation modes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory) -> Path:
    """An untrained tiny U-Net with zero weights: probability 0.5 everywhere, i.e. the whole image is 'lung'."""
    from covidcxr.models.unet import build_unet
    from covidcxr.segmentation.weights import save_unet

    cfg = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "input_size": 32}
    net = build_unet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return save_unet(net, cfg, tmp_path_factory.mktemp("seg"))


@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_seg_artifact_is_self_contained(tmp_path: Path, tiny_segmenter: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = create_classifier("resnet18").eval()
    d = save_artifact(tmp_path / "seg", model, _config(seg_mode=mode), segmenter_weights=tiny_segmenter)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["segmenter"]["sha256"] == file_sha256(tiny_segmenter)
    assert (d / cfg["segmenter"]["weights"]).is_file() and (d / "segmenter" / "lung_unet.json").is_file()
    tiny_segmenter.rename(tiny_segmenter.with_suffix(".moved"))  # the artifact must not need the original
    try:
        art = load_artifact(d, "cpu")
        images = _images(2)
        probs = art.predict_proba(images)
        assert probs.shape == (2,) and np.isfinite(probs).all()
        assert len(art.qc_flags) == 2  # one (possibly empty) flag list per image
        full = [np.ones(im.shape, np.uint8) for im in images]
        np.testing.assert_allclose(art.predict_proba(images, masks=full), probs, atol=1e-6)
    finally:
        tiny_segmenter.with_suffix(".moved").rename(tiny_segmenter)


def test_seg_mode_changes_input(tmp_path: Path) -> None:
    image = _images(1)[0]
    mask = np.zeros(image.shape, np.uint8)
    mask[10:40, 10:30] = 1
    none = preprocess(image, None, PreprocessCfg(40, "none"))
    masked = preprocess(image, mask, PreprocessCfg(40, "mask"))
    crop = preprocess(image, mask, PreprocessCfg(40, "crop"))
    assert none.shape == masked.shape == crop.shape == (1, 40, 40)
    assert not np.array_equal(none, masked) and not np.array_equal(none, crop)
    with pytest.raises(ConfigError, match="needs a lung mask"):
        preprocess(image, None, PreprocessCfg(40, "crop"))
    with pytest.raises(ConfigError, match="unknown segmentation mode 'lungs'"):
        preprocess(image, mask, PreprocessCfg(40, "lungs"))


def test_mask_cache_round_trip(tmp_path: Path) -> None:
    cache = MaskCache(tmp_path, "ab" * 32)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:25] = 1
    assert cache.get("/data/a.png") is None
    cache.put_many([("/data/a.png", mask, ["small_lungs"])])
    again = MaskCache(tmp_path, "ab" * 32)  # a new run reads the same folder
    got, flags = again.get("/data/a.png")
    np.testing.assert_array_equal(got, mask)
    assert flags == ["small_lungs"]
    assert MaskCache(tmp_path, "cd" * 32).get("/data/a.png") is None  # other segmenter, other masks


def test_copy_of_the_shipped_model_keeps_its_gate(tmp_path: Path) -> None:
    """A copied artifact carries the files its config points to: the mirror check and the OOD reference load."""
    from covidcxr.classification.artifact import shipped_model_dir

    art = load_artifact(copy_artifact(shipped_model_dir(), tmp_path / "copy"), "cpu")
    assert art.mirror_check is not None and art.ood_reference is not None
