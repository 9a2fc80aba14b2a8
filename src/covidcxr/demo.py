"""The main job, end to end on the built-in synthetic cohort: ``covidcxr demo``.

Each stage of the product adds itself here (synthesise, validate + split, segment, train, evaluate, index,
search), so one command shows the whole pipeline working on a 2-core machine in minutes. The cohort is
synthetic: the numbers it prints show that the pipeline runs, not how well it works on real X-rays.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError
from covidcxr.io.files import json_safe
from covidcxr.retrieval.embed import case_metadata, embed_splits
from covidcxr.retrieval.metrics import evaluate_retrieval
from covidcxr.retrieval.report import contact_sheet
from covidcxr.retrieval.workflow import faiss_threads, index_from_embeddings, match_rows
from covidcxr.segmentation.batch import overlay_image
from covidcxr.segmentation.evaluate import evaluate_masks
from covidcxr.segmentation.segmenter import LungSegmenter
from covidcxr.segmentation.weights import shipped_weights_available

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
# Licence of each shipped sample image (full attribution in samples/ATTRIBUTION.md).
SAMPLES = {
    "ieee8023_pneumocystis-pneumonia-1.png": ("non_covid", "CC BY", "ieee8023 (Cohen et al. 2020)"),
    "ieee8023_12941_2020_358_Fig1_HTML.png": ("covid", "CC BY 4.0", "ieee8023 (Cohen et al. 2020)"),
    "hannover_fff13f3a.png": ("covid", "CC BY 3.0", "Hannover Medical School (Winther et al. 2020)"),
    "hannover_c9280a30.png": ("covid", "CC BY 3.0", "Hannover Medical School (Winther et al. 2020)"),
}


@dataclass
class DemoSettings:
    """Sizes of the demo run, chosen so the whole job takes a few minutes on 2 CPU cores."""

    out_dir: Path
    n_patients: int = 200
    seed: int = 0
    image_size: int = 256
    train_size: int = 128
    epochs: int = 10
    arch: str = "resnet18"
    k: int = 5
    stages: tuple[str, ...] = ("data", "segment", "train", "index", "real")
    summary: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[str, Any], None]


def run_demo(settings: DemoSettings, report: Reporter) -> dict[str, Any]:
    """Run every demo stage in order.

    Args:
        settings: Output folder and sizes.
        report: Called as ``report(title, payload)`` after each stage so the CLI can print it.

    Returns:
        A summary dict (also written to ``out_dir/demo_summary.json``).

    Raises:
        ConfigError: If the output folder exists and is not a previous demo output.
    """
    out = Path(settings.out_dir)
    marker = out / "demo_summary.json"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise ConfigError(f"{out}: folder exists and is not a covidcxr demo output; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out), "stages": {}}
    t0 = time.perf_counter()

    manifest = _stage_data(settings, out, summary, report)
    if "segment" in settings.stages:
        _stage_segment(settings, out, manifest, summary, report)
    model_dir = None
    if "train" in settings.stages:
        model_dir = _stage_train(settings, out, manifest, summary, report)
    if "index" in settings.stages and model_dir is not None:
        _stage_index(settings, out, manifest, model_dir, summary, report)
    if "real" in settings.stages:
        _stage_real(summary, report)

    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _stage_data(settings: DemoSettings, out: Path, summary: dict, report: Reporter) -> Path:
    from covidcxr import data
    from covidcxr.data import synth

    t = time.perf_counter()
    cohort = out / "cohort"
    if (cohort / "manifest.csv").exists():
        manifest = cohort / "manifest.csv"
        log.info("reusing synthetic cohort in %s", cohort)
    else:
        manifest = synth.make_cohort(cohort, n_patients=settings.n_patients, seed=settings.seed,
                                     size=settings.image_size)
    df = data.read_manifest(manifest)
    split_df = data.patient_split(df, seed=settings.seed)
    split_path = out / "manifest_split.csv"
    data.write_manifest(split_df, split_path, force=True)  # the demo owns its output folder
    table = data.summarize(split_df)
    # Synthetic patients share one procedural anatomy, so distinct patients correlate up to ~0.99 on the
    # 32-px thumbnails the check compares; exact re-saves score >= 0.998. A stricter threshold keeps the check
    # meaningful here (real archives use the default).
    dups = data.find_near_duplicates(split_df, threshold=0.995)
    summary["stages"]["data"] = {
        "manifest": str(split_path), "images": len(df), "patients": int(df["patient_id"].nunique()),
        "near_duplicates_across_splits": len(dups), "seconds": round(time.perf_counter() - t, 1),
    }
    report("Synthetic cohort (validated, split by patient)", table)
    report("Near-duplicate images across splits (threshold 0.995)", f"{len(dups)} pair(s) found")
    return split_path


def _stage_segment(settings: DemoSettings, out: Path, manifest: Path, summary: dict, report: Reporter) -> None:
    t = time.perf_counter()
    result = run_segmentation_demo(manifest, out / "segmentation")
    result["seconds"] = round(time.perf_counter() - t, 1)
    summary["stages"]["segment"] = result
    report("Lung segmentation with the shipped U-Net (Dice against the synthetic masks)", result)


def _stage_train(settings: DemoSettings, out: Path, manifest: Path, summary: dict, report: Reporter) -> Path:
    from covidcxr.classification.train import train_classifier
    from covidcxr.evaluation.report import format_metrics_table

    t = time.perf_counter()
    model_dir = out / "model"
    # Small input and few epochs keep the stage to a couple of minutes on 2 CPU cores; the lung crop uses the
    # cohort's exact masks (the manifest's mask column), as a user's own masks would be used.
    train_classifier(
        manifest, model_dir, force=True, arch=settings.arch, pretrained="none", seg_mode="crop",
        image_size=settings.train_size, epochs=settings.epochs, batch_size=32, num_workers=0,
        accelerator="cpu", seed=settings.seed, patience=0, n_boot=300, progress=True,
    )
    metrics_path = model_dir / "test_eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    overall = metrics["overall"]
    summary["stages"]["train"] = {
        "model_dir": str(model_dir), "report": str(model_dir / "test_eval" / "report.html"),
        "threshold": metrics["threshold"],
        "test": {k: overall[k]["value"] for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")},
        "seconds": round(time.perf_counter() - t, 1),
    }
    report("Classifier test metrics (threshold chosen on validation; 95 % patient-bootstrap CIs)",
           format_metrics_table(metrics))
    return model_dir


def _stage_index(settings: DemoSettings, out: Path, manifest: Path, model_dir: Path, summary: dict,
                 report: Reporter) -> None:
    from covidcxr.demo import run_index_demo, serve_command

    result = run_index_demo(model_dir, manifest, out / "search", k=settings.k, device="cpu", n_boot=200)
    summary["stages"]["index"] = {k: result[k] for k in ("index_dir", "n_cases", "query", "sheet", "retrieval",
                                                         "seconds") if k in result}
    report("Similar-case search (query from the test split; its own patient excluded)", result)
    command = serve_command(model_dir, result["index_dir"])
    summary["serve_command"] = command
    report("Open the radiologist's page", command)


def _stage_real(summary: dict, report: Reporter) -> None:
    """The shipped classifier on the real CXRs whose licences allow shipping them (CC BY, see ATTRIBUTION.md)."""
    import pandas as pd

    from covidcxr.classification.artifact import shipped_model_dir
    from covidcxr.service import jobs

    t = time.perf_counter()
    files = [SAMPLES_DIR / name for name in SAMPLES if (SAMPLES_DIR / name).is_file()]
    try:
        model = shipped_model_dir()
    except ModelError as exc:  # reported, not fatal: the rest of the demo ran
        report("Shipped classifier on real chest X-rays", f"skipped: {exc}")
        return
    if not files:
        report("Shipped classifier on real chest X-rays",
               f"no sample images found in {SAMPLES_DIR}; run it on your own: covidcxr predict IMAGE.png ...")
        return
    result = jobs.predict_files(files, model, device="cpu")  # the same call as `covidcxr predict`, gate included
    rows = result.table
    table = pd.DataFrame({
        "image": [f.name for f in files],
        "collection label": [SAMPLES[f.name][0] for f in files],
        "P(covid)": [f"{p:.3f}" if s == "ok" else "no result" for p, s in zip(rows["prob_covid"], rows["status"])],
        f"label (t={result.threshold:.2f})": [lab or "-" for lab in rows["label"]],
        "QC": [q or "-" for q in rows["qc_flags"]],
        "licence": [SAMPLES[f.name][1] for f in files],
    })
    summary["stages"]["real"] = {"model": str(model), "weights_sha256": result.model_hash,
                                 "predictions": table.to_dict(orient="records"),
                                 "seconds": round(time.perf_counter() - t, 1)}
    report("Shipped classifier on real chest X-rays (CC BY samples; they were in its training data, so this shows "
           "the model running, not its accuracy)", table)
    report("Your own images", "covidcxr predict IMAGE.dcm ... (no --model: the shipped classifier); "
           f"sources and licences of these samples: {SAMPLES_DIR / 'ATTRIBUTION.md'}")


def serve_command(model_dir: str | Path, index_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """The shell command that serves a model and index (printed by ``covidcxr demo``).

    Args:
        model_dir: Model artifact folder.
        index_dir: Case index folder.
        host: Bind address.
        port: TCP port.

    Returns:
        e.g. ``covidcxr serve --model out/model --index out/index --host 127.0.0.1 --port 8000``.
    """
    parts = ["covidcxr", "serve", "--model", str(model_dir), "--index", str(index_dir), "--host", host,
             "--port", str(port)]
    return " ".join(shlex.quote(p) for p in parts)
def run_segmentation_demo(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    n_overlays: int = 4,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Segment a (synthetic) cohort with the shipped U-Net and report Dice against its masks.

    Args:
        manifest: Manifest CSV with ``image`` and ``mask`` columns (e.g. from :func:`covidcxr.synth.make_cohort`).
        out_dir: Folder for ``segmentation_dice.csv``, ``summary.json`` and a few overlay PNGs.
        weights: Weights file or folder; None = shipped weights.
        n_overlays: Overlay pictures written for the first images.
        max_images: Evaluate at most this many rows (None = all).

    Returns:
        Summary dict: ``n_images``, ``dice_mean``, ``dice_median``, ``dice_p05``, ``qc_flagged``,
        ``qc_flag_counts``, ``images_per_s``, ``weights_sha256``, ``overlays``; or ``{'skipped': reason}`` when
        no shipped weights exist yet.

    Raises:
        ManifestError: Unreadable manifest or no masks.
        ModelError: ``weights`` given but missing or invalid.
    """
    from covidcxr.data.manifest import read_manifest
    from covidcxr.io.files import save_png
    from covidcxr.io.image import load_image

    if weights is None and not shipped_weights_available():
        log.warning("lung segmentation demo skipped: shipped weights not trained yet")
        return {"skipped": "shipped lung U-Net weights not trained yet"}
    df = read_manifest(manifest, validate=False)
    if max_images is not None:
        df = df.head(max_images)
    segmenter = LungSegmenter.load(weights)
    t0 = time.perf_counter()
    per_image = evaluate_masks(df, segmenter)
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_image.to_csv(out / "segmentation_dice.csv", index=False)
    overlays = []
    for i, path in enumerate(per_image["image"].head(n_overlays)):
        image = load_image(path)[0]
        res = segmenter.predict(image)[0]
        dest = out / f"overlay_{i:02d}_{Path(path).stem}.png"
        save_png(dest, overlay_image(image, res.mask))
        overlays.append(str(dest))
    flags = [f for s in per_image["qc_flags"] for f in str(s).split(";") if f]
    dice = per_image["dice"].to_numpy(dtype=float)
    summary = {
        "n_images": len(per_image),
        "dice_mean": round(float(dice.mean()), 4),
        "dice_median": round(float(np.median(dice)), 4),
        "dice_p05": round(float(np.percentile(dice, 5)), 4),
        "qc_flagged": int((per_image["qc_flags"] != "").sum()),
        "qc_flag_counts": {f: flags.count(f) for f in sorted(set(flags))},
        "images_per_s": round(len(per_image) / max(seconds, 1e-9), 1),
        "weights_sha256": segmenter.weights_hash[:16],
        "overlays": overlays,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
def run_index_demo(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    k: int = 5,
    *,
    device: str = "auto",
    evaluate: bool = True,
    n_boot: int = 200,
    force: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The demo's index stage: index the train split, search one test image, write a contact sheet.

    Args:
        model_dir: Model artifact folder.
        manifest: Manifest CSV with a ``split`` column (split by patient when absent).
        out_dir: Folder for ``index/`` (with thumbnails), ``similar_cases.png`` and ``retrieval.json``.
        k: Neighbours shown.
        device: Inference device.
        evaluate: Also measure retrieval quality on the whole test split (:func:`evaluate_retrieval`).
        n_boot: Bootstrap replicates for the AUC CIs.
        force: Replace a previous demo index in ``out_dir/index``.
        progress: Progress bars.

    Returns:
        JSON-ready dict: ``index_dir``, ``n_cases``, ``query`` (image, patient, label, prob), ``rows`` (the
        neighbour table, see :func:`match_rows`), ``sheet`` (PNG path), ``retrieval`` (overall metrics or None),
        ``seconds``.
    """
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.manifest import read_manifest
    from covidcxr.io.image import load_image

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = load_artifact(model_dir, device)
    df = read_manifest(manifest)
    e_train, r_train, e_test, r_test = embed_splits(artifact, df, progress=progress, skip_bad=True)
    index = index_from_embeddings(artifact, e_train, r_train, out / "index", thumbnails=True, force=force,
                                  info={"split": "train"})
    q = 0
    query = r_test.iloc[q]
    with faiss_threads(1):
        matches = index.search(e_test[q : q + 1], k=k, exclude_patients=str(query["patient_id"]))[0]
    image = load_image(query["image"])[0]
    title = f"query ({query['label']})\nP(covid) {float(query['prob']):.3f}"
    sheet = contact_sheet(image, matches, out / "similar_cases.png", index_dir=out / "index", query_title=title)
    retrieval = None
    if evaluate:
        result = evaluate_retrieval(e_train, case_metadata(r_train), e_test, r_test,
                                    test_prob=r_test["prob"].to_numpy(), k=10, n_boot=n_boot)
        (out / "retrieval.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
        retrieval = json_safe(result["overall"])
    return {
        "index_dir": str(out / "index"),
        "n_cases": len(index),
        "query": {"image": str(query["image"]), "patient_id": str(query["patient_id"]), "label": str(query["label"]),
                  "prob": float(query["prob"])},
        "rows": match_rows(matches),
        "sheet": str(sheet),
        "retrieval": retrieval,
        "seconds": round(time.perf_counter() - t0, 1),
    }
