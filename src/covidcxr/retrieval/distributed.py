"""Distributed embedding on Lightning: the one manifest loop, run per shard on every process, GPU and node.

Lightning's ``Trainer.predict`` is the engine (it already runs our training on DDP): the dataset is the list of
shards of :mod:`covidcxr.retrieval.shards`, Lightning's unrepeated distributed sampler hands each process its
shards, ``predict_step`` runs :func:`covidcxr.classification.loop.predict_manifest` on the shard's rows (threaded
decoding, lung masks, the stored preprocessing, bf16 where native) and a :class:`~lightning.pytorch.callbacks.
BasePredictionWriter` writes each shard atomically as it finishes. Nothing is gathered in memory, a shard
already on disk is skipped (resume after a crash), and shard ``i`` holds the same rows whatever the number of
processes. Launching is Lightning's: ``--devices N`` on one machine, ``srun`` / ``torchrun`` on a cluster
(see README "Indexing a whole archive" and ``docs/ARCHITECTURE.md`` for why Lightning and not Ray).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from covidcxr.errors import ConfigError
from covidcxr.retrieval import shards
from covidcxr.retrieval.embed import case_metadata

log = logging.getLogger(__name__)

PLAN_WAIT_S = 120.0
"""How long a non-zero rank started at the same time as rank 0 (``srun``/``torchrun``) waits for the plan."""


@dataclass
class EmbedSummary:
    """What an embedding run did (returned on global rank 0; other ranks get ``rank != 0``)."""

    directory: Path
    n_rows: int
    n_shards: int
    embedded: int
    skipped_existing: int
    seconds: float
    world_size: int
    rank: int = 0
    unreadable: list[dict[str, Any]] = field(default_factory=list)


def _first(batch: list[int]) -> int:
    return batch[0]


class ShardEmbedder(L.LightningModule):
    """Runs the manifest loop over one shard per step; the model is loaded on each process's own device."""

    def __init__(self, model_dir: str | Path, rows: pd.DataFrame, plan: shards.ShardPlan, out: Path, *,
                 batch_size: int = 32, num_workers: int = 2, skip_bad: bool = False) -> None:
        super().__init__()
        self.model_dir, self.rows, self.plan, self.out = Path(model_dir), rows, plan, Path(out)
        self.batch_size, self.num_workers, self.skip_bad = batch_size, num_workers, skip_bad
        self.artifact: Any = None

    def on_predict_start(self) -> None:
        from covidcxr.classification.artifact import load_artifact

        self.artifact = load_artifact(self.model_dir, str(self.device))
        if self.artifact.weights_hash != self.plan.model_hash:
            raise ConfigError(f"{self.model_dir}: weights hash {self.artifact.weights_hash[:12]} differs from the "
                              f"plan's {self.plan.model_hash[:12]}")

    def predict_step(self, shard: int, batch_idx: int) -> dict[str, Any] | None:
        from covidcxr.classification.loop import predict_manifest

        if shards.shard_path(self.out, shard).is_file():
            return None
        part = self.rows.iloc[self.plan.rows_of(shard)]
        done, emb = predict_manifest(self.artifact, part, embeddings=True, batch_size=self.batch_size,
                                     num_workers=self.num_workers, skip_bad=self.skip_bad)
        # Unreadable images by their manifest row (the loop numbers the rows of this shard).
        done.attrs["unreadable"] = [{**bad, "row": int(part["_row"].iloc[bad["row"]])}
                                    for bad in done.attrs.get("unreadable", [])]
        return {"shard": shard, "embeddings": emb, "rows": done}


class ShardWriter(BasePredictionWriter):
    """Writes each finished shard at once (atomic rename); keeps nothing in memory."""

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if prediction is None:
            return
        rows = prediction["rows"]
        bad = rows.attrs.get("unreadable", [])
        if bad:  # written before the shard: a finished shard's unreadable rows are always on record
            from covidcxr.io.files import write_json

            write_json(shards.unreadable_path(self.out, prediction["shard"]), bad)
        shards.write_shard(self.out, prediction["shard"], prediction["embeddings"], rows,
                           rows["_row"].to_numpy())



def _global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _wait_for_plan(out: Path) -> None:
    deadline = time.monotonic() + PLAN_WAIT_S
    while not (out / shards.PLAN_FILE).is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"{out}: rank 0 wrote no {shards.PLAN_FILE} within {PLAN_WAIT_S:.0f} s")
        time.sleep(0.5)


def embed_to_shards(
    model_dir: str | Path,
    model_hash: str,
    df: pd.DataFrame,
    out: str | Path,
    *,
    shard_size: int = shards.DEFAULT_SHARD_SIZE,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    batch_size: int = 32,
    num_workers: int = 2,
    skip_bad: bool = False,
    progress: bool = True,
) -> EmbedSummary:
    """Embed manifest rows into a shard folder with Lightning (one or many processes); resumable.

    Args:
        model_dir: Model artifact folder (loaded on each process's device).
        model_hash: Its weights hash (recorded in the plan; a resumed run must match).
        df: Manifest rows (``image``, ``patient_id``, ``label``; ``case_id`` optional, else made relative to the
            manifest folder as in ``index build``).
        out: Shard folder (created; a folder of another run is refused).
        shard_size: Rows per shard.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Processes/GPUs per node (``auto`` = all GPUs, or 1 on CPU).
        num_nodes: Machines (launched by ``srun``/``torchrun``, see the README).
        strategy: Lightning strategy; ``auto`` = ``ddp`` with more than one process.
        batch_size: Images per forward pass inside a shard.
        num_workers: Decoding threads per process.
        skip_bad: Skip unreadable images (logged with their path) instead of stopping.
        progress: Show Lightning's progress bar over shards.

    Returns:
        :class:`EmbedSummary` (on every rank; ``rank`` says which).

    Raises:
        ConfigError: another run's folder, bad shard size, empty manifest.
        ImageError: an unreadable image without ``skip_bad``.
    """
    from covidcxr.training import lightning_output

    out = Path(out)
    missing = [c for c in ("image", "patient_id", "label") if c not in df.columns]
    if missing:
        raise ConfigError(f"manifest table lacks column(s) {missing}; has {list(map(str, df.columns))}")
    rows = df.reset_index(drop=True).copy()
    rows["case_id"] = case_metadata(df.reset_index(drop=True))["case_id"].to_numpy()
    rows["_row"] = range(len(rows))
    if _global_rank() != 0 and not (out / shards.PLAN_FILE).is_file():
        _wait_for_plan(out)  # ranks started together by a cluster launcher: rank 0 writes the plan
    plan, todo = shards.open_plan(out, rows, model_hash, shard_size)
    world = int(devices) * int(num_nodes) if str(devices).isdigit() else None
    if strategy == "auto" and world is not None and world > 1:
        strategy = "ddp"
    module = ShardEmbedder(model_dir, rows, plan, out, batch_size=batch_size, num_workers=num_workers,
                           skip_bad=skip_bad)
    # Every shard number on every rank (done ones are skipped in predict_step), so all ranks split one list.
    loader = torch.utils.data.DataLoader(range(plan.n_shards), batch_size=1, collate_fn=_first, num_workers=0)
    t0 = time.perf_counter()
    with lightning_output():
        trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                            callbacks=[ShardWriter(out)], logger=False, enable_checkpointing=False,
                            enable_progress_bar=progress, enable_model_summary=False, inference_mode=True)
        log.info("embedding %d rows into %d shard(s) of %d at %s (%d to do) on %d process(es)", plan.n_rows,
                 plan.n_shards, plan.shard_size, out, len(todo), trainer.world_size)
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier("covidcxr-embed-done")  # every rank's last shard is on disk before we count
    embedded = sum(shards.shard_path(out, i).is_file() for i in todo)
    return EmbedSummary(out, plan.n_rows, plan.n_shards, embedded, plan.n_shards - len(todo),
                        time.perf_counter() - t0, trainer.world_size, trainer.global_rank, shards.unreadable_rows(out))
