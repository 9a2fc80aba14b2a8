"""``covidcxr segment``: train the lung U-Net, install its weights, predict lung masks, evaluate Dice."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``segment`` command group (train, install, predict, evaluate).

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    seg = subparsers.add_parser("segment", help="lung segmentation: train, install, predict, evaluate")
    sub = seg.add_subparsers(title="segment commands", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train the lung U-Net on image/mask pairs (Lightning)")
    p.add_argument("--manifest", type=Path, required=True, help="CSV with image, mask, patient_id[, mask_source]")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, logs, exported weights)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="batch size per device (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--input-size", type=int, default=256, help="model input side in pixels (default 256)")
    p.add_argument("--channels", default=None, help="U-Net channels per level, e.g. 16,32,64,128,256 (default)")
    p.add_argument("--arch", choices=("unet", "basic_unet"), default=None, help="MONAI UNet (default) or BasicUNet")
    p.add_argument("--val", type=float, default=0.15, help="fraction of patients for validation")
    p.add_argument("--test", type=float, default=0.15, help="fraction of patients for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default auto)")
    p.add_argument("--devices", default="1", help="number of devices, or 'auto' (default 1)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: one per CPU beyond the main process)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16-mixed only where the hardware has native bf16, else 32-true), bf16-mixed, 32-true")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--force", action="store_true", help="start over although OUT holds earlier checkpoints")
    p.add_argument("--install", action="store_true", help="copy the exported weights into the package")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="write lung mask + overlay PNGs and a CSV (area, QC flags) per image")
    p.add_argument("source", type=Path, help="an image, a folder of images, or a manifest CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--weights", type=Path, default=None, help="weights file or folder (default: shipped weights)")
    p.add_argument("--precision", choices=("auto", "fp32"), default="fp32",
                   help="inference computes in float32 on every CPU (the same masks everywhere); auto = fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("install", help="copy exported lung_unet.safetensors + .json into the package")
    p.add_argument("folder", type=Path, help="folder holding lung_unet.safetensors and lung_unet.json (a train --out)")
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser("evaluate", help="Dice per mask source against a manifest's reference masks")
    p.add_argument("--manifest", type=Path, required=True, help="CSV with image and mask columns")
    p.add_argument("--weights", type=Path, default=None, help="weights file or folder (default: shipped weights)")
    p.add_argument("--split-csv", type=Path, default=None, help="split.csv of a training run: evaluate its rows")
    p.add_argument("--split", default="test", help="which split of --split-csv to evaluate (default test)")
    p.add_argument("--out", type=Path, default=None, help="write per-image Dice CSV and summary JSON here")
    p.add_argument("--precision", choices=("auto", "fp32"), default="fp32",
                   help="inference computes in float32 on every CPU (the same masks everywhere); auto = fp32")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    from covidcxr.segmentation.train import train_segmenter

    config: dict[str, Any] = {}
    if args.channels:
        config["channels"] = [int(c) for c in args.channels.split(",")]
        if args.arch is None or args.arch == "unet":
            config["strides"] = [2] * (len(config["channels"]) - 1)
    if args.arch:
        config["arch"] = args.arch
    devices: int | str = int(args.devices) if args.devices.isdigit() else args.devices
    weights = train_segmenter(
        args.manifest,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        config=config,
        input_size=args.input_size,
        val=args.val,
        test=args.test,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=devices,
        num_workers=args.num_workers,
        precision=args.precision,
        resume=args.resume,
        force=args.force,
        install=args.install,
        max_minutes=args.max_minutes,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
    )
    print(f"weights: {weights}")
    test = weights.parent / "test_dice.json"
    if test.is_file():
        print(f"test Dice: {test}")
        print(test.read_text(encoding="utf-8"))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from covidcxr.service import jobs

    table = jobs.segment_folder(args.source, args.out, weights=args.weights, precision=args.precision,
                                batch_size=args.batch_size, force=args.force, progress=sys.stderr.isatty())
    flagged = int((table["qc_flags"].fillna("") != "").sum())
    errors = int((table["error"].fillna("") != "").sum())
    print(f"{len(table)} image(s): {flagged} with QC flags, {errors} unreadable; table: {args.out / 'segmentation.csv'}")
    return 1 if errors else 0


def _cmd_install(args: argparse.Namespace) -> int:
    from covidcxr.segmentation.weights import install_weights

    print(f"installed: {install_weights(args.folder)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from covidcxr.service import jobs

    per_image, summary, weights_hash = jobs.evaluate_segmenter(
        args.manifest, weights=args.weights, precision=args.precision, split_csv=args.split_csv, split=args.split,
        progress=sys.stderr.isatty())
    table = Table(title=f"Lung Dice ({len(per_image)} pairs, weights {weights_hash[:12]})")
    for col in ("mask source", "n", "mean", "median", "p05", "min", "QC flagged"):
        table.add_column(col, justify="left" if col == "mask source" else "right")
    for name, row in summary.iterrows():
        table.add_row(str(name), str(int(row["n"])), *(f"{row[c]:.4f}" for c in ("mean", "median", "p05", "min")),
                      str(int(row["qc_flagged"])))
    Console(width=None if sys.stdout.isatty() else 160, highlight=False).print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        per_image.to_csv(args.out / "dice_per_image.csv", index=False)
        (args.out / "dice_summary.json").write_text(json.dumps(summary.to_dict(orient="index"), indent=2) + "\n")
    return 0
