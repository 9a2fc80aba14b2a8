"""Lung-mask pairs for training the segmenter: the manifest, its patient-level split, preloaded tensors, the DataModule."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from covidcxr.errors import ManifestError
from covidcxr.segmentation.evaluate import source_key
from covidcxr.transforms.joint import build_seg_train_transform
from covidcxr.transforms.resize import resize_image, resize_mask

log = logging.getLogger(__name__)


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


def select_saved_split(df: pd.DataFrame, split_csv: str | os.PathLike[str], split: str = "test") -> pd.DataFrame:
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
    return torch.from_numpy(resize_image(image, size)).to(torch.float16), torch.from_numpy(resize_mask(mask, size))


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
