"""Classifier training with Lightning: cached data, class balancing, warm-up + cosine AdamW, AUC-based checkpoints.

``train_classifier`` reads a manifest (using its ``split`` column, or making a patient-level split), decodes every
image once into an in-RAM uint8 cache (segmentation mode applied, squashed to ~1.15 x the input size) so epochs
only run augmentation, trains with early stopping and the best checkpoint on validation ROC AUC, chooses the
decision threshold on validation predictions, evaluates the test split with that threshold, and writes a model
artifact into ``out`` (which also holds ``checkpoints/``, ``logs/`` and the ``masks/`` cache).

Multi-GPU and multi-node training use Lightning's DDP (``devices``, ``num_nodes``, ``strategy``); only global
rank zero prepares ``out`` and writes the artifact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from covidcxr.classification.artifact import save_artifact
from covidcxr.classification.cache import (
    _Data,
    _label_array,
    _loaders,
    _prepare_data,
)
from covidcxr.classification.config import VAL_METRICS, TrainConfig
from covidcxr.classification.inference import ModelArtifact
from covidcxr.classification.module import ClassifierModule, EpochTimer
from covidcxr.classification.operating_point import fit_operating_point
from covidcxr.device import (
    resolve_device,
    resolve_precision,
    uses_cuda,
)
from covidcxr.errors import ConfigError
from covidcxr.io.files import json_safe
from covidcxr.models.registry import NORMALIZATIONS
from covidcxr.training import RESUME_WARNINGS, GracefulStop, lightning_output
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)

# auc_both: validation ROC AUC on rows of sources that hold both labels, where recognising the source cannot help.




# ---------------------------------------------------------------------------------------------------------
# Lightning module
# ---------------------------------------------------------------------------------------------------------








# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
















def prepare_split(df: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """Use the manifest's ``split`` column, or make a patient-level split (``data.patient_split``).

    Args:
        df: Manifest table.
        cfg: Settings (fractions, group column, seed).

    Returns:
        Copy of ``df`` with ``split`` in {train, val, test}.

    Raises:
        ConfigError: Unknown split values, an empty train/val split, or a validation split with one class.
    """
    from covidcxr.data.split import patient_split

    has_split = "split" in df.columns and (df["split"].astype(str).str.strip().isin(["train", "val", "test"])).all()
    if has_split:
        out = df.copy()
        out["split"] = out["split"].astype(str).str.strip()
    else:
        if "split" in df.columns and (df["split"].astype(str).str.strip() != "").any():
            bad = sorted(set(df["split"].astype(str).str.strip()) - {"train", "val", "test"})
            raise ConfigError(f"manifest column 'split' has values {bad}; valid: train, val, test (or leave empty)")
        out = patient_split(df.drop(columns=["split"], errors="ignore"), cfg.val_fraction, cfg.test_fraction,
                            group_col=cfg.group_col, seed=cfg.seed)
    y = _label_array(out)
    for name in ("train", "val"):
        sel = (out["split"] == name).to_numpy()
        if not sel.any():
            raise ConfigError(f"split {name!r} is empty; a classifier needs train and val rows")
        if np.unique(y[sel]).size < 2:
            raise ConfigError(f"split {name!r} holds only one class; threshold and AUC need both labels")
    return out


def _data_summary(df: pd.DataFrame) -> dict[str, Any]:
    counts: dict[str, Any] = {"n_images": len(df), "n_patients": int(df["patient_id"].nunique())}
    counts["per_split_label"] = {
        s: {k: int(v) for k, v in g["label"].value_counts().sort_index().items()} for s, g in df.groupby("split")
    }
    if "source" in df.columns:
        counts["per_split_source_label"] = {
            s: {src: {k: int(v) for k, v in gg["label"].value_counts().sort_index().items()}
                for src, gg in g.groupby("source")}
            for s, g in df.groupby("split")
        }
    counts["patients_per_split"] = {s: int(g["patient_id"].nunique()) for s, g in df.groupby("split")}
    return counts


def _is_global_zero() -> bool:
    # Before the Trainer exists, the launcher's environment tells the rank (Lightning/torchrun/SLURM set these).
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    if not _is_global_zero():
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"{out / 'checkpoints' / 'last.ckpt'}: nothing to resume from")
        return
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: output folder exists and is not empty (use --resume to continue or --force)")
        # Only our own files: --out might be a folder holding other things (the mask cache stays valid).
        for name in ("checkpoints", "logs", "test_eval"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("config.json", "model.safetensors", "val_predictions.csv", "test_predictions.csv",
                     "split.csv", "train_summary.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "segmenter", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)




@dataclass
class TrainResult:
    """What a training run produced: the artifact folder, its config and the run summary (None off rank zero)."""

    out: Path
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


def train_classifier(
    manifest: str | Path | pd.DataFrame,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    **settings: Any,
) -> Path:
    """Train a COVID classifier and write its artifact into ``out`` (see :func:`fit_classifier`); returns ``out``."""
    return fit_classifier(manifest, out, config, resume=resume, force=force, **settings).out


def fit_classifier(
    manifest: str | Path | pd.DataFrame,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    **settings: Any,
) -> TrainResult:
    """Train a COVID classifier and write its artifact into ``out``.

    Args:
        manifest: Manifest CSV path or a table from ``data.read_manifest`` (``split`` column used if complete).
        out: Run folder; becomes the artifact (plus ``checkpoints/``, ``logs/``, ``masks/``, ``test_eval/``).
        config: Settings; keyword ``settings`` override its fields (or build one when None).
        resume: Continue from ``out/checkpoints/last.ckpt``.
        force: Reuse a non-empty ``out`` (its previous run files are removed).
        **settings: :class:`TrainConfig` fields.

    Returns:
        The :class:`TrainResult` (``out`` is the artifact directory).

    Raises:
        ConfigError: Bad settings, an occupied ``out``, unusable splits.
        ManifestError: Invalid manifest.
        PretrainedWeightsError: Pretrained weights unavailable.
        Interrupted: SIGINT/SIGTERM stopped training; ``out/checkpoints/last.ckpt`` holds the state reached
            (continue with ``resume=True``).
    """
    from covidcxr.data.manifest import read_manifest

    cfg = dataclasses.replace(config, **settings) if config is not None else TrainConfig(**settings)
    out = Path(out)
    _prepare_out(out, resume, force)
    t_start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else manifest
    df = prepare_split(df, cfg).reset_index(drop=True)
    if _is_global_zero():
        cols = [c for c in ("image", "patient_id", "label", "source", "view", "split") if c in df.columns]
        df[cols].to_csv(out / "split.csv", index=False)
    data = _prepare_data(df, cfg, out)
    module, fit = _fit(data, cfg, out, resume)
    if fit is None:  # not rank zero: the artifact is rank zero's job
        return TrainResult(out)

    model = module.model.to(memory_format=torch.contiguous_format).cpu().eval()
    if cfg.weights_dtype == "float16":  # calibrate the weights that will be shipped
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.half().float())
    device = resolve_device("cuda" if uses_cuda(cfg.accelerator) else "cpu")
    # Validation (temperature, threshold) runs through the exported network, the path that serves the model.
    from covidcxr.classification.artifact import ONNX_FILE
    from covidcxr.models.export import export_classifier
    from covidcxr.runtime import OnnxNetwork

    export_classifier(model, out / ONNX_FILE, cfg.image_size)
    mean, std = NORMALIZATIONS[cfg.normalization]
    config: dict[str, Any] = {
        "arch": cfg.arch,
        "input_size": cfg.image_size,
        "normalization": {"name": cfg.normalization, "mean": list(mean), "std": list(std)},
        "seg_mode": cfg.seg_mode,
        "intensity": cfg.intensity,
        "pretrained": cfg.pretrained if cfg.pretrained in ("imagenet", "none") else "path",
        "temperature": 1.0,
        "threshold": 0.5,
        "threshold_method": cfg.threshold_method,
        "target_sensitivity": cfg.target_sensitivity,
        "class_names": list(LABELS),
        "bf16_inference": cfg.bf16_inference,
        "weights_sha256": "",
    }
    art = ModelArtifact(out, {**config, "num_features": model.num_features}, OnnxNetwork(out / ONNX_FILE))
    val_pred = data.predict(art, "val", 2 * cfg.batch_size)
    point = fit_operating_point(val_pred, cfg)
    summary: dict[str, Any] = {
        "data": _data_summary(df),
        "manifest": df.attrs.get("manifest"),
        "settings": cfg.to_dict(),
        **fit,
        "val_auc": point.val_auc,
        "val_auc_both": point.val_auc_both,
        "threshold_rows": point.threshold_rows,
        "calibration": point.calibration,
        "cache_seconds": data.cache_seconds,
        "device": _device_name(device),
        "qc_flag_counts": _qc_counts(data.qc),
    }
    config.update(temperature=point.temperature, threshold=point.threshold, threshold_rows=point.threshold_rows,
                  val_auc=point.val_auc, val_auc_both=point.val_auc_both, training=summary,
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    keep = [c for c in ("image", "patient_id", "label", "source", "view", "source_has_both_labels", "y", "margin",
                        "prob_uncalibrated", "prob", "pred_label") if c in val_pred]
    save_artifact(out, model, config, segmenter_weights=data.seg_weights, val_predictions=val_pred[keep],
                  weights_dtype=cfg.weights_dtype)
    if cfg.eval_test and len(data.idx["test"]):
        _test_report(data.predict(art, "test", 2 * cfg.batch_size), point.threshold, out, cfg, summary)
    summary["total_seconds"] = time.perf_counter() - t_start
    (out / "train_summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return TrainResult(out, config, summary)








def _fit(data: _Data, cfg: TrainConfig, out: Path, resume: bool) -> tuple[ClassifierModule, dict[str, Any] | None]:
    """Run Lightning's fit and load the best checkpoint; returns the module and run facts (None off rank zero).

    Raises:
        Interrupted: SIGINT/SIGTERM stopped training after saving ``out/checkpoints/last.ckpt``.
    """
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    train_dl, val_dl, class_weights = _loaders(data, cfg)
    mean, std = NORMALIZATIONS[cfg.normalization]
    module = ClassifierModule(
        cfg.arch, "none" if resume else cfg.pretrained, mean, std, cfg.drop_rate, cfg.peak_lr, cfg.weight_decay,
        cfg.warmup_epochs, class_weights, channels_last=cfg.channels_last,
        backbone_lr_scale=cfg.backbone_lr_scale, freeze_epochs=cfg.freeze_epochs,
    )
    monitor, mode = VAL_METRICS[cfg.val_metric]
    # Best: weights only (a third of a full checkpoint, written often early on); last: full state for --resume.
    ckpt_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                              save_top_k=1, save_weights_only=True, auto_insert_metric_name=False)
    last_cb = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True)
    timer = EpochTimer()
    # SIGINT/SIGTERM: last.ckpt at the step reached (full state, what --resume loads), then Interrupted.
    stop = GracefulStop(out / "checkpoints" / "last.ckpt")
    callbacks: list[L.Callback] = [ckpt_cb, last_cb, timer, LearningRateMonitor(logging_interval="epoch"), stop]
    if cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience))
    precision = resolve_precision(str(cfg.precision), cfg.accelerator)
    log.info("training precision %s (asked: %s), channels_last=%s, %d DataLoader workers", precision, cfg.precision,
             cfg.channels_last, cfg.num_workers)
    history = out / "logs" / "version_0" / "metrics.csv"
    backup = history.with_name("metrics.before_resume.csv")
    # On --resume the run folder holds the earlier logs and checkpoints on purpose (the history is merged below).
    known = (*RESUME_WARNINGS, (r"Experiment logs directory .* exists and is not empty",
                                r"lightning\.fabric\.loggers\.csv_logs")) if resume else ()
    with lightning_output(known), stop:
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=precision,
            callbacks=callbacks,
            logger=CSVLogger(out, name="logs", version=0),
            default_root_dir=out,
            enable_progress_bar=cfg.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(10, len(train_dl))),
            benchmark=uses_cuda(cfg.accelerator),
        )
        if resume and _is_global_zero():
            _merge_history(history, backup)  # left over by a resumed run that died before merging
            if history.is_file():
                shutil.copy2(history, backup)  # Lightning's CSV logger deletes metrics.csv when it starts
        t0 = time.perf_counter()
        try:
            trainer.fit(module, train_dl, val_dl, ckpt_path=out / "checkpoints" / "last.ckpt" if resume else None)
        except BaseException:
            stop.raise_if_stopped()
            raise
        finally:
            if trainer.is_global_zero:  # an interrupted resumed run keeps its whole history too
                _merge_history(history, backup)
    stop.raise_if_stopped()  # a signal during the last step: the run is complete, the exit status says stopped
    fit_seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return module, None
    best_path = ckpt_cb.best_model_path or str(out / "checkpoints" / "last.ckpt")
    if Path(best_path).is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module, {"precision": precision, "best_checkpoint": Path(best_path).name,
                    "best_epoch": _best_epoch(history, monitor, mode), "epochs_run": int(trainer.current_epoch),
                    "history": str(history.relative_to(out)), "fit_seconds": fit_seconds, **timer.summary()}


def _test_report(test_pred: pd.DataFrame, threshold: float, out: Path, cfg: TrainConfig,
                 summary: dict[str, Any]) -> None:
    """Test predictions at the validation threshold, calibration error and the metric report (into ``summary``)."""
    from covidcxr.evaluation.metrics import expected_calibration_error

    two = np.unique(test_pred["y"]).size == 2
    summary["test_ece_before"] = expected_calibration_error(test_pred["y"], test_pred["prob_uncalibrated"]) \
        if two else None
    summary["test_ece_after"] = expected_calibration_error(test_pred["y"], test_pred["prob"]) if two else None
    test_pred["pred_label"] = np.where(test_pred["prob"] >= threshold, LABELS[1], LABELS[0])
    test_pred.to_csv(out / "test_predictions.csv", index=False)
    if two:
        result = _evaluate_test(test_pred, threshold, out / "test_eval", cfg)
        summary["test_metrics"] = str(Path("test_eval") / "metrics.json")
        summary["test_roc_auc"] = result["overall"]["roc_auc"]["value"]


def _merge_history(history: Path, backup: Path) -> None:
    """Put the rows of the run before ``--resume`` (``backup``) in front of the resumed run's ``history``."""
    if not backup.is_file():
        return
    parts = [pd.read_csv(backup)] + ([pd.read_csv(history)] if history.is_file() and history.stat().st_size else [])
    history.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(parts, ignore_index=True).to_csv(history, index=False)
    backup.unlink()




def _evaluate_test(pred: pd.DataFrame, threshold: float, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Test metrics at the validation threshold; plots and reports need matplotlib, metrics.json does not."""
    from covidcxr.evaluation.metrics import evaluate_predictions

    title = f"{cfg.arch} seg={cfg.seg_mode} test split"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib not installed: writing %s without plots or reports", out_dir / "metrics.json")
        result = evaluate_predictions(pred, threshold, None, n_boot=cfg.n_boot, seed=cfg.seed, title=title)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        return result
    return evaluate_predictions(pred, threshold, out_dir, n_boot=cfg.n_boot, seed=cfg.seed, title=title)




def _best_epoch(history: Path, monitor: str, mode: str) -> int | None:
    try:
        h = pd.read_csv(history)
    except (OSError, pd.errors.EmptyDataError):
        return None
    if monitor not in h.columns or h[monitor].notna().sum() == 0:
        return None
    col = h.dropna(subset=[monitor])
    row = col[monitor].idxmax() if mode == "max" else col[monitor].idxmin()
    return int(col.loc[row, "epoch"])


def _qc_counts(qc: Sequence[Sequence[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for flags in qc:
        for f in flags:
            counts[f] = counts.get(f, 0) + 1
    return counts


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def load_history(out: str | Path) -> pd.DataFrame:
    """Training history (one row per logged step/epoch) from the run's CSV log.

    Args:
        out: The training run folder.

    Returns:
        The metrics table.
    """
    return pd.read_csv(Path(out) / "logs" / "version_0" / "metrics.csv")


