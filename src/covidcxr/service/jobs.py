"""The batch jobs the CLI runs, each one call: predict files, evaluate a manifest, train, ensemble, index, search.

The CLI parses arguments and presents what these return; it never re-reads from disk what a job returned, and it
never loads a model or walks a manifest itself. Models are given as folders (the caller resolves the shipped
default, see :func:`covidcxr.classification.artifact.resolve_model_dir`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.errors import ConfigError
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)


EXIT_RULE = ("exit status of batch commands: 0 every input answered (a result, or no result with its reason), "
             "1 some inputs could not be read or processed (each reported with its reason; the outputs hold "
             "the rest), 2 the command could not run (bad arguments, model or manifest): nothing written")


def batch_exit_code(statuses: Sequence[str]) -> int:
    """The one exit-status rule of batch commands (:data:`EXIT_RULE`): 1 when any input's status is ``error``."""
    return 1 if any(s == "error" for s in statuses) else 0


@dataclass
class Predictions:
    """Per-image results of a model with the threshold and model identity they came from."""

    table: pd.DataFrame
    threshold: float
    model_hash: str
    embeddings: Any = None
    honest_estimate: str = ""


def predict_files(images: Sequence[str | Path], model: str | Path, *, device: str = "auto", batch_size: int = 32,
                  num_workers: int = 2, dicom_out: str | Path | None = None) -> Predictions:
    """Probability, label and QC flags per image file (the one manifest loop, chunked, threaded decoding).

    Args:
        dicom_out: Also write, for each DICOM input, the SR and heat-map Secondary Capture the PACS client stores
            (:mod:`covidcxr.service.dicom_results`) as ``<stem>_sr.dcm`` / ``<stem>_sc.dcm`` into this folder.

    Returns:
        :class:`Predictions` with a table ``image, status, prob_covid, label, qc_flags, no_result_reason`` in the
        order given; ``prob_covid`` and ``label`` are empty where the input gate gave no result (``no_result``) or
        the file could not be read (``error``, the reason in ``no_result_reason``): one bad file never stops the
        batch. With
        ``dicom_out`` the table also has ``dicom_files`` (the files written, ``;``-separated), and DICOM rows carry
        the values of the written SR.
    """
    from covidcxr.classification.artifact import load_artifact

    art = load_artifact(model, device)
    rows = pd.DataFrame({"image": [str(p) for p in images]})
    pred, _ = art.predict_manifest(rows, batch_size=batch_size, num_workers=num_workers, on_error="report")
    ok = pred["status"] == "ok"
    table = pd.DataFrame({"image": pred["image"], "status": pred["status"],
                          "prob_covid": pred["prob"].where(ok), "label": pred["pred_label"].where(ok, ""),
                          "qc_flags": pred["qc_flags"], "no_result_reason": pred["no_result_reason"]})
    if dicom_out is not None:
        from covidcxr.service.dicom_results import write_dicom_outputs

        outputs = write_dicom_outputs(art, table["image"].tolist(), dicom_out)
        table["dicom_files"] = [files for files, _ in outputs]
        # The DICOM objects come from the one single-image analysis (with Grad-CAM), as in the PACS client and the
        # web page; bf16 batches can differ from it in the third decimal, so the table takes the values the files
        # hold: what a user reads in the CSV and in the viewer is the same number.
        from covidcxr.classification.ood import GateResult

        for i, (_, result) in enumerate(outputs):
            if result is not None:
                reason = GateResult(usable=result.status == "ok", reasons=list(result.no_result_reasons)).message
                table.loc[i, ["status", "prob_covid", "label", "no_result_reason"]] = [
                    result.status, result.probability, result.label or "", reason]
    from covidcxr.evaluation.honest import describe_honest_estimate

    return Predictions(table, art.threshold, art.weights_hash, honest_estimate=describe_honest_estimate(art.config))


def evaluate_manifest(manifest: str | Path, model: str | Path, out: str | Path, *, split: str = "test",
                      device: str = "auto", batch_size: int = 32, num_workers: int = 2,
                      n_boot: int = 1000) -> tuple[dict[str, Any], pd.DataFrame]:
    """Predict a manifest split and write the metric report (CIs by patient, per source and view) into ``out``.

    The report carries the source probe (when the rows hold two or more sources) and the shortcut warnings
    (:func:`covidcxr.evaluation.honest.shortcut_warnings`: a two-label AUC far below the overall one, a high probe).

    Returns:
        ``(metrics result, predictions)``; ``out/predictions.csv`` holds the predictions of every row (unreadable
        images as ``status`` ``error`` rows with the reason; the metrics are of the readable rows, their count in
        ``result["unreadable"]``).

    Raises:
        ConfigError: No ``split`` column for a named split, or no rows in it.
    """
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.manifest import read_manifest
    from covidcxr.evaluation.metrics import evaluate_predictions

    manifest, model, out = Path(manifest), Path(model), Path(out)
    df = read_manifest(manifest)
    if split != "all":
        if "split" not in df.columns:
            raise ConfigError(f"{manifest}: no 'split' column; use --split all or split it (covidcxr data split)")
        df = df[df["split"] == split]
        if df.empty:
            raise ConfigError(f"{manifest}: no rows with split {split!r}")
    from covidcxr.evaluation.probe import source_probe

    art = load_artifact(model, device)
    from covidcxr.io.files import write_text

    pred, emb = art.predict_manifest(df, batch_size=batch_size, num_workers=num_workers, progress=True,
                                     embeddings=True, on_error="report")
    pred["y"] = (pred["label"] == LABELS[1]).astype(int)
    readable = pred[pred["status"] != "error"].reset_index(drop=True)  # the rows ``emb`` holds, in order
    if readable.empty:
        raise ConfigError(f"{manifest}: none of the {len(pred)} images could be read (first: "
                          f"{pred['no_result_reason'].iloc[0]})")
    # Held-out logistic regression only (grouped by patient): the probe is never scored on rows it was fitted on.
    probe = source_probe(emb, readable["source"], readable["patient_id"]) if "source" in readable.columns else None
    result = evaluate_predictions(readable, art.threshold, out, n_boot=n_boot,
                                  title=f"{model.name} on {manifest.name} ({split})", source_probe=probe)
    result["unreadable"] = [{"image": r.image, "reason": r.no_result_reason} for r in pred.itertuples()
                            if r.status == "error"]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "predictions.csv", pred.to_csv(index=False))
    return result, pred


def train(manifest: str | Path, out: str | Path, *, resume: bool = False, force: bool = False,
          **settings: Any) -> Any:
    """Train a classifier (:func:`covidcxr.classification.train.fit_classifier`); returns its ``TrainResult``."""
    from covidcxr.classification.train import fit_classifier

    return fit_classifier(manifest, out, resume=resume, force=force, **settings)


def crossval(manifest: str | Path, out: str | Path, **options: Any) -> Any:
    """Cross-validate a classifier (:func:`covidcxr.classification.crossval.run_crossval`); its ``CrossvalResult``."""
    from covidcxr.classification.crossval import run_crossval

    return run_crossval(manifest, out, **options)


def ensemble(models: Sequence[str | Path], out: str | Path, *, weighted: bool = False,
             force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Average classifier artifacts into one ensemble artifact; returns ``(out, its config)``."""
    from covidcxr.classification.ensemble import make_ensemble

    return make_ensemble(models, out, weighted=weighted, force=force)


def manifest_split(manifest: str | Path, split: str | None) -> pd.DataFrame:
    """The rows of a manifest split (``all`` / None: every row)."""
    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.split import select_split

    return select_split(read_manifest(manifest), split, manifest)


def build_index(model: str | Path, manifest: str | Path, out: str | Path, *, split: str | None = "train",
                device: str = "auto", **options: Any) -> Any:
    """Embed a manifest split with a model and save a case index; returns the fitted ``CaseIndex``."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.retrieval.workflow import build_index as build

    df = manifest_split(manifest, split)
    return build(load_artifact(model, device), df, out, info={"split": split}, **options)


def add_to_index(index: str | Path, model: str | Path, manifest: str | Path, *, split: str | None = None,
                 device: str = "auto", **options: Any) -> tuple[Any, int]:
    """Embed more cases into an existing index (refused for another model); returns ``(index, cases added)``."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.retrieval.workflow import add_to_index as add

    return add(index, load_artifact(model, device), manifest_split(manifest, split), **options)


def evaluate_retrieval(model: str | Path, manifest: str | Path, *, device: str = "auto",
                       **options: Any) -> tuple[dict[str, Any], str]:
    """Retrieval quality (train split indexed, test split queried, leave-patient-out); ``(result, weights hash)``."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.data.manifest import read_manifest
    from covidcxr.retrieval.report import evaluate_model_retrieval

    art = load_artifact(model, device)
    result = evaluate_model_retrieval(art, read_manifest(manifest), **options)
    result["manifest"] = str(manifest)
    return result, art.weights_hash


@dataclass
class SearchResult:
    """Similar cases of one image, with the model's probability and label (None and ``no result`` when the input
    gate gives no verdict: ``no_result_reason`` says why)."""

    matches: list[Any]
    rows: list[dict[str, Any]]
    prob: float | None
    label: str
    threshold: float
    no_result_reason: str = ""


def search(image_path: str | Path, index_dir: str | Path, model: str | Path | None = None, *, k: int = 8,
           exclude_patients: Sequence[str] | None = None, sheet: str | Path | None = None,
           device: str = "auto") -> SearchResult:
    """Find the most similar indexed cases of an image file (and draw a contact sheet when ``sheet`` is given).

    Raises:
        ConfigError: ``k`` below 1.
    """
    from covidcxr.io.image import load_image
    from covidcxr.retrieval.report import contact_sheet
    from covidcxr.retrieval.workflow import load_index_and_model, match_rows, search_image

    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    image, _ = load_image(image_path)
    index, art = load_index_and_model(index_dir, model, device)
    pred = art.predict([image], embeddings=True)
    checked = art.gate(pred, [image])[0]  # the one input gate: no verdict on what is not a frontal CXR
    matches, prob = search_image(art, index, image, k=k, exclude_patients=exclude_patients, prediction=pred)
    label = art.class_names[int(prob >= art.threshold)] if checked.usable else "no result"
    if sheet is not None:
        contact_sheet(image, matches, sheet, index_dir=index_dir,
                      query_title=f"query (model: {label})" + (f"\nP(covid) {prob:.3f}" if checked.usable else ""))
    return SearchResult(matches, match_rows(matches), float(prob) if checked.usable else None, label,
                        float(art.threshold), checked.message)


def segment_folder(source: str | Path, out: str | Path, *, weights: str | Path | None = None,
                   precision: str = "auto", batch_size: int = 16, force: bool = False,
                   progress: bool = False) -> pd.DataFrame:
    """Lung masks and overlays for a folder or manifest of images; returns the per-image table (QC, errors)."""
    from covidcxr.segmentation.batch import predict_to_dir
    from covidcxr.segmentation.segmenter import LungSegmenter

    segmenter = LungSegmenter.load(weights, precision=precision, batch_size=batch_size)
    return predict_to_dir(source, out, segmenter=segmenter, force=force, progress=progress)


def evaluate_segmenter(manifest: str | Path, *, weights: str | Path | None = None, precision: str = "auto",
                       split_csv: str | Path | None = None, split: str = "test",
                       progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Dice of the segmenter against reference masks, per image and per mask source; ``(per image, summary, sha)``."""
    from covidcxr.segmentation.data import read_seg_manifest, select_saved_split
    from covidcxr.segmentation.evaluate import dice_table, evaluate_masks
    from covidcxr.segmentation.segmenter import LungSegmenter

    df = read_seg_manifest(manifest, require_mask=False)
    if split_csv is not None:
        df = select_saved_split(df, split_csv, split)
    segmenter = LungSegmenter.load(weights, precision=precision)
    per_image = evaluate_masks(df, segmenter, progress=progress)
    return per_image, dice_table(per_image), segmenter.weights_hash


def embed_shards(model: str | Path, manifest: str | Path, out: str | Path, *, split: str | None = None,
                 **options: Any) -> Any:
    """Embed a manifest split into a resumable shard folder with Lightning (one or many processes / GPUs / nodes).

    ``options`` go to :func:`covidcxr.retrieval.distributed.embed_to_shards` (shard_size, accelerator, devices,
    num_nodes, strategy, batch_size, num_workers, skip_bad, progress). Returns its ``EmbedSummary``.
    """
    from covidcxr.classification.artifact import model_hash
    from covidcxr.retrieval.distributed import embed_to_shards

    df = manifest_split(manifest, split)
    return embed_to_shards(model, model_hash(model), df, out, **options)


def index_from_shards(embeddings: str | Path, out: str | Path, *, force: bool = False, kind: str = "auto",
                      **settings: Any) -> Any:
    """Build a case index from a finished shard folder (streamed IVF-PQ for archives); returns the index.

    ``settings`` are :class:`~covidcxr.retrieval.index.CaseIndex` settings (pca_dim, nprobe, pq_m, rerank, ...).
    """
    from covidcxr.retrieval.archive import build_from_shards
    from covidcxr.retrieval.index import CaseIndex

    check_index_target(out, force)
    return build_from_shards(embeddings, out, index=CaseIndex(kind=kind, **settings))


def check_index_target(out: str | Path, force: bool) -> None:
    """Refuse early (before a long embedding run) an ``out`` that is not an index, or an index without ``force``."""
    from covidcxr.retrieval.workflow import check_index_out

    check_index_out(Path(out), force)


def export_networks(model: str | Path | None = None, segmenter: str | Path | None = None) -> list[Path]:
    """``covidcxr export``: write the ONNX networks of a model artifact and/or a lung segmenter (needs torch).

    Args:
        model: Classifier or ensemble artifact folder.
        segmenter: Lung U-Net weights file or folder.

    Returns:
        The ONNX files written.

    Raises:
        ConfigError: Neither given.
    """
    written: list[Path] = []
    if model is None and segmenter is None:
        raise ConfigError("covidcxr export needs --model DIR and/or --segmenter PATH")
    if segmenter is not None:
        from covidcxr.segmentation.weights import export_segmenter

        written.append(export_segmenter(segmenter))
    if model is not None:
        from covidcxr.classification.export import export_model

        written += export_model(model)
    return written
