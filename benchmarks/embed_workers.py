"""Embedding throughput of ``covidcxr index embed`` with 1 vs 2 Lightning worker processes, in one run.

Both runs embed the same seeded sample of real CXRs (every source) with the same model into fresh shard folders,
as a user runs them (fresh process: start-up, model load on every worker, decode, lung segmentation, forward,
atomic shard writes); the shards are then compared (they must be bit-identical). Writes
``benchmarks/results/embed_workers.json`` and ``.md``.

    python benchmarks/embed_workers.py --manifest ../shared/data/cxr/manifest.csv          # shipped model
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model  # benchmarks/_machine.py
from _sample import sample  # the same per-source sample as the other real-data benchmarks

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--model", type=Path, default=None, help="default: the shipped classifier")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "embed_workers")
    args = p.parse_args(argv)
    from covidcxr.retrieval import shards

    images = sample(args.manifest, args.n, args.seed)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "sample.csv"
        from covidcxr.data.manifest import read_manifest

        full = read_manifest(args.manifest)
        full["image"] = full["image"].astype(str)
        rows = full.set_index("image").loc[images].reset_index()
        rows.to_csv(manifest, index=False)
        # Warm-up (not timed): load torch and the model once, so the first timed process does not pay for
        # reading the libraries back into the page cache after other work evicted them.
        subprocess.run([sys.executable, "-c", ("import torch, covidcxr.classification.artifact as a; "
                        "a.load_artifact(a.resolve_model_dir(None)[0], 'cpu')")], check=True, capture_output=True)
        for w in args.workers:
            out = Path(tmp) / f"w{w}"
            cmd = [sys.executable, "-m", "covidcxr", "index", "embed", "--manifest", str(manifest), "--out", str(out),
                   "--shard-size", str(args.shard_size), "--devices", str(w), "--accelerator", "cpu", "--no-progress"]
            if args.model is not None:
                cmd += ["--model", str(args.model)]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            if run.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
            said = " ".join(run.stdout.split())
            inner = float(said.rsplit("process(es), ", 1)[1].split(" s)")[0])
            runs.append({"workers": w, "wall_s": wall, "predict_s": inner, "img_per_s_wall": len(rows) / wall,
                         "img_per_s_predict": len(rows) / inner, "out": out})
            print(f"{w} worker(s): {wall:.1f} s wall ({len(rows) / wall:.1f} img/s), {inner:.1f} s in predict")
        ref = runs[0]["out"]
        identical = True
        _, ref_paths = shards.complete_shards(ref)
        for r in runs[1:]:
            _, paths = shards.complete_shards(r["out"])
            for a, b in zip(ref_paths, paths, strict=True):
                ea, ra = shards.read_shard(a)
                eb, rb = shards.read_shard(b)
                identical &= bool(np.array_equal(ea, eb)) and ra.equals(rb)
        for r in runs:
            r.pop("out")
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/embed_workers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "loadavg_1min_end": round(os.getloadavg()[0], 1),
        "model": str(args.model or "shipped classifier"), "n_images": len(images), "shard_size": args.shard_size,
        "runs": runs, "shards_identical": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Distributed embedding: 1 vs 2 Lightning worker processes",
        "",
        f"Generated {result['date']} by `{result['command']}`.",
        (f"Machine: {result['cpu']} ({', '.join(result['cpu_flags'])}), {result['cpu_count']} cores; model: "
        f"{result['model']} (lung U-Net + classifier per image); {len(images)} real CXRs (per-source sample), "
        f"shards of {args.shard_size}. Wall = the whole command (Python and torch start-up, model load in every "
        "worker); predict = Lightning's predict loop. 1-min load average at the end: "
        f"{result['loadavg_1min_end']} (other jobs shared the 2 cores)."),
        "",
        "| workers | wall s | img/s (wall) | predict s | img/s (predict) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['wall_s']:.1f} | {r['img_per_s_wall']:.1f} | {r['predict_s']:.1f} | "
                     f"{r['img_per_s_predict']:.1f} |")
    lines += ["", f"Shards bit-identical across worker counts: **{identical}**.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
