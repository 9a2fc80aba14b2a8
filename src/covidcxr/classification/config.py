"""Classifier training settings: :class:`TrainConfig` (validated, JSON round trip) and the CLI's mapping onto it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from covidcxr.device import LIGHTNING_PRECISIONS, default_num_workers, prefer_channels_last, uses_cuda
from covidcxr.errors import ConfigError
from covidcxr.models.registry import NORMALIZATIONS, get_arch_spec
from covidcxr.transforms.augment import AugmentConfig
from covidcxr.vocab import INTENSITY_MODES, SEG_MODES

BALANCE_MODES = ("loss", "sampler", "none")


VAL_METRICS = {"auc": ("val_auc", "max"), "loss": ("val_loss", "min"), "auc_both": ("val_auc_both", "max")}


PRECISIONS = LIGHTNING_PRECISIONS


THRESHOLD_METHODS = ("youden", "sensitivity")


THRESHOLD_ROWS = ("both_labels", "all")


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


def settings_from(args: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only :class:`TrainConfig` fields of a mapping (e.g. parsed CLI arguments)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in args.items() if k in names}
