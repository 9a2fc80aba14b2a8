"""Training's image cache: every manifest row decoded once through the model's preprocessing.

Training rows are kept as uint8 a little larger than the input (random crops need room), validation and test rows
at the input size in float32, i.e. exactly what inference feeds the network. Lung masks come from the manifest,
the mask cache or the segmenter (batched, then cached).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from covidcxr.classification.config import TrainConfig
from covidcxr.classification.inference import ModelArtifact
from covidcxr.classification.loop import MaskCache
from covidcxr.data.manifest import both_label_mask, has_path
from covidcxr.device import uses_cuda
from covidcxr.errors import ConfigError
from covidcxr.evaluation.calibration import apply_temperature
from covidcxr.transforms.augment import build_train_transform
from covidcxr.transforms.preprocess import PreprocessCfg, preprocess, to_uint8
from covidcxr.vocab import LABELS, SEG_MODES

log = logging.getLogger(__name__)


class CachedImageDataset(Dataset):
    """Images from the uint8 cache through a transform, with integer labels.

    Args:
        cache: uint8 tensor ``(N, 1, S, S)``; shared with forked DataLoader workers without copying.
        labels: int64 labels ``(N,)``.
        transform: Maps a cached ``(1, S, S)`` image to the network input; None: the cache holds inputs already.
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
        x = self.cache[i] if self.transform is None else self.transform(self.cache[i])
        return x, self.labels[i], self.weights[i], self.both[i]


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
        x = preprocess(image, mask, self.cfg, flags=flags)  # the inference function, numpy; tensors from here on
        return i, torch.from_numpy(to_uint8(x) if self.uint8 else x), flags




def _as_list(batch: list[Any]) -> list[Any]:
    return batch




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
            if has_path(m):
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
        bar_off = not progress or not todo
        for start in tqdm(range(0, len(todo), chunk), desc="segment lungs", unit="chunk", disable=bar_off):
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
    kind = "uint8" if uint8 else "float32"
    with tqdm(total=len(images), desc=f"cache images ({kind}, {cache_size} px)", unit="img", disable=not progress) as bar:
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


@dataclass
class _Data:
    """The run's rows and caches: training images (uint8, for augmentation), validation/test inputs (float32)."""

    df: pd.DataFrame
    y: np.ndarray
    both: np.ndarray
    idx: dict[str, np.ndarray]
    train_cache: torch.Tensor
    eval_cache: torch.Tensor
    eval_pos: dict[int, int]
    qc: list[list[str]]
    seg_weights: Path | None
    cache_seconds: float

    def predict(self, art: ModelArtifact, split: str, batch_size: int) -> pd.DataFrame:
        """Margins of a validation/test split on the cached inference inputs, with labels and QC flags."""
        rows = self.df.iloc[self.idx[split]].copy()
        size = int(self.eval_cache.shape[-1])
        x = torch.stack([self.eval_cache[self.eval_pos[int(i)]] for i in self.idx[split]]) if len(rows) \
            else torch.zeros((0, 1, size, size))
        margin, _ = art.forward_margins(x, batch_size=batch_size)
        rows["y"] = self.y[self.idx[split]]
        rows["margin"] = margin
        rows["prob_uncalibrated"] = apply_temperature(margin, 1.0)
        rows["prob"] = apply_temperature(margin, art.temperature)
        rows["qc_flags"] = [";".join(self.qc[i]) for i in self.idx[split]]
        rows["source_has_both_labels"] = self.both[self.idx[split]]
        return rows


def _prepare_data(df: pd.DataFrame, cfg: TrainConfig, out: Path) -> _Data:
    """Lung masks (segmenter + mask cache) and the image caches of every split."""
    segmenter, mask_cache, seg_weights = None, None, None
    if cfg.seg_mode != "none":
        from covidcxr.classification.artifact import segmenter_files
        from covidcxr.segmentation.segmenter import LungSegmenter

        seg_weights = segmenter_files(cfg.segmenter)[0]
        seg_device = "cuda" if uses_cuda(cfg.accelerator) else "cpu"
        segmenter = LungSegmenter.load(seg_weights, device=seg_device, batch_size=32,
                                       precision="auto" if cfg.bf16_inference else "fp32")
        mask_cache = MaskCache(cfg.mask_dir or out / "masks", segmenter.cache_key)
    idx = {s: np.flatnonzero((df["split"] == s).to_numpy()) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    cache_args = {"segmenter": segmenter, "mask_cache": mask_cache, "num_workers": cfg.num_workers,
                  "progress": cfg.progress, "intensity": cfg.intensity}
    cache_size = cfg.augment_config().cache_size
    # Training images: uint8, larger than the input, for random crops. Validation and test: the inference input.
    train_cache, train_qc = build_image_cache(df.iloc[idx["train"]], cfg.seg_mode, cache_size, **cache_args)
    eval_idx = np.concatenate([idx["val"], idx["test"]])
    eval_cache, eval_qc = build_image_cache(df.iloc[eval_idx], cfg.seg_mode, cfg.image_size, uint8=False,
                                            **cache_args)
    qc: list[list[str]] = [[] for _ in range(len(df))]
    for rows, flags in ((idx["train"], train_qc), (eval_idx, eval_qc)):
        for i, f in zip(rows, flags, strict=True):
            qc[i] = f
    cache_seconds = time.perf_counter() - t0
    log.info("cached %d images (train at %dpx, evaluation at %dpx) in %.1fs", len(df), cache_size, cfg.image_size,
             cache_seconds)
    both, _ = both_label_mask(df)
    if both is None:  # no source column: every row counts as one where the source cannot give the label away
        both = np.ones(len(df), dtype=bool)
    return _Data(df, _label_array(df), both, idx, train_cache, eval_cache,
                 {int(i): k for k, i in enumerate(eval_idx)}, qc, seg_weights, cache_seconds)


def _loaders(data: _Data, cfg: TrainConfig) -> tuple[DataLoader, DataLoader, list[float] | None]:
    """Training loader (augmentation, balancing) and validation loader; class weights for ``balance='loss'``."""
    aug = cfg.augment_config()
    train = data.idx["train"]
    row_weight = np.where(data.both, float(cfg.both_label_weight), 1.0)
    train_ds = CachedImageDataset(data.train_cache, data.y[train], build_train_transform(aug), row_weight[train],
                                  data.both[train])
    val = data.idx["val"]
    val_ds = CachedImageDataset(data.eval_cache[: len(val)], data.y[val], None, None, data.both[val])
    y_train = data.y[train]
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
    return train_dl, val_dl, class_weights
