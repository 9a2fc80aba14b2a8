"""Hardware choices: bf16 only where native, workers from the CPU count (the probes are mocked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidcxr import device
from covidcxr.errors import ConfigError


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU: oneDNN reports no native bf16, and no GPU."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_native_bf16")
@pytest.mark.parametrize("accelerator", ["auto", "cpu", "gpu"])
def test_auto_training_precision_is_float32_without_native_bf16(accelerator: str) -> None:
    assert device.resolve_precision("auto", accelerator) == "32-true"


@pytest.mark.usefixtures("native_bf16")
def test_auto_training_precision_is_bf16_with_native_bf16() -> None:
    assert device.resolve_precision("auto", "cpu") == "bf16-mixed"


@pytest.mark.usefixtures("no_native_bf16")
def test_explicit_precision_is_kept() -> None:
    assert device.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert device.inference_bf16("cpu", "bf16") is True


def test_probe_failure_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("no oneDNN")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert device.cpu_native_bf16() is False


@pytest.mark.parametrize("fixture", ["no_native_bf16", "native_bf16"])
def test_inference_is_float32_whatever_the_cpu(fixture: str, request, tmp_path, make_tiny_artifact) -> None:
    # Training's `auto` follows the CPU; inference does not: the same labels on an AVX2 workstation and on an
    # AVX-512/AMX server (covidcxr.runtime).
    request.getfixturevalue(fixture)
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.segmentation.segmenter import LungSegmenter

    art = load_artifact(make_tiny_artifact(tmp_path / "m", seed=0), "cpu")
    images = [np.random.default_rng(i).random((40, 40), dtype=np.float32) for i in range(2)]
    np.testing.assert_array_equal(art.predict_proba(images), art.predict_proba(images, bf16=False))
    assert LungSegmenter(None, {"channels": [4, 8], "strides": [2], "input_size": 32}).precision == "fp32"


@pytest.mark.parametrize("bad", ["fp8", "", "bf16-true-ish"])
def test_unknown_precision_raises(bad: str) -> None:
    with pytest.raises(ConfigError, match="precision="):
        device.resolve_precision(bad, "cpu")
    with pytest.raises(ConfigError, match="precision="):
        device.inference_bf16("cpu", bad)


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 1), (4, 3), (64, 8)])
def test_default_workers_follow_the_machine(monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int) -> None:
    monkeypatch.setattr(device, "available_cpus", lambda: cpus)
    assert device.default_num_workers() == workers


def test_train_config_takes_workers_and_normalisation_from_machine_and_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr.classification.train import TrainConfig

    monkeypatch.setattr("covidcxr.classification.config.default_num_workers", lambda: 3)
    cfg = TrainConfig(arch="efficientnet_lite0")
    assert cfg.num_workers == 3
    assert cfg.normalization == "inception"  # what the TF-trained ImageNet weights expect
    assert TrainConfig(arch="resnet18").normalization == "imagenet"
    assert TrainConfig(arch="resnet18", num_workers=0, normalization="gray").num_workers == 0
