"""Temperature scaling (Guo et al., 2017): one scalar that makes the network's probabilities honest.

The two-class network's logit margin ``m = logit_covid - logit_non_covid`` gives ``p = sigmoid(m)``; temperature
scaling replaces it by ``sigmoid(m / T)`` with ``T`` fitted on validation by minimising the negative
log-likelihood. Ranking (ROC AUC) is unchanged; probabilities and the ECE change.
"""

from __future__ import annotations

import math

import numpy as np

from covidcxr.errors import ConfigError

# A temperature outside this range means the validation set is degenerate (e.g. perfectly separated).
T_MIN, T_MAX = 0.05, 20.0


def _check(margins: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(m)):
        raise ConfigError("logit margins must be finite")
    if y is None:
        return m, None
    yy = np.asarray(y).reshape(-1)
    if yy.shape != m.shape:
        raise ConfigError(f"got {len(yy)} labels for {len(m)} margins")
    if not np.isin(yy, (0, 1)).all():
        raise ConfigError(f"labels must be 0/1, got {sorted(set(yy.tolist()))[:5]}")
    return m, yy.astype(np.float64)


def apply_temperature(margins: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probability of the positive class from logit margins at ``temperature``.

    Args:
        margins: ``logit_1 - logit_0`` per image.
        temperature: ``T > 0``.

    Returns:
        ``sigmoid(margins / T)`` as float64.

    Raises:
        ConfigError: Non-positive temperature or non-finite margins.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    m, _ = _check(margins)
    z = m / temperature
    # Numerically stable sigmoid for large |z|.
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def nll(margins: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` under ``sigmoid(margins / T)``."""
    m, yy = _check(margins, y)
    z = m / temperature
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, computed without overflow.
    return float(np.mean(np.logaddexp(0.0, np.where(yy == 1, -z, z))))


def fit_temperature(margins: np.ndarray, y: np.ndarray) -> float:
    """Temperature that minimises the validation NLL.

    Args:
        margins: Validation logit margins.
        y: Validation labels (0/1); both classes should be present.

    Returns:
        ``T`` in ``[T_MIN, T_MAX]`` (1.0 when ``y`` holds a single class: nothing to fit).

    Raises:
        ConfigError: Bad inputs.
    """
    from scipy.optimize import minimize_scalar

    m, yy = _check(margins, y)
    if m.size == 0 or np.unique(yy).size < 2:
        return 1.0
    # Optimise log T: the NLL is smooth and unimodal in it, and the bounds stay symmetric around T = 1.
    res = minimize_scalar(lambda lt: nll(m, yy, math.exp(lt)), bounds=(math.log(T_MIN), math.log(T_MAX)),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))
