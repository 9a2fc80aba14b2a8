"""``covidcxr train | predict | evaluate | ensemble``: the COVID classifier commands (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli._model import DEVICE_HELP, MODEL_HELP, decode_threads, model_dir
from covidcxr.errors import ConfigError
from covidcxr.vocab import INTENSITY_MODES, SEG_MODES

log = logging.getLogger(__name__)

# Choices spelled here so that building the parser (``covidcxr --help``) imports no torch; the library owns the
# values (classification.train, models.registry) and tests/test_cli_help.py checks that both agree.
NORMALIZATION_CHOICES = ("imagenet", "inception", "gray")
BALANCE_CHOICES = ("loss", "sampler", "none")
VAL_METRIC_CHOICES = ("auc", "auc_both", "loss")
THRESHOLD_METHOD_CHOICES = ("youden", "sensitivity")
THRESHOLD_ROWS_CHOICES = ("both_labels", "all")
ARCH_HELP = ("registry architecture (default resnet50), e.g. resnet18, resnet50, densenet121, efficientnet_b0, "
             "efficientnet_lite0, convnext_tiny; an unknown name is refused with the full list")

_TRAIN_EPILOG = """\
multi-GPU / multi-node (Lightning DDP, nothing hand-written):
  one machine, 4 GPUs:   covidcxr train ... --accelerator gpu --devices 4 --strategy ddp
  2 nodes x 8 GPUs:      run on every node with MASTER_ADDR, MASTER_PORT and NODE_RANK set (or under SLURM/torchrun):
                         covidcxr train ... --accelerator gpu --devices 8 --num-nodes 2 --strategy ddp
  --batch-size is per device; validation AUC is computed on the gathered predictions of all ranks.
  Only global rank 0 prepares --out and writes the model artifact.

resume and outputs:
  --out becomes the model artifact (config.json, model.safetensors, val_predictions.csv, segmenter/) and also
  holds checkpoints/ (best.ckpt, last.ckpt), logs/version_0/metrics.csv, masks/ (predicted lung masks) and
  test_eval/ (test metrics at the validation-chosen threshold). --resume continues from checkpoints/last.ckpt.
"""


def register(subparsers: Any) -> None:
    """Add the ``train``, ``predict``, ``evaluate`` and ``ensemble`` commands.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    p = subparsers.add_parser(
        "train",
        help="train a COVID classifier (Lightning) and write a model artifact",
        description="Train a COVID-19 vs non-COVID classifier on a manifest and write a model artifact into --out.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True, help="manifest CSV (its 'split' column is used if present)")
    p.add_argument("--out", type=Path, required=True, help="run folder = model artifact")
    _training_options(p)
    p.add_argument("--group-col", default=None, help="column kept together when making the split (split_group)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/last.ckpt")
    p.add_argument("--force", action="store_true", help="reuse a non-empty --out (its previous run files go)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("predict", help="probability and label per image with a model artifact")
    p.add_argument("images", nargs="+", type=Path, help="PNG/JPEG/TIFF/DICOM files")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--out", type=Path, default=None, help="also write predictions to .csv or .json")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                   help="for DICOM inputs, also write the result SR and heat-map Secondary Capture (as `pacs run` "
                        "stores them) into DIR, to push with your own DICOM tools")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser("evaluate", help="predict a manifest split and report metrics with patient-bootstrap CIs")
    p.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--split", default="test", help="rows of this split (default test; 'all' = every row)")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, plots and reports")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding threads (default: one per CPU)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("ensemble", help="average classifier artifacts into one ensemble artifact")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="two or more model artifact folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weighted", action="store_true", help="weight members by their validation ROC AUC")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_ensemble)


def _training_options(p: argparse.ArgumentParser) -> None:
    """The training settings shared by ``train`` and ``crossval`` (:class:`TrainConfig` fields)."""
    p.add_argument("--arch", default="resnet50", help=ARCH_HELP)
    p.add_argument("--pretrained", default="none", help="imagenet | none | PATH to a state dict (default none)")
    p.add_argument("--seg", dest="seg_mode", default="none", choices=SEG_MODES,
                   help="lung-segmentation preprocessing (default none)")
    p.add_argument("--segmenter", default=None, help="lung-segmenter weights for masks (default: shipped weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per device")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW lr (default 1e-3 from scratch, 3e-4 pretrained)")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="backbone lr as a fraction of --lr (discriminative fine-tuning; default 1)")
    p.add_argument("--freeze-epochs", type=int, default=0, help="leading epochs that train the head only (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers and decoding threads (default: one per CPU beyond the main process)")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu | ... (Lightning)")
    p.add_argument("--devices", default="auto", help="auto | N | list, e.g. 0,1 (Lightning)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="auto | ddp | ... (Lightning)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16-mixed only where the hardware has native bf16, else 32-true) | 32-true | bf16-mixed")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    p.add_argument("--normalization", default=None, choices=NORMALIZATION_CHOICES,
                   help="input normalisation (default: what the architecture's ImageNet weights expect)")
    p.add_argument("--intensity", default="none", choices=INTENSITY_MODES,
                   help="intensity standardisation after the segmentation mode (default none)")
    p.add_argument("--balance", default="loss", choices=BALANCE_CHOICES,
                   help="class balancing: weighted loss, balanced sampling or none (default loss)")
    p.add_argument("--val-metric", default="auc", choices=VAL_METRIC_CHOICES,
                   help="early stopping / best checkpoint on validation ROC AUC (default), ROC AUC on rows of "
                        "sources holding both labels (auc_both, shortcut-resistant) or loss")
    p.add_argument("--both-label-weight", type=float, default=1.0,
                   help="loss weight of rows from sources that hold both labels (default 1)")
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (0 = off)")
    p.add_argument("--threshold-method", default="youden", choices=THRESHOLD_METHOD_CHOICES)
    p.add_argument("--target-sensitivity", type=float, default=None, help="with --threshold-method sensitivity")
    p.add_argument("--threshold-rows", default="both_labels", choices=THRESHOLD_ROWS_CHOICES,
                   help="validation rows the threshold is chosen on: those of two-label sources (hard negatives; "
                        "default, falls back to all when too few) or all")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip temperature scaling on validation")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _cmd_train(args: argparse.Namespace) -> int:
    from covidcxr.classification.config import settings_from
    from covidcxr.service import jobs

    settings = settings_from(vars(args))
    devices = str(args.devices)
    settings["devices"] = int(devices) if devices.isdigit() else devices
    run = jobs.train(args.manifest, args.out, resume=args.resume, force=args.force, **settings)
    if run.summary is None:  # non-zero DDP ranks
        return 0
    summary, cfg = run.summary, run.config
    console = _console()
    console.print(f"model artifact: {run.out}")
    console.print(f"validation ROC AUC {summary['val_auc']:.4f}; threshold {cfg['threshold']:.4f} "
                  f"({cfg['threshold_method']}, chosen on validation)")
    if "test_roc_auc" in summary:
        console.print(f"test ROC AUC {summary['test_roc_auc']:.4f} (report: {run.out / 'test_eval' / 'report.md'})")
    if summary.get("train_images_per_s"):
        console.print(f"training throughput {summary['train_images_per_s']:.1f} img/s on {summary['device']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.table import Table

    from covidcxr.device import available_cpus
    from covidcxr.io.files import json_safe, write_text
    from covidcxr.service import jobs

    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"{args.out}: --out must end in .csv or .json")
    args.model = model_dir(args.model)
    # The one manifest loop: chunks keep memory bounded for thousands of files; a decoding thread per CPU.
    result = jobs.predict_files(args.images, args.model, device=args.device, batch_size=args.batch_size,
                                num_workers=available_cpus(), dicom_out=args.dicom_out)
    table = result.table
    log.info("model %s: %s", args.model, result.honest_estimate)
    rich_table = Table(title=f"{args.model} (threshold {result.threshold:.3f}; {result.honest_estimate})")
    for col in ("image", "P(covid)", "label", "QC"):
        rich_table.add_column(col, justify="right" if col == "P(covid)" else "left")
    for row in table.itertuples(index=False):
        if row.status == "ok":
            rich_table.add_row(row.image, f"{row.prob_covid:.4f}", row.label, row.qc_flags)
        elif row.status == "error":
            rich_table.add_row(row.image, "-", "error", row.no_result_reason.removeprefix("error: "))
        else:
            rich_table.add_row(row.image, "-", "no result", row.no_result_reason.removeprefix("no result: "))
    _console().print(rich_table)
    failed = int((table["status"] == "error").sum())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if failed and args.out.exists():
            log.warning("%s: replaced by this run's table, in which %d of %d input(s) could not be read "
                        "(status error)", args.out, failed, len(table))
        if args.out.suffix.lower() == ".csv":
            write_text(args.out, table.to_csv(index=False))
        else:
            records = table.assign(threshold=result.threshold, model_hash=result.model_hash).to_dict(orient="records")
            write_text(args.out, json.dumps(json_safe(records), indent=2) + "\n")
    if failed:
        log.error("%d of %d input(s) could not be read; the other results are above%s", failed, len(table),
                  f" and in {args.out}" if args.out is not None else "")
    return jobs.batch_exit_code(table["status"])


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from covidcxr.evaluation.report import format_metrics_table
    from covidcxr.service import jobs

    args.model = model_dir(args.model)
    result, pred = jobs.evaluate_manifest(args.manifest, args.model, args.out, split=args.split, device=args.device,
                                          batch_size=args.batch_size, num_workers=decode_threads(args.num_workers),
                                          n_boot=args.n_boot)
    print(format_metrics_table(result))
    for bad in result["unreadable"]:
        log.error("not evaluated: %s", bad["reason"].removeprefix("error: "))
    if result["unreadable"]:
        log.error("%d of %d image(s) could not be read: the metrics are of the other %d (rows with status error in "
                  "%s)", len(result["unreadable"]), len(pred), len(pred) - len(result["unreadable"]),
                  args.out / "predictions.csv")
    return jobs.batch_exit_code(pred["status"])


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from covidcxr.service import jobs

    out, cfg = jobs.ensemble(args.models, args.out, weighted=args.weighted, force=args.force)
    console = _console()
    weights = ", ".join(f"{m['weight']:.3f}" for m in cfg["members"])
    console.print(f"ensemble artifact: {out} ({len(cfg['members'])} members, weights {weights})")
    console.print(f"threshold {cfg['threshold']:.4f} ({cfg['threshold_source']})")
    return 0