"""Make a compact, downsampled copy of a manifest's images (and masks) for a remote training machine.

The copy keeps the manifest's relative layout, so the copied manifest.csv works unchanged. Images are
area-resized so the longer side is at most ``--max-side`` pixels; masks are resized the same way and
re-binarised at 0.5 (the convention of the shared lung-mask data).

Usage: python tools/pack_dataset.py MANIFEST OUT_DIR [--max-side 320]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _resize(src: Path, dst: Path, max_side: int, is_mask: bool) -> None:
    img = Image.open(src)
    img = img.convert("L")
    scale = max_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BOX)
    if is_mask:
        img = Image.fromarray(((np.asarray(img) >= 128) * 255).astype(np.uint8))
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-side", type=int, default=320)
    args = parser.parse_args()
    root = args.manifest.parent
    df = pd.read_csv(args.manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    for col in ("image", "mask"):
        if col not in df.columns:
            continue
        for rel in df[col].dropna().unique():
            dst = args.out / rel
            if not dst.exists():
                _resize(root / rel, dst, args.max_side, is_mask=(col == "mask"))
    shutil.copy(args.manifest, args.out / args.manifest.name)


if __name__ == "__main__":
    main()
