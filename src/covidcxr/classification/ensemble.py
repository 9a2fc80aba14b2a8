"""Building ensemble artifacts (probability average, threshold re-chosen on shared validation)."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr import __version__
from covidcxr.classification.artifact import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MEMBERS_DIR,
    VAL_PREDICTIONS_FILE,
    WEIGHTS_FILE,
    _read_config,
    copy_artifact,
)
from covidcxr.errors import ConfigError, ModelError
from covidcxr.evaluation.metrics import safe_auc
from covidcxr.io.files import file_sha256, write_json
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)

def build_ensemble(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    weighted: bool = False,
    force: bool = False,
) -> Path:
    """Combine classifier artifacts into an ensemble artifact (see :func:`make_ensemble`); returns ``out``."""
    return make_ensemble(model_dirs, out, weighted=weighted, force=force)[0]


def make_ensemble(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    weighted: bool = False,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Combine classifier artifacts into a self-contained ensemble artifact (probability average).

    The members are copied into ``out/members/``. Weights are equal, or each member's validation ROC AUC
    (``val_auc`` in its config) with ``weighted``. The threshold is re-chosen (member's method) on the averaged
    validation predictions when all members were validated on the same images; otherwise it is the
    (weighted) mean of the members' thresholds.

    Args:
        model_dirs: Two or more classifier artifact folders.
        out: New artifact folder.
        weighted: Weight members by validation AUC.
        force: Replace an existing ``out``.

    Returns:
        ``(out, its config)``.

    Raises:
        ConfigError: Fewer than two members, or ``out`` exists.
        ModelError: A member is missing, corrupt or itself an ensemble.
    """
    from covidcxr.evaluation.metrics import choose_threshold

    if len(model_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 models, got {len(model_dirs)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: output folder exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    configs = []
    for d in model_dirs:
        cfg = _read_config(Path(d))
        if cfg.get("kind", "classifier") != "classifier":
            raise ModelError(f"{Path(d) / CONFIG_FILE}: nested ensembles are not supported")
        weights_file = Path(d) / cfg.get("weights_file", WEIGHTS_FILE)
        if not weights_file.is_file() or file_sha256(weights_file) != cfg.get("weights_sha256"):
            raise ModelError(f"{weights_file}: weights file missing or corrupt (SHA-256 differs from config.json)")
        configs.append(cfg)
    if weighted:
        aucs = [c.get("val_auc") for c in configs]
        bad = [str(d) for d, a in zip(model_dirs, aucs) if a is None or not math.isfinite(float(a))]
        if bad:
            raise ConfigError(f"--weighted needs val_auc in each member's config; missing for {bad}")
        weights = np.asarray(aucs, dtype=float)
    else:
        weights = np.ones(len(configs))
    weights = weights / weights.sum()

    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (d, cfg, w) in enumerate(zip(model_dirs, configs, weights)):
        rel = f"{MEMBERS_DIR}/m{i}_{cfg['arch']}"
        copy_artifact(d, out / rel)
        members.append(
            {"dir": rel, "source": str(Path(d).resolve()), "weight": float(w), "arch": cfg["arch"],
             "seg_mode": cfg["seg_mode"], "val_auc": cfg.get("val_auc"), "threshold": cfg["threshold"],
             "weights_sha256": cfg["weights_sha256"]}
        )

    method = configs[0].get("threshold_method", "youden")
    target = configs[0].get("target_sensitivity")
    val = _shared_val_predictions([Path(d) for d in model_dirs], weights)
    if val is not None:
        threshold = choose_threshold(val["y"].to_numpy(), val["prob"].to_numpy(), method,
                                     target if method == "sensitivity" else None)
        threshold_source = "validation"
        val_auc = safe_auc(val["y"].to_numpy(), val["prob"].to_numpy())
        val.to_csv(out / VAL_PREDICTIONS_FILE, index=False)
    else:
        threshold = float(np.average([float(c["threshold"]) for c in configs], weights=weights))
        threshold_source = "mean_of_members"
        val_auc = None
    digest = hashlib.sha256("".join(f"{m['weights_sha256']}:{m['weight']:.6f};" for m in members).encode())
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "ensemble",
        "members": members,
        "weighted": bool(weighted),
        "threshold": float(threshold),
        "threshold_method": method,
        "target_sensitivity": target,
        "threshold_source": threshold_source,
        "val_auc": val_auc,
        "class_names": list(configs[0].get("class_names", LABELS)),
        "weights_sha256": digest.hexdigest(),
        "package_version": __version__,
    }
    write_json(out / CONFIG_FILE, config)
    log.info("ensemble of %d models -> %s (threshold %.4f from %s)", len(members), out, threshold, threshold_source)
    return out, config


def _shared_val_predictions(dirs: Sequence[Path], weights: np.ndarray) -> pd.DataFrame | None:
    frames = []
    for d in dirs:
        path = d / VAL_PREDICTIONS_FILE
        if not path.is_file():
            return None
        frame = pd.read_csv(path)
        if not {"image", "y", "prob"} <= set(frame.columns):
            return None
        frames.append(frame.sort_values("image").reset_index(drop=True))
    first = frames[0]
    for f in frames[1:]:
        if len(f) != len(first) or not (f["image"].to_numpy() == first["image"].to_numpy()).all():
            return None
        if not (f["y"].to_numpy() == first["y"].to_numpy()).all():
            return None
    merged = first.copy()
    merged["prob"] = np.average(np.stack([f["prob"].to_numpy() for f in frames]), axis=0, weights=weights)
    return merged
