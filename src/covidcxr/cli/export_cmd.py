"""``covidcxr export``: write the ONNX networks inference runs into existing artifacts (thin: parse, call, print)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``export`` command.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.
    """
    p = subparsers.add_parser(
        "export",
        help="write the ONNX networks inference runs (model.onnx, lung_unet.onnx) into existing artifacts",
        description="Export a classifier or ensemble artifact (and a segmenter it carries) and/or lung-segmenter "
                    "weights to ONNX, the format every inference command runs (float32, ONNX Runtime, no torch). "
                    "Training writes them itself; use this for artifacts made before. Needs the training extra: "
                    "pip install 'covidcxr[train]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help="classifier or ensemble artifact folder")
    p.add_argument("--segmenter", type=Path, default=None, help="lung U-Net weights (lung_unet.safetensors) or folder")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from covidcxr.service import jobs

    for path in jobs.export_networks(args.model, args.segmenter):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
