"""Classifier training: augmentation, loss decrease, split handling, threshold from validation, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.classification.artifact import load_artifact
from covidcxr.classification.module import ClassifierModule, _warmup_cosine
from covidcxr.classification.train import TrainConfig, prepare_split, train_classifier
from covidcxr.cli import main
from covidcxr.errors import ConfigError
from covidcxr.io.image import load_image
from covidcxr.transforms.augment import AugmentConfig, build_eval_transform, build_train_transform
from covidcxr.transforms.preprocess import PreprocessCfg, preprocess, to_uint8

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)
TINY = {"arch": "resnet18", "image_size": 32, "batch_size": 32, "num_workers": 0, "progress": False, "n_boot": 50,
        "patience": 0}


@pytest.fixture(scope="module")
def cohort(synth_cohort: Path) -> Path:
    """The shared synthetic cohort (tests/conftest.py)."""
    return synth_cohort


# -- augmentation ---------------------------------------------------------------------------------------------


def _cached(seed: int = 0, size: int = 40) -> torch.Tensor:
    image = np.random.default_rng(seed).random((60, 50), dtype=np.float32)
    return torch.from_numpy(to_uint8(preprocess(image, None, PreprocessCfg(size))))


def test_train_transform_is_random_and_shaped() -> None:
    cfg = AugmentConfig(image_size=32)
    tf = build_train_transform(cfg)
    x = _cached(size=cfg.cache_size)
    torch.manual_seed(0)
    a, b = tf(x), tf(x)
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert not torch.equal(a, b)


def test_eval_transform_is_deterministic_and_no_augment_equals_it() -> None:
    cfg = AugmentConfig(image_size=32, enabled=False)
    x = _cached(size=cfg.cache_size)
    torch.testing.assert_close(build_train_transform(cfg)(x), build_eval_transform(cfg)(x), rtol=0, atol=0)
    torch.testing.assert_close(build_eval_transform(32)(x), build_eval_transform(32)(x), rtol=0, atol=0)


def test_augment_defaults_suit_chest_xrays() -> None:
    cfg = AugmentConfig()
    assert cfg.hflip == 0.0 and cfg.rotation == 10.0 and cfg.crop_scale == (0.8, 1.0)
    assert cfg.cache_size == 258  # ~1.15 x 224
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("data", "pattern"), [({"flip": 0.5}, "unknown augment settings"),
                                               ({"gamma": [1.2, 0.8]}, "gamma must be"),
                                               ({"image_size": 4}, "image_size must be")])
def test_augment_config_errors(data: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        AugmentConfig.from_dict(data)


# -- pieces -------------------------------------------------------------------------------------------------


def test_warmup_then_cosine() -> None:
    values = [_warmup_cosine(s, warmup=4, total=20) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(values[3:]))
    assert values[-1] < 0.05


def test_train_config_validates() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'resnet9'"):
        TrainConfig(arch="resnet9")
    with pytest.raises(ConfigError, match="seg_mode must be one of"):
        TrainConfig(seg_mode="lungs")
    assert TrainConfig(threshold_method="sensitivity").target_sensitivity == 0.9
    assert TrainConfig().peak_lr == 1e-3 and TrainConfig(pretrained="imagenet").peak_lr == 3e-4


def test_tiny_model_loss_falls(cohort: Path) -> None:
    df = pd.read_csv(cohort).head(8)
    images = [load_image(cohort.parent / p)[0] for p in df["image"]]
    x = torch.from_numpy(np.stack([preprocess(im, None, PreprocessCfg(32)) for im in images]))
    y = torch.as_tensor((df["label"] == "covid").to_numpy().astype(np.int64))
    torch.manual_seed(0)
    module = ClassifierModule("resnet18", "none", lr=1e-3)
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():  # still in train mode: BatchNorm running stats of 3 steps are not meaningful yet
        final = float(torch.nn.functional.cross_entropy(module(x), y))
    assert final < losses[0]


def test_split_column_used_or_made(cohort: Path) -> None:
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(cohort)
    made = prepare_split(df, TrainConfig(seed=3))
    assert set(made["split"]) == {"train", "val", "test"}
    assert made.groupby("patient_id")["split"].nunique().max() == 1  # patient-level
    given = made.assign(split=np.where(made["split"] == "test", "val", made["split"]))
    kept = prepare_split(given, TrainConfig(seed=99))
    assert kept["split"].tolist() == given["split"].tolist()


def test_single_class_validation_refused(cohort: Path) -> None:
    from covidcxr.data.manifest import read_manifest

    df = prepare_split(read_manifest(cohort), TrainConfig())
    df.loc[(df["split"] == "val") & (df["label"] == "covid"), "split"] = "train"
    with pytest.raises(ConfigError, match="split 'val' holds only one class"):
        prepare_split(df, TrainConfig())


class _FakeSegmenter:
    """Counts calls; the 'lungs' are the central half of the image."""

    def __init__(self) -> None:
        self.seen = 0

    def predict(self, images):
        from covidcxr.segmentation.segmenter import SegResult

        self.seen += len(images)
        out = []
        for im in images:
            m = np.zeros(im.shape, np.uint8)
            h, w = im.shape
            m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
            out.append(SegResult(mask=m, lung_fraction=float(m.mean()), qc_flags=["demo_flag"]))
        return out


def test_image_cache_segments_once_and_reuses_masks(cohort: Path, tmp_path: Path) -> None:
    from covidcxr.classification.cache import build_image_cache
    from covidcxr.classification.loop import MaskCache
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(cohort).head(6).drop(columns=["mask"])
    seg = _FakeSegmenter()
    cache = MaskCache(tmp_path / "masks", "0" * 64)
    first, qc = build_image_cache(df, "crop", 20, segmenter=seg, mask_cache=cache, num_workers=0, progress=False)
    assert seg.seen == 6 and first.shape == (6, 1, 20, 20) and first.dtype == torch.uint8
    assert qc == [["demo_flag"]] * 6
    again, qc2 = build_image_cache(df, "crop", 20, segmenter=seg, mask_cache=MaskCache(tmp_path / "masks", "0" * 64),
                                   num_workers=0, progress=False)
    assert seg.seen == 6  # nothing segmented the second time
    assert torch.equal(first, again) and qc2 == qc
    plain, _ = build_image_cache(df, "none", 20, num_workers=0, progress=False)
    assert not torch.equal(plain, first)


def test_image_cache_without_masks_or_segmenter_raises(cohort: Path) -> None:
    from covidcxr.classification.cache import build_image_cache
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(cohort).head(2).drop(columns=["mask"])
    with pytest.raises(ConfigError, match="needs lung masks for 2 image"):
        build_image_cache(df, "mask", 20, num_workers=0, progress=False)


# -- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory) -> tuple[Path, dict]:
    from covidcxr.evaluation import metrics as evaluate

    calls: dict = {}
    real = evaluate.choose_threshold

    def spy(y, p, method="youden", target_sensitivity=None):
        calls.update(y=np.asarray(y), p=np.asarray(p), method=method)
        calls["result"] = real(y, p, method, target_sensitivity)
        return calls["result"]

    mp = pytest.MonkeyPatch()
    mp.setattr(evaluate, "choose_threshold", spy)
    try:
        out = train_classifier(cohort, tmp_path_factory.mktemp("run") / "out", epochs=1, **TINY)
    finally:
        mp.undo()
    return out, calls


def test_training_writes_artifact_and_logs(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    for name in ("config.json", "model.safetensors", "val_predictions.csv", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt", "logs/version_0/metrics.csv", "test_eval/metrics.json", "split.csv"):
        assert (out / name).is_file(), name
    history = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert {"train_loss_step", "val_auc", "val_loss"} <= set(history.columns)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_images_per_s"] > 0
    assert summary["data"]["per_split_label"]["val"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["history"] == "logs/version_0/metrics.csv"
    assert cfg["input_size"] == 32 and cfg["seg_mode"] == "none"


def test_threshold_chosen_on_validation_only(trained: tuple[Path, dict]) -> None:
    out, calls = trained
    val = pd.read_csv(out / "val_predictions.csv")
    split = pd.read_csv(out / "split.csv")
    assert len(calls["y"]) == (split["split"] == "val").sum() == len(val)
    np.testing.assert_allclose(np.sort(calls["p"]), np.sort(val["prob"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threshold"] == calls["result"]
    metrics = json.loads((out / "test_eval" / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(cfg["threshold"])  # test uses the validation threshold


def test_trained_artifact_reproduces_validation_predictions(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    val = pd.read_csv(out / "val_predictions.csv")
    art = load_artifact(out, "cpu")
    probs = art.predict_proba([load_image(p)[0] for p in val["image"]])
    np.testing.assert_allclose(probs, val["prob"].to_numpy(), rtol=0, atol=1e-6)


def test_trained_model_exports_round_trip(trained: tuple[Path, dict], tmp_path: Path) -> None:
    # Training wrote model.onnx (validation was predicted through it); `covidcxr export --model` of the same
    # artifact writes the same network again, and both agree with the torch model in float32.
    import shutil

    from covidcxr.classification.export import load_torch_classifier

    out, _ = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["onnx"]["file"] == "model.onnx" and cfg["onnx"]["cam_exact"] is True
    assert cfg["onnx"]["weights_sha256"] == cfg["weights_sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "masks"))
    (copy / "model.onnx").unlink()
    assert main(["export", "--model", str(copy)]) == 0
    val = pd.read_csv(out / "val_predictions.csv")
    images = [load_image(p)[0] for p in val["image"]]
    before, after = load_artifact(out, "cpu"), load_artifact(copy, "cpu")
    np.testing.assert_allclose(after.predict_proba(images), before.predict_proba(images), rtol=0, atol=1e-6)
    x = torch.from_numpy(after.preprocess_batch(images, None))
    with torch.no_grad():
        logits = load_torch_classifier(copy)(x).double().numpy()
    margin, _ = after.forward_margins(x.numpy())
    np.testing.assert_allclose(margin, logits[:, 1] - logits[:, 0], atol=1e-4)


def test_refuses_non_empty_out(trained: tuple[Path, dict], cohort: Path) -> None:
    out, _ = trained
    with pytest.raises(ConfigError, match="output folder exists and is not empty"):
        train_classifier(cohort, out, epochs=1, **TINY)


def test_resume_continues_from_last_checkpoint(trained: tuple[Path, dict], cohort: Path, tmp_path: Path) -> None:
    import shutil

    out = shutil.copytree(trained[0], tmp_path / "resumed")
    train_classifier(cohort, out, resume=True, epochs=2, **{**TINY, "eval_test": False})
    history = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert sorted(history["epoch"].dropna().unique().astype(int).tolist()) == [0, 1]
    with pytest.raises(ConfigError, match="nothing to resume from"):
        train_classifier(cohort, tmp_path / "empty", resume=True, epochs=1, **TINY)


def test_test_metrics_written_without_matplotlib(tmp_path: Path, monkeypatch) -> None:
    import sys

    from covidcxr.classification.train import _evaluate_test

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, as on a machine without it
    rng = np.random.default_rng(0)
    pred = pd.DataFrame({"y": [0, 1] * 10, "prob": rng.random(20), "patient_id": [f"P{i // 2}" for i in range(20)]})
    result = _evaluate_test(pred, 0.5, tmp_path / "ev", TrainConfig(n_boot=20))
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["threshold"] == 0.5 == result["threshold"]
    assert not list((tmp_path / "ev").glob("*.png"))


# -- transfer-learning settings, calibration and the operating point -------------------------------------------


def _val_table(n_both_neg: int, seed: int = 0) -> pd.DataFrame:
    """Validation rows: easy single-source negatives (low p) plus a mixed source with hard negatives (high p)."""
    rng = np.random.default_rng(seed)
    easy = pd.DataFrame({"y": 0, "prob": rng.uniform(0.0, 0.2, 40), "source_has_both_labels": False})
    pos = pd.DataFrame({"y": 1, "prob": rng.uniform(0.5, 1.0, 30), "source_has_both_labels": True})
    hard = pd.DataFrame({"y": 0, "prob": rng.uniform(0.3, 0.75, n_both_neg), "source_has_both_labels": True})
    return pd.concat([easy, pos, hard], ignore_index=True)


def test_threshold_holds_on_hard_negatives() -> None:
    from covidcxr.classification.operating_point import choose_val_threshold as _choose_val_threshold
    from covidcxr.evaluation.metrics import choose_threshold

    table = _val_table(n_both_neg=20)
    t_both, rows = _choose_val_threshold(table, TrainConfig(arch="resnet18", num_workers=0), choose_threshold)
    t_all, rows_all = _choose_val_threshold(table, TrainConfig(arch="resnet18", num_workers=0,
                                                               threshold_rows="all"), choose_threshold)
    assert (rows, rows_all) == ("both_labels", "all")
    hard = table[(table["y"] == 0) & table["source_has_both_labels"]]["prob"]
    # Specificity on the hard negatives is what the both-label threshold buys.
    assert (hard < t_both).mean() > (hard < t_all).mean()


def test_threshold_falls_back_to_all_rows_when_too_few_hard_negatives(caplog) -> None:
    from covidcxr.classification.operating_point import choose_val_threshold as _choose_val_threshold
    from covidcxr.evaluation.metrics import choose_threshold

    _, rows = _choose_val_threshold(_val_table(n_both_neg=2), TrainConfig(arch="resnet18", num_workers=0),
                                    choose_threshold)
    assert rows == "all"
    assert "threshold chosen on all validation rows" in caplog.text


def test_training_on_a_cpu_without_native_bf16_uses_float32(cohort: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    out = train_classifier(cohort, tmp_path / "out", epochs=1, **{**TINY, "eval_test": False,
                                                                   "val_metric": "auc_both"})
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["precision"] == "32-true"
    cfg = json.loads((out / "config.json").read_text())
    # Calibration and the operating point travel with the weights.
    assert cfg["temperature"] > 0 and cfg["temperature"] == summary["calibration"]["temperature"]
    assert cfg["threshold_rows"] in ("both_labels", "all") and cfg["intensity"] == "none"
    history = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert "val_auc_both" in history.columns
    val = pd.read_csv(out / "val_predictions.csv")
    from covidcxr.evaluation.calibration import apply_temperature

    np.testing.assert_allclose(val["prob"], apply_temperature(val["margin"].to_numpy(), cfg["temperature"]))


@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("backbone_lr_scale", 0.0, "backbone_lr_scale must be in"),
    ("freeze_epochs", -1, "freeze_epochs must be >= 0"),
    ("both_label_weight", 0.0, "both_label_weight must be > 0"),
    ("intensity", "hdr", "intensity must be one of"),
    ("weights_dtype", "int8", "weights_dtype must be one of"),
    ("threshold_rows", "some", "threshold_rows must be one of"),
])
def test_new_settings_validate(field: str, value, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(arch="resnet18", **{field: value})


def test_frozen_warmup_and_discriminative_lr() -> None:
    module = ClassifierModule("resnet18", lr=1e-3, backbone_lr_scale=0.1, freeze_epochs=1)

    class _Trainer:  # just what configure_optimizers and the epoch hook read
        estimated_stepping_batches, max_epochs, current_epoch = 10, 2, 0

    module._trainer = _Trainer()
    opt = module.configure_optimizers()["optimizer"]
    lrs = sorted({g["initial_lr"] for g in opt.param_groups})  # before the warm-up scales them
    assert lrs == pytest.approx([1e-4, 1e-3])
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(module.model.parameters()))
