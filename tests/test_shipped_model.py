"""The classifier that ships with the package: loads offline, its hash is checked, predictions are deterministic."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr.classification.artifact import SHIPPED_MODEL_DIR, load_artifact, resolve_model_dir, shipped_model_dir
from covidcxr.errors import ModelError

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "samples"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("COVIDCXR_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _images(n: int = 3) -> list[np.ndarray]:
    from covidcxr.data.synth import draw_cxr

    rng = np.random.default_rng(0)
    return [draw_cxr(rng, i % 2, 256)[0] for i in range(n)]


def test_shipped_model_is_small_and_documented() -> None:
    folder = shipped_model_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 15 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["weights_dtype"] == "float32"  # the features its heads were fitted on, exactly
    assert config["arch"].startswith("efficientnet_lite") and config["pretrained"] == "imagenet"
    assert config["segmenter"]["builtin"] == "lung_unet"  # referenced by hash, not a second copy
    assert 0.0 < config["threshold"] < 1.0 and config["temperature"] > 0
    card = (folder / "MODEL_CARD.md").read_text()
    for needed in ("Intended use", "not a diagnostic device", "Training data", "Known limits", "licence",
                   "two-label", "AP/PA", "Temperature scaling"):
        assert needed.lower() in card.lower(), needed
    # No path of the training machine leaks into a shipped file.
    assert "/work/" not in (folder / "config.json").read_text()


@pytest.mark.usefixtures("offline")
def test_shipped_model_loads_offline_and_is_deterministic() -> None:
    torch.manual_seed(123)  # must not matter
    a = load_artifact(shipped_model_dir(), "cpu")
    images = _images()
    first = a.predict(images)
    torch.manual_seed(456)
    second = load_artifact(shipped_model_dir(), "cpu").predict(images)
    np.testing.assert_array_equal(first.prob, second.prob)
    assert first.label == second.label
    assert np.all((first.prob >= 0) & (first.prob <= 1))
    assert a.network.output_names == ["logits", "embedding", "feature_map", "class_maps"]


def test_shipped_model_weights_hash_is_checked(tmp_path: Path) -> None:
    copy = tmp_path / "shipped"
    shutil.copytree(shipped_model_dir(), copy)
    weights = copy / "model.onnx"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.onnx: exported network is corrupt or was replaced"):
        load_artifact(copy, "cpu")


def test_shipped_model_checks_the_referenced_segmenter(tmp_path: Path) -> None:
    copy = tmp_path / "shipped"
    shutil.copytree(shipped_model_dir(), copy)
    config = json.loads((copy / "config.json").read_text())
    config["segmenter"]["sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    art = load_artifact(copy, "cpu")
    with pytest.raises(ModelError, match="lung segmenter is not the one"):
        art.predict(_images(1))


def test_no_model_argument_means_the_shipped_model(caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="covidcxr.classification"):
        folder, shipped = resolve_model_dir(None)
    assert shipped and folder == SHIPPED_MODEL_DIR
    assert "using the shipped classifier" in caplog.text
    assert resolve_model_dir(Path("elsewhere")) == (Path("elsewhere"), False)


def test_cli_predict_without_model_says_so(tmp_path: Path, capsys) -> None:
    from covidcxr.cli import main

    sample = min(SAMPLES.glob("*.png"))
    out = tmp_path / "p.csv"
    assert main(["predict", str(sample), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "using the shipped classifier" in captured.err
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 1 and 0.0 <= table["prob_covid"][0] <= 1.0


def test_samples_are_attributed() -> None:
    attribution = (SAMPLES / "ATTRIBUTION.md").read_text()
    files = sorted(p.name for p in SAMPLES.glob("*.png"))
    assert files
    for name in files:
        assert name in attribution
    assert "CC BY" in attribution


def test_cli_explain_without_model_uses_the_shipped_one(tmp_path: Path, capsys) -> None:
    from covidcxr.cli import main

    sample = SAMPLES / "hannover_fff13f3a.png"
    assert main(["explain", str(sample), "--out", str(tmp_path / "x"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "using the shipped classifier" in captured.err
    summary = json.loads(captured.out)
    assert 0.0 <= summary["probability"] <= 1.0
    assert summary["threshold"] == pytest.approx(json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())["threshold"])
