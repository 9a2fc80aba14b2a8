"""Shared pytest fixtures: small, seeded, synthetic data made on the fly (never the network or real images)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a small synthetic cohort (24 patients, 128 px, seed 0, PNG and DICOM images)."""
    from covidcxr.data.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("synth_cohort"), n_patients=24, seed=0, size=128)


@pytest.fixture(scope="session")
def make_tiny_artifact():
    """Factory of tiny untrained resnet18 artifacts (32 px, no segmentation): ``make(directory, seed) -> Path``."""
    import torch

    from covidcxr.classification.artifact import save_artifact
    from covidcxr.models.classifier import create_classifier
    from covidcxr.models.registry import IMAGENET_MEAN, IMAGENET_STD
    from covidcxr.transforms.augment import cache_size_for

    def make(directory: Path, seed: int, size: int = 32) -> Path:
        torch.manual_seed(seed)
        config = {
            "arch": "resnet18", "input_size": size, "cache_size": cache_size_for(size),
            "normalization": {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "seg_mode": "none", "threshold": 0.5,
        }
        return save_artifact(directory, create_classifier("resnet18").eval(), config)

    return make
