"""One directory per model: weights, config and decision threshold, loadable for prediction and embedding.

A classifier artifact holds ``model.safetensors`` and ``config.json`` (architecture, input size, normalisation,
segmentation mode, threshold chosen on validation, class names, training-data summary, package version and the
weights' SHA-256), ``val_predictions.csv`` (so ensembles can re-choose a threshold) and, when the segmentation
mode is not ``none``, ``segmenter/`` with the lung-segmenter weights used in training (self-contained).
An ensemble artifact holds ``config.json`` (``"kind": "ensemble"``) and copies of its members in ``members/``.

Preprocessing is one function, :func:`prepare_image` followed by the evaluation transform, shared by training
(validation/test) and inference, so the stored preprocessing is reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr import __version__
from covidcxr.augment import build_eval_transform, standardise_intensity, to_cache_image
from covidcxr.calibration import apply_temperature
from covidcxr.device import inference_bf16, prefer_channels_last, resolve_device
from covidcxr.errors import ConfigError, CxrError, ModelError
from covidcxr.io import file_sha256
from covidcxr.models import CxrClassifier, create_classifier

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
SEGMENTER_DIR = "segmenter"
MEMBERS_DIR = "members"
SEG_MODES = ("none", "mask", "crop")
CLASS_NAMES = ("non_covid", "covid")
# Files that make up a classifier artifact (a training run directory holds more: checkpoints, logs, masks).
ARTIFACT_ENTRIES = (CONFIG_FILE, WEIGHTS_FILE, VAL_PREDICTIONS_FILE, SEGMENTER_DIR)
_REQUIRED_KEYS = ("arch", "input_size", "cache_size", "normalization", "seg_mode", "threshold", "weights_sha256")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # Write then rename, so a crash never leaves a half-written config behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelError(f"{directory}: model directory not found")
    if not path.is_file():
        raise ModelError(f"{path}: config file missing; not a model artifact directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: corrupt config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path}: corrupt config (expected a JSON object)")
    return config


# ---------------------------------------------------------------------------------------------------------
# Preprocessing shared by training and inference
# ---------------------------------------------------------------------------------------------------------


def prepare_image(
    image: np.ndarray,
    mask: np.ndarray | None,
    seg_mode: str,
    cache_size: int,
    flags: list[str] | None = None,
    intensity: str = "none",
) -> torch.Tensor:
    """Apply the segmentation mode and make the cached uint8 square that training and inference both start from.

    Args:
        image: float32 ``H x W`` in [0, 1].
        mask: Lung mask (``H x W``, nonzero = lung); required unless ``seg_mode == "none"``.
        seg_mode: ``none``, ``mask`` (zero outside the lungs) or ``crop`` (crop to the lung bounding box).
        cache_size: Side of the cached square (see :func:`covidcxr.augment.cache_size_for`).
        flags: QC flag list; ``seg_fallback`` is appended when an empty mask forces the full image.
        intensity: Intensity standardisation of the square (``none`` or ``clahe``).

    Returns:
        uint8 tensor ``(1, cache_size, cache_size)``.

    Raises:
        ConfigError: Unknown mode or a missing mask.
    """
    if seg_mode not in SEG_MODES:
        raise ConfigError(f"unknown segmentation mode {seg_mode!r}; valid: {', '.join(SEG_MODES)}")
    if seg_mode != "none":
        if mask is None:
            raise ConfigError(f"segmentation mode {seg_mode!r} needs a lung mask")
        from covidcxr.segment import apply_seg_mode

        image = apply_seg_mode(image, mask, seg_mode, flags=flags)
    return standardise_intensity(to_cache_image(image, cache_size), intensity)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a lung-mask image as uint8 {0, 1}."""
    from covidcxr.io import load_image

    arr, _ = load_image(path)
    return (arr > 0.5).astype(np.uint8)


def segmenter_files(weights: str | Path | None) -> list[Path]:
    """The files that make up a lung segmenter: its weights and the JSON config next to them.

    Args:
        weights: Weights file (or folder) as given to ``LungSegmenter.load``; None = the shipped weights.

    Returns:
        Existing files, weights first.

    Raises:
        ModelError: The weights file does not exist.
    """
    from covidcxr import segment

    path = Path(weights) if weights is not None else segment.default_weights_path()
    if path.is_dir():
        path = path / segment.WEIGHTS_NAME
    if not path.is_file():
        raise ModelError(f"{path}: segmenter weights not found (train them with `covidcxr segment train` or "
                         "pass --segmenter PATH)")
    config = path.with_suffix(".json")
    if not config.is_file():
        raise ModelError(f"{config}: segmenter config missing next to {path.name}")
    return [path, config]


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def save_artifact(
    directory: str | Path,
    model: CxrClassifier,
    config: Mapping[str, Any],
    *,
    segmenter_weights: str | Path | None = None,
    val_predictions: pd.DataFrame | None = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write a classifier artifact.

    Args:
        directory: Target folder (created; artifact files inside are replaced).
        model: The trained network.
        config: Settings (see module docstring); ``weights_file``, ``weights_sha256``, ``package_version``,
            ``num_features`` and ``format_version`` are filled in here.
        segmenter_weights: Lung-segmenter weights to copy into ``segmenter/`` when ``config["seg_mode"]`` is not
            ``none`` (None = the shipped weights).
        val_predictions: Validation predictions (``image, patient_id, y, prob``) saved for ensembles.
        weights_dtype: ``float32`` or ``float16`` (floating tensors stored in half precision; loading converts
            them back to float32).

    Returns:
        The artifact directory.

    Raises:
        ConfigError: Missing required settings.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    missing = [k for k in ("arch", "input_size", "normalization", "seg_mode", "threshold") if k not in cfg]
    if missing:
        raise ConfigError(f"artifact config lacks {missing}")
    if weights_dtype not in ("float32", "float16"):
        raise ConfigError(f"weights_dtype={weights_dtype!r}: expected float32 or float16")
    half = weights_dtype == "float16"
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"arch": model.arch, "format": "covidcxr-classifier"})
    cfg.update(
        format_version=FORMAT_VERSION,
        kind="classifier",
        num_classes=model.num_classes,
        num_features=model.num_features,
        class_names=list(cfg.get("class_names", CLASS_NAMES)),
        weights_file=WEIGHTS_FILE,
        weights_dtype=weights_dtype,
        weights_sha256=file_sha256(weights),
        package_version=__version__,
    )
    cfg.setdefault("cache_size", None)
    seg_dir = directory / SEGMENTER_DIR
    if cfg["seg_mode"] != "none":
        files = segmenter_files(segmenter_weights)
        if seg_dir.exists():
            shutil.rmtree(seg_dir)
        seg_dir.mkdir()
        for f in files:
            shutil.copy2(f, seg_dir / f.name)
        cfg["segmenter"] = {
            "weights": f"{SEGMENTER_DIR}/{files[0].name}",
            "files": [f"{SEGMENTER_DIR}/{f.name}" for f in files],
            "sha256": file_sha256(files[0]),
        }
    else:
        cfg["segmenter"] = None
    if val_predictions is not None:
        val_predictions.to_csv(directory / VAL_PREDICTIONS_FILE, index=False)
    _write_json(directory / CONFIG_FILE, cfg)
    log.info("saved model artifact %s (%s, sha256 %s)", directory, model.arch, cfg["weights_sha256"][:12])
    return directory


# ---------------------------------------------------------------------------------------------------------
# Loading and inference
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Per-image outputs of :meth:`ModelArtifact.predict`.

    Attributes:
        prob: Probability of COVID, shape ``(N,)``.
        label: Predicted class name per image (``prob >= threshold`` -> covid).
        qc_flags: Segmentation QC flags per image (empty lists when no segmentation is used).
        embeddings: L2-normalised embeddings ``(N, D)`` when asked for, else None.
        prob_uncalibrated: Probability before temperature scaling (single models; None for ensembles).
    """

    prob: np.ndarray
    label: list[str]
    qc_flags: list[list[str]] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    prob_uncalibrated: np.ndarray | None = None


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when ``y`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class ModelArtifact:
    """A loaded classifier artifact (use :func:`load_artifact`).

    Attributes:
        directory: The artifact folder.
        config: Its ``config.json``.
        model: The network in eval mode on ``device``.
        device: Inference device.
        weights_hash: SHA-256 of the weights file (identifies the embedding model, e.g. for the case index).
    """

    kind = "classifier"

    def __init__(self, directory: Path, config: dict[str, Any], model: CxrClassifier, device: torch.device) -> None:
        self.directory = directory
        self.config = config
        # The faster memory layout for this device (measured: benchmarks/precision.py).
        self.memory_format = torch.channels_last if prefer_channels_last(device) else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.device = device
        self.weights_hash: str = config["weights_sha256"]
        self._transform = build_eval_transform(int(config["input_size"]))
        self._segmenter: Any = None
        self._last_qc: list[list[str]] = []

    # -- properties -------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Decision threshold chosen on validation."""
        return float(self.config["threshold"])

    @property
    def seg_mode(self) -> str:
        """Segmentation mode used in training (``none``, ``mask`` or ``crop``)."""
        return str(self.config["seg_mode"])

    @property
    def intensity(self) -> str:
        """Intensity standardisation used in training (``none`` or ``clahe``)."""
        return str(self.config.get("intensity", "none"))

    @property
    def temperature(self) -> float:
        """Temperature fitted on validation (1.0 = uncalibrated); probabilities are ``sigmoid(margin / T)``."""
        return float(self.config.get("temperature", 1.0))

    @property
    def class_names(self) -> list[str]:
        """Class names, index 1 = positive (covid)."""
        return list(self.config.get("class_names", CLASS_NAMES))

    @property
    def num_features(self) -> int:
        """Embedding dimension of :meth:`embed`."""
        return int(self.model.num_features)

    @property
    def qc_flags(self) -> list[list[str]]:
        """Segmentation QC flags of the images of the last predict/embed call (empty lists without segmentation)."""
        return self._last_qc

    @property
    def segmenter_key(self) -> str | None:
        """SHA-256 of the segmenter weights (masks are interchangeable between artifacts with the same key)."""
        seg = self.config.get("segmenter")
        return seg["sha256"] if seg else None

    # -- preprocessing ----------------------------------------------------------------------------------
    @property
    def segmenter(self) -> Any:
        """The lung segmenter stored in the artifact (loaded on first use)."""
        if self._segmenter is None:
            seg = self.config.get("segmenter")
            if not seg:
                raise ConfigError(f"{self.directory}: model uses no segmentation (seg_mode 'none')")
            from covidcxr import segment
            from covidcxr.segment import LungSegmenter

            if seg.get("builtin"):
                # A reference to the package's own lung U-Net (the shipped model does not carry a second copy).
                weights = segment.default_weights_path()
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
                self._segmenter = LungSegmenter.load(
                    weights, device=str(self.device),
                    precision="auto" if self.config.get("bf16_inference", True) else "fp32")
            except CxrError:
                raise
            except Exception as exc:  # any failure of a corrupt file surfaces as ModelError naming it
                raise ModelError(f"{weights}: cannot load segmenter ({type(exc).__name__}: {exc})") from exc
        return self._segmenter

    def segment(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[list[str]]]:
        """Lung masks and QC flags from the artifact's segmenter.

        Args:
            images: float32 ``H x W`` arrays in [0, 1].

        Returns:
            ``(masks, qc_flags)``, one entry per image.
        """
        if not images:
            return [], []
        results = self.segmenter.predict(list(images))
        return [np.asarray(r.mask) for r in results], [list(r.qc_flags) for r in results]

    def _masks(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None
    ) -> tuple[list[np.ndarray | None], list[list[str]]]:
        n = len(images)
        if self.seg_mode == "none":
            return [None] * n, [[] for _ in range(n)]
        given = list(masks) if masks is not None else [None] * n
        if len(given) != n:
            raise ConfigError(f"got {len(given)} masks for {n} images")
        todo = [i for i, m in enumerate(given) if m is None]
        qc: list[list[str]] = [[] for _ in range(n)]
        if todo:
            pred, flags = self.segment([images[i] for i in todo])
            for i, m, f in zip(todo, pred, flags):
                given[i], qc[i] = m, f
        return given, qc

    def preprocess(self, image: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
        """Preprocess one image exactly as training's evaluation transform did.

        Segmentation mode (mask from the stored segmenter unless given), squash to the cache size, uint8, resize
        to the input size, scale to [0, 1]. Normalisation happens in the model's stem.

        Args:
            image: float32 ``H x W`` in [0, 1].
            mask: Optional lung mask; predicted when needed and not given.

        Returns:
            float32 tensor ``(1, input_size, input_size)``.
        """
        masks, qc = self._masks([image], [mask])
        self._last_qc = qc
        return self._transform(prepare_image(image, masks[0], self.seg_mode, int(self.config["cache_size"]), qc[0],
                                             self.intensity))

    def preprocess_cached(self, cached: torch.Tensor) -> torch.Tensor:
        """Evaluation transform of an already prepared uint8 square (see :func:`prepare_image`)."""
        return self._transform(cached)

    # -- inference --------------------------------------------------------------------------------------
    def _autocast(self, bf16: bool | None) -> Any:
        use = bool(self.config.get("bf16_inference", True)) and inference_bf16(self.device) if bf16 is None else bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use else nullcontext()

    @torch.inference_mode()
    def forward_margins(
        self, batch: torch.Tensor, *, bf16: bool | None = None, features: bool = False, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the network on preprocessed inputs and return uncalibrated logit margins.

        Args:
            batch: ``(N, 1, S, S)`` float tensor from :meth:`preprocess`.
            bf16: Force bf16 autocast on/off; None = config flag where bf16 is native on the device.
            features: Also return L2-normalised embeddings.
            batch_size: Chunk size.

        Returns:
            ``(logit_covid - logit_non_covid (N,), embeddings (N, D) or None)``.
        """
        margins, feats = [], []
        self.model.eval()
        for start in range(0, len(batch), batch_size):
            x = batch[start : start + batch_size].to(self.device, non_blocking=True, memory_format=self.memory_format)
            with self._autocast(bf16):
                f = self.model.forward_features(x)
                logits = self.model.forward_head(f)
            logits = logits.float()
            margins.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
            if features:
                feats.append(f.float().cpu().numpy())
        margin = np.concatenate(margins).astype(np.float64) if margins else np.zeros(0, dtype=np.float64)
        emb = _l2_normalise(np.concatenate(feats)) if features and feats else None
        if features and emb is None:
            emb = np.zeros((0, self.num_features), dtype=np.float32)
        return margin, emb

    def forward_batches(
        self, batch: torch.Tensor, *, bf16: bool | None = None, features: bool = False, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`forward_margins` turned into probabilities with the stored temperature.

        Returns:
            ``(calibrated probability of COVID (N,), embeddings (N, D) or None)``.
        """
        margin, emb = self.forward_margins(batch, bf16=bf16, features=features, batch_size=batch_size)
        return apply_temperature(margin, self.temperature), emb

    def predict(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        *,
        embeddings: bool = False,
        bf16: bool | None = None,
        batch_size: int = 32,
    ) -> Prediction:
        """Probabilities, labels at the stored threshold, QC flags and optionally embeddings.

        Args:
            images: float32 ``H x W`` arrays in [0, 1].
            masks: Optional lung masks (None entries are predicted by the stored segmenter).
            embeddings: Also compute L2-normalised embeddings.
            bf16: Force bf16 autocast on/off (default: config flag where supported).
            batch_size: Images per forward pass.

        Returns:
            A :class:`Prediction`.
        """
        images = [_check_image(im, i) for i, im in enumerate(images)]
        full_masks, qc = self._masks(images, masks)
        cache = int(self.config["cache_size"])
        x = [self._transform(prepare_image(im, m, self.seg_mode, cache, f, self.intensity))
             for im, m, f in zip(images, full_masks, qc)]
        batch = torch.stack(x) if x else torch.zeros((0, 1, 1, 1))
        margin, emb = self.forward_margins(batch, bf16=bf16, features=embeddings, batch_size=batch_size)
        prob = apply_temperature(margin, self.temperature)
        self._last_qc = qc
        labels = [self.class_names[int(p >= self.threshold)] for p in prob]
        return Prediction(prob=prob, label=labels, qc_flags=qc, embeddings=emb,
                          prob_uncalibrated=apply_temperature(margin, 1.0))

    def predict_proba(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Probability of COVID per image, shape ``(N,)`` (see :meth:`predict` for the arguments)."""
        return self.predict(images, masks, **kwargs).prob

    def embed(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """L2-normalised embeddings from ``forward_features``, shape ``(N, D)`` (see :meth:`predict`)."""
        return self.predict(images, masks, embeddings=True, **kwargs).embeddings

    def predict_manifest(
        self,
        df: pd.DataFrame,
        *,
        embeddings: bool = False,
        batch_size: int = 64,
        num_workers: int = 4,
        mask_dir: str | Path | None = None,
        progress: bool = False,
    ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Predict every row of a manifest table, reading images (and masks) from disk in chunks.

        Args:
            df: Table with an ``image`` column of paths (``mask`` column used when present and non-empty).
            embeddings: Also return embeddings.
            batch_size: Images per chunk.
            num_workers: Threads for decoding.
            mask_dir: Folder caching predicted masks per segmenter (see :class:`MaskCache`).
            progress: Show a progress bar.

        Returns:
            ``(df copy with prob, pred_label, qc_flags columns, embeddings or None)``.
        """
        return predict_manifest(
            self, df, embeddings=embeddings, batch_size=batch_size, num_workers=num_workers, mask_dir=mask_dir,
            progress=progress,
        )


def _check_image(image: Any, i: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ConfigError(f"image {i}: expected a 2-D grey array (H, W), got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


class EnsembleArtifact:
    """Probability average of member artifacts (use :func:`load_artifact`); same interface as ModelArtifact.

    Attributes:
        members: Loaded member artifacts.
        member_weights: Averaging weights (sum 1).
    """

    kind = "ensemble"

    def __init__(
        self, directory: Path, config: dict[str, Any], members: list[ModelArtifact], weights: np.ndarray
    ) -> None:
        self.directory = directory
        self.config = config
        self.members = members
        self.member_weights = weights
        self.weights_hash: str = config["weights_sha256"]
        self._last_qc: list[list[str]] = []

    @property
    def threshold(self) -> float:
        """Decision threshold of the ensemble."""
        return float(self.config["threshold"])

    @property
    def class_names(self) -> list[str]:
        """Class names, index 1 = covid."""
        return list(self.config.get("class_names", CLASS_NAMES))

    @property
    def seg_mode(self) -> str:
        """``mixed`` unless all members share one mode."""
        modes = {m.seg_mode for m in self.members}
        return modes.pop() if len(modes) == 1 else "mixed"

    @property
    def num_features(self) -> int:
        """Embedding dimension (sum of the members')."""
        return sum(m.num_features for m in self.members)

    @property
    def qc_flags(self) -> list[list[str]]:
        """QC flags of the last call (union over the members' segmenters)."""
        return self._last_qc

    def preprocess(self, image: np.ndarray, mask: np.ndarray | None = None) -> list[torch.Tensor]:
        """Each member's preprocessed input (members may differ in size and segmentation mode)."""
        return [m.preprocess(image, mask) for m in self.members]

    def _member_masks(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None
    ) -> tuple[dict[str | None, list[np.ndarray | None] | None], list[list[str]]]:
        # Members sharing a segmenter share its masks: segment once per distinct segmenter.
        by_key: dict[str | None, list[np.ndarray | None] | None] = {None: None}
        qc: list[list[str]] = [[] for _ in images]
        for m in self.members:
            key = m.segmenter_key
            if key is None or key in by_key:
                continue
            got, flags = m._masks(images, masks)
            by_key[key] = got
            for i, f in enumerate(flags):
                qc[i] = sorted(set(qc[i]) | set(f))
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
        """Weighted mean of member probabilities; embeddings concatenated (see :meth:`ModelArtifact.predict`)."""
        images = [_check_image(im, i) for i, im in enumerate(images)]
        by_key, qc = self._member_masks(images, masks)
        probs, embs = [], []
        for m in self.members:
            out = m.predict(images, by_key[m.segmenter_key], embeddings=embeddings, bf16=bf16, batch_size=batch_size)
            probs.append(out.prob)
            embs.append(out.embeddings)
        prob = np.average(np.stack(probs), axis=0, weights=self.member_weights) if images else np.zeros(0)
        emb = _l2_normalise(np.concatenate(embs, axis=1)) if embeddings else None
        self._last_qc = qc
        labels = [self.class_names[int(p >= self.threshold)] for p in prob]
        return Prediction(prob=prob, label=labels, qc_flags=qc, embeddings=emb)

    def predict_proba(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Weighted mean probability of COVID, shape ``(N,)``."""
        return self.predict(images, masks, **kwargs).prob

    def embed(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Concatenated L2-normalised member embeddings, re-normalised, shape ``(N, sum D)``."""
        return self.predict(images, masks, embeddings=True, **kwargs).embeddings

    def predict_manifest(
        self,
        df: pd.DataFrame,
        *,
        embeddings: bool = False,
        batch_size: int = 64,
        num_workers: int = 4,
        mask_dir: str | Path | None = None,
        progress: bool = False,
    ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Predict every row of a manifest table (see :meth:`ModelArtifact.predict_manifest`)."""
        return predict_manifest(
            self, df, embeddings=embeddings, batch_size=batch_size, num_workers=num_workers, mask_dir=mask_dir,
            progress=progress,
        )


Artifact = ModelArtifact | EnsembleArtifact


def _load_classifier(directory: Path, config: dict[str, Any], device: torch.device, verify: bool) -> ModelArtifact:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ModelError(f"{directory / CONFIG_FILE}: config lacks {missing}")
    weights = directory / config.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    if verify and file_sha256(weights) != config["weights_sha256"]:
        raise ModelError(f"{weights}: weights file is corrupt or was replaced (SHA-256 differs from config.json)")
    try:
        # Shipped weights are stored in float16 to halve the file; compute stays in float32 (bf16 by autocast).
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: corrupt weights ({exc})") from exc
    norm = config["normalization"]
    try:
        model = create_classifier(
            config["arch"], "none", num_classes=int(config.get("num_classes", 2)), mean=norm["mean"], std=norm["std"],
            init=False,
        )
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(f"{weights}: weights do not fit {config['arch']!r} ({exc})") from exc
    except ConfigError as exc:
        raise ModelError(f"{directory / CONFIG_FILE}: {exc}") from exc
    model.to(device).eval()
    if config.get("cache_size") is None:
        from covidcxr.augment import cache_size_for

        config["cache_size"] = cache_size_for(int(config["input_size"]))
    return ModelArtifact(directory, config, model, device)


SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "covid_classifier"


def shipped_model_dir() -> Path:
    """Folder of the COVID-19 classifier that ships with the package (see its ``MODEL_CARD.md``).

    Raises:
        ModelError: The package was installed without it.
    """
    if not (SHIPPED_MODEL_DIR / CONFIG_FILE).is_file():
        raise ModelError(f"{SHIPPED_MODEL_DIR}: the shipped classifier is missing from this installation; "
                         "reinstall covidcxr or pass --model DIR")
    return SHIPPED_MODEL_DIR


def resolve_model_dir(model: str | Path | None) -> tuple[Path, bool]:
    """The model folder to use: ``model`` when given, else the shipped classifier (logged, so users know).

    Returns:
        ``(folder, is_shipped)``.
    """
    if model is not None:
        return Path(model), False
    folder = shipped_model_dir()
    log.info("no --model given: using the shipped classifier %s (research use, not a diagnostic device)", folder)
    return folder, True


def load_artifact(directory: str | Path, device: str | torch.device | None = "auto", *, verify: bool = True) -> Artifact:
    """Load a classifier or ensemble artifact.

    Args:
        directory: The artifact folder (a training ``--out`` folder is one).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
        verify: Check the weights' SHA-256 against the config.

    Returns:
        A :class:`ModelArtifact` or :class:`EnsembleArtifact`.

    Raises:
        ModelError: Missing or corrupt files (the message names the file).
    """
    directory = Path(directory)
    config = _read_config(directory)
    dev = resolve_device(device)
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelError(f"{directory / CONFIG_FILE}: format_version {config['format_version']} is newer than "
                         f"this package supports ({FORMAT_VERSION}); upgrade covidcxr")
    if config.get("kind", "classifier") == "ensemble":
        members_cfg = config.get("members")
        if not members_cfg:
            raise ModelError(f"{directory / CONFIG_FILE}: ensemble config lists no members")
        members = []
        for entry in members_cfg:
            art = load_artifact(directory / entry["dir"], dev, verify=verify)
            if not isinstance(art, ModelArtifact):
                raise ModelError(f"{directory / entry['dir']}: nested ensembles are not supported")
            members.append(art)
        weights = np.asarray([float(e.get("weight", 1.0)) for e in members_cfg])
        return EnsembleArtifact(directory, config, members, weights / weights.sum())
    return _load_classifier(directory, config, dev, verify)


# ---------------------------------------------------------------------------------------------------------
# Manifest-level prediction with a mask cache
# ---------------------------------------------------------------------------------------------------------


class MaskCache:
    """Predicted lung masks stored as PNGs under ``root/<segmenter sha[:16]>/``, keyed by image path.

    Computed once per (segmenter, image), so resumed runs, other variants and evaluation reuse them.

    Args:
        root: Cache folder (None disables caching).
        segmenter_sha: SHA-256 of the segmenter weights.
    """

    def __init__(self, root: str | Path | None, segmenter_sha: str) -> None:
        self.dir = Path(root) / segmenter_sha[:16] if root is not None else None
        self._qc: dict[str, list[str]] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            qc_file = self.dir / "qc.json"
            if qc_file.is_file():
                try:
                    self._qc = json.loads(qc_file.read_text())
                except (OSError, json.JSONDecodeError):
                    log.warning("%s: unreadable QC cache, recomputing masks", qc_file)

    @staticmethod
    def key(image_path: str) -> str:
        """File stem of an image's cached mask."""
        return hashlib.sha1(os.path.abspath(image_path).encode()).hexdigest()[:20]

    def cached_path(self, image_path: str) -> Path | None:
        """The cached mask PNG of an image, or None when not cached."""
        if self.dir is None:
            return None
        k = self.key(image_path)
        path = self.dir / f"{k}.png"
        return path if k in self._qc and path.is_file() else None

    def flags(self, image_path: str) -> list[str]:
        """Cached QC flags of an image (empty when not cached)."""
        return list(self._qc.get(self.key(image_path), []))

    def get(self, image_path: str) -> tuple[np.ndarray, list[str]] | None:
        """Cached ``(mask, qc_flags)`` or None."""
        if self.dir is None:
            return None
        k = self.key(image_path)
        path = self.dir / f"{k}.png"
        if k not in self._qc or not path.is_file():
            return None
        try:
            return read_mask(path), list(self._qc[k])
        except CxrError:
            return None

    def put_many(self, items: Sequence[tuple[str, np.ndarray, list[str]]]) -> None:
        """Store ``(image_path, mask, qc_flags)`` entries and persist the QC table."""
        if self.dir is None or not items:
            return
        from covidcxr.io import save_png

        for image_path, mask, flags in items:
            k = self.key(image_path)
            tmp = self.dir / f"{k}.tmp.png"
            save_png(tmp, (np.asarray(mask) > 0).astype(np.float32), bit_depth=8)
            os.replace(tmp, self.dir / f"{k}.png")
            self._qc[k] = list(flags)
        _write_json(self.dir / "qc.json", self._qc)


def load_masks_for_rows(
    rows: pd.DataFrame,
    images: Sequence[np.ndarray],
    segment: Callable[[list[np.ndarray]], tuple[list[np.ndarray], list[list[str]]]],
    cache: MaskCache | None,
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Lung masks for manifest rows: the ``mask`` column when given, else the cache, else ``segment`` (batched).

    Args:
        rows: Manifest rows (``image``, optional ``mask``), aligned with ``images``.
        images: Decoded images.
        segment: Function returning ``(masks, qc_flags)`` for a list of images.
        cache: Mask cache or None.

    Returns:
        ``(masks, qc_flags)`` per row.
    """
    n = len(rows)
    masks: list[np.ndarray | None] = [None] * n
    qc: list[list[str]] = [[] for _ in range(n)]
    paths = rows["image"].astype(str).tolist()
    given = rows["mask"].astype(str).tolist() if "mask" in rows.columns else [""] * n
    todo = []
    for i in range(n):
        if given[i] not in ("", "nan", "None"):
            masks[i] = read_mask(given[i])
            continue
        hit = cache.get(paths[i]) if cache is not None else None
        if hit is not None:
            masks[i], qc[i] = hit
        else:
            todo.append(i)
    if todo:
        pred, flags = segment([images[i] for i in todo])
        for i, m, f in zip(todo, pred, flags):
            masks[i], qc[i] = np.asarray(m), list(f)
        if cache is not None:
            cache.put_many([(paths[i], masks[i], qc[i]) for i in todo])
    return masks, qc  # type: ignore[return-value]


def decode_images(paths: Sequence[str], num_workers: int) -> list[np.ndarray]:
    """Read images with :func:`covidcxr.io.load_image`, in a thread pool when ``num_workers > 1``.

    Args:
        paths: Image files.
        num_workers: Decoding threads (``<= 1`` reads in the calling thread).

    Returns:
        float32 ``H x W`` arrays in [0, 1], in the order of ``paths``.

    Raises:
        ImageError: A file cannot be read (the first failure in order).
    """
    from covidcxr.io import load_image

    if num_workers <= 1 or len(paths) <= 1:
        return [load_image(p)[0] for p in paths]
    with ThreadPoolExecutor(num_workers) as pool:
        return [im for im, _ in pool.map(load_image, paths)]


def predict_manifest(
    artifact: Artifact,
    df: pd.DataFrame,
    *,
    embeddings: bool = False,
    batch_size: int = 64,
    num_workers: int = 4,
    mask_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Predict (and embed) every row of a manifest table with a classifier or ensemble artifact.

    Args:
        artifact: Loaded artifact.
        df: Table with ``image`` paths (``mask`` used when present and non-empty).
        embeddings: Also return L2-normalised embeddings ``(N, D)``.
        batch_size: Rows per chunk (decode, segment, forward).
        num_workers: Decoding threads.
        mask_dir: Mask cache folder shared with training (None: masks are not cached).
        progress: Show a tqdm progress bar.

    Returns:
        ``(df copy + prob, pred_label, qc_flags, embeddings or None)``.
    """
    from tqdm.auto import tqdm

    if "image" not in df.columns:
        raise ConfigError(f"manifest table needs an 'image' column, has {list(df.columns)}")
    members = artifact.members if isinstance(artifact, EnsembleArtifact) else [artifact]
    caches: dict[str, MaskCache] = {}
    for m in members:
        key = m.segmenter_key
        if key is not None and key not in caches:
            caches[key] = MaskCache(mask_dir, key)
    probs, raws, embs, qcs = [], [], [], []
    rows_all = df.reset_index(drop=True)
    chunks = range(0, len(rows_all), batch_size)
    for start in tqdm(chunks, desc="predict", unit="batch", disable=not progress):
        rows = rows_all.iloc[start : start + batch_size]
        images = decode_images(rows["image"].astype(str).tolist(), num_workers)
        masks_by_key: dict[str, list[np.ndarray]] = {}
        qc: list[list[str]] = [[] for _ in images]
        for m in members:
            key = m.segmenter_key
            if key is None or key in masks_by_key:
                continue
            got, flags = load_masks_for_rows(rows, images, m.segment, caches[key])
            masks_by_key[key] = got
            qc = [sorted(set(a) | set(b)) for a, b in zip(qc, flags)]
        if isinstance(artifact, EnsembleArtifact):
            member_out = [
                m.predict(images, masks_by_key.get(m.segmenter_key), embeddings=embeddings) for m in members
            ]
            prob = np.average(np.stack([o.prob for o in member_out]), axis=0, weights=artifact.member_weights)
            emb = _l2_normalise(np.concatenate([o.embeddings for o in member_out], axis=1)) if embeddings else None
        else:
            out = artifact.predict(images, masks_by_key.get(artifact.segmenter_key), embeddings=embeddings)
            prob, emb = out.prob, out.embeddings
            raws.append(out.prob_uncalibrated)
        probs.append(prob)
        qcs.extend(qc)
        if embeddings:
            embs.append(emb)
    result = rows_all.copy()
    result["prob"] = np.concatenate(probs) if probs else np.zeros(0)
    if raws and isinstance(artifact, ModelArtifact) and artifact.temperature != 1.0:
        result["prob_uncalibrated"] = np.concatenate(raws)
    result["pred_label"] = [artifact.class_names[int(p >= artifact.threshold)] for p in result["prob"]]
    result["qc_flags"] = [";".join(f) for f in qcs]
    emb_all = np.concatenate(embs) if embeddings and embs else None
    return result, emb_all


# ---------------------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------------------


def copy_artifact(src: str | Path, dst: str | Path) -> Path:
    """Copy only the artifact files of a model directory (not checkpoints, logs or mask caches).

    Args:
        src: Classifier artifact (or training run) folder.
        dst: New folder (must not exist).

    Returns:
        ``dst``.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for name in ARTIFACT_ENTRIES:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dst / name)
        elif p.is_file():
            shutil.copy2(p, dst / name)
    return dst


def build_ensemble(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    weighted: bool = False,
    force: bool = False,
) -> Path:
    """Combine classifier artifacts into a self-contained ensemble artifact (probability average).

    The members are copied into ``out/members/``. Weights are equal, or each member's validation ROC AUC
    (``val_auc`` in its config) with ``weighted``. The threshold is re-chosen (member's method) on the averaged
    validation predictions when all members were validated on the same images; otherwise it is the
    (weighted) mean of the members' thresholds.

    Args:
        model_dirs: Two or more classifier artifact folders.
        out: New artifact folder.
        weighted: Weight members by validation AUC.
        force: Replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ConfigError: Fewer than two members, or ``out`` exists.
        ModelError: A member is missing, corrupt or itself an ensemble.
    """
    from covidcxr.evaluate import choose_threshold

    if len(model_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 models, got {len(model_dirs)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: output folder exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    configs = []
    for d in model_dirs:
        cfg = _read_config(Path(d))
        if cfg.get("kind", "classifier") != "classifier":
            raise ModelError(f"{Path(d) / CONFIG_FILE}: nested ensembles are not supported")
        weights_file = Path(d) / cfg.get("weights_file", WEIGHTS_FILE)
        if not weights_file.is_file() or file_sha256(weights_file) != cfg.get("weights_sha256"):
            raise ModelError(f"{weights_file}: weights file missing or corrupt (SHA-256 differs from config.json)")
        configs.append(cfg)
    if weighted:
        aucs = [c.get("val_auc") for c in configs]
        bad = [str(d) for d, a in zip(model_dirs, aucs) if a is None or not math.isfinite(float(a))]
        if bad:
            raise ConfigError(f"--weighted needs val_auc in each member's config; missing for {bad}")
        weights = np.asarray(aucs, dtype=float)
    else:
        weights = np.ones(len(configs))
    weights = weights / weights.sum()

    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (d, cfg, w) in enumerate(zip(model_dirs, configs, weights)):
        rel = f"{MEMBERS_DIR}/m{i}_{cfg['arch']}"
        copy_artifact(d, out / rel)
        members.append(
            {"dir": rel, "source": str(Path(d).resolve()), "weight": float(w), "arch": cfg["arch"],
             "seg_mode": cfg["seg_mode"], "val_auc": cfg.get("val_auc"), "threshold": cfg["threshold"],
             "weights_sha256": cfg["weights_sha256"]}
        )

    method = configs[0].get("threshold_method", "youden")
    target = configs[0].get("target_sensitivity")
    val = _shared_val_predictions([Path(d) for d in model_dirs], weights)
    if val is not None:
        threshold = choose_threshold(val["y"].to_numpy(), val["prob"].to_numpy(), method,
                                     target if method == "sensitivity" else None)
        threshold_source = "validation"
        val_auc = safe_auc(val["y"].to_numpy(), val["prob"].to_numpy())
        val.to_csv(out / VAL_PREDICTIONS_FILE, index=False)
    else:
        threshold = float(np.average([float(c["threshold"]) for c in configs], weights=weights))
        threshold_source = "mean_of_members"
        val_auc = None
    digest = hashlib.sha256("".join(f"{m['weights_sha256']}:{m['weight']:.6f};" for m in members).encode())
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "ensemble",
        "members": members,
        "weighted": bool(weighted),
        "threshold": float(threshold),
        "threshold_method": method,
        "target_sensitivity": target,
        "threshold_source": threshold_source,
        "val_auc": val_auc,
        "class_names": list(configs[0].get("class_names", CLASS_NAMES)),
        "weights_sha256": digest.hexdigest(),
        "package_version": __version__,
    }
    _write_json(out / CONFIG_FILE, config)
    log.info("ensemble of %d models -> %s (threshold %.4f from %s)", len(members), out, threshold, threshold_source)
    return out


def _shared_val_predictions(dirs: Sequence[Path], weights: np.ndarray) -> pd.DataFrame | None:
    frames = []
    for d in dirs:
        path = d / VAL_PREDICTIONS_FILE
        if not path.is_file():
            return None
        frame = pd.read_csv(path)
        if not {"image", "y", "prob"} <= set(frame.columns):
            return None
        frames.append(frame.sort_values("image").reset_index(drop=True))
    first = frames[0]
    for f in frames[1:]:
        if len(f) != len(first) or not (f["image"].to_numpy() == first["image"].to_numpy()).all():
            return None
        if not (f["y"].to_numpy() == first["y"].to_numpy()).all():
            return None
    merged = first.copy()
    merged["prob"] = np.average(np.stack([f["prob"].to_numpy() for f in frames]), axis=0, weights=weights)
    return merged
