"""Loaded classifiers and ensembles: preprocessing, one forward pass, calibrated probabilities, embeddings.

:class:`ModelArtifact` (one network) and :class:`EnsembleArtifact` (a weighted probability average of several)
share :class:`BaseArtifact`: an ensemble is a list of members, a single model is its own only member, so masks,
labels, manifests and the single-pass :meth:`BaseArtifact.analyze` are written once. Use
:func:`covidcxr.classification.artifact.load_artifact` to get one.

Networks run as exported ONNX graphs in float32 (:class:`covidcxr.runtime.OnnxNetwork`; no torch), so every CPU
gives the same answer. One analysis runs each network once: :meth:`BaseArtifact.analyze` returns the probability,
the embedding and, when asked, the heat map (CAM from the last feature map, equal to Grad-CAM for these heads) from
the same forward pass, and the :class:`Prediction` carries the lung masks
and preprocessed inputs so later steps (the web page, search) never segment or preprocess again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, CxrError, ModelError
from covidcxr.evaluation.calibration import apply_temperature
from covidcxr.io.files import file_sha256
from covidcxr.io.image import check_gray
from covidcxr.runtime import check_precision
from covidcxr.transforms.preprocess import PreprocessCfg, preprocess
from covidcxr.vocab import LABELS

log = logging.getLogger(__name__)

Masks = list[np.ndarray | None]


@dataclass
class Prediction:
    """Per-image outputs of :meth:`BaseArtifact.predict` and :meth:`BaseArtifact.analyze`.

    Attributes:
        prob: Probability of COVID, shape ``(N,)``.
        label: Predicted class name per image (``prob >= threshold`` -> covid).
        qc_flags: Segmentation QC flags per image (empty lists when no segmentation is used).
        embeddings: L2-normalised embeddings ``(N, D)`` when asked for, else None.
        prob_uncalibrated: Probability before temperature scaling (single models; None for ensembles).
        masks: Lung mask per image that the model used (None entries where it uses no segmentation).
        heatmaps: Grad-CAM heat maps ``H x W`` in [0, 1] in each image's geometry (``analyze(explain=True)``).
        mirror_scores: The mirror check's score per image (high = upright; single models with a check, when
            embeddings are computed), see :mod:`covidcxr.classification.mirror`.
    """

    prob: np.ndarray
    label: list[str]
    qc_flags: list[list[str]] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    prob_uncalibrated: np.ndarray | None = None
    masks: Masks | None = None
    heatmaps: list[np.ndarray] | None = None
    mirror_scores: np.ndarray | None = None


@dataclass
class Prepared:
    """A batch ready for the classifier networks (:meth:`BaseArtifact.prepare`), so that preparing one batch and
    running the networks on another can overlap (the manifest loop's pipeline).

    Attributes:
        images: The checked float32 images.
        masks: Lung masks per segmenter SHA-256 (:meth:`BaseArtifact.member_masks`).
        qc_flags: QC flags per image (``seg_fallback`` added by preprocessing).
        inputs: Each member's preprocessed input ``(N, 1, S, S)``.
    """

    images: list[np.ndarray]
    masks: dict[str, Masks]
    qc_flags: list[list[str]]
    inputs: list[np.ndarray]


def map_threads(fn: Any, items: Sequence[Any], num_workers: int | None = None) -> list[Any]:
    """``[fn(i) for i in items]`` on up to ``num_workers`` threads (None: the CPUs this process may use); OpenCV,
    Pillow and ONNX Runtime release the GIL, so decoding and preprocessing run in parallel."""
    from covidcxr.device import available_cpus

    workers = min(available_cpus() if num_workers is None else num_workers, len(items))
    if workers <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)




class BaseArtifact:
    """What single models and ensembles share (masks per distinct segmenter, labels, manifests, analysis).

    Subclasses provide :attr:`members` (the networks), :attr:`member_weights` and :meth:`predict`.

    Attributes:
        directory: The artifact folder.
        config: Its ``config.json``.
        weights_hash: SHA-256 identifying the weights (single model) or the members and weights (ensemble).
    """

    kind = "base"
    members: list[ModelArtifact]
    member_weights: np.ndarray

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        self.weights_hash: str = config["weights_sha256"]
        self._last_qc: list[list[str]] = []

    @property
    def threshold(self) -> float:
        """Decision threshold chosen on validation."""
        return float(self.config["threshold"])

    @property
    def class_names(self) -> list[str]:
        """Class names, index 1 = positive (covid)."""
        return list(self.config.get("class_names", LABELS))

    @property
    def qc_flags(self) -> list[list[str]]:
        """Segmentation QC flags of the images of the last predict/embed call (empty lists without segmentation)."""
        return self._last_qc

    @property
    def segmenter_keys(self) -> set[str]:
        """SHA-256 of every segmenter the members use."""
        return {m.segmenter_key for m in self.members if m.segmenter_key is not None}

    @property
    def ood_reference(self) -> Any:
        """The model's out-of-distribution reference (:class:`~covidcxr.classification.ood.OODReference`), or None.

        Single models only: an ensemble's concatenated embedding has no reference of its own.
        """
        if not hasattr(self, "_ood"):
            from covidcxr.classification.ood import OODReference

            entry = self.config.get("ood") if len(self.members) == 1 else None
            self._ood = OODReference.load(self.directory, entry) if entry else None
        return self._ood

    @property
    def mirror_check(self) -> Any:
        """The model's left-right mirror check (:class:`~covidcxr.classification.mirror.MirrorCheck`), or None.

        Single models only: it reads the model's own feature map.
        """
        if not hasattr(self, "_mirror"):
            from covidcxr.classification.mirror import MirrorCheck

            entry = self.config.get("mirror") if len(self.members) == 1 else None
            self._mirror = MirrorCheck.load(self.directory, entry) if entry else None
        return self._mirror

    def gate(self, pred: Prediction, images: Sequence[np.ndarray] | None = None, *,
             input_types: Sequence[Any] | None = None) -> list[Any]:
        """The input gate per image of a prediction (with ``images``: what each input looks like; QC flags; the
        distance to the training cases when the model has a reference and the prediction carries embeddings; whether
        it looks mirrored when the model has a mirror check); see :mod:`covidcxr.classification.ood`,
        :mod:`covidcxr.classification.input_type` and :mod:`covidcxr.classification.mirror`.

        ``input_types`` (from :func:`~covidcxr.classification.input_type.check_inputs` of the same images, computed
        earlier, e.g. while a network ran) replaces checking ``images`` here.
        """
        from covidcxr.classification.input_type import check_inputs
        from covidcxr.classification.ood import gate

        ref = self.ood_reference
        dist = ref.distances(pred.embeddings) if ref is not None and pred.embeddings is not None else None
        if input_types is not None:
            if len(input_types) != len(pred.qc_flags):
                raise ConfigError(f"{len(input_types)} input types for {len(pred.qc_flags)} images")
            kinds = list(input_types)
        else:
            kinds = check_inputs(images) if images is not None else [None] * len(pred.qc_flags)
        check = self.mirror_check
        mirrored = (check.mirrored(pred.mirror_scores).tolist() if check is not None and pred.mirror_scores is not None
                    else [None] * len(pred.qc_flags))
        return [gate(list(q), None if dist is None else float(dist[i]), None if ref is None else ref.threshold,
                     kinds[i], mirrored[i])
                for i, q in enumerate(pred.qc_flags)]

    def labels(self, prob: np.ndarray) -> list[str]:
        """Class name per probability at the stored threshold."""
        return [self.class_names[int(p >= self.threshold)] for p in np.asarray(prob)]

    def member_masks(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | dict[str, Masks] | None = None
    ) -> tuple[dict[str, Masks], list[list[str]]]:
        """Lung masks per distinct segmenter of the members (segmenting once per segmenter), and the QC flags.

        Args:
            images: float32 ``H x W`` arrays in [0, 1].
            masks: Given masks, one per image, or ``{segmenter sha: masks}`` (an ensemble whose members use different
                segmenters); None entries, or None, are predicted by the members' segmenters.

        Returns:
            ``({segmenter sha: masks per image}, qc flags per image (union over segmenters))``.
        """
        n = len(images)
        per_key = masks if isinstance(masks, dict) else {}
        given = list(masks) if masks is not None and not isinstance(masks, dict) else [None] * n
        if len(given) != n or any(len(v) != n for v in per_key.values()):
            raise ConfigError(f"got {len(given)} masks for {n} images")
        by_key: dict[str, Masks] = {}
        qc: list[list[str]] = [[] for _ in range(n)]
        for m in self.members:
            key = m.segmenter_key
            if key is None or key in by_key:
                continue
            got = list(per_key.get(key, given))
            todo = [i for i, g in enumerate(got) if g is None]
            if todo:
                pred, flags = m.segment([images[i] for i in todo])
                for i, mask, f in zip(todo, pred, flags, strict=True):
                    got[i] = mask
                    qc[i] = sorted(set(qc[i]) | set(f))
            by_key[key] = got
        return by_key, qc

    def predict(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        *,
        embeddings: bool = False,
        bf16: bool | None = None,
        batch_size: int = 32,
    ) -> Prediction:
        """Probabilities, labels at the stored threshold, QC flags, the masks used and optionally embeddings.

        Args:
            images: float32 ``H x W`` arrays in [0, 1].
            masks: Optional lung masks (None entries are predicted by the stored segmenter).
            embeddings: Also compute L2-normalised embeddings.
            bf16: Force bf16 autocast on/off (default: config flag where native on the device).
            batch_size: Images per forward pass.

        Returns:
            A :class:`Prediction`.
        """
        return self.predict_prepared(self.prepare(images, masks), embeddings=embeddings, bf16=bf16,
                                     batch_size=batch_size)

    def prepare(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | dict[str, Masks] | None = None
                ) -> Prepared:
        """Everything :meth:`predict` does before the classifier networks: masks (segmenting where not given), QC
        flags and each member's preprocessed input.

        Args:
            images: float32 ``H x W`` arrays in [0, 1].
            masks: As :meth:`member_masks`.

        Returns:
            A :class:`Prepared` batch for :meth:`predict_prepared`.
        """
        images = [check_gray(im, i) for i, im in enumerate(images)]
        by_key, qc = self.member_masks(images, masks)
        inputs = [m.preprocess_batch(images, by_key.get(m.segmenter_key) if m.segmenter_key else None, qc)
                  for m in self.members]
        return Prepared(images, by_key, qc, inputs)

    def predict_prepared(self, prepared: Prepared, *, embeddings: bool = False, bf16: bool | None = None,
                         batch_size: int = 32, split: int = 1) -> Prediction:
        """The classifier networks on a :meth:`prepare`-d batch (arguments as :meth:`predict`; ``split`` as
        :meth:`covidcxr.runtime.OnnxNetwork.run`)."""
        if len(prepared.inputs) != len(self.members):
            raise ConfigError(f"a batch prepared for {len(prepared.inputs)} networks, this model has "
                              f"{len(self.members)}")
        margins, embs, mirror = [], [], None
        for m, x in zip(self.members, prepared.inputs, strict=True):
            margin, emb, mirror = m.forward(x, bf16=bf16, features=embeddings, batch_size=batch_size,
                                            mirror=len(self.members) == 1, split=split)
            margins.append(margin)
            embs.append(emb)
        self._last_qc = prepared.qc_flags
        return self._combine(margins, embs if embeddings else None, prepared.qc_flags, prepared.masks, None, mirror)

    def analyze(
        self, image: np.ndarray, mask: np.ndarray | None = None, *, explain: bool = True, target_class: int = 1
    ) -> Prediction:
        """Everything one image needs, each network run once: probability, embedding and Grad-CAM heat map.

        With ``explain`` the forward pass that gives the probability and the embedding also gives the last feature
        map the heat map is computed from, so the heat map explains exactly that prediction.

        Args:
            image: float32 ``H x W`` in [0, 1].
            mask: Lung mask from the models' own segmenter (None: segment here).
            explain: Compute the Grad-CAM heat map (class ``target_class``).
            target_class: Class explained (1 = covid).

        Returns:
            A :class:`Prediction` for one image, with ``embeddings``, ``masks`` and (with ``explain``) ``heatmaps``.
        """
        from covidcxr.classification.explain import cam_forward, to_image_geometry

        prepared = self.prepare([image], [mask])
        image, by_key, qc = prepared.images[0], prepared.masks, prepared.qc_flags
        single = len(self.members) == 1  # the mirror check is a single model's
        margins, embs, heats, mirror = [], [], [], None
        for m, x in zip(self.members, prepared.inputs, strict=True):
            if explain:
                used = by_key.get(m.segmenter_key) if m.segmenter_key else None
                margin, emb, grid, mirror = cam_forward(m, x, target_class, mirror=single)
                heats.append(to_image_geometry(grid, image, used[0] if used else None, m.seg_mode))
            else:
                margin, emb, mirror = m.forward(x, features=True, mirror=single)
            margins.append(margin)
            embs.append(emb)
        heat = None
        if explain:
            heat = np.average(np.stack(heats), axis=0, weights=self.member_weights) if len(heats) > 1 else heats[0]
            top = float(heat.max(initial=0.0))
            heat = (heat / top if top > 0 else heat).astype(np.float32)
        self._last_qc = qc
        return self._combine(margins, embs, qc, by_key, [heat] if explain else None, mirror)

    def _combine(self, margins: list[np.ndarray], embs: list[np.ndarray] | None, qc: list[list[str]],
                 by_key: dict[str, Masks], heatmaps: list[np.ndarray] | None,
                 mirror: np.ndarray | None = None) -> Prediction:
        n = len(qc)
        probs = [apply_temperature(mg, m.temperature) for mg, m in zip(margins, self.members, strict=True)]
        if len(self.members) == 1:
            prob, raw = probs[0], apply_temperature(margins[0], 1.0)
        else:
            prob = np.average(np.stack(probs), axis=0, weights=self.member_weights) if n else np.zeros(0)
            raw = None
        emb = None
        if embs is not None:
            emb = embs[0] if len(embs) == 1 else l2_normalise(np.concatenate(embs, axis=1))
        # The mask shown with a result is the one of the first member that segments.
        shown = next(iter(by_key.values()), None)
        return Prediction(prob=prob, label=self.labels(prob), qc_flags=qc, embeddings=emb, prob_uncalibrated=raw,
                          masks=list(shown) if shown is not None else [None] * n, heatmaps=heatmaps,
                          mirror_scores=mirror)

    def predict_proba(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Probability of COVID per image, shape ``(N,)`` (see :meth:`predict` for the arguments)."""
        return self.predict(images, masks, **kwargs).prob

    def embed(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """L2-normalised embeddings, shape ``(N, D)`` (members' concatenated and re-normalised; see :meth:`predict`)."""
        return self.predict(images, masks, embeddings=True, **kwargs).embeddings

    def predict_manifest(self, df: pd.DataFrame, **kwargs: Any) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Predict every row of a manifest table (:func:`covidcxr.classification.loop.predict_manifest`)."""
        from covidcxr.classification.loop import predict_manifest

        return predict_manifest(self, df, **kwargs)


class ModelArtifact(BaseArtifact):
    """A loaded classifier artifact (use :func:`~covidcxr.classification.artifact.load_artifact`).

    Attributes:
        network: The exported network (:class:`covidcxr.runtime.OnnxNetwork`; outputs
            :data:`covidcxr.runtime.CLASSIFIER_OUTPUTS`), run in float32.
        device: ``cpu`` (ONNX Runtime's CPU provider; kept for callers that read it).
        preprocess_cfg: Input size, segmentation mode and intensity standardisation from the config.
    """

    kind = "classifier"

    def __init__(self, directory: Path, config: dict[str, Any], network: Any, device: Any = "cpu") -> None:
        super().__init__(directory, config)
        self.network = network
        self.device = "cpu"
        self.preprocess_cfg = PreprocessCfg.from_config(config)
        self.members = [self]
        self.member_weights = np.ones(1)
        self._segmenter: Any = None

    @property
    def seg_mode(self) -> str:
        """Segmentation mode used in training (``none``, ``mask`` or ``crop``)."""
        return self.preprocess_cfg.seg_mode

    @property
    def intensity(self) -> str:
        """Intensity standardisation used in training (``none`` or ``clahe``)."""
        return self.preprocess_cfg.intensity

    @property
    def temperature(self) -> float:
        """Temperature fitted on validation (1.0 = uncalibrated); probabilities are ``sigmoid(margin / T)``."""
        return float(self.config.get("temperature", 1.0))

    @property
    def num_features(self) -> int:
        """Embedding dimension of :meth:`embed`."""
        return int(self.config["num_features"])

    @property
    def segmenter_key(self) -> str | None:
        """SHA-256 of the segmenter weights (masks are interchangeable between artifacts with the same key)."""
        seg = self.config.get("segmenter")
        return seg["sha256"] if seg else None

    @property
    def segmenter(self) -> Any:
        """The lung segmenter stored in (or referenced by) the artifact, loaded on first use."""
        if self._segmenter is None:
            self._segmenter = self._load_segmenter()
        return self._segmenter

    def _load_segmenter(self) -> Any:
        seg = self.config.get("segmenter")
        if not seg:
            raise ConfigError(f"{self.directory}: model uses no segmentation (seg_mode 'none')")
        from covidcxr.segmentation import weights as seg_weights
        from covidcxr.segmentation.segmenter import LungSegmenter

        if seg.get("builtin"):
            # A reference to the package's own lung U-Net (the shipped model does not carry a second copy).
            weights = seg_weights.default_weights_path()
            if not weights.is_file():
                raise ModelError(f"{weights}: the package's lung-segmenter weights are missing (reinstall covidcxr)")
            if file_sha256(weights) != seg["sha256"]:
                raise ModelError(f"{weights}: the package's lung segmenter is not the one {self.directory} was "
                                 f"trained with (SHA-256 {seg['sha256'][:12]}...); reinstall covidcxr")
        else:
            weights = self.directory / seg["weights"]
        if not weights.is_file():
            raise ModelError(f"{weights}: segmenter weights missing from the model artifact")
        try:
            return LungSegmenter.load(weights)
        except CxrError:
            raise
        except Exception as exc:  # any failure of a corrupt file surfaces as ModelError naming it
            raise ModelError(f"{weights}: cannot load segmenter ({type(exc).__name__}: {exc})") from exc

    def segment(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[list[str]]]:
        """Lung masks and QC flags from the artifact's segmenter, one entry per image."""
        if not images:
            return [], []
        results = self.segmenter.predict(list(images))
        return [np.asarray(r.mask) for r in results], [list(r.qc_flags) for r in results]

    # -- preprocessing ----------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The model's input for one image (:func:`covidcxr.transforms.preprocess.preprocess` with its config).

        Args:
            image: float32 ``H x W`` in [0, 1].
            mask: Optional lung mask; predicted when needed and not given.

        Returns:
            float32 array ``(1, input_size, input_size)``.
        """
        by_key, qc = self.member_masks([image], [mask])
        self._last_qc = qc
        return self.preprocess_batch([image], by_key.get(self.segmenter_key) if self.segmenter_key else None, qc)[0]

    def preprocess_batch(self, images: Sequence[np.ndarray], masks: Masks | None,
                         qc: list[list[str]] | None = None) -> np.ndarray:
        """Stacked model inputs ``(N, 1, S, S)``; ``masks`` must be given when the model segments."""
        if self.preprocess_cfg.needs_mask and masks is None:
            raise ConfigError(f"segmentation mode {self.seg_mode!r} needs lung masks")
        qc = qc if qc is not None else [[] for _ in images]

        def one(i: int) -> np.ndarray:
            return preprocess(images[i], masks[i] if masks is not None else None, self.preprocess_cfg, flags=qc[i])

        # OpenCV and Pillow release the GIL: the images of a batch are prepared in parallel.
        x = map_threads(one, range(len(images)))
        size = self.preprocess_cfg.input_size
        return np.stack(x) if x else np.zeros((0, 1, size, size), np.float32)

    # -- inference --------------------------------------------------------------------------------------
    def run_network(self, batch: Any, outputs: Sequence[str], *, bf16: bool | None = None,
                    batch_size: int = 32, split: int = 1) -> dict[str, np.ndarray]:
        """The exported network's named outputs for preprocessed inputs ``(N, 1, S, S)`` (float32; ``split`` as
        :meth:`covidcxr.runtime.OnnxNetwork.run`)."""
        if bf16:
            check_precision("bf16")  # raises: inference is float32 on every CPU
        x = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        return self.network.run(x, outputs, batch_size=batch_size, split=split)

    def forward_margins(
        self, batch: Any, *, bf16: bool | None = None, features: bool = False, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the network on preprocessed inputs and return uncalibrated logit margins.

        Args:
            batch: ``(N, 1, S, S)`` float array (or tensor) from :meth:`preprocess_batch`.
            bf16: Kept for callers; True raises (inference computes in float32), None/False are float32.
            features: Also return L2-normalised embeddings.
            batch_size: Chunk size.

        Returns:
            ``(logit_covid - logit_non_covid (N,), embeddings (N, D) or None)``.
        """
        margin, emb, _ = self.forward(batch, bf16=bf16, features=features, batch_size=batch_size)
        return margin, emb

    def forward(
        self, batch: Any, *, bf16: bool | None = None, features: bool = False, batch_size: int = 32,
        mirror: bool = True, split: int = 1,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`forward_margins` plus, with ``features``, ``mirror`` and a mirror check, each image's mirror score
        from the same pass (``(margins, embeddings or None, mirror scores or None)``; ``split`` as
        :meth:`covidcxr.runtime.OnnxNetwork.run`)."""
        check = self.mirror_check if features and mirror else None
        if len(batch) == 0:
            return (np.zeros(0, dtype=np.float64),
                    np.zeros((0, self.num_features), np.float32) if features else None,
                    np.zeros(0) if check is not None else None)
        names = ["logits", "embedding"] if features else ["logits"]
        out = self.run_network(batch, names + (["feature_map"] if check is not None else []), bf16=bf16,
                               batch_size=batch_size, split=split)
        logits = out["logits"].astype(np.float64)
        margin = logits[:, 1] - logits[:, 0]
        mirror = check.scores(out["feature_map"]) if check is not None else None
        return margin, (l2_normalise(out["embedding"]) if features else None), mirror

    def forward_batches(
        self, batch: Any, *, bf16: bool | None = None, features: bool = False, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`forward_margins` turned into probabilities with the stored temperature."""
        margin, emb = self.forward_margins(batch, bf16=bf16, features=features, batch_size=batch_size)
        return apply_temperature(margin, self.temperature), emb


class EnsembleArtifact(BaseArtifact):
    """Probability average of member artifacts (use :func:`~covidcxr.classification.artifact.load_artifact`).

    Attributes:
        members: Loaded member artifacts.
        member_weights: Averaging weights (sum 1).
    """

    kind = "ensemble"

    def __init__(
        self, directory: Path, config: dict[str, Any], members: list[ModelArtifact], weights: np.ndarray
    ) -> None:
        super().__init__(directory, config)
        self.members = members
        self.member_weights = weights

    @property
    def seg_mode(self) -> str:
        """``mixed`` unless all members share one mode."""
        modes = {m.seg_mode for m in self.members}
        return modes.pop() if len(modes) == 1 else "mixed"

    @property
    def num_features(self) -> int:
        """Embedding dimension (sum of the members')."""
        return sum(m.num_features for m in self.members)

    def preprocess(self, image: np.ndarray, mask: np.ndarray | None = None) -> list[np.ndarray]:
        """Each member's preprocessed input (members may differ in size and segmentation mode)."""
        return [m.preprocess(image, mask) for m in self.members]


Artifact = ModelArtifact | EnsembleArtifact
