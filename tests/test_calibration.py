"""Temperature scaling: fitted on validation, lowers the NLL of a miscalibrated set, applied at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidcxr.errors import ConfigError
from covidcxr.evaluation.calibration import apply_temperature, fit_temperature, nll
from covidcxr.evaluation.metrics import expected_calibration_error


def _miscalibrated(scale: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the 'network' reports scale * z (over-confident when scale > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    return scale * z, y


@pytest.mark.parametrize("scale", [4.0, 0.4])
def test_temperature_recovers_the_miscalibration_and_lowers_nll(scale: float) -> None:
    margins, y = _miscalibrated(scale)
    t = fit_temperature(margins, y)
    assert t == pytest.approx(scale, rel=0.15)
    assert nll(margins, y, t) < nll(margins, y, 1.0) - 0.01
    before = expected_calibration_error(y, apply_temperature(margins, 1.0))
    after = expected_calibration_error(y, apply_temperature(margins, t))
    assert after < before / 2


def test_temperature_keeps_the_ranking() -> None:
    margins, _ = _miscalibrated(3.0, n=200)
    assert np.array_equal(np.argsort(apply_temperature(margins, 1.0)), np.argsort(apply_temperature(margins, 3.0)))


def test_single_class_has_nothing_to_fit() -> None:
    assert fit_temperature(np.array([1.0, 2.0, 3.0]), np.array([1, 1, 1])) == 1.0


def test_extreme_margins_stay_finite() -> None:
    p = apply_temperature(np.array([-1e4, 0.0, 1e4]))
    assert np.all(np.isfinite(p)) and p[0] == 0.0 and p[1] == 0.5 and p[2] == 1.0
    assert np.isfinite(nll(np.array([-1e4, 1e4]), np.array([1, 0])))


@pytest.mark.parametrize(("margins", "y", "t", "pattern"), [
    ([0.0, 1.0], None, 0.0, "temperature must be a positive number"),
    ([0.0, np.inf], None, 1.0, "must be finite"),
    ([0.0, 1.0], [0, 2], 1.0, "labels must be 0/1"),
    ([0.0, 1.0], [0], 1.0, "got 1 labels for 2 margins"),
])
def test_bad_inputs_raise(margins, y, t, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        if y is None:
            apply_temperature(np.asarray(margins), t)
        else:
            fit_temperature(np.asarray(margins), np.asarray(y))


def test_artifact_applies_the_stored_temperature(tmp_path, make_tiny_artifact) -> None:
    import json

    from covidcxr.classification.artifact import load_artifact

    directory = make_tiny_artifact(tmp_path / "m", seed=0)
    art = load_artifact(directory, "cpu")
    x = torch.rand(6, 1, 32, 32)
    margin, _ = art.forward_margins(x)
    p1, _ = art.forward_batches(x)
    np.testing.assert_allclose(p1, apply_temperature(margin, 1.0))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "temperature": 2.5}))
    hot = load_artifact(directory, "cpu")
    assert hot.temperature == 2.5
    p2, _ = hot.forward_batches(x)
    np.testing.assert_allclose(p2, apply_temperature(margin, 2.5), atol=1e-12)
    assert not np.allclose(p1, p2)
