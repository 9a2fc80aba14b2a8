"""Lung segmentation benchmark: Dice per mask source on held-out images, and CPU inference speed.

Dice is computed by the full inference pipeline (resize to the model input, U-Net, post-processing, upsampling
of the cleaned probabilities) at each reference mask's own resolution, on the test pairs of the training run:
by default the pairs recorded in the weights' ``lung_unet.json``, or the ``test`` rows of ``--split-csv``.
Speed is batched inference on ``--threads`` CPU threads (default 2) from in-memory images at their original
size, including resize and post-processing, for fp32 and bf16 autocast.

Targets (issue 3): Dice >= 0.96 on JSRT/SCR, >= 0.92 on ieee8023 (v7labs and GeneralBlockchain masks),
>= 15 images/s.

Usage::

    python benchmarks/segmentation.py --manifest /work/shared/data/lungseg/manifest.csv
    python benchmarks/segmentation.py --manifest M --weights runs/seg/lung_unet.safetensors --split-csv runs/seg/split.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr.errors import CxrError
from covidcxr.io.image import load_image
from covidcxr.segmentation.data import read_seg_manifest, select_pairs, select_saved_split
from covidcxr.segmentation.evaluate import dice_table, evaluate_masks
from covidcxr.segmentation.segmenter import LungSegmenter

logger = logging.getLogger("segmentation_benchmark")
TARGETS = {"scr": 0.96, "ieee8023": 0.92, "images_per_s": 15.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="lung-mask manifest (image, mask, patient_id, ...)")
    p.add_argument("--weights", type=Path, default=None, help="weights file or folder (default: shipped weights)")
    p.add_argument("--split-csv", type=Path, default=None, help="split.csv of the training run (default: the "
                   "test pairs recorded in the weights' JSON)")
    p.add_argument("--split", default="test", help="split of --split-csv to evaluate (default test)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for inference (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--speed-images", type=int, default=64, help="images timed per precision (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "segmentation",
                   help="output path without suffix (writes .json and .md)")
    return p.parse_args(argv)


def select_rows(df: pd.DataFrame, args: argparse.Namespace, config: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """The evaluated pairs and a description of where they come from."""
    if args.split_csv is not None:
        return select_saved_split(df, args.split_csv, args.split), f"{args.split} split of {args.split_csv}"
    pairs = config.get("split", {}).get("test_pairs")
    if pairs:
        return select_pairs(df, pairs, what="weights' test pairs"), "test pairs recorded in the weights' JSON"
    logger.warning("no split given or recorded with the weights: evaluating ALL pairs (includes training images)")
    return df, "all pairs (no split known: includes training images)"


def dataset_of(df: pd.DataFrame) -> pd.Series:
    """Dataset of each pair: 'scr' (JSRT images + SCR masks), 'ieee8023', or the mask source."""
    source = df["source"] if "source" in df.columns else df["mask_source"]
    head = source.astype(str).str.split(" + ", regex=False).str[0].str.lower()
    return head.map(lambda s: "scr" if s.startswith("jsrt") else "ieee8023" if s.startswith("ieee8023") else s)


def time_inference(segmenter: LungSegmenter, images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median images/s of ``segmenter.predict`` over ``repeats`` runs (after one warm-up batch)."""
    segmenter.predict(images[: segmenter.batch_size])
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        segmenter.predict(images)
        seconds.append(time.perf_counter() - t0)
    med = statistics.median(seconds)
    return {"images_per_s": round(len(images) / med, 2), "ms_per_image": round(1000 * med / len(images), 2),
            "seconds": [round(s, 3) for s in seconds]}


def summary_rows(per_image: pd.DataFrame) -> dict[str, dict[str, float]]:
    table = dice_table(per_image)
    return {str(k): {c: int(v) if c in ("n", "qc_flagged") else round(float(v), 4) for c, v in row.items()}
            for k, row in table.iterrows()}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# Lung segmentation benchmark",
        "",
        (
            f"Date {result['date']}; weights `{result['weights']}` (sha256 {result['weights_sha256'][:12]}); "
            f"{result['rows']} pairs: {result['evaluated']}."
        ),
        (
            f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch "
            f"{result['machine']['torch']}."
        ),
        "",
        "## Dice at the reference masks' resolution (fp32)",
        "",
        "| group | n | mean | median | p05 | min | QC flagged | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, rows in (("dataset", result["dice_by_dataset"]), ("mask source", result["dice_by_mask_source"])):
        for name, r in rows.items():
            target = TARGETS.get(name) if group == "dataset" else None
            met = "" if target is None else ("yes" if r["mean"] >= target else "NO")
            lines.append(f"| {group}: {name} | {r['n']} | {r['mean']:.4f} | {r['median']:.4f} | {r['p05']:.4f} | "
                         f"{r['min']:.4f} | {r['qc_flagged']} | {'' if target is None else target} | {met} |")
    lines += [
        "",
        (
            f"bf16 autocast Dice (all pairs): mean {result['dice_bf16_all']['mean']:.4f}, "
            f"median {result['dice_bf16_all']['median']:.4f}."
        ),
        "",
        (
            f"## Speed (batched inference incl. resize + post-processing, {result['machine']['threads']} CPU "
            f"threads, batch {result['batch_size']}, {result['speed_images']} images of original size)"
        ),
        "",
        "| precision | images/s | ms/image | target | met |",
        "|---|---:|---:|---:|---|",
    ]
    for prec, r in result["speed"].items():
        met = "yes" if r["images_per_s"] >= TARGETS["images_per_s"] else "NO"
        lines.append(f"| {prec} | {r['images_per_s']:.1f} | {r['ms_per_image']:.1f} | {TARGETS['images_per_s']} | "
                     f"{met} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    segmenter = LungSegmenter.load(args.weights, batch_size=args.batch_size)
    df = read_seg_manifest(args.manifest)
    rows, evaluated = select_rows(df, args, segmenter.config)
    logger.info("evaluating %d pairs (%s)", len(rows), evaluated)

    per_image = evaluate_masks(rows, segmenter, progress=sys.stderr.isatty())
    ordered = rows.reset_index(drop=True)
    per_image["dataset"] = dataset_of(ordered).to_numpy()
    per_image["image"], per_image["mask"] = ordered["rel_image"].to_numpy(), ordered["rel_mask"].to_numpy()
    by_dataset = summary_rows(per_image.assign(mask_source=per_image["dataset"]))
    by_mask_source = summary_rows(per_image)

    bf16 = LungSegmenter.load(args.weights, batch_size=args.batch_size, precision="bf16")
    per_image_bf16 = evaluate_masks(rows, bf16)
    unique_images = list(dict.fromkeys(rows["image"]))[: args.speed_images]
    images = [load_image(p)[0] for p in unique_images]
    while len(images) < args.speed_images:  # small test sets: repeat images to fill the timed batch count
        images += images[: args.speed_images - len(images)]
    speed = {"fp32": time_inference(segmenter, images, args.repeats),
             "bf16": time_inference(bf16, images, args.repeats)}

    weights = args.weights or Path("covidcxr/weights/lung_unet.safetensors (shipped)")
    result = {
        "benchmark": "segmentation",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/segmentation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "weights": str(weights),
        "weights_sha256": segmenter.weights_hash,
        "config": {k: segmenter.config[k] for k in ("arch", "channels", "input_size", "normalisation", "threshold")},
        "trained": segmenter.config.get("trained", {}),
        "evaluated": evaluated,
        "rows": len(rows),
        "dice_by_dataset": by_dataset,
        "dice_by_mask_source": by_mask_source,
        "dice_bf16_all": summary_rows(per_image_bf16)["all"],
        "speed": speed,
        "batch_size": args.batch_size,
        "speed_images": len(images),
        "targets": TARGETS,
        "targets_met": {
            "scr": by_dataset.get("scr", {}).get("mean", 0.0) >= TARGETS["scr"],
            "ieee8023": by_dataset.get("ieee8023", {}).get("mean", 0.0) >= TARGETS["ieee8023"],
            "speed_fp32": speed["fp32"]["images_per_s"] >= TARGETS["images_per_s"],
            "speed_bf16": speed["bf16"]["images_per_s"] >= TARGETS["images_per_s"],
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_markdown(result, args.out.with_suffix(".md"))
    per_image.to_csv(args.out.parent / f"{args.out.name}_per_image.csv", index=False)
    print(args.out.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
