"""``covidcxr crossval``: K-fold or leave-one-group-out cross-validation of the classifier (thin: parse, call, print)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from covidcxr.cli.classify_cmd import _console, _training_options

_EPILOG = """\
what it writes into --out:
  fold_<i>/      one model artifact per fold, trained with every `train` option on the other folds only (its
                 validation rows, for early stopping, checkpoint, temperature and threshold, are a patient split
                 of the training folds, never the held-out fold)
  oof.csv        one out-of-fold prediction per manifest row (fold, prob, label, source, view, patient_id, ...)
  report/        the evaluation on oof.csv: patient-bootstrap CIs overall, per source, per view, on rows of sources
                 holding both labels (the honest estimate), calibration, and the source probe (logistic regression
                 on each fold model's held-out embeddings, scored only on rows it was not fitted on)
  crossval.json  per-fold facts, honest_estimate, source probe, warnings
  ensemble/      the fold models as one ensemble artifact (use it with --model anywhere)

resume:
  a stopped run (Ctrl+C / SIGTERM: the fold in training saves checkpoints/last.ckpt) continues with --resume:
  finished folds are skipped, the interrupted one resumes from its last.ckpt. plan.json refuses a --resume with
  another manifest, other folds or other settings.

multi-GPU: the --accelerator / --devices / --num-nodes / --strategy options work as in `covidcxr train`.
"""


def register(subparsers: Any) -> None:
    """Add the ``crossval`` command.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    p = subparsers.add_parser(
        "crossval",
        help="K-fold / leave-one-group-out cross-validation: out-of-fold predictions, report, fold ensemble",
        description="Cross-validate a COVID-19 classifier on a manifest: one model per fold (grouped by patient, "
                    "stratified by label x source), out-of-fold predictions for every row and their report.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True, help="manifest CSV (a 'split' column is ignored)")
    p.add_argument("--out", type=Path, required=True, help="cross-validation folder")
    p.add_argument("--folds", type=int, default=5, help="K (default 5); ignored with --leave-out-col")
    p.add_argument("--group-col", default=None,
                   help="column whose equal values (with patient_id) stay in one fold, e.g. split_group")
    p.add_argument("--leave-out-col", default=None, metavar="COL",
                   help="leave-one-group-out: one fold per value of COL (a site, a location); empty rows always "
                        "train")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="validation share of each fold's training patients (default 0.15)")
    _training_options(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the report (default 1000)")
    p.add_argument("--no-ensemble", dest="ensemble", action="store_false",
                   help="do not write the fold models as an ensemble artifact")
    p.add_argument("--resume", action="store_true", help="continue the cross-validation in --out")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out (masks/ is kept)")
    p.set_defaults(func=_cmd_crossval)


def _cmd_crossval(args: argparse.Namespace) -> int:
    from covidcxr.classification.config import settings_from
    from covidcxr.evaluation.honest import describe_honest_estimate
    from covidcxr.evaluation.report import format_metrics_table
    from covidcxr.service import jobs

    settings = settings_from(vars(args))
    devices = str(args.devices)
    settings["devices"] = int(devices) if devices.isdigit() else devices
    run = jobs.crossval(args.manifest, args.out, folds=args.folds, leave_out_col=args.leave_out_col,
                        resume=args.resume, force=args.force, ensemble=args.ensemble, **settings)
    if run.summary is None:  # non-zero DDP ranks
        return 0
    console = _console()
    summary = run.summary
    console.print(f"cross-validation ({summary['kind']}): {run.out}")
    console.print(format_metrics_table(run.metrics))
    console.print(describe_honest_estimate(summary))
    probe = summary.get("source_probe")
    if probe:
        console.print(f"source probe: ROC AUC {probe['roc_auc']:.3f}, accuracy {probe['accuracy']:.3f} "
                      f"(chance {probe['chance_accuracy']:.3f})")
    console.print(f"out-of-fold predictions: {run.out / 'oof.csv'}")
    if summary.get("report"):
        console.print(f"report: {run.out / summary['report']}")
    if summary.get("ensemble"):
        console.print(f"fold ensemble: {summary['ensemble']}")
    return 0
