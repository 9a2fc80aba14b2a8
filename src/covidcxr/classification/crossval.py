"""K-fold (or leave-one-group-out) cross-validation of the classifier: out-of-fold predictions for every row.

Each fold trains one model with the ordinary training code (:func:`~covidcxr.classification.train.fit_classifier`,
every :class:`~covidcxr.classification.config.TrainConfig` setting) on the other folds only: its validation rows
(early stopping, best checkpoint, temperature, threshold) are a patient split of the training folds, never the
held-out fold, which the finished model then predicts through the inference path (with embeddings). No model, and no
head on a model's embedding, is ever scored on a row it was fitted on.

``out`` holds::

    plan.json        manifest fingerprint, folds, settings: a rerun with --resume must match it
    folds.csv        the fold of every manifest row
    fold_<i>/        the fold's training run = a model artifact; heldout.csv + heldout_embeddings.npy when done
    masks/           lung masks shared by all folds (segmentation modes)
    oof.csv          one out-of-fold prediction per row (fold, prob, label, source, view, patient_id, ...)
    report/          evaluate_predictions on oof.csv (CIs overall, per source, per view, two-label rows,
                     calibration) with the source probe
    crossval.json    per-fold facts, the honest estimate, the source probe, warnings
    ensemble/        the fold models as one ensemble artifact (its config records the honest estimate)

A fold is finished when its ``heldout.csv`` exists (written last, atomically); ``resume=True`` skips finished
folds, predicts a trained one, resumes an interrupted one from its ``checkpoints/last.ckpt`` and starts the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.classification.config import TrainConfig
from covidcxr.errors import ConfigError
from covidcxr.io.files import file_sha256, write_json, write_text
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
FOLDS_FILE = "folds.csv"
OOF_FILE = "oof.csv"
SUMMARY_FILE = "crossval.json"
HELDOUT_FILE = "heldout.csv"
HELDOUT_EMBEDDINGS = "heldout_embeddings.npy"
REPORT_DIR = "report"
ENSEMBLE_DIR = "ensemble"
PLAN_VERSION = 1
# Settings that say where and how fast a run goes, not what it learns: a resumed run may change them.
_RUN_ONLY = ("num_workers", "progress", "accelerator", "devices", "num_nodes", "strategy", "channels_last",
             "mask_dir", "max_minutes")
_OUR_FILES = (PLAN_FILE, FOLDS_FILE, OOF_FILE, SUMMARY_FILE)
_OUR_DIRS = (REPORT_DIR, ENSEMBLE_DIR)
_KEEP_COLUMNS = ("image", "patient_id", "label", "source", "view", "split_group", "location", "study_date")


@dataclass
class CrossvalResult:
    """What a cross-validation produced (None fields off DDP rank zero)."""

    out: Path
    oof: pd.DataFrame | None = None
    metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    folds: list[dict[str, Any]] = field(default_factory=list)


def fold_dir(out: str | Path, fold: int) -> Path:
    """The run folder of fold ``fold``."""
    return Path(out) / f"fold_{fold}"


def assign_folds(df: pd.DataFrame, k: int, *, group_col: str | None = None, leave_out_col: str | None = None,
                 seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Fold per row (``-1`` = never held out) and a name per fold.

    K-fold: :func:`covidcxr.data.split.crossval_folds` (linked patient groups stay together; label x source
    strata). Leave-one-out: :func:`covidcxr.data.split.leave_out_folds` on ``leave_out_col`` (``k`` ignored).
    """
    from covidcxr.data.split import crossval_folds, leave_out_folds

    if leave_out_col is not None:
        folds, names = leave_out_folds(df, leave_out_col)
        return folds, [f"{leave_out_col}={n}" for n in names]
    folds = crossval_folds(df, k, group_col=group_col, seed=seed)
    return folds, [f"fold {i}" for i in range(k)]


def fold_table(df: pd.DataFrame, folds: np.ndarray, fold: int, cfg: TrainConfig, seed: int) -> pd.DataFrame:
    """The training table of one fold: the other folds split by patient into ``train`` / ``val``.

    The held-out fold is left out entirely, and so is any row linked (same patient or ``group_col`` value) to a
    held-out row, which matters only when folds come from a column that does not follow patients.

    Raises:
        ConfigError: The training folds cannot give train and validation rows of both classes.
    """
    from covidcxr.data.split import patient_groups, patient_split

    groups = patient_groups(df, cfg.group_col)
    held = folds == fold
    linked = np.isin(groups, np.unique(groups[held])) & ~held
    if linked.any():
        log.warning("fold %d: %d training row(s) share a patient or group with the held-out rows; left out of "
                    "training", fold, int(linked.sum()))
    rows = df[~held & ~linked].drop(columns=["split"], errors="ignore")
    if rows.empty:
        raise ConfigError(f"fold {fold}: no training rows left")
    try:
        return patient_split(rows, cfg.val_fraction, 0.0, group_col=cfg.group_col, seed=seed + fold)
    except Exception as exc:  # SplitError names the reason; say which fold
        raise ConfigError(f"fold {fold}: cannot split the training folds into train and val: {exc}") from exc


def _manifest_table(manifest: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    from covidcxr.data.manifest import read_manifest

    if isinstance(manifest, pd.DataFrame):
        df = manifest.reset_index(drop=True)
        digest = hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
        return df, str(df.attrs.get("manifest", "<table>")), digest
    df = read_manifest(manifest).reset_index(drop=True)
    return df, str(Path(manifest).resolve()), file_sha256(manifest)


def _plan(df: pd.DataFrame, name: str, digest: str, folds: np.ndarray, fold_names: list[str], k: int,
          group_col: str | None, leave_out_col: str | None, seed: int, cfg: TrainConfig) -> dict[str, Any]:
    settings = {key: v for key, v in cfg.to_dict().items() if key not in _RUN_ONLY}
    return {"plan_version": PLAN_VERSION, "manifest": name, "manifest_sha256": digest, "n_rows": len(df),
            "k": len(fold_names), "folds_asked": None if leave_out_col else k, "group_col": group_col, "leave_out_col": leave_out_col,
            "seed": seed, "fold_names": fold_names,
            "folds_sha256": hashlib.sha256(np.ascontiguousarray(folds).tobytes()).hexdigest(),
            "settings": settings}


def _plan_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    import json

    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "manifest":  # the same content under another path is the same data
            continue
        if key == "settings":
            a, b = old.get(key) or {}, new.get(key) or {}
            diffs += [f"settings.{s}: {a.get(s)!r} -> {b.get(s)!r}" for s in sorted(set(a) | set(b))
                      if norm(a.get(s)) != norm(b.get(s))]
        elif norm(old.get(key)) != norm(new.get(key)):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def _prepare_out(out: Path, plan: dict[str, Any], resume: bool, force: bool) -> None:
    """Create ``out`` with the plan, or check it against the plan of the run being resumed."""
    import json

    plan_file = out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if resume:
        if not plan_file.is_file():
            raise ConfigError(f"{plan_file}: nothing to resume from (no cross-validation plan)")
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{plan_file}: unreadable plan: {exc}") from exc
        diffs = _plan_differences(old, plan)
        if diffs:
            raise ConfigError(f"{plan_file}: this run differs from the one in {out} ({'; '.join(diffs)}); "
                              "use the same manifest and settings, another --out, or --force to start over")
        return
    if out.is_dir() and any(out.iterdir()):
        if not force:
            what = "holds a cross-validation (use --resume to continue it or --force to start over)" \
                if plan_file.is_file() else "exists and is not empty (use --force to reuse it)"
            raise ConfigError(f"{out}: output folder {what}")
        # Only our own files go (the mask cache stays valid across runs with the same segmenter).
        for name in _OUR_FILES:
            (out / name).unlink(missing_ok=True)
        for path in [*(out / d for d in _OUR_DIRS), *out.glob("fold_*")]:
            if path.is_dir():
                shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)


def _predict_heldout(run: Path, held: pd.DataFrame, cfg: TrainConfig, mask_dir: Path) -> None:
    """Predict the held-out rows with the fold's artifact (inference path, with embeddings) and store them."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.device import uses_cuda

    art = load_artifact(run, "cuda" if uses_cuda(cfg.accelerator) else "cpu")
    pred, emb = art.predict_manifest(held, embeddings=True, batch_size=max(2 * cfg.batch_size, 8),
                                     num_workers=max(int(cfg.num_workers or 0), 1), mask_dir=mask_dir)
    pred["threshold"] = float(art.threshold)
    tmp = run / (HELDOUT_EMBEDDINGS + ".tmp.npy")
    np.save(tmp, np.asarray(emb, dtype=np.float32))
    os.replace(tmp, run / HELDOUT_EMBEDDINGS)
    write_text(run / HELDOUT_FILE, pred.to_csv(index=False))  # last: its presence means the fold is finished


def _run_fold(df: pd.DataFrame, folds: np.ndarray, fold: int, name: str, cfg: TrainConfig, out: Path,
              rank_zero: bool) -> dict[str, Any] | None:
    from covidcxr.classification.train import fit_classifier

    run = fold_dir(out, fold)
    if (run / HELDOUT_FILE).is_file() and (run / HELDOUT_EMBEDDINGS).is_file():
        log.info("%s: finished earlier (%s); skipped", name, run / HELDOUT_FILE)
        return _fold_facts(run, fold, name)
    if not (run / "train_summary.json").is_file():
        resume = (run / "checkpoints" / "last.ckpt").is_file()
        table = fold_table(df, folds, fold, cfg, cfg.seed)
        log.info("%s: training on %d rows (%d val), %d held out%s", name, int((table["split"] == "train").sum()),
                 int((table["split"] == "val").sum()), int((folds == fold).sum()),
                 " (resuming from checkpoints/last.ckpt)" if resume else "")
        result = fit_classifier(table, run, cfg, resume=resume, force=not resume)
        if result.summary is None:  # DDP rank > 0: rank zero predicts and reports
            return None
    if not rank_zero:
        return None
    held = df[folds == fold]
    _predict_heldout(run, held, cfg, Path(cfg.mask_dir) if cfg.mask_dir else out / "masks")
    return _fold_facts(run, fold, name)


def _fold_facts(run: Path, fold: int, name: str) -> dict[str, Any]:
    import json

    from covidcxr.evaluation.metrics import safe_auc

    pred = pd.read_csv(run / HELDOUT_FILE)
    cfg = json.loads((run / "config.json").read_text())
    y = (pred["label"].astype(str) == LABELS[1]).to_numpy().astype(int)
    training = cfg.get("training", {})
    return {"fold": fold, "name": name, "dir": run.name, "n_held_out": len(pred),
            "n_train": sum(training.get("data", {}).get("per_split_label", {}).get("train", {}).values()),
            "n_val": sum(training.get("data", {}).get("per_split_label", {}).get("val", {}).values()),
            "roc_auc_held_out": safe_auc(y, pred["prob"].to_numpy()),
            "val_auc": cfg.get("val_auc"), "val_auc_both": cfg.get("val_auc_both"),
            "threshold": cfg.get("threshold"), "temperature": cfg.get("temperature"),
            "best_epoch": training.get("best_epoch"), "epochs_run": training.get("epochs_run")}


def out_of_fold(df: pd.DataFrame, folds: np.ndarray, out: Path, fold_names: list[str]
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """Gather the folds' held-out predictions into one table in manifest order (+ their embeddings).

    Raises:
        ConfigError: A row predicted twice or a held-out row without prediction.
    """
    from covidcxr.data.manifest import both_label_mask

    both, _ = both_label_mask(df)
    parts, embs = [], []
    for fold in range(len(fold_names)):
        run = fold_dir(out, fold)
        pred = pd.read_csv(run / HELDOUT_FILE, keep_default_na=False, na_values=[""])
        rows = np.flatnonzero(folds == fold)
        if len(pred) != len(rows):
            raise ConfigError(f"{run / HELDOUT_FILE}: {len(pred)} predictions for {len(rows)} held-out rows")
        table = pd.DataFrame({"row": rows})
        for col in _KEEP_COLUMNS:
            if col in df.columns:
                table[col] = df[col].to_numpy()[rows]
        table["fold"] = fold
        table["held_out"] = fold_names[fold]
        table["source_has_both_labels"] = both[rows] if both is not None else True
        table["y"] = (table["label"].astype(str) == LABELS[1]).astype(int)
        for col in ("prob", "prob_uncalibrated", "pred_label", "threshold", "qc_flags", "status"):
            if col in pred.columns:
                table[col] = pred[col].to_numpy()
        parts.append(table)
        embs.append(np.load(run / HELDOUT_EMBEDDINGS))
    oof = pd.concat(parts, ignore_index=True)
    emb = np.concatenate(embs)
    if oof["row"].duplicated().any():
        raise ConfigError(f"{out}: rows predicted by two folds: {oof.loc[oof['row'].duplicated(), 'row'].tolist()[:5]}")
    order = np.argsort(oof["row"].to_numpy(), kind="stable")
    return oof.iloc[order].reset_index(drop=True), emb[order]


def run_crossval(
    manifest: str | Path | pd.DataFrame,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    folds: int = 5,
    leave_out_col: str | None = None,
    resume: bool = False,
    force: bool = False,
    ensemble: bool = True,
    **settings: Any,
) -> CrossvalResult:
    """Cross-validate the classifier: one model per fold, out-of-fold predictions, report, probe, ensemble.

    Args:
        manifest: Manifest CSV or table (a ``split`` column is ignored: the folds decide).
        out: Cross-validation folder (see the module docstring).
        config: Training settings; keyword ``settings`` override its fields. ``group_col`` links patients for the
            folds and for each fold's validation split; ``seed`` seeds folds, splits and training;
            ``val_fraction`` is the validation share of each fold's training rows; ``n_boot`` the report's
            bootstrap replicates.
        folds: K (>= 2); ignored with ``leave_out_col``.
        leave_out_col: Leave-one-group-out on this column (one fold per value; empty rows always train).
        resume: Continue the run in ``out`` (its plan must match).
        force: Start over in a non-empty ``out`` (only cross-validation files are removed; ``masks/`` stays).
        ensemble: Also write the fold models as one ensemble artifact into ``out/ensemble``.
        **settings: :class:`TrainConfig` fields.

    Returns:
        The :class:`CrossvalResult`.

    Raises:
        ConfigError: Bad settings, an occupied ``out``, a plan that differs from the resumed run's.
        SplitError: Too few patient groups for ``folds``, or a bad ``leave_out_col``.
        Interrupted: SIGINT/SIGTERM stopped a fold's training; rerun with ``resume=True``.
    """
    from covidcxr.classification.train import _is_global_zero

    cfg = dataclasses.replace(config, **settings) if config is not None else TrainConfig(**settings)
    out = Path(out)
    df, name, digest = _manifest_table(manifest)
    fold_of_row, fold_names = assign_folds(df, folds, group_col=cfg.group_col, leave_out_col=leave_out_col,
                                           seed=cfg.seed)
    cfg = dataclasses.replace(cfg, eval_test=False, mask_dir=cfg.mask_dir or str(out / "masks"))
    rank_zero = _is_global_zero()
    if rank_zero:
        plan = _plan(df, name, digest, fold_of_row, fold_names, folds, cfg.group_col, leave_out_col, cfg.seed, cfg)
        _prepare_out(out, plan, resume, force)
        cols = [c for c in ("image", "patient_id", "label", "source") if c in df.columns]
        write_text(out / FOLDS_FILE, df[cols].assign(fold=fold_of_row).to_csv(index=False))
    log.info("cross-validation: %d folds over %d rows -> %s", len(fold_names), len(df), out)
    facts = []
    for fold, fold_name in enumerate(fold_names):
        fact = _run_fold(df, fold_of_row, fold, fold_name, cfg, out, rank_zero)
        if fact is not None:
            facts.append(fact)
    if not rank_zero:
        return CrossvalResult(out)
    return _finish(df, fold_of_row, fold_names, out, cfg, facts, ensemble)


def _finish(df: pd.DataFrame, folds: np.ndarray, fold_names: list[str], out: Path, cfg: TrainConfig,
            facts: list[dict[str, Any]], ensemble: bool) -> CrossvalResult:
    """Out-of-fold table, report with the source probe, honest estimate, ensemble and summary."""
    from covidcxr.evaluation.honest import honest_estimate
    from covidcxr.evaluation.metrics import evaluate_predictions
    from covidcxr.evaluation.probe import source_probe

    oof, emb = out_of_fold(df, folds, out, fold_names)
    write_text(out / OOF_FILE, oof.to_csv(index=False))
    probe = None
    if "source" in oof.columns:
        from covidcxr.data.split import patient_groups

        groups = patient_groups(oof, cfg.group_col) if cfg.group_col in oof.columns else oof["patient_id"]
        probe = source_probe(emb, oof["source"], groups, blocks=oof["fold"], seed=cfg.seed)
    # One number for the pooled report: the fold ensemble's threshold (mean of the members'); each row's own
    # fold threshold is in oof.csv (pred_label).
    threshold = float(np.mean([f["threshold"] for f in facts]))
    kind = f"leave-one-{fold_names[0].split('=')[0]}-out" if "=" in fold_names[0] else f"{len(fold_names)}-fold"
    title = f"{cfg.arch} seg={cfg.seg_mode} out-of-fold ({kind} cross-validation)"
    try:
        import matplotlib  # noqa: F401

        report_dir: Path | None = out / REPORT_DIR
    except ImportError:
        log.warning("matplotlib not installed: %s gets metrics only, no plots or report", out / SUMMARY_FILE)
        report_dir = None
    metrics = evaluate_predictions(oof, threshold, report_dir, n_boot=cfg.n_boot, seed=cfg.seed, title=title,
                                   source_probe=probe)
    estimate = honest_estimate(metrics)
    summary: dict[str, Any] = {
        "kind": kind, "folds": facts, "n_rows": len(df), "n_predicted": len(oof),
        "n_never_held_out": int((folds < 0).sum()), "threshold": threshold,
        "roc_auc": metrics["overall"]["roc_auc"], "two_label": metrics["both_label_sources"],
        "honest_estimate": estimate, "source_probe": probe, "warnings": metrics["warnings"],
        "report": str(Path(REPORT_DIR) / "report.md") if report_dir else None,
        "settings": cfg.to_dict(),
    }
    if ensemble and len(facts) >= 2:
        summary["ensemble"] = str(_write_ensemble(out, len(fold_names), estimate))
    write_json(out / SUMMARY_FILE, summary)
    return CrossvalResult(out, oof, metrics, summary, facts)


def _write_ensemble(out: Path, k: int, estimate: dict[str, Any] | None) -> Path:
    """The fold models as one ensemble artifact; its config records the out-of-fold estimate of its members."""
    from covidcxr.classification.artifact import CONFIG_FILE
    from covidcxr.classification.ensemble import make_ensemble

    path, config = make_ensemble([fold_dir(out, i) for i in range(k)], out / ENSEMBLE_DIR, force=True)
    if estimate is not None:
        # The members' pooled out-of-fold figure: each row scored by the one member that never saw it.
        config["honest_estimate"] = {**estimate, "of": f"{k} cross-validation fold models, each on its held-out fold"}
        write_json(path / CONFIG_FILE, config)
    return path
