"""A tiny untrained model, lung segmenter and case index on synthetic X-rays, for tests and the load benchmark.

Everything is built in seconds on a CPU with the package's own public functions (``create_classifier`` +
``save_artifact``, ``build_unet`` + ``save_unet``, ``CaseIndex``). The networks are randomly initialised: the
numbers they give exercise the service, they mean nothing clinically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def toy_classifier(arch: str, images: list[np.ndarray], input_size: int = 64, seed: int = 0) -> Any:
    """A randomly initialised classifier whose head is set so that its outputs are not degenerate.

    The covid logit is made to grow with every feature (so Grad-CAM maps are not empty) and is centred and scaled
    on ``images`` (so probabilities spread around 0.5 instead of saturating).

    Args:
        arch: Registry architecture.
        images: A few float ``H x W`` images in [0, 1] to centre the logits on.
        input_size: Side the images are resized to.
        seed: Seed of the initialisation.

    Returns:
        A :class:`~covidcxr.models.CxrClassifier` in eval mode.
    """
    import torch

    from covidcxr.models.classifier import create_classifier

    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        model = create_classifier(arch, "none", mean=[0.5], std=[0.25]).eval()
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32))[None] for im in images])
    x = torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True)
    with torch.no_grad():
        w = model.head.weight[1].abs()
        z = model.forward_features(x) @ w
        scale = 1.0 / (float(z.std()) + 1e-6) if len(images) > 1 else 1.0 / (float(z.abs().mean()) + 1e-6)
        model.head.weight[1] = w * scale / 2
        model.head.weight[0] = -w * scale / 2
        model.head.bias[1] = -float(z.mean()) * scale / 2
        model.head.bias[0] = float(z.mean()) * scale / 2
    return model


@dataclass
class ToyAssets:
    """Paths of the toy model, segmenter weights, index and the synthetic images used for the index."""

    model_dir: Path
    index_dir: Path
    segmenter_weights: Path
    images: list[Path]


def make_toy_assets(
    out_dir: str | Path,
    *,
    arch: str = "resnet18",
    input_size: int = 64,
    n_cases: int = 24,
    image_size: int = 96,
    seg_mode: str = "mask",
    seed: int = 0,
    shipped_segmenter: bool = True,
) -> ToyAssets:
    """Write a toy model artifact (with its own tiny lung U-Net), a case index and synthetic images.

    Args:
        out_dir: Folder to write into (created).
        arch: Classifier architecture from the registry.
        input_size: Classifier input side.
        n_cases: Cases in the index (half covid), three images per patient.
        image_size: Side of the synthetic X-rays.
        seg_mode: Segmentation mode stored in the artifact (``none``, ``mask`` or ``crop``).
        seed: Seed of the networks' initialisation and of the synthetic images.
        shipped_segmenter: Use the package's trained lung U-Net when it ships (realistic masks and QC); else, or
            when it is absent, a tiny untrained U-Net.

    Returns:
        The :class:`ToyAssets` paths.
    """
    import pandas as pd
    import torch

    from covidcxr.classification.artifact import load_artifact, save_artifact
    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.files import save_png
    from covidcxr.models.unet import build_unet
    from covidcxr.retrieval.index import CaseIndex
    from covidcxr.segmentation.weights import default_weights_path, save_unet, shipped_weights_available

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_cfg = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "input_size": 64}
    if shipped_segmenter and shipped_weights_available():
        seg_weights = default_weights_path()
    else:
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
            torch.manual_seed(seed)
            unet = build_unet(unet_cfg)
        seg_weights = save_unet(unet, unet_cfg, out / "segmenter")

    rng = np.random.default_rng(seed)
    images, rows, arrays = [], [], []
    (out / "images").mkdir(exist_ok=True)
    for i in range(n_cases):
        label = "covid" if i % 2 else "non_covid"
        image, _, info = draw_cxr(rng, label, size=image_size)
        path = save_png(out / "images" / f"case{i:03d}.png", image)
        images.append(path)
        arrays.append(image)
        rows.append({"case_id": f"case{i:03d}", "patient_id": f"P{i // 3:03d}", "label": label,
                     "source": "synthetic", "view": info["view"], "image": str(path)})

    model = toy_classifier(arch, arrays, input_size, seed)
    config = {
        "arch": arch,
        "input_size": input_size,
        "normalization": {"name": "gray", "mean": [0.5], "std": [0.25]},
        "seg_mode": seg_mode,
        "threshold": 0.5,
        "class_names": ["non_covid", "covid"],
    }
    model_dir = save_artifact(out / "model", model, config, segmenter_weights=seg_weights)
    artifact = load_artifact(model_dir, "cpu")
    embeddings = artifact.embed(arrays)
    index_dir = CaseIndex(kind="exact", model_hash=artifact.weights_hash).fit(embeddings, pd.DataFrame(rows)).save(
        out / "index"
    )
    return ToyAssets(model_dir=Path(model_dir), index_dir=Path(index_dir), segmenter_weights=Path(seg_weights),
                     images=images)
