"""Benchmark: COVID classifier variants on the real development manifest (patient-level split, test with CIs).

Variants (ResNet50 from scratch by default):
  a  no segmentation, no augmentation
  b  augmentation only
  c  augmentation + lung mask (outside the lungs zeroed)
  d  augmentation + lung crop
The report picks c or d by validation ROC AUC (never by test). Each variant is trained with
``covidcxr.train.train_classifier`` and evaluated on the test split at its validation-chosen threshold with
patient-bootstrap CIs: overall, on rows whose ``source_has_both_labels`` is True, per source and per view.
Results are written after every variant, so one failure does not lose the others.

Example (one GPU):
  python benchmarks/classification.py --manifest /work/shared/data/cxr/manifest.csv --out-dir /tmp/cls_bench \\
      --epochs 30 --batch-size 64 --num-workers 16 --save-embeddings
Smoke test (CPU):
  python benchmarks/classification.py --out-dir /tmp/cls_smoke --limit 120 --arch resnet18 --image-size 64 \\
      --epochs 1 --results-dir /tmp/cls_smoke/results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("benchmarks.classification")

VARIANTS = {
    "a": {"name": "a_noseg_noaug", "seg_mode": "none", "augment": False},
    "b": {"name": "b_aug", "seg_mode": "none", "augment": True},
    "c": {"name": "c_aug_mask", "seg_mode": "mask", "augment": True},
    "d": {"name": "d_aug_crop", "seg_mode": "crop", "augment": True},
}
DEFAULT_MANIFEST = "/work/shared/data/cxr/manifest.csv"
KEY_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=Path(DEFAULT_MANIFEST))
    p.add_argument("--out-dir", type=Path, required=True, help="run folder for model artifacts (not in the repo)")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where classification.json/.md go (default benchmarks/results)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=None, help="training time cap per variant (minutes)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-col", default="split_group")
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--segmenter", default=None, help="lung-segmenter weights for masks (default: shipped)")
    p.add_argument("--save-embeddings", action="store_true",
                   help="write L2-normalised embeddings + case metadata of every image for the best variant")
    p.add_argument("--limit", type=int, default=None, help="use about N images (whole split groups) for a smoke run")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--reuse", action="store_true",
                   help="reuse variants already trained in --out-dir (assumes the same data and settings)")
    return p.parse_args(argv)


def limit_rows(df: pd.DataFrame, n: int, group_col: str | None, seed: int) -> pd.DataFrame:
    """About ``n`` rows made of whole groups, keeping the label mix (for smoke runs)."""
    key = df[group_col] if group_col and group_col in df.columns else df["patient_id"]
    rng = np.random.default_rng(seed)
    keep: list[Any] = []
    for _, part in df.groupby("label"):
        groups = part.assign(_g=key[part.index]).groupby("_g").size()
        order = rng.permutation(groups.index.to_numpy())
        target = round(n * len(part) / len(df))
        counts = groups.loc[order].cumsum()
        keep.extend(order[: int(np.searchsorted(counts.to_numpy(), target)) + 1])
    return df[key.isin(keep)].copy()


REQUIRED_MODULES = {"safetensors": "safetensors", "scipy": "scipy", "sklearn": "scikit-learn", "PIL": "pillow",
                    "lightning": "lightning", "torchvision": "torchvision", "tqdm": "tqdm"}
OPTIONAL_MODULES = {"monai": "monai (lung U-Net: variants c, d)", "pydicom": "pydicom (DICOM images)",
                    "matplotlib": "matplotlib (plots in test_eval/)"}


def preflight(variants: list[str]) -> None:
    """Fail fast, naming the wheels to install, when a needed module is missing."""
    import importlib.util

    missing = [pkg for mod, pkg in REQUIRED_MODULES.items() if importlib.util.find_spec(mod) is None]
    if any(VARIANTS[v]["seg_mode"] != "none" for v in variants) and importlib.util.find_spec("monai") is None:
        missing.append("monai")
    if missing:
        raise SystemExit(f"missing Python packages: {', '.join(missing)} (pip install them first)")
    for mod, what in OPTIONAL_MODULES.items():
        if importlib.util.find_spec(mod) is None:
            log.warning("optional module missing: %s", what)


def device_info() -> dict[str, Any]:
    """Accelerator and software versions."""
    import lightning
    import torch
    import torchvision

    info = {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "lightning": lightning.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def _metric(block: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if not block or name not in block:
        return None
    entry = block[name]
    return {"value": _finite(entry.get("value")), "ci": [_finite(v) for v in entry["ci"]] if entry.get("ci") else None}


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _block(block: dict[str, Any] | None) -> dict[str, Any] | None:
    if not block:
        return None
    out = {m: _metric(block, m) for m in KEY_METRICS}
    out.update({c: block[c]["value"] for c in ("n", "n_pos", "n_patients") if c in block})
    return out


def run_variant(key: str, df: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one variant; returns its result entry."""
    import torch

    from covidcxr.classification.train import train_classifier

    spec = VARIANTS[key]
    out = args.out_dir / spec["name"]
    t0 = time.perf_counter()
    if args.reuse and (out / "config.json").is_file() and (out / "train_summary.json").is_file():
        log.info("%s: reusing the trained model in %s", spec["name"], out)
    else:
        train_classifier(
            df, out, force=True, arch=args.arch, pretrained=args.pretrained, seg_mode=spec["seg_mode"],
            augment=spec["augment"], image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, num_workers=args.num_workers, accelerator=args.accelerator, precision=args.precision,
            seed=args.seed, patience=args.patience, segmenter=args.segmenter, mask_dir=str(args.out_dir / "masks"),
            progress=args.progress, n_boot=args.n_boot, max_minutes=args.max_minutes,
        )
    wall = time.perf_counter() - t0
    summary = json.loads((out / "train_summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    metrics_file = out / "test_eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "status": "ok",
        "variant": key,
        "seg_mode": spec["seg_mode"],
        "augment": spec["augment"],
        "model_dir": str(out),
        "weights_sha256": config["weights_sha256"],
        "val_auc": summary["val_auc"],
        "threshold": config["threshold"],
        "threshold_method": config["threshold_method"],
        "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"),
        "train_images_per_s": summary.get("train_images_per_s"),
        "train_seconds": summary.get("train_seconds"),
        "cache_seconds": summary.get("cache_seconds"),
        "fit_seconds": summary.get("fit_seconds"),
        "wall_seconds": wall if wall > 1 else summary.get("total_seconds"),
        "precision": summary.get("precision"),
        "device": summary.get("device"),
        "max_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "qc_flag_counts": summary.get("qc_flag_counts"),
        "test": {
            "n_images": metrics.get("n_images"),
            "n_patients": metrics.get("n_patients"),
            "overall": _block(metrics.get("overall")),
            "both_label_sources": _block(metrics.get("both_label_sources")),
            "both_label_source_names": metrics.get("both_label_source_names"),
            "per_source": {k: _block(v) for k, v in metrics.get("per_source", {}).items()},
            "per_view": {k: _block(v) for k, v in metrics.get("per_view", {}).items()},
            "ece": _finite(metrics.get("ece")),
        },
    }


def save_embeddings(result: dict[str, Any], df: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    """Embed every image with the chosen variant's artifact; write an npz with embeddings + case metadata."""
    from covidcxr.classification.artifact import load_artifact

    t0 = time.perf_counter()
    art = load_artifact(result["model_dir"])
    pred, emb = art.predict_manifest(df, embeddings=True, batch_size=max(32, args.batch_size),
                                     num_workers=args.num_workers, mask_dir=args.out_dir / "masks",
                                     progress=args.progress)
    path = args.out_dir / f"embeddings_{VARIANTS[result['variant']]['name']}.npz"
    # Fixed-width unicode arrays (not object arrays), so np.load works with allow_pickle=False.
    meta = {c: np.asarray(pred[c].astype(str).tolist(), dtype=str)
            for c in ("image", "patient_id", "label", "source", "view", "split") if c in pred.columns}
    np.savez_compressed(path, embeddings=emb.astype(np.float32), prob=pred["prob"].to_numpy(np.float32),
                        model_hash=np.array(art.weights_hash), model_dir=np.array(result["model_dir"]), **meta)
    return {"path": str(path), "variant": result["variant"], "n": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "model_hash": art.weights_hash, "seconds": time.perf_counter() - t0}


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    ci = m.get("ci")
    if ci and None not in ci:
        return f"{m['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{m['value']:.3f}"


def write_reports(report: dict[str, Any], results_dir: Path) -> None:
    """classification.json and classification.md (rewritten after every variant)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "classification.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    dev = report["environment"]["device"]
    s = report["settings"]
    lines = [
        "# Classification benchmark",
        "",
        (f"Device: **{dev}** (torch {report['environment']['torch']}, {report['environment']['cpu_count']} CPUs). "
        f"Manifest: `{s['manifest']}` ({report['data']['n_images']} images, {report['data']['n_patients']} "
        f"patients{', limited to ~' + str(s['limit']) + ' images' if s.get('limit') else ''})."),
        (f"Split: patient-level with group column `{s['group_col']}` (seed {s['seed']}; train/val/test images "
        f"{report['data']['per_split']}). Model: {s['arch']} (pretrained: {s['pretrained']}), {s['image_size']} px, "
        f"up to {s['epochs']} epochs (early stopping patience {s['patience']}), batch {s['batch_size']}."),
        ("Threshold chosen on validation (Youden); test metrics at that threshold with 95% patient-bootstrap CIs "
        f"({s['n_boot']} replicates). Command: `{report['command']}`"),
        "",
        "| variant | seg | aug | val AUC | test AUC | test sens | test spec | both-label-sources AUC | img/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in report["variants"].items():
        name = VARIANTS[key]["name"]
        if r.get("status") != "ok":
            lines.append(f"| {name} | {VARIANTS[key]['seg_mode']} | {VARIANTS[key]['augment']} | failed: "
                         f"{str(r.get('error', ''))[:80]} | | | | | | |")
            continue
        t = r["test"]
        ov, both = t.get("overall") or {}, t.get("both_label_sources") or {}
        ips = f"{r['train_images_per_s']:.0f}" if r.get("train_images_per_s") else "n/a"
        lines.append(
            f"| {name} | {r['seg_mode']} | {r['augment']} | {r['val_auc']:.3f} | {_fmt(ov.get('roc_auc'))} | "
            f"{_fmt(ov.get('sensitivity'))} | {_fmt(ov.get('specificity'))} | {_fmt(both.get('roc_auc'))} | "
            f"{ips} | {r['wall_seconds']:.0f} |"
        )
    choice = report.get("seg_choice")
    if choice:
        lines += ["", f"Segmentation choice by validation AUC: **{choice['chosen']}** ({choice['reason']})."]
    for key, r in report["variants"].items():
        if r.get("status") != "ok":
            continue
        lines += ["", f"## {VARIANTS[key]['name']}: test per source (AUC, sensitivity, specificity, n)", "",
                  "| source | AUC | sens | spec | n (covid) |", "|---|---|---|---|---|"]
        for src, b in (r["test"].get("per_source") or {}).items():
            if b:
                lines.append(f"| {src} | {_fmt(b.get('roc_auc'))} | {_fmt(b.get('sensitivity'))} | "
                             f"{_fmt(b.get('specificity'))} | {b.get('n')} ({b.get('n_pos')}) |")
    if report.get("embeddings"):
        e = report["embeddings"]
        lines += ["", f"Embeddings ({e.get('n')} x {e.get('dim')}) of variant {e.get('variant')}: `{e.get('path')}`"]
    lines += [
        "",
        ("Caveats: sources differ in label mix (JSRT and Kaggle are negatives only, Hannover positives only), so "
        "overall AUC rewards recognising the source; the both-label-sources row (ieee8023 only in the dev set) and "
        "the per-source rows are the shortcut-resistant numbers. Single split, single seed."),
    ]
    (results_dir / "classification.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preflight(args.variants)
    import torch

    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.split import patient_split

    torch.set_float32_matmul_precision("high")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    df = read_manifest(args.manifest)
    if args.limit:
        df = limit_rows(df, args.limit, args.group_col, args.seed)
    df = patient_split(df.drop(columns=["split"], errors="ignore"), args.val, args.test,
                       group_col=args.group_col, seed=args.seed).reset_index(drop=True)
    df.to_csv(args.out_dir / "split_manifest.csv", index=False)
    report: dict[str, Any] = {
        "benchmark": "classification",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "environment": device_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "n_images": len(df),
            "n_patients": int(df["patient_id"].nunique()),
            "per_split": {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")},
            "per_split_label": {s: g["label"].value_counts().to_dict() for s, g in df.groupby("split")},
        },
        "variants": {},
    }
    t_all = time.perf_counter()
    for key in args.variants:
        log.info("=== variant %s (%s) ===", key, VARIANTS[key]["name"])
        try:
            report["variants"][key] = run_variant(key, df, args)
        except Exception as exc:  # one variant failing must not lose the others
            log.exception("variant %s failed", key)
            report["variants"][key] = {"status": "failed", "variant": key, "error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc()[-4000:]}
        report["total_seconds"] = time.perf_counter() - t_all
        write_reports(report, args.results_dir)

    ok = {k: r for k, r in report["variants"].items() if r.get("status") == "ok"}
    seg = {k: r for k, r in ok.items() if k in ("c", "d")}
    if seg:
        chosen = max(seg, key=lambda k: seg[k]["val_auc"])
        report["seg_choice"] = {"chosen": VARIANTS[chosen]["name"],
                                "reason": ", ".join(f"{VARIANTS[k]['name']} val AUC {r['val_auc']:.3f}"
                                                    for k, r in seg.items())}
    if args.save_embeddings and ok:
        best = max(ok, key=lambda k: ok[k]["val_auc"])
        try:
            report["embeddings"] = save_embeddings(ok[best], df, args)
        except Exception as exc:
            log.exception("embeddings failed")
            report["embeddings"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    report["total_seconds"] = time.perf_counter() - t_all
    write_reports(report, args.results_dir)
    log.info("wrote %s", args.results_dir / "classification.json")
    return 0 if len(ok) == len(args.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
