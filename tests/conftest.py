"""Shared pytest fixtures: small, seeded, synthetic data made on the fly (never the network or real images)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a small synthetic cohort (24 patients, 128 px, seed 0, PNG and DICOM images)."""
    from covidcxr.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("synth_cohort"), n_patients=24, seed=0, size=128)
