"""Writing files: strict JSON, atomic and readable like any other file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from covidcxr.io.files import json_safe, write_json


def test_write_json_is_strict_and_honours_the_umask(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": float("nan"), "c": (1, 2), "d": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [1, 2], "d": str(tmp_path)}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert not list(tmp_path.glob("*.tmp"))
    assert json_safe({1: np.arange(2)}) == {"1": [0, 1]}
