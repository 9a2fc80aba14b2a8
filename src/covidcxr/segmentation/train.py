"""Train the lung U-Net on image + mask pairs with Lightning; export the best weights as safetensors + JSON.

The lung-segmentation data is small (hundreds of pairs), so every image and mask is resized to the model input
size once and cached in RAM as tensors when the data module is set up; workers then only augment. The split is
made by patient (and image: one image may carry masks from two annotators), stratified by dataset, seeded, and
written to ``split.csv`` so the benchmark evaluates exactly the held-out images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from covidcxr.device import default_num_workers, resolve_precision
from covidcxr.errors import ConfigError, ManifestError
from covidcxr.models.unet import build_unet, unet_config
from covidcxr.segmentation.evaluate import source_key
from covidcxr.segmentation.weights import WEIGHTS_NAME
from covidcxr.transforms.joint import build_seg_train_transform, normalise
from covidcxr.transforms.resize import resize_image, resize_mask

log = logging.getLogger(__name__)

SPLIT_NAME = "split.csv"
CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------------------------- data
def read_seg_manifest(path: str | os.PathLike[str], *, require_mask: bool = True) -> pd.DataFrame:
    """Read a lung-mask manifest (``image``, ``mask``, ``patient_id``; optional ``mask_source``, ``source``).

    Args:
        path: Manifest CSV; paths relative to its folder.
        require_mask: Every row must have a mask; False drops rows without one (with a warning).

    Returns:
        The table with absolute ``image``/``mask`` paths, plus ``rel_image``/``rel_mask`` as written in the CSV.

    Raises:
        ManifestError: Missing columns, empty values or missing files (all listed).
    """
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(path, validate=False)  # the classifier checks (labels) do not apply to mask pairs
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    problems = [f"missing column '{c}'" for c in ("image", "mask", "patient_id") if c not in df.columns]
    if problems:
        raise ManifestError(path, problems)
    no_mask = (df["mask"].astype(str).str.strip() == "").to_numpy()
    if not require_mask and no_mask.any():
        log.warning("%s: %d row(s) without a mask skipped", path, int(no_mask.sum()))
        df, raw = df[~no_mask], raw[~no_mask]
    for col in ("image", "mask", "patient_id"):
        empty = np.flatnonzero(df[col].astype(str).str.strip() == "")
        if len(empty):
            problems.append(f"empty '{col}' in row(s) {', '.join(str(df.index[i] + 2) for i in empty[:10])}")
    missing = [p for col in ("image", "mask") for p in df[col] if p and not os.path.isfile(p)]
    if missing:
        problems.append(f"{len(missing)} file(s) not found, e.g. {', '.join(missing[:3])}")
    if problems:
        raise ManifestError(path, problems)
    df = df.copy()
    df["rel_image"] = raw["image"].str.strip().to_numpy()
    df["rel_mask"] = raw["mask"].str.strip().to_numpy()
    if "mask_source" not in df.columns:
        df["mask_source"] = df["source"] if "source" in df.columns else "all"
    return df


def split_pairs(df: pd.DataFrame, *, val: float = 0.15, test: float = 0.15, seed: int = 0) -> pd.DataFrame:
    """Patient-level train/val/test split of mask pairs, stratified by dataset.

    Rows sharing a patient or an image are linked (:func:`covidcxr.data.patient_groups`); each linked group is
    assigned a dataset (the ``source`` text before ' + ', else ``mask_source``) and each dataset is split on its
    own with :func:`covidcxr.data.patient_split`, so every dataset has its share in the test set.

    Args:
        df: Table from :func:`read_seg_manifest`.
        val: Fraction of patients for validation.
        test: Fraction of patients for testing.
        seed: Split seed.

    Returns:
        Copy of ``df`` with ``split`` in {train, val, test}.

    Raises:
        SplitError: Bad fractions or too few patients in a dataset.
    """
    from covidcxr.data.split import patient_groups, patient_split

    component = patient_groups(df, "image")
    dataset_col = df["source"] if "source" in df.columns else df["mask_source"]
    dataset = dataset_col.astype(str).str.split(" + ", regex=False).str[0].to_numpy()
    first = pd.Series(dataset).groupby(component).transform("first").to_numpy()
    parts = []
    for name in sorted(set(first)):
        sub = df[first == name].assign(label="non_covid")  # patient_split stratifies by label: one stratum here
        parts.append(patient_split(sub, val=val, test=test, group_col="image", seed=seed).drop(columns="label"))
    out = pd.concat(parts).loc[df.index]
    out.attrs = dict(df.attrs)
    return out


def select_pairs(df: pd.DataFrame, pairs: Sequence[Sequence[str]], *, what: str = "split") -> pd.DataFrame:
    """Rows of ``df`` whose (image, mask) paths, as written in the manifest, are in ``pairs``.

    Args:
        df: Table from :func:`read_seg_manifest`.
        pairs: ``(image, mask)`` relative paths.
        what: Where the pairs come from (for the error message).

    Returns:
        The matching rows.

    Raises:
        ManifestError: Some pairs are not in the manifest (a different manifest than the one trained on).
    """
    wanted = {(str(a), str(b)) for a, b in pairs}
    keys = list(zip(df["rel_image"], df["rel_mask"]))
    missing = wanted - set(keys)
    if missing:
        example = ", ".join(f"{a} / {b}" for a, b in sorted(missing)[:3])
        raise ManifestError(
            df.attrs.get("manifest", "manifest"),
            [f"{len(missing)} of {len(wanted)} pairs of the {what} are not in this manifest, e.g. {example}"],
        )
    return df[[k in wanted for k in keys]]


def select_split(df: pd.DataFrame, split_csv: str | os.PathLike[str], split: str = "test") -> pd.DataFrame:
    """Rows of ``df`` that a training run's ``split.csv`` put in ``split``.

    Args:
        df: Table from :func:`read_seg_manifest`.
        split_csv: The ``split.csv`` written by :func:`train_segmenter`.
        split: ``train``, ``val`` or ``test``.

    Returns:
        The matching rows.

    Raises:
        ManifestError: The split file is unreadable or lists pairs missing from ``df``.
    """
    try:
        table = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(split_csv, [f"cannot read split file ({exc})"]) from exc
    if not {"image", "mask", "split"} <= set(table.columns):
        raise ManifestError(split_csv, ["split file needs image, mask and split columns"])
    part = table[table["split"] == split]
    if part.empty:
        raise ManifestError(split_csv, [f"no rows with split == {split!r}"])
    return select_pairs(df, part[["image", "mask"]].to_numpy().tolist(), what=f"{split} split of {split_csv}")


def _load_pair(image_path: str, mask_path: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from covidcxr.io.image import load_image

    image = load_image(image_path)[0]
    mask = load_image(mask_path)[0] >= 0.5
    return resize_image(image, size).to(torch.float16), resize_mask(mask, size)


def preload_pairs(df: pd.DataFrame, size: int, *, threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Load every image/mask pair once, resized to ``size`` (images fp16 in [0, 1], masks uint8).

    Args:
        df: Table with absolute ``image`` and ``mask`` paths.
        size: Square side in pixels.
        threads: Reader threads (PNG decoding releases the GIL).

    Returns:
        ``(images (N, 1, S, S) float16, masks (N, 1, S, S) uint8)``.
    """
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pairs = list(pool.map(lambda ab: _load_pair(ab[0], ab[1], size), zip(df["image"], df["mask"])))
    if not pairs:
        return torch.zeros((0, 1, size, size), dtype=torch.float16), torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return torch.stack([p[0] for p in pairs])[:, None], torch.stack([p[1] for p in pairs])[:, None]


class CachedPairs(Dataset):
    """Cached image/mask tensors with an optional joint transform.

    Args:
        images: ``(N, 1, S, S)`` float16 images in [0, 1].
        masks: ``(N, 1, S, S)`` uint8 masks.
        sources: Per-row dataset index (for per-source validation Dice).
        transform: v2 transform on ``(tv_tensors.Image, tv_tensors.Mask)``; None = as cached.
    """

    def __init__(
        self, images: torch.Tensor, masks: torch.Tensor, sources: Sequence[int], transform: Any = None
    ) -> None:
        self.images, self.masks = images, masks
        self.sources = torch.as_tensor(list(sources), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image, mask = self.images[index].float(), self.masks[index]
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float(), self.sources[index]


class LungSegData(L.LightningDataModule):
    """Split table -> cached tensors -> loaders.

    Args:
        table: Output of :func:`split_pairs`.
        size: Model input size.
        batch_size: Training batch size.
        num_workers: Loader worker processes.
        augment: Keyword arguments of :func:`covidcxr.transforms.build_seg_train_transform`.
    """

    def __init__(
        self, table: pd.DataFrame, size: int, *, batch_size: int = 32, num_workers: int = 2, augment: dict | None = None
    ) -> None:
        super().__init__()
        self.table, self.size = table, int(size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.augment = dict(augment or {})
        self.source_names = sorted({source_key(s) for s in table["mask_source"]})
        self.train_set: CachedPairs | None = None
        self.val_set: CachedPairs | None = None

    def setup(self, stage: str | None = None) -> None:
        """Decode, resize and cache the train and val pairs once (later calls do nothing)."""
        if self.train_set is not None:
            return
        t0 = time.perf_counter()
        sets = {}
        for split in ("train", "val"):
            part = self.table[self.table["split"] == split]
            images, masks = preload_pairs(part, self.size, threads=max(2, min(16, os.cpu_count() or 2)))
            idx = [self.source_names.index(source_key(s)) for s in part["mask_source"]]
            transform = build_seg_train_transform(self.size, **self.augment) if split == "train" else None
            sets[split] = CachedPairs(images, masks, idx, transform)
        self.train_set, self.val_set = sets["train"], sets["val"]
        log.info(
            "cached %d train + %d val pairs at %d px in %.1f s",
            len(self.train_set), len(self.val_set), self.size, time.perf_counter() - t0,
        )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,  # BatchNorm cannot train on a batch of one
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches of ``(image, mask, source index)``."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``(image, mask, source index)`` in manifest order."""
        return self._loader(self.val_set, train=False)


# --------------------------------------------------------------------------------------------- model
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Batch soft Dice loss of sigmoid probabilities (computed in fp32)."""
    prob = torch.sigmoid(logits.float())
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image for binary ``(N, 1, H, W)`` tensors (1 when both are empty)."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter, total = (pred * target).sum(1), pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))


class LungSegModule(L.LightningModule):
    """U-Net + Dice/BCE loss + AdamW with warm-up + cosine schedule; logs ``val_dice`` (per image, thresholded).

    Args:
        config: U-Net config (see :func:`covidcxr.models.unet_config`).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        source_names: Names of the per-source validation Dice logs (``val_dice_<name>``).
    """

    def __init__(
        self,
        config: dict[str, Any],
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        source_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = unet_config(config)
        self.model = build_unet(self.config)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Lung logits of a ``(N, 1, H, W)`` batch in [0, 1] (normalised here)."""
        return self.model(normalise(x, self.config["normalisation"]))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice + BCE (both in fp32)."""
        return soft_dice_loss(logits, target) + self.bce(logits.float(), target)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Dice + BCE loss on one batch; logs ``train_loss``."""
        image, mask, _ = batch
        loss = self.loss(self(image), mask)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(image))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Logs ``val_loss``, ``val_dice`` and ``val_dice_<source>`` for one batch."""
        image, mask, source = batch
        logits = self(image)
        n = len(image)
        self.log("val_loss", self.loss(logits, mask), prog_bar=False, batch_size=n, sync_dist=True)
        dice = dice_per_image(torch.sigmoid(logits.float()) >= self.config["threshold"], mask)
        self.log("val_dice", dice.mean(), prog_bar=True, batch_size=n, sync_dist=True)
        for i, name in enumerate(self.hparams.source_names):
            sel = source == i
            if sel.any():
                self.log(f"val_dice_{name}", dice[sel].mean(), batch_size=int(sel.sum()), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with per-step linear warm-up then cosine decay."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, total // 20)

        # Linear warm-up then cosine decay. A plain function (not OneCycleLR) because LambdaLR does not save it
        # in checkpoints: a run resumed with more epochs follows the new length instead of failing.
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------------------------- training
class _EpochSummary(L.Callback):
    """One INFO line per epoch with the validation Dice per source (readable in logs without a progress bar)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val_dice", "train_loss_ep"))}
        if not trainer.is_global_zero or "val_dice" not in m:
            return
        per_source = ", ".join(f"{k.removeprefix('val_dice_')} {v:.4f}" for k, v in sorted(m.items())
                               if k.startswith("val_dice_"))
        log.info("epoch %d/%d: train loss %.4f, val Dice %.4f (%s), %.0f s", trainer.current_epoch + 1,
                 trainer.max_epochs, m.get("train_loss_epoch", float("nan")), m["val_dice"], per_source,
                 time.perf_counter() - self.t0)


def _write_split(table: pd.DataFrame, path: Path) -> None:
    cols = ["rel_image", "rel_mask", "patient_id", "mask_source", "split"]
    table[cols].rename(columns={"rel_image": "image", "rel_mask": "mask"}).to_csv(path, index=False)


def train_segmenter(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    config: dict[str, Any] | None = None,
    input_size: int | None = None,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_workers: int | None = None,
    precision: str = "auto",
    resume: bool = False,
    force: bool = False,
    install: bool = False,
    max_minutes: float | None = None,
    augment: dict[str, Any] | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> Path:
    """Train the lung U-Net and export the best checkpoint's weights.

    Writes into ``out``: ``split.csv``, ``checkpoints/`` (best by ``val_dice`` + ``last.ckpt``), ``logs/``
    (CSV logger), ``lung_unet.safetensors`` + ``lung_unet.json`` (config, split, validation Dice), and with
    ``evaluate`` ``test_dice.csv`` / ``test_dice.json`` (full inference pipeline at the masks' own resolution).

    Args:
        manifest: Lung-mask manifest (``image, mask, patient_id``; ``mask_source`` groups the metrics).
        out: Output folder.
        epochs: Training epochs.
        batch_size: Batch size per device.
        lr: Peak learning rate (after a linear warm-up, cosine decay to 2 % of it).
        weight_decay: AdamW weight decay.
        config: U-Net config overrides (architecture, normalisation, threshold).
        input_size: Model input side (overrides ``config``).
        val: Validation fraction of patients.
        test: Test fraction of patients.
        seed: Seed of the split, the initial weights and the augmentation.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Devices to use (Lightning semantics).
        num_workers: Data loader workers (None: one per CPU beyond the main process).
        precision: ``'auto'`` (bf16 autocast) or a Lightning precision string.
        resume: Continue from ``out/checkpoints/last.ckpt`` (fresh start with a warning when it is missing).
        force: Start over although ``out`` holds checkpoints of an earlier run.
        install: Copy the exported weights into the package (``covidcxr/weights/``).
        max_minutes: Stop training after this wall time (the best checkpoint so far is exported).
        augment: Overrides of :func:`covidcxr.transforms.build_seg_train_transform` keywords.
        evaluate: Evaluate the exported weights on the test split.
        progress: Show the progress bar.

    Returns:
        Path of the exported ``lung_unet.safetensors``.

    Raises:
        ManifestError: Bad manifest.
        SplitError: The split cannot be made.
        ConfigError: Bad settings, or checkpoints exist without ``resume``/``force``.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    if epochs < 1 or batch_size < 2:
        raise ConfigError(f"epochs={epochs}, batch_size={batch_size}: need epochs >= 1 and batch_size >= 2")
    cfg = unet_config(config, **({"input_size": input_size} if input_size else {}))
    out = Path(out)
    ckpt_dir = out / CHECKPOINT_DIR
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if resume:
        if last.is_file():
            ckpt_path = str(last)
        else:
            log.warning("%s: no last.ckpt to resume from; starting a fresh run", ckpt_dir)
    elif ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")) and not force:
        raise ConfigError(f"{ckpt_dir}: holds checkpoints of an earlier run; pass --resume to continue or --force")
    out.mkdir(parents=True, exist_ok=True)

    table = split_pairs(read_seg_manifest(manifest), val=val, test=test, seed=seed)
    _write_split(table, out / SPLIT_NAME)
    counts = table.groupby(["split", "mask_source"]).size().unstack(fill_value=0)
    log.info("split (pairs per mask source):\n%s", counts.to_string())

    L.seed_everything(seed, workers=True, verbose=False)
    if num_workers is None:
        num_workers = default_num_workers()
    data = LungSegData(table, cfg["input_size"], batch_size=batch_size, num_workers=num_workers, augment=augment)
    module = LungSegModule(cfg, lr=lr, weight_decay=weight_decay, source_names=data.source_names)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best-{epoch:03d}-{val_dice:.4f}", monitor="val_dice", mode="max",
        save_top_k=1, save_last=True,
    )
    precision = resolve_precision(precision, accelerator)  # bf16 only where native
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="epoch"), _EpochSummary()],
        logger=CSVLogger(out, name="logs"),
        max_time={"minutes": max_minutes} if max_minutes else None,
        log_every_n_steps=max(1, min(10, int((table["split"] == "train").sum()) // batch_size)),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,  # bilinear upsampling backward has no deterministic CUDA kernel
        benchmark=torch.cuda.is_available(),  # fixed input size: let cuDNN pick the fastest kernels once
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return out / WEIGHTS_NAME

    best_path = checkpoint.best_model_path or str(last)
    model = build_unet(cfg)
    state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]  # our own checkpoint
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    metrics = {k: round(float(v), 5) for k, v in _best_val_metrics(out, checkpoint).items()}
    cfg.update(
        trained={
            "manifest": os.path.basename(str(manifest)),
            "pairs": {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")},
            "epochs": int(trainer.current_epoch),
            "best_checkpoint": os.path.basename(best_path),
            "val": metrics,
            "batch_size": batch_size,
            "lr": lr,
            "precision": precision,
            "seconds": round(train_seconds, 1),
            "device": _device_name(trainer),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        split={
            "seed": seed, "val": val, "test": test, "file": SPLIT_NAME,
            "test_pairs": table.loc[table["split"] == "test", ["rel_image", "rel_mask"]].to_numpy().tolist(),
        },
    )
    from covidcxr.segmentation.weights import save_unet

    weights = save_unet(model, cfg, out)
    log.info("exported %s (val Dice %s)", weights, metrics.get("val_dice"))
    if evaluate:
        _evaluate_test(table, weights, out, device="cuda" if _uses_cuda(trainer) else "cpu")
    if install:
        from covidcxr.segmentation.weights import install_weights

        install_weights(out)
    return weights


def _uses_cuda(trainer: L.Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"


def _device_name(trainer: L.Trainer) -> str:
    if _uses_cuda(trainer):
        return torch.cuda.get_device_name(trainer.strategy.root_device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _best_val_metrics(out: Path, checkpoint: Any) -> dict[str, float]:
    """Validation metrics of the best epoch, read back from the CSV log."""
    logs = sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    best = {"val_dice": float(checkpoint.best_model_score)} if checkpoint.best_model_score is not None else {}
    if not logs or not best:
        return best
    frames = [pd.read_csv(p) for p in logs]
    df = pd.concat(frames, ignore_index=True)
    val_rows = df[df["val_dice"].notna()] if "val_dice" in df.columns else df.iloc[0:0]
    if val_rows.empty:
        return best
    row = val_rows.iloc[int((val_rows["val_dice"] - best["val_dice"]).abs().to_numpy().argmin())]
    return {k: float(row[k]) for k in row.index if k.startswith("val_") and pd.notna(row[k])} | {"epoch": row["epoch"]}


def _evaluate_test(table: pd.DataFrame, weights: Path, out: Path, *, device: str) -> dict[str, Any]:
    from covidcxr.segmentation.evaluate import dice_table, evaluate_masks
    from covidcxr.segmentation.segmenter import LungSegmenter

    test = table[table["split"] == "test"]
    if test.empty:
        return {}
    segmenter = LungSegmenter.load(weights, device=device)
    per_image = evaluate_masks(test, segmenter)
    per_image.to_csv(out / "test_dice.csv", index=False)
    summary = dice_table(per_image)
    result = {str(k): {c: int(v) if c in ("n", "qc_flagged") else round(float(v), 4) for c, v in row.items()}
              for k, row in summary.iterrows()}
    (out / "test_dice.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("test Dice per mask source:\n%s", summary.round(4).to_string())
    return result
