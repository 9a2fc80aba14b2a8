"""Lung U-Net training: patient-level split, cached data, loss, Lightning run, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.errors import ConfigError, ManifestError
from covidcxr.segmentation.data import read_seg_manifest, select_saved_split, split_pairs
from covidcxr.segmentation.segmenter import LungSegmenter
from covidcxr.segmentation.train import LungSegModule, dice_per_image, train_segmenter
from covidcxr.segmentation.weights import install_weights

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "input_size": 32}


@pytest.fixture(scope="module")
def pair_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic image/mask pairs from 12 patients of two datasets; 4 images carry a second annotator's mask."""
    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.files import save_png

    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image, mask, _ = draw_cxr(rng, "covid" if i % 2 else "non_covid", size=48)
        save_png(root / "images" / f"p{i}.png", image)
        save_png(root / "masks" / f"p{i}.png", mask * np.uint8(255))
        dataset = "jsrt" if i < 6 else "ieee"
        source = f"{dataset} + annotator_a"
        rows.append((f"images/p{i}.png", f"masks/p{i}.png", f"pt{i}", f"annotator_a/{dataset}", source))
        if i >= 8:
            save_png(root / "masks" / f"p{i}_b.png", mask * np.uint8(255))
            rows.append((f"images/p{i}.png", f"masks/p{i}_b.png", f"pt{i}", "annotator_b/x", f"{dataset} + b"))
    df = pd.DataFrame(rows, columns=["image", "mask", "patient_id", "mask_source", "source"])
    df.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_read_seg_manifest_lists_problems(tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.png", ""], "patient_id": ["p", "q"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="missing column 'mask'"):
        read_seg_manifest(tmp_path / "m.csv")
    pd.DataFrame({"image": ["a.png"], "mask": ["b.png"], "patient_id": ["p"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="2 file"):
        read_seg_manifest(tmp_path / "m.csv")


def test_split_keeps_patients_and_images_together(pair_manifest: Path) -> None:
    df = read_seg_manifest(pair_manifest)
    table = split_pairs(df, val=0.17, test=0.17, seed=3)
    assert table.index.equals(df.index) and set(table["split"]) == {"train", "val", "test"}
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert (table.groupby("image")["split"].nunique() == 1).all()
    dataset = table["source"].str.split(" + ", regex=False).str[0]
    assert (pd.crosstab(dataset, table["split"]) > 0).all().all()  # every dataset reaches every split
    again = split_pairs(read_seg_manifest(pair_manifest), val=0.17, test=0.17, seed=3)
    assert table["split"].tolist() == again["split"].tolist()


def test_select_split_matches_rows(pair_manifest: Path, tmp_path: Path) -> None:
    df = read_seg_manifest(pair_manifest)
    table = split_pairs(df, seed=0)
    split_csv = tmp_path / "split.csv"
    table.rename(columns={"image": "abs", "rel_image": "image", "mask": "abs_m", "rel_mask": "mask"})[
        ["image", "mask", "split"]
    ].to_csv(split_csv, index=False)
    test = select_saved_split(df, split_csv, "test")
    assert len(test) == (table["split"] == "test").sum()
    pd.DataFrame({"image": ["x.png"], "mask": ["y.png"], "split": ["test"]}).to_csv(split_csv, index=False)
    with pytest.raises(ManifestError, match="not in this manifest"):
        select_saved_split(df, split_csv, "test")


def test_dice_per_image() -> None:
    a = torch.zeros(2, 1, 4, 4)
    a[0, 0, :2] = 1
    b = a.clone()
    b[0, 0, 0] = 0
    assert torch.allclose(dice_per_image(a, b), torch.tensor([2 * 4 / 12, 1.0]))


def test_tiny_training_loss_falls() -> None:
    from covidcxr.data.synth import draw_cxr

    rng = np.random.default_rng(1)
    pairs = [draw_cxr(rng, "non_covid", size=32)[:2] for _ in range(8)]
    image = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    mask = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LungSegModule(TINY)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):  # loss before, after step 1, after step 2
        loss = module.loss(module(image), mask)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[2] < losses[0]


def test_train_export_resume_install(pair_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kwargs = {"batch_size": 4, "config": TINY, "accelerator": "cpu", "num_workers": 0, "precision": "32-true",
              "progress": False, "val": 0.17, "test": 0.17, "augment": {"degrees": 5.0}}
    weights = train_segmenter(pair_manifest, out, epochs=1, **kwargs)
    assert weights == out / "lung_unet.safetensors" and weights.is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file() and list(out.glob("logs/version_*/metrics.csv"))
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["image", "mask", "patient_id", "mask_source", "split"]
    config = json.loads((out / "lung_unet.json").read_text())
    assert config["input_size"] == 32 and config["trained"]["epochs"] == 1
    assert 0.0 <= config["trained"]["val"]["val_dice"] <= 1.0
    assert sorted(map(tuple, config["split"]["test_pairs"])) == sorted(
        map(tuple, split.loc[split["split"] == "test", ["image", "mask"]].to_numpy())
    )
    test_dice = json.loads((out / "test_dice.json").read_text())
    assert test_dice["all"]["n"] == (split["split"] == "test").sum()

    with pytest.raises(ConfigError, match="--resume"):
        train_segmenter(pair_manifest, out, epochs=2, **kwargs)
    train_segmenter(pair_manifest, out, epochs=2, resume=True, evaluate=False, **kwargs)
    assert json.loads((out / "lung_unet.json").read_text())["trained"]["epochs"] == 2

    segmenter = LungSegmenter.load(out)
    assert segmenter.predict(np.zeros((40, 40), np.float32))[0].mask.shape == (40, 40)
    installed = install_weights(out, tmp_path / "pkg_weights")
    assert installed.is_file() and (tmp_path / "pkg_weights" / "lung_unet.json").is_file()
