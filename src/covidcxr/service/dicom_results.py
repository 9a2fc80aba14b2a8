"""DICOM result objects of one analysis: a TID 1500 measurement report (Comprehensive SR) and a heat-map capture.

Shared by ``covidcxr predict --dicom-out`` and the PACS client (:mod:`covidcxr.pacs`), so both write the same
objects. :class:`DicomAnalyzer` reads one DICOM radiograph (bytes), runs the one analysis
(:func:`~covidcxr.service.analysis.analyze_one`) and builds:

* **Structured report** (Comprehensive SR, TID 1500 "Imaging Measurement Report" with highdicom): one measurement
  group whose algorithm identification is the model (name, version = first 12 characters of the weights hash,
  parameters ``weights_sha256`` and the package version), holding the COVID-19 probability, the decision threshold,
  the label at that threshold, the share of the Grad-CAM heat map inside the lungs, every QC flag and, with a case
  index, the share of COVID-19 among the similar cases. Its source image reference points to the analysed image.
  When the input gate refuses a verdict the report says so instead (result status "no result" and each reason as a
  coded evaluation): no probability, no label, no heat map.
* **Secondary Capture** (RGB) of the heat map over the image with "NOT FOR DIAGNOSTIC USE" burned in and in the
  series description; written only when there is a verdict (the web page shows no heat map without one either).

Identifiers: new SOP Instance and Series UIDs, derived deterministically from the source SOP Instance UID, the
model's weights hash and a generation number (a rerun after a crash re-sends the same objects, which the archive
files once; ``generation`` changes only on an explicit reprocess). The study's identifiers and the patient
module's Type 2 attributes are copied from the source by highdicom so viewers file the objects into the same
study; nothing else from the header is copied, and nothing from it is logged.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr import __version__
from covidcxr.errors import ConfigError, ImageReadError, NotFrontalChestError, UnsupportedImageError
from covidcxr.vocab import view_from_header

log = logging.getLogger(__name__)

SCHEME = "99COVIDCXR"
"""Private coding scheme designator of the concepts below (the standard has no codes for them)."""
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "covidcxr COVID-19 AI result - not for diagnostic use"
SC_SERIES_DESCRIPTION = "covidcxr heat map - NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "covidcxr"
MAX_CAPTURE_SIDE = 1024
"""Longest side of the heat-map capture (the source image is reduced for it, never enlarged)."""
FRONTAL_BODY_PARTS = ("CHEST", "")
"""BodyPartExamined values accepted (unset counts as chest: many archives leave it empty)."""

# Concept names (code value, meaning); values <= 16 characters fit a Code Value (SH).
_CONCEPTS = {
    "probability": ("CXR-PROB", "Probability of COVID-19"),
    "threshold": ("CXR-THRESHOLD", "Decision threshold"),
    "label": ("CXR-LABEL", "COVID-19 classification"),
    "lung_energy": ("CXR-HEATLUNG", "Share of heat map inside the lungs"),
    "knn_share": ("CXR-KNN-COVID", "Share of COVID-19 among similar cases"),
    "status": ("CXR-STATUS", "Result status"),
    "reason": ("CXR-NORESULT", "Reason for no result"),
    "qc": ("CXR-QC", "Quality control flag"),
}
_STATUS_VALUES = {"ok": ("CXR-OK", "Result given"), "no_result": ("CXR-NONE", "No result")}
_LABEL_CODES = {"covid": ("840539006", "SCT", "COVID-19"), "non_covid": ("CXR-NONCOVID", SCHEME, "Not COVID-19")}
_PROCEDURE = ("399208008", "Plain chest X-ray", "SCT")
_TRACKING = "covidcxr COVID-19 classification"


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def _concept(key: str) -> Any:
    return _code(*_CONCEPTS[key])


def result_uid(source_sop_uid: str, model_hash: str, kind: str, generation: int = 0) -> str:
    """The UID of a result object, the same for the same source image, model, kind and generation.

    Args:
        source_sop_uid: SOP Instance UID of the analysed image.
        model_hash: SHA-256 of the model weights.
        kind: ``'sr'``, ``'sc'``, ``'sr-series'``, ``'sc-series'`` or ``'device'``.
        generation: Bumped by an explicit reprocess so the new results get new UIDs.
    """
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["covidcxr", source_sop_uid, model_hash, kind, str(int(generation))]))


@dataclass(frozen=True)
class ModelIdentity:
    """The model named in every result: what ``AlgorithmIdentification`` says."""

    name: str
    version: str
    weights_hash: str
    honest_estimate: str = ""

    @classmethod
    def from_artifact(cls, artifact: Any) -> ModelIdentity:
        """Name (architecture), version (first 12 hex of the weights hash), hash and honest estimate of a loaded
        artifact (:func:`covidcxr.evaluation.honest.describe_honest_estimate`)."""
        from covidcxr.evaluation.honest import describe_honest_estimate

        members = getattr(artifact, "members", None) or []
        arch = "+".join(str(m.config.get("arch", "?")) for m in members) or str(artifact.config.get("arch", "?"))
        return cls(name=f"covidcxr COVID-19 classifier ({arch})"[:64], version=artifact.weights_hash[:12],
                   weights_hash=artifact.weights_hash, honest_estimate=describe_honest_estimate(artifact.config))


@dataclass
class DicomResult:
    """One DICOM image analysed, with the result objects to store.

    Attributes:
        sop_instance_uid, study_instance_uid, series_instance_uid: The source image's identifiers.
        status: ``'ok'`` (verdict given) or ``'no_result'`` (the input gate refused one).
        probability: P(COVID-19) (None without a verdict).
        label: Label at ``threshold`` (None without a verdict).
        threshold: The model's stored decision threshold.
        qc_flags: Segmentation / preprocessing QC flags, with ``heatmap_outside_lungs`` when it applies.
        lung_energy_fraction: Share of the heat map inside the lungs (None without a verdict or a lung).
        no_result_reasons: Gate reasons (keys of :data:`covidcxr.classification.ood.REASONS`).
        knn_covid_share: Share of COVID-19 among the ``k`` similar cases (None without an index).
        datasets: ``[SR]`` or ``[SR, Secondary Capture]``.
    """

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    status: str
    probability: float | None
    label: str | None
    threshold: float
    qc_flags: list[str]
    lung_energy_fraction: float | None
    no_result_reasons: list[str] = field(default_factory=list)
    knn_covid_share: float | None = None
    datasets: list[Any] = field(default_factory=list)

    @property
    def result_uids(self) -> list[str]:
        """SOP Instance UIDs of :attr:`datasets`."""
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def read_source(data: bytes, name: str) -> Any:
    """The header of a DICOM file (pixel data not parsed), for the identifiers and the frontal-chest check.

    Raises:
        ImageReadError: Not parseable as DICOM.
    """
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise ImageReadError(name, f"corrupt or truncated DICOM file ({type(exc).__name__})") from exc


_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate",
           "StudyTime", "AccessionNumber", "ReferringPhysicianName")
"""Copied from the source into the results: the study's identifiers and the patient module's Type 2 attributes."""


def reference_header(source: Any) -> Any:
    """The part of a source header the result objects may copy (:data:`_COPIED` plus the image's own UIDs).

    Missing Type 2 attributes become empty; everything else in the source header is left behind.
    """
    from pydicom.dataset import Dataset

    ref = Dataset()
    for attr in _COPIED:
        setattr(ref, attr, source.get(attr, "") or "")
    for attr in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        setattr(ref, attr, source.get(attr))
    orientation = source.get("PatientOrientation")
    if orientation is not None:
        ref.PatientOrientation = orientation
    return ref


def check_frontal_chest(source: Any, name: str) -> None:
    """Refuse what is not a frontal chest radiograph by its header: body part other than chest, lateral view.

    The modality, pixel and syntax checks are :func:`covidcxr.io.image.load_image_bytes`'s; the view is mapped
    through :func:`covidcxr.vocab.view_from_header` (header text is never echoed).

    Raises:
        NotFrontalChestError: Body part not CHEST (nor unset), or a lateral ViewPosition.
    """
    body = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if body not in FRONTAL_BODY_PARTS:
        shown = body if re.fullmatch(r"[A-Z0-9_ ]{1,16}", body) else "(not a valid code string)"  # never free text
        raise NotFrontalChestError(name, f"body part {shown} is not a chest (BodyPartExamined CHEST or unset)")
    if view_from_header(source.get("ViewPosition")) == "lateral":
        raise NotFrontalChestError(name, "lateral view: only frontal (PA/AP) chest radiographs are analysed")


def build_sr(source: Any, result: DicomResult, model: ModelIdentity, *, generation: int = 0) -> Any:
    """The TID 1500 Comprehensive SR of one result (see the module docstring for its content).

    Args:
        source: The analysed image's dataset (header suffices).
        result: The analysis summary (``datasets`` is ignored).
        model: The model named as algorithm and observer device.
        generation: See :func:`result_uid`.

    Returns:
        The SR as a pydicom ``Dataset``.
    """
    from highdicom.sr import (
        AlgorithmIdentification,
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    from covidcxr.classification.ood import REASONS
    from covidcxr.segmentation.segmenter import QC_MESSAGES

    sop = str(source.SOPInstanceUID)
    algorithm = AlgorithmIdentification(name=model.name, version=model.version,
                                        parameters=[f"weights_sha256={model.weights_hash}",
                                                    f"covidcxr={__version__}",
                                                    *([f"honest_estimate={model.honest_estimate}"]
                                                      if model.honest_estimate else [])])
    unitless = _code("1", "no units", "UCUM")
    measurements = []
    evaluations = [QualitativeEvaluation(_concept("status"), _code(*_STATUS_VALUES[result.status]))]
    if result.status == "ok":
        measurements.append(Measurement(_concept("probability"), float(result.probability), unitless))
        measurements.append(Measurement(_concept("threshold"), float(result.threshold), unitless))
        value, scheme, meaning = _LABEL_CODES[str(result.label)]
        evaluations.append(QualitativeEvaluation(_concept("label"), _code(value, meaning, scheme)))
        if result.lung_energy_fraction is not None:
            measurements.append(Measurement(_concept("lung_energy"), float(result.lung_energy_fraction), unitless))
        if result.knn_covid_share is not None:
            measurements.append(Measurement(_concept("knn_share"), float(result.knn_covid_share), unitless))
    for reason in result.no_result_reasons:
        evaluations.append(QualitativeEvaluation(_concept("reason"), _code(reason, REASONS.get(reason, reason))))
    for flag in result.qc_flags:
        evaluations.append(QualitativeEvaluation(_concept("qc"), _code(flag, QC_MESSAGES.get(flag, flag))))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=result_uid(sop, model.weights_hash, "tracking", generation),
                                               identifier=_TRACKING),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(referenced_sop_class_uid=str(source.SOPClassUID),
                                                      referenced_sop_instance_uid=sop)],
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", model.weights_hash, "device"), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=model.name),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=_code(*_PROCEDURE),
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = ComprehensiveSR(
        evidence=[source], content=report,
        series_instance_uid=result_uid(sop, model.weights_hash, "sr-series", generation),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(sop, model.weights_hash, "sr", generation), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.SoftwareVersions = f"covidcxr {__version__}"
    return sr


def build_capture(source: Any, image: np.ndarray, heatmap: np.ndarray, result: DicomResult, model: ModelIdentity,
                  *, generation: int = 0) -> Any:
    """The Secondary Capture of the heat map over the image, labelled "NOT FOR DIAGNOSTIC USE".

    Args:
        source: The analysed image's dataset (header suffices).
        image: The decoded image, float ``H x W`` in [0, 1].
        heatmap: Grad-CAM heat map of the same size.
        result: The analysis summary (its probability is burned in next to the warning).
        model: The model (its version is burned in).
        generation: See :func:`result_uid`.

    Returns:
        The Secondary Capture as a pydicom ``Dataset``.
    """
    import cv2
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from covidcxr.classification.explain import overlay_heatmap
    from covidcxr.service.images import _fit_size, _resize

    shape = _fit_size(image.shape, MAX_CAPTURE_SIDE)
    small_image, small_heat = _resize(image, shape), np.clip(_resize(heatmap, shape), 0.0, 1.0)
    rgb = np.ascontiguousarray(overlay_heatmap(small_image, small_heat))
    lines = (NOT_FOR_DIAGNOSTIC_USE, f"covidcxr {model.version}  P(covid) {result.probability:.3f}  {result.label}")
    font = cv2.FONT_HERSHEY_SIMPLEX
    widest = max(cv2.getTextSize(t, font, 1.0, 1)[0][0] for t in lines)
    scale = min(1.2, 0.95 * shape[1] / widest)  # the longest line fits the width
    height = cv2.getTextSize(lines[0], font, scale, 1)[0][1]
    thick = max(1, round(1.5 * scale))
    band = round(height * 1.6 * len(lines) + height)
    rgb[:band] = 0  # a black band keeps the label readable over any image
    for i, text in enumerate(lines):
        y = round(height * (1.3 + 1.6 * i))
        cv2.putText(rgb, text, (max(2, int(0.02 * shape[1])), y), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    sop = str(source.SOPInstanceUID)
    orientation = source.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=tuple(orientation) if known else ("L", "F"),
        series_instance_uid=result_uid(sop, model.weights_hash, "sc-series", generation),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(sop, model.weights_hash, "sc", generation),
        instance_number=1, manufacturer=MANUFACTURER, transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if not known:
        sc.PatientOrientation = ""  # Type 2: unknown rather than guessed
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: Grad-CAM heat map of the covidcxr classifier {model.version}"
    sc.BurnedInAnnotation = "NO"  # the burned-in text identifies the software, never the patient
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Grad-CAM heat map blended over the source radiograph (not for diagnostic use)"
    sc.SoftwareVersions = f"covidcxr {__version__}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = DicomSequence([ref])
    return sc


def read_result_sr(ds: Any) -> dict[str, Any]:
    """What one of our SRs says, read back with highdicom (for checks, tests and downstream tools).

    Returns:
        ``status``, ``probability``, ``threshold``, ``label``, ``lung_energy_fraction``, ``knn_covid_share``,
        ``qc_flags``, ``no_result_reasons``, ``algorithm`` (name, version, parameters) and ``source_sop_uid``.

    Raises:
        ConfigError: Not a covidcxr measurement report.
    """
    from highdicom.sr import ComprehensiveSR

    sr = ComprehensiveSR.from_dataset(ds, copy=True)
    groups = sr.content.get_image_measurement_groups()
    group = next((g for g in groups if g.tracking_identifier == _TRACKING), None)
    if group is None:
        raise ConfigError(f"SR {ds.SOPInstanceUID}: no covidcxr measurement group")
    by_code = {v[0]: k for k, v in _CONCEPTS.items()}
    out: dict[str, Any] = {"status": None, "probability": None, "threshold": None, "label": None,
                           "lung_energy_fraction": None, "knn_covid_share": None, "qc_flags": [],
                           "no_result_reasons": []}
    numeric = {"probability": "probability", "threshold": "threshold", "lung_energy": "lung_energy_fraction",
               "knn_share": "knn_covid_share"}
    for m in group.get_measurements():
        key = by_code.get(m.name.value)
        if key in numeric:
            out[numeric[key]] = float(m.value)
    status = {v[0]: k for k, v in _STATUS_VALUES.items()}
    labels = {v[0]: k for k, v in _LABEL_CODES.items()}
    for e in group.get_qualitative_evaluations():
        key, value = by_code.get(e.name.value), e.value.value
        if key == "status":
            out["status"] = status.get(value, value)
        elif key == "label":
            out["label"] = labels.get(value, value)
        elif key == "qc":
            out["qc_flags"].append(value)
        elif key == "reason":
            out["no_result_reasons"].append(value)
    out["algorithm"] = _algorithm(group[0])
    refs = group.source_images
    out["source_sop_uid"] = refs[0].referenced_sop_instance_uid if refs else None
    return out


_ALGORITHM_CODES = {"111001": "name", "111003": "version", "111002": "parameters"}  # DCM Algorithm Name/Version/...


def _algorithm(container: Any) -> dict[str, Any]:
    """The group's own algorithm identification (its direct TEXT children, TID 4019)."""
    out: dict[str, Any] = {"name": None, "version": None, "parameters": []}
    for item in container.get("ContentSequence", []):
        key = _ALGORITHM_CODES.get(str(item.ConceptNameCodeSequence[0].CodeValue))
        if key is None or item.ValueType != "TEXT":
            continue
        if key == "parameters":
            out["parameters"].append(str(item.TextValue))
        elif out[key] is None:
            out[key] = str(item.TextValue)
        for child in item.get("ContentSequence", []):  # parameters are children of the name item
            if str(child.ConceptNameCodeSequence[0].CodeValue) == "111002":
                out["parameters"].append(str(child.TextValue))
    return out


class DicomAnalyzer:
    """The loaded model and segmenter (and optional case index) turning DICOM images into result objects.

    Build with :meth:`load`; :meth:`analyze_bytes` then handles one image at a time (not thread-safe: Grad-CAM
    hooks the network).

    Args:
        artifact: Loaded classifier or ensemble artifact.
        segmenter: Lung segmenter.
        segmenter_key: SHA-256 of the segmenter weights when they are the model's own.
        index: Optional loaded case index built with this model (adds the similar-case share).
        k: Similar cases looked up with an index.
        max_side: Longest side of a decoded image.
    """

    def __init__(self, artifact: Any, segmenter: Any, *, segmenter_key: str | None = None, index: Any = None,
                 k: int = 8, max_side: int = 4300) -> None:
        if k < 1:
            raise ConfigError(f"k={k}: must be at least 1")
        self.artifact = artifact
        self.segmenter = segmenter
        self.segmenter_key = segmenter_key
        self.index = index
        self.k = k
        self.max_side = max_side
        self.model = ModelIdentity.from_artifact(artifact)

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "auto", segmenter_weights: str | Path | None = None,
             index_dir: str | Path | None = None, k: int = 8) -> DicomAnalyzer:
        """Load the model, its (or the shipped) segmenter and, when given, the case index.

        Raises:
            ModelError: Missing or corrupt model.
            CaseIndexError: Missing or corrupt index, or one built with another model.
        """
        from covidcxr.classification.artifact import load_artifact
        from covidcxr.service.analysis import pick_segmenter

        artifact = load_artifact(model_dir, device)
        segmenter, key = pick_segmenter(artifact, segmenter_weights)
        index = None
        if index_dir is not None:
            from covidcxr.retrieval.index import CaseIndex

            index = CaseIndex.load(index_dir, expect_model_hash=artifact.weights_hash,
                                   expect_dim=int(artifact.num_features))
        return cls(artifact, segmenter, segmenter_key=key, index=index, k=k)

    @property
    def model_hash(self) -> str:
        """SHA-256 of the model weights (the ledger's key with the SOP Instance UID)."""
        return self.model.weights_hash

    def analyze_bytes(self, data: bytes, name: str, *, generation: int = 0) -> DicomResult:
        """Analyse one DICOM file's content and build its result objects.

        Args:
            data: Part-10 DICOM bytes.
            name: Used in messages (the PACS client passes the SOP Instance UID, never a patient identifier).
            generation: See :func:`result_uid`.

        Raises:
            ImageReadError: Corrupt or truncated file / pixel data.
            NotFrontalChestError: Lateral view or another body part, by the header.
            UnsupportedImageError: Not a projection radiograph (CT, MR, ...), multi-frame, or a transfer syntax
                nothing installed decodes.
        """
        from covidcxr.io.image import load_image_bytes, sniff_format
        from covidcxr.service.analysis import analyze_one

        if sniff_format(data) != "dicom":
            raise UnsupportedImageError(name, "not a DICOM file")
        source = read_source(data, name)
        for attr in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
            if not str(source.get(attr, "") or ""):
                raise ImageReadError(name, f"DICOM header lacks {attr}")
        check_frontal_chest(source, name)
        source = reference_header(source)
        image, _ = load_image_bytes(data, name, max_side=self.max_side)
        analysis = analyze_one(self.artifact, image, segmenter=self.segmenter, segmenter_key=self.segmenter_key)
        pred, usable = analysis.prediction, analysis.usable
        knn = None
        if usable and self.index is not None:
            matches = self.index.search(pred.embeddings[:1], k=self.k)[0]
            knn = float(np.mean([m.label == "covid" for m in matches])) if matches else None
        result = DicomResult(
            sop_instance_uid=str(source.SOPInstanceUID), study_instance_uid=str(source.StudyInstanceUID),
            series_instance_uid=str(source.SeriesInstanceUID), status="ok" if usable else "no_result",
            probability=float(pred.prob[0]) if usable else None, label=str(pred.label[0]) if usable else None,
            threshold=float(self.artifact.threshold),
            qc_flags=sorted(set(analysis.qc_flags) | set(analysis.explanation_flags if usable else [])),
            lung_energy_fraction=analysis.lung_energy_fraction if usable else None,
            no_result_reasons=list(analysis.gate.reasons) if analysis.gate is not None and not usable else [],
            knn_covid_share=knn,
        )
        result.datasets.append(build_sr(source, result, self.model, generation=generation))
        if usable:
            result.datasets.append(build_capture(source, image, analysis.heatmap, result, self.model,
                                                 generation=generation))
        return result


def write_results(result: DicomResult, out_dir: str | Path, stem: str) -> list[Path]:
    """Write a result's objects as ``<stem>_sr.dcm`` and ``<stem>_sc.dcm`` (Part-10 files) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in result.datasets:
        kind = "sr" if str(ds.Modality) == "SR" else "sc"
        path = out / f"{stem}_{kind}.dcm"
        tmp = path.with_suffix(".dcm.tmp")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_dicom_outputs(artifact: Any, images: list[str], out_dir: str | Path) -> list[tuple[str, DicomResult | None]]:
    """``predict --dicom-out``: the SR / Secondary Capture files of each DICOM input (others get none).

    Args:
        artifact: The loaded model.
        images: Input files.
        out_dir: Output folder.

    Returns:
        Per input, ``(files written, ';'-separated, the result they hold)``; ``('', None)`` for non-DICOM or refused
        inputs, which are logged.
    """
    from covidcxr.errors import ImageError
    from covidcxr.io.image import sniff_format
    from covidcxr.service.analysis import pick_segmenter

    segmenter, key = pick_segmenter(artifact, None)
    analyzer = DicomAnalyzer(artifact, segmenter, segmenter_key=key)
    written = []
    for image in images:
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("%s: not read for --dicom-out (%s)", path, type(exc).__name__)
            written.append(("", None))
            continue
        if sniff_format(data) != "dicom":
            log.warning("%s: not a DICOM file; no DICOM results written for it", path)
            written.append(("", None))
            continue
        try:
            result = analyzer.analyze_bytes(data, str(path))
        except ImageError as exc:
            log.warning("%s: no DICOM results written (%s)", path, exc.reason)
            written.append(("", None))
            continue
        written.append((";".join(str(p) for p in write_results(result, out_dir, path.stem)), result))
    return written
