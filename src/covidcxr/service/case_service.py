"""The web app's service: the loaded model, segmenter and case index answering uploads and thumbnails.

:class:`CaseService` is built once when the server starts and shared by all requests. Analysing one upload runs
:func:`~covidcxr.service.analysis.analyze_one`, the similar-case search and the PNG layers of the page.

Privacy rules kept here: uploads are decoded from memory under the neutral name ``upload`` (a client file name
can carry a patient name), nothing from the DICOM header except format facts (size, bit depth, view, modality;
view and modality from a closed vocabulary) reaches a response or a log line, and uploads are written to disk only
when ``keep_uploads`` is set, under a server-generated name. Thumbnails are looked up by ``case_id`` in the index
metadata; a client value is never joined to a path.

Least exposure: the archive identifiers of similar cases (``case_id``, ``patient_id``) are pseudonymised in every
response with a keyed hash (HMAC-SHA256 under a per-server secret derived from the access token, else a random key
drawn at startup; :data:`PSEUDONYM_HEX` hex characters) unless ``show_real_ids`` is set; the thumbnail route maps the
pseudonymous case id back through a table built at load. Each analysis writes one audit line on the
``covidcxr.audit`` logger (request id, UTC time, status, probability, duration: no image data, identifiers or file
names). At most ``inference_threads + queue_size`` analyses are admitted at once (:meth:`CaseService.admit`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from covidcxr import __version__
from covidcxr.errors import CaseIndexError, ImageReadError, ImageTooLargeError, UnsupportedImageError
from covidcxr.io.image import sniff_format
from covidcxr.service.analysis import _image_facts, _ms, analyze_one, pick_segmenter
from covidcxr.service.images import _fit_size, _resize, png_base64
from covidcxr.service.settings import ServeSettings

log = logging.getLogger(__name__)
audit_log = logging.getLogger("covidcxr.audit")
"""One line per analysis: request id, UTC time, status, probability, duration (never identifiers or image data)."""



PSEUDONYM_HEX = 12
"""Hex characters of a pseudonymous identifier (48 bits of the HMAC-SHA256)."""


UPLOAD_NAME = "upload"
"""Name under which uploads are decoded (and therefore named in error messages)."""


ACCEPTED_FORMATS = ("png", "jpeg", "dicom")


_PUBLIC_METADATA = ("source", "view", "study_date")  # index metadata columns safe to show (never file paths)


def utc_now() -> str:
    """UTC time with milliseconds, ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class CaseService:
    """Loaded model, segmenter and index, answering analyses for the CLI and the web app.

    Model calls are serialised with a lock: Grad-CAM hooks the network and the artifact keeps per-call state,
    so two threads must not run it at once. Decoding and PNG encoding run outside the lock. :attr:`executor`
    is the small thread pool the web app runs analyses in (``settings.inference_threads`` threads), so the event
    loop stays free and memory stays flat.

    Args:
        artifact: Loaded classifier or ensemble artifact.
        index: Loaded :class:`~covidcxr.index.CaseIndex` built with this model's embeddings.
        segmenter: Object with ``predict(images) -> list[SegResult]``.
        settings: Service settings.
        segmenter_key: SHA-256 of the segmenter weights when they are the model's own (its masks can then be
            handed to the model instead of segmenting twice).
        index_dir: Index folder (relative thumbnail paths in the metadata are resolved against it).
    """

    def __init__(
        self,
        artifact: Any,
        index: Any,
        segmenter: Any,
        settings: ServeSettings | None = None,
        *,
        segmenter_key: str | None = None,
        index_dir: str | Path | None = None,
    ) -> None:
        self.artifact = artifact
        self.index = index
        self.segmenter = segmenter
        self.settings = settings or ServeSettings()
        self.segmenter_key = segmenter_key
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._model_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=int(self.settings.inference_threads),
                                           thread_name_prefix="covidcxr-analysis")
        self._thumb_lock = threading.Lock()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._slots = threading.Semaphore(self.settings.max_in_flight)
        self._in_flight = 0
        self._count_lock = threading.Lock()
        token = self.settings.token
        # Per-server pseudonym key: derived from the token (stable across restarts), else random per start.
        self._id_key = (hmac.new(token.encode(), b"covidcxr-pseudonym-key", hashlib.sha256).digest()
                        if token else secrets.token_bytes(32))
        meta = index.metadata_
        self._rows = {str(cid): i for i, cid in enumerate(meta["case_id"].tolist())}
        self._thumb_source = self._thumbnail_sources(meta)
        self._public_case = {cid: self.public_id("case", cid) for cid in self._rows}
        self._real_case = {pub: cid for cid, pub in self._public_case.items()}
        if len(self._real_case) != len(self._public_case):
            raise CaseIndexError("two case ids of the index share a pseudonym; serve with show_real_ids")

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_dir: str | Path, index_dir: str | Path, settings: ServeSettings | None = None) -> CaseService:
        """Load the artifact, its segmenter and the index (checking that the index fits the model).

        Args:
            model_dir: Classifier or ensemble artifact folder.
            index_dir: Case index folder built with this model's embeddings.
            settings: Service settings.

        Returns:
            The service.

        Raises:
            ModelError: Missing or corrupt model.
            CaseIndexError: Missing or corrupt index; IndexMismatchError when built with another model.
        """
        from covidcxr.classification.artifact import load_artifact
        from covidcxr.retrieval.index import CaseIndex

        settings = settings or ServeSettings()
        t0 = time.perf_counter()
        artifact = load_artifact(model_dir, settings.device)
        index = CaseIndex.load(index_dir, expect_model_hash=artifact.weights_hash,
                               expect_dim=int(artifact.num_features))
        segmenter, key = pick_segmenter(artifact, settings.segmenter_weights)
        log.info("loaded model %s (%s), index of %d cases and segmenter in %.1f s", model_dir,
                 artifact.weights_hash[:12], len(index), time.perf_counter() - t0)
        return cls(artifact, index, segmenter, settings, segmenter_key=key, index_dir=index_dir)

    def close(self) -> None:
        """Stop the analysis threads (waiting for running analyses)."""
        self.executor.shutdown(wait=True)

    @property
    def model_info(self) -> dict[str, Any]:
        """Model identity shown with every result, with its honest (out-of-fold, two-label) estimate."""
        from covidcxr.evaluation.honest import describe_honest_estimate

        cfg = self.artifact.config
        members = getattr(self.artifact, "members", None)
        return {
            "version": self.artifact.weights_hash[:12],
            "weights_sha256": self.artifact.weights_hash,
            "kind": getattr(self.artifact, "kind", cfg.get("kind", "classifier")),
            "arch": "+".join(m.config["arch"] for m in members) if members else cfg.get("arch"),
            "seg_mode": getattr(self.artifact, "seg_mode", cfg.get("seg_mode")),
            "trained_with": cfg.get("package_version"),
            "package_version": __version__,
            "honest_estimate": describe_honest_estimate(cfg),
            "honest_estimate_record": cfg.get("honest_estimate"),
        }

    def health(self, full: bool = True) -> dict[str, Any]:
        """Liveness facts: model version and index size (``full=False``: only ``{"status": "ok"}``)."""
        if not full:
            return {"status": "ok"}
        return {"status": "ok", "model": self.model_info["version"], "index_cases": len(self.index),
                "k": self.settings.k, "max_upload_mb": self.settings.max_upload_mb}

    # ------------------------------------------------------------------ admission
    def admit(self) -> bool:
        """Take one of the ``max_in_flight`` analysis slots without waiting; False when all are taken."""
        if not self._slots.acquire(blocking=False):
            return False
        with self._count_lock:
            self._in_flight += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`admit`."""
        with self._count_lock:
            self._in_flight -= 1
        self._slots.release()

    def submit_admitted(self, data: bytes) -> Future:
        """Run :meth:`analyze_bytes` in :attr:`executor` for a caller that holds a slot from :meth:`admit`.

        The slot is given back when the job ends, or when it is cancelled before it started (a client that goes
        away cannot free a slot while its analysis is still queued or running).
        """
        def job() -> dict[str, Any]:
            try:
                return self.analyze_bytes(data)
            finally:
                self.release()

        future = self.executor.submit(job)
        future.add_done_callback(lambda f: self.release() if f.cancelled() else None)
        return future

    @property
    def in_flight(self) -> int:
        """Analyses admitted and not finished."""
        return self._in_flight

    # ------------------------------------------------------------------ identifiers
    def public_id(self, kind: str, value: Any) -> str:
        """Pseudonym of an archive identifier (``kind``: ``case`` or ``patient``), or the real one with
        ``show_real_ids``."""
        if self.settings.show_real_ids:
            return str(value)
        digest = hmac.new(self._id_key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
        return digest[:PSEUDONYM_HEX]

    def real_case_id(self, public_case_id: str) -> str | None:
        """The index's case id behind a case id shown to clients; None when unknown."""
        return self._real_case.get(public_case_id)

    # ------------------------------------------------------------------ analysis
    def analyze_bytes(self, data: bytes) -> dict[str, Any]:
        """Analyse one uploaded file (PNG, JPEG or DICOM, recognised by content).

        Args:
            data: File content.

        Returns:
            The JSON-ready result (see :meth:`analyze_image`) plus ``request_id``.

        Raises:
            ImageTooLargeError: Over the upload or pixel limit.
            UnsupportedImageError: Not PNG/JPEG/DICOM, or a DICOM object this package refuses.
            ImageReadError: Corrupt or truncated file.
        """
        request_id = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        status, prob = "error", None
        try:
            result = self._analyze_bytes(data, request_id)
            status, prob = result["status"], result["probability"]
            return result
        finally:
            audit_log.info("analysis request_id=%s time=%s status=%s probability=%s duration_ms=%.0f", request_id,
                           utc_now(), status, "none" if prob is None else f"{prob:.3f}",
                           1000 * (time.perf_counter() - t0))

    def _analyze_bytes(self, data: bytes, request_id: str) -> dict[str, Any]:
        from covidcxr.io.image import load_image_bytes

        limit = self.settings.max_upload_bytes
        if len(data) > limit:
            raise ImageTooLargeError(UPLOAD_NAME, f"{len(data):,} bytes exceeds the upload limit of {limit:,} bytes "
                                                  f"({self.settings.max_upload_mb:g} MB)")
        if not data:
            raise ImageReadError(UPLOAD_NAME, "empty file (0 bytes)")
        fmt = sniff_format(data)
        if fmt is None:
            raise UnsupportedImageError(UPLOAD_NAME, "not a PNG, JPEG or DICOM file (recognised by content, not "
                                                     "by name)")
        t0 = time.perf_counter()
        image, meta = load_image_bytes(data, UPLOAD_NAME, max_side=self.settings.max_side)
        if self.settings.keep_uploads is not None:
            self._keep(data, fmt, request_id)
        result = self.analyze_image(image, meta)
        result["request_id"] = request_id
        result["timing_ms"]["total"] = round(1000 * (time.perf_counter() - t0), 1)
        log.info("analysis %s: %s %dx%d, %s, %.0f ms", request_id, meta.format, meta.original_size[1],
                 meta.original_size[0], f"p={result['probability']:.3f}" if result["status"] == "ok"
                 else f"no result ({', '.join(result['no_result_reasons'])})", result["timing_ms"]["total"])
        return result

    def analyze_image(self, image: np.ndarray, meta: Any = None) -> dict[str, Any]:
        """Analyse one decoded image.

        Args:
            image: float32 ``H x W`` in [0, 1].
            meta: Its :class:`~covidcxr.io.ImageMeta` (format facts are echoed; may be None).

        Returns:
            JSON-ready dict: ``probability``, ``label``, ``threshold``, ``qc_flags``, ``lung_fraction``,
            ``lung_energy_fraction``, ``explanation_flags``, ``image`` (format facts), ``overlays`` (base64 PNGs
            of the image, the heat map and the lung outline, all at one display size), ``similar_cases``,
            ``model`` and ``timing_ms``.
        """
        from covidcxr.classification.explain import heatmap_rgba, outline_rgba
        from covidcxr.segmentation.segmenter import QC_MESSAGES

        with self._model_lock:
            result = analyze_one(self.artifact, image, segmenter=self.segmenter, segmenter_key=self.segmenter_key)
        pred, mask, heat, timing = result.prediction, result.mask, result.heatmap, result.timing
        usable = result.usable
        t = time.perf_counter()
        # No verdict, no heat map and no "similar" cases for what is not a usable frontal chest X-ray.
        matches = self.index.search(pred.embeddings[:1], k=self.settings.k)[0] if usable else []
        timing["search"] = _ms(t)

        t = time.perf_counter()
        shape = _fit_size(image.shape, self.settings.display_size)
        overlays = {
            "height": shape[0],
            "width": shape[1],
            "image_png": png_base64(_resize(image, shape)),
            "heatmap_png": png_base64(heatmap_rgba(_resize(heat, shape))) if usable else None,
            "lung_outline_png": png_base64(outline_rgba(_resize(mask.astype(np.uint8), shape, nearest=True))),
        }
        timing["encode"] = _ms(t)
        qc = result.qc_flags
        energy = result.lung_energy_fraction if usable else None
        gate = result.gate
        return {
            "status": "ok" if usable else "no_result",
            "no_result_reason": gate.message if gate is not None else "",
            "no_result_reasons": list(gate.reasons) if gate is not None else [],
            "probability": float(pred.prob[0]) if usable else None,
            "label": pred.label[0] if usable else None,
            "threshold": float(self.artifact.threshold),
            "qc_flags": qc,
            "qc_messages": {f: QC_MESSAGES.get(f, f) for f in qc},
            "lung_fraction": result.lung_fraction,
            "lung_energy_fraction": energy,
            "explanation_flags": result.explanation_flags if usable else [],
            "image": _image_facts(image, meta),
            "overlays": overlays,
            "similar_cases": [self._match_json(m) for m in matches],
            "model": self.model_info,
            "timing_ms": timing,
        }

    def _match_json(self, match: Any) -> dict[str, Any]:
        extra = {k: match.metadata.get(k) for k in _PUBLIC_METADATA if match.metadata.get(k) is not None}
        case_id = self._public_case.get(str(match.case_id)) or self.public_id("case", match.case_id)
        return {
            "rank": int(match.rank),
            "case_id": case_id,
            "score": float(match.score),
            "label": match.label,
            "patient_id": self.public_id("patient", match.patient_id),
            "thumbnail_url": f"/api/v1/cases/{quote(case_id, safe='')}/thumbnail",
            **extra,
        }

    def _keep(self, data: bytes, fmt: str, request_id: str) -> Path:
        folder = self.settings.keep_uploads
        folder.mkdir(parents=True, exist_ok=True)
        ext = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[fmt]
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{request_id}{ext}"
        with open(path, "xb") as fh:  # "x": never overwrite
            fh.write(data)
        log.info("analysis %s: upload kept as %s", request_id, path.name)
        return path

    # ------------------------------------------------------------------ thumbnails
    @staticmethod
    def _thumbnail_sources(meta: Any) -> list[str | None]:
        # Per case: the ``thumbnail`` column when set, else the ``image`` column (archive file on this server).
        empty = [None] * len(meta)
        thumbs = meta["thumbnail"].tolist() if "thumbnail" in meta.columns else empty
        images = meta["image"].tolist() if "image" in meta.columns else empty
        return [t if isinstance(t, str) and t else i if isinstance(i, str) and i else None
                for t, i in zip(thumbs, images, strict=True)]

    def has_case(self, case_id: str) -> bool:
        """Whether ``case_id`` is in the index."""
        return case_id in self._rows

    def thumbnail_png(self, case_id: str) -> bytes:
        """PNG thumbnail of an indexed case.

        Args:
            case_id: A case id of the index (looked up in its metadata, never used as a path).

        Returns:
            PNG bytes, longer side ``settings.thumbnail_size``.

        Raises:
            KeyError: Unknown case id.
            CaseIndexError: The case has no readable image on this server.
        """
        from PIL import Image

        from covidcxr.errors import ImageError
        from covidcxr.io.image import load_image

        row = self._rows[case_id]  # KeyError for unknown ids
        with self._thumb_lock:
            if case_id in self._thumbs:
                self._thumbs.move_to_end(case_id)
                return self._thumbs[case_id]
        source = self._thumb_source[row]
        if source is None:
            raise CaseIndexError(f"case {case_id!r}: the index stores no image for it")
        path = Path(source)
        if not path.is_absolute() and self.index_dir is not None:
            path = self.index_dir / path
        try:
            image, _ = load_image(path)
        except ImageError as exc:
            log.warning("thumbnail of case %r unavailable: %s", case_id, exc.reason)
            raise CaseIndexError(f"case {case_id!r}: image unavailable on this server") from exc
        shape = _fit_size(image.shape, self.settings.thumbnail_size)
        buf = io.BytesIO()
        Image.fromarray(np.uint8(np.rint(_resize(image, shape) * 255))).save(buf, format="PNG")
        png = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[case_id] = png
            while len(self._thumbs) > 1024:
                self._thumbs.popitem(last=False)
        return png
