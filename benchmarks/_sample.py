"""The seeded per-source sample of real CXRs that several benchmarks measure on (every source represented)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def sample(manifest: Path, n: int, seed: int) -> list[str]:
    """``n`` image paths of ``manifest``: an equal seeded share per ``source``, topped up at random."""
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(manifest)
    per = max(1, n // df["source"].nunique())
    parts = [g.sample(min(len(g), per), random_state=seed) for _, g in df.groupby("source")]
    picked = pd.concat(parts)
    if len(picked) < n:
        picked = pd.concat([picked, df.drop(picked.index).sample(n - len(picked), random_state=seed)])
    return picked["image"].astype(str).head(n).tolist()
