"""The classifier's LightningModule (loss, optimiser, warm-up + cosine schedule, frozen warm-up) and epoch timing."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from covidcxr.evaluation.metrics import safe_auc
from covidcxr.models.classifier import create_classifier


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
