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
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from covidcxr.device import default_num_workers, resolve_precision
from covidcxr.errors import ConfigError
from covidcxr.models.unet import build_unet, unet_config
from covidcxr.segmentation.data import LungSegData, read_seg_manifest, split_pairs
from covidcxr.segmentation.weights import WEIGHTS_NAME
from covidcxr.training import RESUME_WARNINGS, GracefulStop, lightning_output
from covidcxr.transforms.joint import normalise

log = logging.getLogger(__name__)

SPLIT_NAME = "split.csv"
CHECKPOINT_DIR = "checkpoints"


















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


# Deprecations inside Lightning itself that a user cannot act on: (message regex, category, module regex).
# Expected on ``--resume`` (the run folder holds the earlier run's files on purpose): (message regex, module regex).










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
        Interrupted: SIGINT/SIGTERM stopped training; ``out/checkpoints/last.ckpt`` holds the state reached
            (continue with ``resume=True``).
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
    stop = GracefulStop(last)  # SIGINT/SIGTERM: last.ckpt at the step reached, then Interrupted
    with lightning_output(RESUME_WARNINGS if ckpt_path else ()), stop:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            callbacks=[checkpoint, LearningRateMonitor(logging_interval="epoch"), _EpochSummary(), stop],
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
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except BaseException:
            stop.raise_if_stopped()
            raise
    stop.raise_if_stopped()  # a signal during the last step: the run is complete, the exit status says stopped
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
