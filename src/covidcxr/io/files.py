"""Writing files: PNGs, atomic JSON, hashes; reading the arrays a model stores beside its weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.errors import ConfigError, ModelError


# --------------------------------------------------------------------------------------------- PNG
def save_png(path: str | os.PathLike[str], array: np.ndarray, bit_depth: int = 8) -> Path:
    """Save a gray (``H x W``) or 8-bit RGB (``H x W x 3``) image as PNG.

    Args:
        path: Output file.
        array: Floats in ``[0, 1]`` (scaled to the bit depth's maximum), or unsigned integers / booleans stored
            as given (booleans as 0/max).
        bit_depth: 8 or 16.

    Returns:
        The written path.

    Raises:
        ConfigError: Unsupported bit depth, shape, or values out of range.
    """
    from PIL import Image

    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth={bit_depth}: expected 8 or 16")
    arr = np.asarray(array)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3 and bit_depth == 8)):
        raise ConfigError(f"array shape {arr.shape}: expected H x W (or H x W x 3 at 8 bit)")
    stored = _quantise(arr, bit_depth, "array").astype(np.uint8 if bit_depth == 8 else np.uint16)
    path = Path(path)
    Image.fromarray(stored).save(path, format="PNG")
    return path


def _quantise(arr: np.ndarray, bits: int, what: str) -> np.ndarray:
    """Floats in [0, 1] -> round(x * (2**bits - 1)); bools -> 0/max; unsigned integers checked and kept."""
    top = 2**bits - 1
    if arr.dtype == bool:
        return arr.astype(np.int64) * top
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise ConfigError(f"{what}: float values must be finite and in [0, 1]")
        return np.rint(arr.astype(np.float64) * top).astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            raise ConfigError(f"{what}: integer values must be in [0, {top}] for {bits} bits")
        return arr.astype(np.int64)
    raise ConfigError(f"{what}: unsupported dtype {arr.dtype}")


def read_npz(path: str | os.PathLike[str], keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file a model stores (gate references, small checks) as float64.

    Raises:
        ModelError: The file is missing, corrupt or lacks a key: ``"<path>: cannot read the <what> (...)"``.
    """
    try:
        with np.load(path) as data:
            return {k: data[k].astype(np.float64) for k in keys}
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc})") from exc


def unique_names(names: list[str], *, first: int = 2) -> list[str]:
    """Each name, or ``<name>_<n>`` with the smallest ``n >= first`` not yet taken when the name is (output files of
    a batch must not overwrite each other: ``a, a, a_2`` -> ``a, a_2, a_2_2``)."""
    used: set[str] = set()
    out = []
    for name in names:
        new, n = name, first
        while new in used:
            new, n = f"{name}_{n}", n + 1
        used.add(new)
        out.append(new)
    return out


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (the identity of weights files in configs and indexes).

    Args:
        path: File to hash.
        chunk: Bytes read at a time.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_safe(obj: Any) -> Any:
    """Strict-JSON form of ``obj``, recursively: numpy scalars and arrays become Python values, NaN/inf become
    None, paths become strings, tuples and sets become lists (the one sanitiser for configs, metrics and reports)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def readable_mode() -> int:
    """The mode a new file gets under the process umask (``tempfile.mkstemp`` files are 0600 instead)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically (temporary file in the same folder, then rename); returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, readable_mode())  # mkstemp makes 0600 files; a shared model or report must stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``json_safe(data)`` as indented strict JSON, atomically (temporary file, then rename).

    A crash never leaves a half-written file behind, and readers never see one.

    Args:
        path: Target file (its folder must exist).
        data: JSON-able data (see :func:`json_safe`).

    Returns:
        ``path``.
    """
    return write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically: a temporary file in the same folder, then a rename.

    An earlier file at ``path`` stays as it was until the new one is complete.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))
