"""Classifier training with Lightning: cached data, class balancing, warm-up + cosine AdamW, AUC-based checkpoints.

``train_classifier`` reads a manifest (using its ``split`` column, or making a patient-level split), decodes every
image once into an in-RAM uint8 cache (segmentation mode applied, squashed to ~1.15 x the input size) so epochs
only run augmentation, trains with early stopping and the best checkpoint on validation ROC AUC, chooses the
decision threshold on validation predictions, evaluates the test split with that threshold, and writes a model
artifact into ``out`` (which also holds ``checkpoints/``, ``logs/`` and the ``masks/`` cache).

Multi-GPU and multi-node training use Lightning's DDP (``devices``, ``num_nodes``, ``strategy``); only global
rank zero prepares ``out`` and writes the artifact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from covidcxr.classification.artifact import save_artifact
from covidcxr.classification.inference import ModelArtifact
from covidcxr.classification.loop import MaskCache
from covidcxr.data.manifest import both_label_mask
from covidcxr.device import (
    LIGHTNING_PRECISIONS,
    default_num_workers,
    prefer_channels_last,
    resolve_device,
    resolve_precision,
    uses_cuda,
)
from covidcxr.errors import ConfigError
from covidcxr.evaluation.calibration import apply_temperature, fit_temperature, nll
from covidcxr.evaluation.metrics import safe_auc
from covidcxr.io.files import file_sha256, json_safe
from covidcxr.models.classifier import create_classifier
from covidcxr.models.registry import NORMALIZATIONS, get_arch_spec
from covidcxr.transforms.augment import AugmentConfig, build_train_transform
from covidcxr.transforms.preprocess import PreprocessCfg, preprocess, to_uint8
from covidcxr.vocab import INTENSITY_MODES, LABELS, SEG_MODES

log = logging.getLogger(__name__)

BALANCE_MODES = ("loss", "sampler", "none")
# auc_both: validation ROC AUC on rows of sources that hold both labels, where recognising the source cannot help.
VAL_METRICS = {"auc": ("val_auc", "max"), "loss": ("val_loss", "min"), "auc_both": ("val_auc_both", "max")}
PRECISIONS = LIGHTNING_PRECISIONS
THRESHOLD_METHODS = ("youden", "sensitivity")
THRESHOLD_ROWS = ("both_labels", "all")
# Fewer validation rows of either class than this on two-label sources: the threshold falls back to all rows.
MIN_THRESHOLD_ROWS_PER_CLASS = 5


@dataclass
class TrainConfig:
    """Every training setting (stored in the artifact config under ``training``).

    Attributes:
        arch: Registry architecture.
        pretrained: ``imagenet``, ``none`` or a weights path.
        seg_mode: ``none``, ``mask`` or ``crop``.
        image_size: Network input side.
        epochs: Maximum epochs.
        batch_size: Images per step per device.
        lr: AdamW peak learning rate; None = 1e-3 from scratch, 3e-4 from pretrained weights.
        backbone_lr_scale: Backbone learning rate as a fraction of ``lr`` (discriminative fine-tuning; 1 = same).
        freeze_epochs: Whole epochs at the start that train the head only (frozen-backbone warm-up).
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_epochs: Linear warm-up length before the cosine decay (fractions allowed).
        seed: Seed of split, initialisation, sampling and augmentation.
        num_workers: DataLoader worker processes (and decoding threads); None = one per CPU beyond the main one.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        devices: Lightning devices (``auto``, a count or a list).
        num_nodes: Nodes for multi-node DDP.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        precision: ``auto`` (bf16-mixed where the hardware has native bf16, else 32-true) or a Lightning precision.
        channels_last: Channels-last tensors; None = where measured faster (CUDA, AVX-512 CPUs; see
            :func:`covidcxr.device.prefer_channels_last` and ``benchmarks/precision.py``).
        augment: Augmentation on/off; ``augment_options`` override :class:`AugmentConfig` fields.
        normalization: ``imagenet``, ``inception`` (mean = std = 0.5) or ``gray``; None = what the architecture's
            ImageNet weights expect (its pretrained config).
        intensity: ``none`` or ``clahe`` (contrast-limited histogram equalisation of the prepared image, a
            standardisation that removes some scanner/source contrast cues).
        balance: ``loss`` (class-weighted CE), ``sampler`` (balanced sampling) or ``none``.
        val_metric: ``auc``, ``auc_both`` (two-label sources only) or ``loss`` for early stopping and the best
            checkpoint.
        both_label_weight: Loss weight of training rows from sources that hold both labels (1 = as any row).
        patience: Early-stopping patience in epochs (0 = off).
        threshold_method: ``youden`` or ``sensitivity``.
        threshold_rows: ``both_labels`` (choose the threshold on validation rows of two-label sources, the hard
            negatives, when each class has enough of them) or ``all``.
        calibrate: Fit temperature scaling on validation and store it in the artifact.
        weights_dtype: ``float32`` or ``float16`` (half the file; the weights are rounded *before* calibration and
            threshold choice, so both fit the weights that are saved).
        target_sensitivity: Target for ``sensitivity``.
        group_col: Extra grouping column for the patient split (when the manifest has no ``split``).
        val_fraction: Validation share of patients for a new split.
        test_fraction: Test share of patients for a new split.
        drop_rate: Dropout before the head.
        segmenter: Lung-segmenter weights for masks (None = shipped weights).
        mask_dir: Predicted-mask cache (None = ``out/masks``).
        bf16_inference: Store the bf16-inference flag in the artifact.
        progress: Progress bars.
        eval_test: Evaluate the test split after training (patient-bootstrap CIs).
        n_boot: Bootstrap replicates of the test evaluation.
        max_minutes: Stop training after this many minutes (None = no limit); the best checkpoint is kept.
    """

    arch: str = "resnet50"
    pretrained: str = "none"
    seg_mode: str = "none"
    image_size: int = 224
    epochs: int = 30
    batch_size: int = 32
    lr: float | None = None
    backbone_lr_scale: float = 1.0
    freeze_epochs: int = 0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    num_workers: int | None = None
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    augment: bool = True
    augment_options: dict[str, Any] = field(default_factory=dict)
    normalization: str | None = None
    intensity: str = "none"
    balance: str = "loss"
    val_metric: str = "auc"
    both_label_weight: float = 1.0
    patience: int = 10
    threshold_method: str = "youden"
    threshold_rows: str = "both_labels"
    calibrate: bool = True
    weights_dtype: str = "float32"
    target_sensitivity: float | None = None
    group_col: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    drop_rate: float = 0.0
    segmenter: str | None = None
    mask_dir: str | None = None
    bf16_inference: bool = True
    progress: bool = True
    eval_test: bool = True
    n_boot: int = 1000
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        spec = get_arch_spec(self.arch)  # ConfigError listing the valid names
        if self.normalization is None:
            self.normalization = spec.pretrained_cfg.normalization
        if self.num_workers is None:
            self.num_workers = default_num_workers()
        if self.channels_last is None:
            self.channels_last = prefer_channels_last("cuda" if uses_cuda(self.accelerator) else "cpu")
        checks = {
            "seg_mode": (self.seg_mode, SEG_MODES),
            "balance": (self.balance, BALANCE_MODES),
            "val_metric": (self.val_metric, tuple(VAL_METRICS)),
            "normalization": (self.normalization, tuple(NORMALIZATIONS)),
            "threshold_method": (self.threshold_method, THRESHOLD_METHODS),
            "threshold_rows": (self.threshold_rows, THRESHOLD_ROWS),
            "intensity": (self.intensity, INTENSITY_MODES),
            "weights_dtype": (self.weights_dtype, ("float32", "float16")),
            "precision": (str(self.precision), PRECISIONS),
        }
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ConfigError(f"{name} must be one of {list(valid)}, got {value!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < float(self.backbone_lr_scale) <= 1.0:
            raise ConfigError(f"backbone_lr_scale must be in (0, 1], got {self.backbone_lr_scale}")
        if int(self.freeze_epochs) < 0:
            raise ConfigError(f"freeze_epochs must be >= 0, got {self.freeze_epochs}")
        if not float(self.both_label_weight) > 0:
            raise ConfigError(f"both_label_weight must be > 0, got {self.both_label_weight}")
        if self.threshold_method == "sensitivity" and self.target_sensitivity is None:
            self.target_sensitivity = 0.9
        if self.threshold_method == "youden":
            self.target_sensitivity = None
        self.pretrained = str(self.pretrained)
        self.augment_config()  # validate the overrides now

    @property
    def peak_lr(self) -> float:
        """Learning rate actually used."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.pretrained == "none" else 3e-4

    def augment_config(self) -> AugmentConfig:
        """The :class:`AugmentConfig` for these settings."""
        return AugmentConfig.from_dict({"image_size": self.image_size, "enabled": self.augment, **self.augment_options})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Lightning module
# ---------------------------------------------------------------------------------------------------------


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    """LightningModule around :class:`covidcxr.models.CxrClassifier`.

    Args:
        arch: Registry architecture.
        pretrained: ``imagenet``, ``none`` or a weights path (ignored when resuming from a checkpoint).
        mean: Normalisation mean.
        std: Normalisation std.
        drop_rate: Dropout before the head.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: Warm-up epochs.
        class_weights: Cross-entropy class weights or None.
        channels_last: Use channels-last memory format (faster convolutions on CPU and GPU).
        backbone_lr_scale: Backbone learning rate as a fraction of ``lr``.
        freeze_epochs: Leading epochs in which only the head trains.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        pretrained: str = "none",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        drop_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        class_weights: Sequence[float] | None = None,
        channels_last: bool = False,
        backbone_lr_scale: float = 1.0,
        freeze_epochs: int = 0,
    ) -> None:
        super().__init__()
        # Plain lists/numbers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"arch": arch, "pretrained": str(pretrained), "mean": list(mean), "std": list(std),
             "drop_rate": drop_rate, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
             "class_weights": list(class_weights) if class_weights is not None else None,
             "channels_last": channels_last, "backbone_lr_scale": backbone_lr_scale, "freeze_epochs": freeze_epochs}
        )
        self.model = create_classifier(arch, pretrained, mean=mean, std=std, drop_rate=drop_rate)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        weights = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self._val_prob: list[torch.Tensor] = []
        self._val_y: list[torch.Tensor] = []
        self._val_both: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a ``(N, 1, H, W)`` batch."""
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        """Frozen-backbone warm-up: only the head learns in the first ``freeze_epochs`` epochs."""
        frozen = self.current_epoch < int(self.hparams.get("freeze_epochs", 0))
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Class- and row-weighted cross-entropy on one batch."""
        x, y, w = batch[0], batch[1], batch[2]
        logits = self.model(x)
        per_row = F.cross_entropy(logits.float(), y, weight=self.class_weights, reduction="none")
        # Normalise by the summed weights, as cross_entropy's weighted mean does, so the lr means the same.
        cw = self.class_weights[y] if self.class_weights is not None else torch.ones_like(w)
        loss = (per_row * w).sum() / (cw * w).sum().clamp_min(1e-12)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Collect probabilities for the epoch's ROC AUCs; log the unweighted loss."""
        x, y, both = batch[0], batch[1], batch[3]
        logits = self.model(x).float()
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        self._val_prob.append(torch.softmax(logits, dim=1)[:, 1].detach())
        self._val_y.append(y.detach())
        self._val_both.append(both.detach())

    def on_validation_epoch_end(self) -> None:
        """ROC AUC over the whole validation set and over its two-label-source rows (gathered across DDP ranks)."""
        if not self._val_prob:
            return
        prob, y, both = torch.cat(self._val_prob), torch.cat(self._val_y), torch.cat(self._val_both)
        self._val_prob.clear()
        self._val_y.clear()
        self._val_both.clear()
        if self.trainer.world_size > 1:
            prob, y = self.all_gather(prob).reshape(-1), self.all_gather(y).reshape(-1)
            both = self.all_gather(both).reshape(-1)
        prob_np, y_np, both_np = prob.cpu().numpy(), y.cpu().numpy(), both.cpu().numpy() > 0.5
        auc = safe_auc(y_np, prob_np)
        auc_both = safe_auc(y_np[both_np], prob_np[both_np]) if both_np.any() else float("nan")
        # A single-class validation batch (sanity check, tiny sets) has no AUC; 0.5 keeps callbacks finite.
        # Same value on every rank (computed from gathered predictions); syncing it is a no-op average.
        self.log("val_auc", 0.5 if math.isnan(auc) else auc, prog_bar=True, sync_dist=True)
        self.log("val_auc_both", 0.5 if math.isnan(auc_both) else auc_both, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """AdamW (no decay on norms/biases; backbone at ``backbone_lr_scale`` x lr) with warm-up then cosine."""
        lr = self.hparams.lr
        scale = float(self.hparams.get("backbone_lr_scale", 1.0))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            # Frozen warm-up toggles requires_grad later, so every parameter goes to the optimiser now.
            groups.setdefault((name.startswith("backbone."), p.ndim <= 1), []).append(p)
        param_groups = [
            {"params": params, "lr": lr * (scale if in_backbone else 1.0),
             "weight_decay": 0.0 if no_decay else self.hparams.weight_decay}
            for (in_backbone, no_decay), params in sorted(groups.items())
        ]
        opt = torch.optim.AdamW(param_groups, lr=lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = round(self.hparams.warmup_epochs * per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochTimer(L.Callback):
    """Training throughput per epoch: images and seconds from the first to the last training batch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []
        self._t0 = 0.0
        self._n = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock (after pending GPU work)."""
        self._sync(pl_module)
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the batch's images; at the epoch's last batch record ``(images, seconds)``."""
        self._n += len(batch[1])
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(pl_module)
            self.epochs.append((self._n * trainer.world_size, time.perf_counter() - self._t0))

    def summary(self) -> dict[str, Any]:
        """Images/s over all epochs but the first (warm-up), or all when only one ran."""
        steady = self.epochs[1:] or self.epochs
        n, t = sum(e[0] for e in steady), sum(e[1] for e in steady)
        return {"epochs_timed": len(steady), "train_images_per_s": n / t if t > 0 else None,
                "train_seconds": sum(e[1] for e in self.epochs)}


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


class CachedImageDataset(Dataset):
    """Images from the uint8 cache through a transform, with integer labels.

    Args:
        cache: uint8 tensor ``(N, 1, S, S)``; shared with forked DataLoader workers without copying.
        labels: int64 labels ``(N,)``.
        transform: Maps ``uint8 (1, S, S)`` to ``float32 (1, s, s)``.
        weights: Per-row loss weights (default 1).
        both: Per-row flag, 1 where the row's source holds both labels (default 1).
    """

    def __init__(self, cache: torch.Tensor, labels: np.ndarray, transform: Any, weights: np.ndarray | None = None,
                 both: np.ndarray | None = None) -> None:
        self.cache = cache
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        n = len(self.labels)
        self.weights = torch.as_tensor(weights if weights is not None else np.ones(n), dtype=torch.float32)
        self.both = torch.as_tensor(both if both is not None else np.ones(n), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image, label, loss weight, 1.0 if the row's source holds both labels)``."""
        return self.transform(self.cache[i]), self.labels[i], self.weights[i], self.both[i]


class _PrepareDataset(Dataset):
    """Decode one row and apply :func:`~covidcxr.transforms.preprocess.preprocess` (in DataLoader worker processes:
    decoding and the segmentation mode cost CPU)."""

    def __init__(self, images: list[str], masks: list[str], cfg: PreprocessCfg, uint8: bool) -> None:
        self.images, self.masks, self.cfg, self.uint8 = images, masks, cfg, uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, list[str]]:
        from covidcxr.io.image import load_image, read_mask

        image, _ = load_image(self.images[i])
        mask = read_mask(self.masks[i]) if self.masks[i] else None
        flags: list[str] = []
        x = preprocess(image, mask, self.cfg, flags=flags)
        return i, to_uint8(x) if self.uint8 else x, flags


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _has_path(value: Any) -> bool:
    return isinstance(value, str) and value.strip() not in ("", "nan", "None")


def build_image_cache(
    df: pd.DataFrame,
    seg_mode: str,
    cache_size: int,
    *,
    segmenter: Any = None,
    mask_cache: MaskCache | None = None,
    num_workers: int = 4,
    chunk: int = 64,
    progress: bool = True,
    intensity: str = "none",
    uint8: bool = True,
) -> tuple[torch.Tensor, list[list[str]]]:
    """Decode every row once through the model's preprocessing at side ``cache_size``, and keep the result.

    Training images are cached as uint8 a little larger than the input (random crops need room); validation and
    test images at the input size as float32, exactly the inference input (so validation predictions, the
    temperature and the threshold are those of inference).

    Lung masks come from the ``mask`` column when given, else from ``mask_cache``, else from ``segmenter``
    (batched, then stored in ``mask_cache`` so a resumed run or another variant does not segment again).
    Decoding and the segmentation mode run in ``num_workers`` processes.

    Args:
        df: Rows with ``image`` (and optional ``mask``) paths.
        seg_mode: ``none``, ``mask`` or ``crop``.
        cache_size: Side of the cached square.
        segmenter: Object with ``predict(images) -> [SegResult]`` for rows without a mask (seg modes only).
        mask_cache: Where predicted masks are stored (required when rows lack masks).
        num_workers: Worker processes (and decoding threads for segmentation).
        chunk: Rows segmented together.
        progress: Show progress bars.
        intensity: Intensity standardisation (see :func:`covidcxr.transforms.preprocess.standardise_intensity`).
        uint8: Store uint8 (augmentation cache) instead of float32 (evaluation inputs).

    Returns:
        ``(tensor (N, 1, S, S), qc_flags per row)``.

    Raises:
        ConfigError: A seg mode without masks and without a segmenter or mask cache.
    """
    from tqdm.auto import tqdm

    from covidcxr.classification.loop import decode_images

    rows_all = df.reset_index(drop=True)
    images = rows_all["image"].astype(str).tolist()
    given = rows_all["mask"].tolist() if "mask" in rows_all.columns else [""] * len(rows_all)
    mask_paths = [""] * len(rows_all)
    seg_qc: list[list[str]] = [[] for _ in images]
    if seg_mode not in SEG_MODES:
        raise ConfigError(f"unknown segmentation mode {seg_mode!r}; valid: {', '.join(SEG_MODES)}")
    if seg_mode != "none":
        todo = []
        for i, (img, m) in enumerate(zip(images, given)):
            if _has_path(m):
                mask_paths[i] = str(m)
            elif mask_cache is not None and (hit := mask_cache.cached_path(img)) is not None:
                mask_paths[i], seg_qc[i] = str(hit), mask_cache.flags(img)
            else:
                todo.append(i)
        if todo and (segmenter is None or mask_cache is None or mask_cache.dir is None):
            raise ConfigError(
                f"segmentation mode {seg_mode!r} needs lung masks for {len(todo)} image(s) "
                f"(e.g. {images[todo[0]]}): add a 'mask' column or give a segmenter and a mask cache folder"
            )
        for start in tqdm(range(0, len(todo), chunk), desc="segment lungs", unit="chunk", disable=not progress):
            idx = todo[start : start + chunk]
            decoded = decode_images([images[i] for i in idx], num_workers)
            results = segmenter.predict(decoded)
            mask_cache.put_many([(images[i], np.asarray(r.mask), list(r.qc_flags)) for i, r in zip(idx, results)])
            for i, r in zip(idx, results):
                mask_paths[i], seg_qc[i] = str(mask_cache.cached_path(images[i])), list(r.qc_flags)

    cfg = PreprocessCfg(int(cache_size), seg_mode, intensity)
    cache = torch.empty((len(rows_all), 1, cache_size, cache_size), dtype=torch.uint8 if uint8 else torch.float32)
    qc_all: list[list[str]] = [list(f) for f in seg_qc]
    loader = DataLoader(
        _PrepareDataset(images, mask_paths, cfg, uint8),
        batch_size=16,
        num_workers=max(0, num_workers),
        collate_fn=_as_list,
    )
    with tqdm(total=len(images), desc="cache images", unit="img", disable=not progress) as bar:
        for batch in loader:
            for i, tensor, flags in batch:
                cache[i] = tensor
                qc_all[i] += [f for f in flags if f not in qc_all[i]]
            bar.update(len(batch))
    return cache, qc_all


def _label_array(df: pd.DataFrame) -> np.ndarray:
    labels = df["label"].astype(str).str.strip()
    bad = sorted(set(labels) - set(LABELS))
    if bad:
        raise ConfigError(f"unknown label(s) {bad}; valid: {list(LABELS)}")
    return (labels == LABELS[1]).to_numpy().astype(np.int64)


def prepare_split(df: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """Use the manifest's ``split`` column, or make a patient-level split (``data.patient_split``).

    Args:
        df: Manifest table.
        cfg: Settings (fractions, group column, seed).

    Returns:
        Copy of ``df`` with ``split`` in {train, val, test}.

    Raises:
        ConfigError: Unknown split values, an empty train/val split, or a validation split with one class.
    """
    from covidcxr.data.split import patient_split

    has_split = "split" in df.columns and (df["split"].astype(str).str.strip().isin(["train", "val", "test"])).all()
    if has_split:
        out = df.copy()
        out["split"] = out["split"].astype(str).str.strip()
    else:
        if "split" in df.columns and (df["split"].astype(str).str.strip() != "").any():
            bad = sorted(set(df["split"].astype(str).str.strip()) - {"train", "val", "test"})
            raise ConfigError(f"manifest column 'split' has values {bad}; valid: train, val, test (or leave empty)")
        out = patient_split(df.drop(columns=["split"], errors="ignore"), cfg.val_fraction, cfg.test_fraction,
                            group_col=cfg.group_col, seed=cfg.seed)
    y = _label_array(out)
    for name in ("train", "val"):
        sel = (out["split"] == name).to_numpy()
        if not sel.any():
            raise ConfigError(f"split {name!r} is empty; a classifier needs train and val rows")
        if np.unique(y[sel]).size < 2:
            raise ConfigError(f"split {name!r} holds only one class; threshold and AUC need both labels")
    return out


def _data_summary(df: pd.DataFrame) -> dict[str, Any]:
    counts: dict[str, Any] = {"n_images": len(df), "n_patients": int(df["patient_id"].nunique())}
    counts["per_split_label"] = {
        s: {k: int(v) for k, v in g["label"].value_counts().sort_index().items()} for s, g in df.groupby("split")
    }
    if "source" in df.columns:
        counts["per_split_source_label"] = {
            s: {src: {k: int(v) for k, v in gg["label"].value_counts().sort_index().items()}
                for src, gg in g.groupby("source")}
            for s, g in df.groupby("split")
        }
    counts["patients_per_split"] = {s: int(g["patient_id"].nunique()) for s, g in df.groupby("split")}
    return counts


def _is_global_zero() -> bool:
    # Before the Trainer exists, the launcher's environment tells the rank (Lightning/torchrun/SLURM set these).
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    if not _is_global_zero():
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"{out / 'checkpoints' / 'last.ckpt'}: nothing to resume from")
        return
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: output folder exists and is not empty (use --resume to continue or --force)")
        # Only our own files: --out might be a folder holding other things (the mask cache stays valid).
        for name in ("checkpoints", "logs", "test_eval"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("config.json", "model.safetensors", "val_predictions.csv", "test_predictions.csv",
                     "split.csv", "train_summary.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "segmenter", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, *, shuffle: bool = False, sampler: Any = None,
            drop_last: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def train_classifier(
    manifest: str | Path | pd.DataFrame,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    **settings: Any,
) -> Path:
    """Train a COVID classifier and write its artifact into ``out``.

    Args:
        manifest: Manifest CSV path or a table from ``data.read_manifest`` (``split`` column used if complete).
        out: Run folder; becomes the artifact (plus ``checkpoints/``, ``logs/``, ``masks/``, ``test_eval/``).
        config: Settings; keyword ``settings`` override its fields (or build one when None).
        resume: Continue from ``out/checkpoints/last.ckpt``.
        force: Reuse a non-empty ``out`` (its previous run files are removed).
        **settings: :class:`TrainConfig` fields.

    Returns:
        ``out`` (the artifact directory).

    Raises:
        ConfigError: Bad settings, an occupied ``out``, unusable splits.
        ManifestError: Invalid manifest.
        PretrainedWeightsError: Pretrained weights unavailable.
    """
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from covidcxr.data.manifest import read_manifest

    cfg = dataclasses.replace(config, **settings) if config is not None else TrainConfig(**settings)
    out = Path(out)
    _prepare_out(out, resume, force)
    t_start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else manifest
    df = prepare_split(df, cfg).reset_index(drop=True)
    y_all = _label_array(df)
    if _is_global_zero():
        cols = [c for c in ("image", "patient_id", "label", "source", "view", "split") if c in df.columns]
        df[cols].to_csv(out / "split.csv", index=False)

    aug = cfg.augment_config()
    cache_size = aug.cache_size
    segmenter, mask_cache, seg_weights = None, None, None
    if cfg.seg_mode != "none":
        from covidcxr.classification.artifact import segmenter_files
        from covidcxr.segmentation.segmenter import LungSegmenter

        seg_weights = segmenter_files(cfg.segmenter)[0]
        seg_device = "cuda" if uses_cuda(cfg.accelerator) else "cpu"
        segmenter = LungSegmenter.load(seg_weights, device=seg_device, batch_size=32,
                                       precision="auto" if cfg.bf16_inference else "fp32")
        mask_cache = MaskCache(cfg.mask_dir or out / "masks", file_sha256(seg_weights))
    idx = {s: np.flatnonzero((df["split"] == s).to_numpy()) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    cache_args = dict(segmenter=segmenter, mask_cache=mask_cache, num_workers=cfg.num_workers, progress=cfg.progress,
                      intensity=cfg.intensity)
    # Training images: uint8, larger than the input, for random crops. Validation and test: the inference input.
    train_cache, train_qc = build_image_cache(df.iloc[idx["train"]], cfg.seg_mode, cache_size, **cache_args)
    eval_idx = np.concatenate([idx["val"], idx["test"]])
    eval_cache, eval_qc = build_image_cache(df.iloc[eval_idx], cfg.seg_mode, cfg.image_size, uint8=False,
                                            **cache_args)
    qc: list[list[str]] = [[] for _ in range(len(df))]
    for rows, flags in ((idx["train"], train_qc), (eval_idx, eval_qc)):
        for i, f in zip(rows, flags, strict=True):
            qc[i] = f
    eval_pos = {int(i): k for k, i in enumerate(eval_idx)}
    cache_seconds = time.perf_counter() - t0
    log.info("cached %d images (train at %dpx, evaluation at %dpx) in %.1fs", len(df), cache_size, cfg.image_size,
             cache_seconds)

    both_all, _ = both_label_mask(df)
    if both_all is None:  # no source column: every row counts as one where the source cannot give the label away
        both_all = np.ones(len(df), dtype=bool)
    row_weight = np.where(both_all, float(cfg.both_label_weight), 1.0)
    train_ds = CachedImageDataset(train_cache, y_all[idx["train"]], build_train_transform(aug),
                                  row_weight[idx["train"]], both_all[idx["train"]])
    val_ds = CachedImageDataset(eval_cache[: len(idx["val"])], y_all[idx["val"]], _as_float, None,
                                both_all[idx["val"]])
    y_train = y_all[idx["train"]]
    counts = np.bincount(y_train, minlength=2).astype(float)
    class_weights = (len(y_train) / (2 * counts)).tolist() if cfg.balance == "loss" else None
    sampler = None
    if cfg.balance == "sampler":
        w = (1.0 / counts)[y_train]
        sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples=len(y_train),
                                        replacement=True, generator=torch.Generator().manual_seed(cfg.seed))
    batch_size = min(cfg.batch_size, len(train_ds))
    train_dl = _loader(train_ds, batch_size, cfg.num_workers, shuffle=True, sampler=sampler,
                       drop_last=len(train_ds) > batch_size, seed=cfg.seed)
    val_dl = _loader(val_ds, max(batch_size, 2 * cfg.batch_size), cfg.num_workers, seed=cfg.seed)

    mean, std = NORMALIZATIONS[cfg.normalization]
    use_cuda = uses_cuda(cfg.accelerator)
    module = ClassifierModule(
        cfg.arch, "none" if resume else cfg.pretrained, mean, std, cfg.drop_rate, cfg.peak_lr, cfg.weight_decay,
        cfg.warmup_epochs, class_weights, channels_last=cfg.channels_last,
        backbone_lr_scale=cfg.backbone_lr_scale, freeze_epochs=cfg.freeze_epochs,
    )
    monitor, mode = VAL_METRICS[cfg.val_metric]
    # Best: weights only (a third of a full checkpoint, written often early on); last: full state for --resume.
    ckpt_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                              save_top_k=1, save_weights_only=True, auto_insert_metric_name=False)
    last_cb = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True)
    timer = EpochTimer()
    callbacks: list[L.Callback] = [ckpt_cb, last_cb, timer, LearningRateMonitor(logging_interval="epoch")]
    if cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience))
    precision = resolve_precision(str(cfg.precision), cfg.accelerator)
    log.info("training precision %s (asked: %s), channels_last=%s, %d DataLoader workers", precision, cfg.precision,
             cfg.channels_last, cfg.num_workers)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs", version=0),
        default_root_dir=out,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, len(train_dl))),
        benchmark=use_cuda,
    )
    history = out / "logs" / "version_0" / "metrics.csv"
    backup = history.with_name("metrics.before_resume.csv")
    if resume and history.is_file() and _is_global_zero():
        shutil.copy2(history, backup)  # Lightning's CSV logger deletes metrics.csv when it starts
    t0 = time.perf_counter()
    trainer.fit(module, train_dl, val_dl, ckpt_path=out / "checkpoints" / "last.ckpt" if resume else None)
    fit_seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return out
    if backup.is_file():
        parts = [pd.read_csv(backup)] + ([pd.read_csv(history)] if history.is_file() else [])
        pd.concat(parts, ignore_index=True).to_csv(history, index=False)
        backup.unlink()

    best_path = ckpt_cb.best_model_path or str(out / "checkpoints" / "last.ckpt")
    if Path(best_path).is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    model = module.model.to(memory_format=torch.contiguous_format).cpu().eval()
    if cfg.weights_dtype == "float16":
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.half().float())
    device = resolve_device("cuda" if use_cuda else "cpu")
    model.to(device)

    config: dict[str, Any] = {
        "arch": cfg.arch,
        "input_size": cfg.image_size,
        "normalization": {"name": cfg.normalization, "mean": list(mean), "std": list(std)},
        "seg_mode": cfg.seg_mode,
        "intensity": cfg.intensity,
        "pretrained": cfg.pretrained if cfg.pretrained in ("imagenet", "none") else "path",
        "temperature": 1.0,
        "threshold": 0.5,
        "threshold_method": cfg.threshold_method,
        "target_sensitivity": cfg.target_sensitivity,
        "class_names": list(LABELS),
        "bf16_inference": cfg.bf16_inference,
        "weights_sha256": "",
    }
    art = ModelArtifact(out, config, model, device)

    def predict_split(name: str) -> pd.DataFrame:
        rows = df.iloc[idx[name]].copy()
        x = torch.stack([eval_cache[eval_pos[int(i)]].float() for i in idx[name]]) if len(rows) \
            else torch.zeros((0, 1, cfg.image_size, cfg.image_size))
        margin, _ = art.forward_margins(x, batch_size=2 * cfg.batch_size)
        rows["y"] = y_all[idx[name]]
        rows["margin"] = margin
        rows["prob_uncalibrated"] = apply_temperature(margin, 1.0)
        rows["prob"] = apply_temperature(margin, float(config["temperature"]))
        rows["qc_flags"] = [";".join(qc[i]) for i in idx[name]]
        rows["source_has_both_labels"] = both_all[idx[name]]
        return rows

    from covidcxr.evaluation.metrics import choose_threshold, expected_calibration_error

    val_pred = predict_split("val")
    y_val = val_pred["y"].to_numpy()
    calibration: dict[str, Any] = {"temperature": 1.0, "val_nll_before": None, "val_nll_after": None}
    if cfg.calibrate and np.unique(y_val).size == 2:
        temperature = fit_temperature(val_pred["margin"].to_numpy(), y_val)
        config["temperature"] = temperature
        val_pred["prob"] = apply_temperature(val_pred["margin"].to_numpy(), temperature)
        calibration = {"temperature": temperature,
                       "val_nll_before": nll(val_pred["margin"].to_numpy(), y_val, 1.0),
                       "val_nll_after": nll(val_pred["margin"].to_numpy(), y_val, temperature)}
    if np.unique(y_val).size == 2:
        calibration["val_ece_before"] = expected_calibration_error(y_val, val_pred["prob_uncalibrated"].to_numpy())
        calibration["val_ece_after"] = expected_calibration_error(y_val, val_pred["prob"].to_numpy())
    threshold, threshold_on = _choose_val_threshold(val_pred, cfg, choose_threshold)
    val_auc = safe_auc(y_val, val_pred["prob"].to_numpy())
    both_val = val_pred["source_has_both_labels"].to_numpy(dtype=bool)
    val_auc_both = safe_auc(y_val[both_val], val_pred["prob"].to_numpy()[both_val]) if both_val.any() else float("nan")
    log.info("validation ROC AUC %.4f (two-label sources %.4f); temperature %.3f; threshold %.4f (%s on %s rows)",
             val_auc, val_auc_both, config["temperature"], threshold, cfg.threshold_method, threshold_on)
    val_pred["pred_label"] = np.where(val_pred["prob"] >= threshold, LABELS[1], LABELS[0])

    timing = timer.summary()
    summary: dict[str, Any] = {
        "data": _data_summary(df),
        "manifest": df.attrs.get("manifest"),
        "settings": cfg.to_dict(),
        "precision": precision,
        "best_checkpoint": Path(best_path).name,
        "best_epoch": _best_epoch(history, monitor, mode),
        "epochs_run": int(trainer.current_epoch),
        "history": str(history.relative_to(out)),
        "val_auc": val_auc,
        "val_auc_both": val_auc_both,
        "threshold_rows": threshold_on,
        "calibration": calibration,
        "cache_seconds": cache_seconds,
        "fit_seconds": fit_seconds,
        **timing,
        "device": _device_name(device),
        "qc_flag_counts": _qc_counts(qc),
    }
    config.update(threshold=threshold, threshold_rows=threshold_on, val_auc=val_auc, val_auc_both=val_auc_both,
                  training=summary, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    keep = [c for c in ("image", "patient_id", "label", "source", "view", "source_has_both_labels", "y", "margin",
                        "prob_uncalibrated", "prob", "pred_label") if c in val_pred]
    save_artifact(out, model, config, segmenter_weights=seg_weights, val_predictions=val_pred[keep],
                  weights_dtype=cfg.weights_dtype)

    if cfg.eval_test and len(idx["test"]):
        test_pred = predict_split("test")
        summary["test_ece_before"] = expected_calibration_error(test_pred["y"], test_pred["prob_uncalibrated"]) \
            if np.unique(test_pred["y"]).size == 2 else None
        summary["test_ece_after"] = expected_calibration_error(test_pred["y"], test_pred["prob"]) \
            if np.unique(test_pred["y"]).size == 2 else None
        test_pred["pred_label"] = np.where(test_pred["prob"] >= threshold, LABELS[1], LABELS[0])
        test_pred.to_csv(out / "test_predictions.csv", index=False)
        if np.unique(test_pred["y"]).size == 2:
            result = _evaluate_test(test_pred, threshold, out / "test_eval", cfg)
            summary["test_metrics"] = str(Path("test_eval") / "metrics.json")
            summary["test_roc_auc"] = result["overall"]["roc_auc"]["value"]
    summary["total_seconds"] = time.perf_counter() - t_start
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


def _choose_val_threshold(val_pred: pd.DataFrame, cfg: TrainConfig, choose: Any) -> tuple[float, str]:
    """Threshold on validation: on two-label-source rows (hard negatives) when each class has enough, else all.

    Validation negatives from single-label archives (clean JSRT/RSNA films) are easy; a threshold chosen on them
    buys sensitivity with specificity that does not hold on the harder negatives of a mixed hospital archive.
    """
    y, p = val_pred["y"].to_numpy(), val_pred["prob"].to_numpy()
    both = val_pred["source_has_both_labels"].to_numpy(dtype=bool)
    counts = np.bincount(y[both], minlength=2) if both.any() else np.zeros(2, dtype=int)
    if cfg.threshold_rows == "both_labels" and not both.all():
        if counts.min() >= MIN_THRESHOLD_ROWS_PER_CLASS:
            return choose(y[both], p[both], cfg.threshold_method, cfg.target_sensitivity), "both_labels"
        log.warning("only %d/%d validation rows of each class on two-label sources (< %d): threshold chosen on all "
                    "validation rows", counts[0], counts[1], MIN_THRESHOLD_ROWS_PER_CLASS)
    return choose(y, p, cfg.threshold_method, cfg.target_sensitivity), "all"


def _evaluate_test(pred: pd.DataFrame, threshold: float, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Test metrics at the validation threshold; plots and reports need matplotlib, metrics.json does not."""
    from covidcxr.evaluation.metrics import evaluate_predictions

    title = f"{cfg.arch} seg={cfg.seg_mode} test split"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib not installed: writing %s without plots or reports", out_dir / "metrics.json")
        result = evaluate_predictions(pred, threshold, None, n_boot=cfg.n_boot, seed=cfg.seed, title=title)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        return result
    return evaluate_predictions(pred, threshold, out_dir, n_boot=cfg.n_boot, seed=cfg.seed, title=title)




def _best_epoch(history: Path, monitor: str, mode: str) -> int | None:
    try:
        h = pd.read_csv(history)
    except (OSError, pd.errors.EmptyDataError):
        return None
    if monitor not in h.columns or h[monitor].notna().sum() == 0:
        return None
    col = h.dropna(subset=[monitor])
    row = col[monitor].idxmax() if mode == "max" else col[monitor].idxmin()
    return int(col.loc[row, "epoch"])


def _qc_counts(qc: Sequence[Sequence[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for flags in qc:
        for f in flags:
            counts[f] = counts.get(f, 0) + 1
    return counts


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def load_history(out: str | Path) -> pd.DataFrame:
    """Training history (one row per logged step/epoch) from the run's CSV log.

    Args:
        out: The training run folder.

    Returns:
        The metrics table.
    """
    return pd.read_csv(Path(out) / "logs" / "version_0" / "metrics.csv")


def settings_from(args: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only :class:`TrainConfig` fields of a mapping (e.g. parsed CLI arguments)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in args.items() if k in names}
