"""Index files on disk: FAISS and SQLite writers, fsync, atomic swap of the index folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

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
