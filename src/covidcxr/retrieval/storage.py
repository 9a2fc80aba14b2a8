"""Index files on disk: FAISS and SQLite writers, fsync, atomic swap of the index folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from covidcxr.errors import CaseIndexError

logger = logging.getLogger(__name__)

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


# A save writes ``.NAME.tmp-PID-XXXXXXXX`` (``tempfile.mkdtemp``'s 8 random characters) beside the index
# ``NAME``; saves before the PID was part of the name wrote ``.NAME.tmp-XXXXXXXX``.
_TMP_SUFFIX = re.compile(r"\.tmp-(?:(?P<pid>[0-9]+)-)?[a-z0-9_]{8}")
UNTAGGED_STALE_S = 600.0
"""Temporary directories whose name carries no live process id are removed once this old (seconds)."""


def _tmp_prefix(directory: Path) -> str:
    """Name prefix of this process's temporary save directories for the index ``directory``."""
    return f".{directory.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _tmp_is_stale(entry: os.DirEntry[str], pid: str | None, reference: float) -> bool:
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if mtime > reference:  # newer than our own in-flight save (or than this load): another save's
        return False
    if pid is None or os.name != "posix":  # no process to ask (os.kill(pid, 0) would kill it on Windows)
        return mtime < reference - UNTAGGED_STALE_S
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def _remove_stale(directory: Path, *, in_flight: Path | None = None) -> int:
    """Remove what interrupted saves of the index ``directory`` left beside it; returns how many were removed.

    Only entries named after *this* index are considered, and only directories (never links or files):

    * ``.NAME.tmp-PID-*`` written by a process that is no longer running, and ``.NAME.tmp-*`` without a process
      id once :data:`UNTAGGED_STALE_S` old; both only when older than ``in_flight`` (the caller's own temporary
      directory, which is never touched) or, without one, than now;
    * ``.NAME.old``, the previous index kept by a save that died after its swap, only while ``NAME`` itself is a
      complete index (otherwise the backup is the index :meth:`CaseIndex.load` falls back to).
    """
    parent, prefix = directory.parent, f".{directory.name}"
    reference = time.time()
    if in_flight is not None:
        try:
            reference = in_flight.stat().st_mtime
        except OSError:
            return 0
    try:
        with os.scandir(parent) as it:
            entries = [e for e in it if e.name.startswith(prefix)]
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        rest = entry.name[len(prefix):]
        if in_flight is not None and entry.name == in_flight.name:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            m = _TMP_SUFFIX.fullmatch(rest)
            if m is not None:
                stale = _tmp_is_stale(entry, m.group("pid"), reference)
            else:
                stale = rest == ".old" and (directory / HEADER_FILE).is_file()
        except OSError:  # housekeeping never fails a save or a load
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += not os.path.lexists(entry.path)
    if removed:
        logger.info("%s: removed %d stale temporary/backup director%s left by interrupted saves", directory,
                    removed, "y" if removed == 1 else "ies")
    return removed


def _swap_in(tmp: Path, directory: Path) -> None:
    """Move the complete ``tmp`` directory to ``directory``, keeping the old index until the new one is in place."""
    backup = _backup_path(directory)
    if backup.exists() and directory.exists():
        shutil.rmtree(backup, ignore_errors=True)  # leftover of an earlier save that crashed after its swap
    if directory.exists():
        if (directory / HEADER_FILE).is_file():
            os.replace(directory, backup)
        else:
            directory.rmdir()  # empty directory (save() refuses non-empty non-index directories)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(backup, ignore_errors=True)


def check_replaceable(directory: Path) -> None:
    """Refuse a target that exists and is not a case index: it is never overwritten.

    Raises:
        CaseIndexError: ``directory`` is a file, or a non-empty folder without ``header.json``.
    """
    if (directory.exists() and not (directory / HEADER_FILE).is_file()
            and (directory.is_file() or any(directory.iterdir()))):
        raise CaseIndexError(f"{directory}: exists and is not a case index (no {HEADER_FILE}); refusing to "
                             "replace it")


@contextlib.contextmanager
def staged_index(directory: Path) -> Iterator[Path]:
    """A temporary folder beside ``directory`` to write a whole index into, swapped in when the block succeeds.

    What killed saves left beside the index is removed first (never this block's folder); on any error the
    temporary folder is removed and ``directory`` is untouched. The caller writes the header last.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(directory), dir=directory.parent))
    try:
        _remove_stale(directory, in_flight=tmp)
        yield tmp
        _fsync_dir(tmp)
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("covidcxr.index needs faiss: pip install faiss-cpu") from exc
    return faiss
