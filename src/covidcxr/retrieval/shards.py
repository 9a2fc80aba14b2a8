"""Sharded embedding files: what distributed embedding writes and ``index build --from-embeddings`` reads.

A folder of shards::

    embeddings.json     the plan: model hash, manifest fingerprint, rows, shard size, number of shards
    shard-00000.npz     rows [0, shard_size) of the manifest: ``embeddings`` (float32, unit norm), ``row`` (manifest
                        row numbers) and one array per metadata column (case_id, patient_id, label, image, prob, ...)
    shard-00001.npz     ...

Shard ``i`` always holds the same manifest rows, whichever worker embedded it, so the content does not depend on
the number of workers. Each shard is written to a temporary file, fsynced and renamed into place: a shard file
that exists is complete, and a resumed run embeds only the missing ones. The plan refuses to mix models or
manifests in one folder. Arrays are stored without pickle (strings as fixed-width unicode), so reading a shard
never executes code.

No torch here (see :mod:`covidcxr.retrieval.index`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError, ConfigError
from covidcxr.io.files import write_json
from covidcxr.retrieval.storage import _fsync_dir

log = logging.getLogger(__name__)

PLAN_FILE = "embeddings.json"
SHARD_FORMAT = 1
DEFAULT_SHARD_SIZE = 4096
# Manifest columns a shard keeps (when present) besides the embedding: what the index metadata and reports need.
SHARD_COLUMNS = ("case_id", "patient_id", "label", "image", "source", "view", "split", "study_date", "date",
                 "prob", "status", "no_result_reason")


@dataclass(frozen=True)
class ShardPlan:
    """What a shard folder holds: fixed by the first run, checked by every resumed one."""

    format: int
    model_hash: str
    manifest_sha256: str
    n_rows: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        """Number of shards (the last one may be shorter)."""
        return -(-self.n_rows // self.shard_size)

    def rows_of(self, shard: int) -> slice:
        """Manifest rows of shard ``shard``."""
        return slice(shard * self.shard_size, min(self.n_rows, (shard + 1) * self.shard_size))


def unreadable_path(directory: str | Path, shard: int) -> Path:
    """The record of a shard's unreadable images (``[{row, image, reason}]``; written only when there were any)."""
    return Path(directory) / f"unreadable-{shard:05d}.json"


def unreadable_rows(directory: str | Path) -> list[dict[str, Any]]:
    """Every unreadable image an embedding run in ``directory`` left out, in shard order."""
    import json

    return [bad for path in sorted(Path(directory).glob("unreadable-*.json")) for bad in json.loads(path.read_text())]


def shard_path(directory: str | Path, shard: int) -> Path:
    """File of shard ``shard``."""
    return Path(directory) / f"shard-{shard:05d}.npz"


def manifest_fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the rows' image paths and labels, in order (what a resumed run must embed again)."""
    h = hashlib.sha256()
    for col in ("image", "patient_id", "label"):
        if col in df.columns:
            h.update(col.encode())
            for v in df[col].astype(str).tolist():
                h.update(v.encode() + b"\0")
    return h.hexdigest()


def open_plan(directory: str | Path, df: pd.DataFrame, model_hash: str,
              shard_size: int = DEFAULT_SHARD_SIZE) -> tuple[ShardPlan, list[int]]:
    """Create or check the plan of a shard folder; return it and the shards still to embed.

    Raises:
        ConfigError: ``shard_size`` < 1, no rows, or the folder holds shards of another model, manifest or shard
            size (they are never mixed or overwritten; choose a new folder).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if len(df) == 0:
        raise ConfigError("the manifest has no rows to embed")
    directory = Path(directory)
    plan = ShardPlan(SHARD_FORMAT, str(model_hash), manifest_fingerprint(df), len(df), shard_size)
    plan_file = directory / PLAN_FILE
    if plan_file.is_file():
        old = read_plan(directory)
        if old != plan:
            diff = [k for k in asdict(plan) if asdict(plan)[k] != asdict(old)[k]]
            raise ConfigError(f"{directory}: holds embeddings of a different run ({', '.join(diff)} differ); resume "
                              "with the same model, manifest and shard size, or choose a new folder")
    elif directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory}: exists, is not empty and is not an embedding folder (no {PLAN_FILE}); "
                          "choose a new folder")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(plan_file, asdict(plan))
    for stale in directory.glob(".shard-*.tmp"):  # what a killed run was writing (no rank writes before all
        stale.unlink(missing_ok=True)             # ranks have opened the plan: Lightning joins them first)
    todo = [i for i in range(plan.n_shards) if not shard_path(directory, i).is_file()]
    return plan, todo


def read_plan(directory: str | Path) -> ShardPlan:
    """The plan of a shard folder.

    Raises:
        CaseIndexError: no or an unreadable plan file.
    """
    plan_file = Path(directory) / PLAN_FILE
    try:
        plan = ShardPlan(**json.loads(plan_file.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise CaseIndexError(f"{directory}: not an embedding folder (no {PLAN_FILE}); make one with "
                             "`covidcxr index embed`") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise CaseIndexError(f"{plan_file}: unreadable embedding plan ({exc})") from exc
    if plan.format != SHARD_FORMAT:
        raise CaseIndexError(f"{plan_file}: shard format {plan.format} but this covidcxr reads {SHARD_FORMAT}")
    return plan


def write_shard(directory: str | Path, shard: int, embeddings: np.ndarray, rows: pd.DataFrame,
                row_numbers: np.ndarray) -> Path:
    """Write one shard atomically (temporary file, fsync, rename); returns its path.

    Args:
        directory: The shard folder.
        shard: Shard number.
        embeddings: ``(n, D)`` embeddings of the readable rows.
        rows: Their manifest rows (with the model's ``prob``/``status`` columns).
        row_numbers: Their manifest row numbers.
    """
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
                                     "row": np.asarray(row_numbers, dtype=np.int64)}
    for col in SHARD_COLUMNS:
        if col in rows.columns:
            values = rows[col]
            if pd.api.types.is_float_dtype(values):
                arrays[f"col_{col}"] = values.to_numpy(dtype=np.float64)
            else:
                arrays[f"col_{col}"] = np.array(["" if _missing(v) else str(v) for v in values.tolist()], dtype=str)
    final = shard_path(directory, shard)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return final


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def read_shard(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """``(embeddings, rows)`` of one shard; rows carry ``row`` (manifest row number) and the stored columns.

    Raises:
        CaseIndexError: unreadable or inconsistent shard file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            emb = z["embeddings"]
            cols = {"row": z["row"], **{k[4:]: z[k] for k in z.files if k.startswith("col_")}}
    except (OSError, ValueError, KeyError) as exc:
        raise CaseIndexError(f"{path}: unreadable embedding shard ({exc}); delete it and resume the embedding "
                             "run") from exc
    if emb.ndim != 2 or any(len(v) != len(emb) for v in cols.values()):
        raise CaseIndexError(f"{path}: embedding shard arrays disagree in length")
    frame = pd.DataFrame({k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in cols.items()})
    return emb, frame


def complete_shards(directory: str | Path) -> tuple[ShardPlan, list[Path]]:
    """The plan and every shard file of a finished embedding run, in order.

    Raises:
        CaseIndexError: not an embedding folder, or shards missing (the run is not finished: resume it).
    """
    plan = read_plan(directory)
    paths = [shard_path(directory, i) for i in range(plan.n_shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CaseIndexError(f"{directory}: {len(missing)} of {plan.n_shards} shard(s) missing (e.g. "
                             f"{', '.join(missing[:5])}); resume the embedding run first")
    return plan, paths


def iter_shards(directory: str | Path) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """``(embeddings, rows)`` shard by shard (memory bounded by one shard)."""
    _, paths = complete_shards(directory)
    for p in paths:
        yield read_shard(p)


def sample_embeddings(directory: str | Path, n: int, seed: int = 0) -> np.ndarray:
    """A seeded random sample of up to ``n`` embeddings across all shards (to train quantisers)."""
    _, paths = complete_shards(directory)
    rng = np.random.default_rng(seed)
    per = max(1, -(-n // len(paths)))
    parts = []
    for p in paths:
        emb, _ = read_shard(p)
        take = min(per, len(emb))
        parts.append(emb[np.sort(rng.choice(len(emb), size=take, replace=False))] if take else emb[:0])
    out = np.concatenate(parts)
    return out[:n]


def shard_lengths(paths: list[Path]) -> list[int]:
    """Rows stored in each shard (reads only the row numbers)."""
    out = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                out.append(len(z["row"]))
        except (OSError, ValueError, KeyError) as exc:
            raise CaseIndexError(f"{p}: unreadable embedding shard ({exc})") from exc
    return out
