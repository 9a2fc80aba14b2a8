"""Index files on disk: FAISS and SQLite writers, fsync, atomic swap of the index folder."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CaseIndexError

# ---------------------------------------------------------------------- file helpers (patchable in tests)


FORMAT_VERSION = 1
HEADER_FILE = "header.json"
INDEX_FILE = "index.faiss"
PCA_FILE = "pca.faiss"
METADATA_FILE = "metadata.sqlite"
REQUIRED_COLUMNS = ("case_id", "patient_id", "label")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_faiss(path: Path, index: Any) -> None:
    _import_faiss().write_index(index, str(path))
    _fsync_file(path)


def _write_metadata(path: Path, metadata: pd.DataFrame) -> None:
    con = sqlite3.connect(path)
    try:
        frame = metadata.copy()
        frame.insert(0, "row_id", np.arange(len(frame), dtype=np.int64))
        frame.to_sql("cases", con, index=False, chunksize=50_000)
        con.execute("CREATE UNIQUE INDEX cases_case_id ON cases(case_id)")
        con.execute("CREATE INDEX cases_patient_id ON cases(patient_id)")
        con.commit()
    finally:
        con.close()
    _fsync_file(path)


def _read_metadata(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CaseIndexError(f"{path}: metadata table is missing")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = con.execute("SELECT * FROM cases ORDER BY row_id")
            columns = [c[0] for c in cur.description]
            rows = cur.fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise CaseIndexError(f"{path}: cannot read the metadata table ({exc})") from exc
    missing = [c for c in ("row_id", *REQUIRED_COLUMNS) if c not in columns]
    if missing:
        raise CaseIndexError(f"{path}: metadata table lacks column(s) {missing}")
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    frame = pd.DataFrame({c: pd.Series(list(v), dtype=object) for c, v in zip(columns, cols, strict=True)})
    if not np.array_equal(frame["row_id"].to_numpy(dtype=np.int64), np.arange(len(frame))):
        raise CaseIndexError(f"{path}: metadata row_id values are not 0..{len(frame) - 1}")
    return frame.drop(columns="row_id")


def _write_header(path: Path, header: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(header, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _backup_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _swap_in(tmp: Path, directory: Path) -> None:
    """Move the complete ``tmp`` directory to ``directory``, keeping the old index until the new one is in place."""
    backup = _backup_path(directory)
    if backup.exists() and directory.exists():
        shutil.rmtree(backup)  # leftover of an earlier save that crashed after its swap
    if directory.exists():
        if (directory / HEADER_FILE).is_file():
            os.replace(directory, backup)
        else:
            directory.rmdir()  # empty directory (save() refuses non-empty non-index directories)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("covidcxr.index needs faiss: pip install faiss-cpu") from exc
    return faiss
