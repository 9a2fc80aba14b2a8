"""Defaults shared by the commands that run a classifier: the model that ships with the package, decoding threads,
what ``--device`` means for inference."""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_HELP = "model (or ensemble) artifact folder (default: the shipped classifier, see its MODEL_CARD.md)"
DEVICE_HELP = ("kept for old scripts: inference runs on the CPU with ONNX Runtime in float32, the same answer on every "
               "machine (a GPU is not used; anything but auto/cpu only logs a warning)")


def model_dir(path: Path | None) -> Path:
    """``path``, or the shipped classifier's folder, announced on stderr so nobody mistakes whose model answered."""
    from covidcxr.classification.artifact import resolve_model_dir

    folder, shipped = resolve_model_dir(path)
    if shipped:
        print(f"covidcxr: no --model given: using the shipped classifier ({folder}); research use and decision "
              "support only, not a diagnostic device", file=sys.stderr)
    return folder


def decode_threads(n: int | None) -> int:
    """``--num-workers`` for image decoding: ``n``, or one thread per CPU this process may use."""
    if n is not None:
        return n
    from covidcxr.device import available_cpus

    return available_cpus()
