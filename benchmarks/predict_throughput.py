"""Whole-process speed of ``covidcxr predict`` against the bare networks' forward passes, in one run.

Three measurements on the same ``--n`` real images (seeded sample of the manifest, every source):

1. **End to end, as a user runs it**: ``covidcxr predict IMG ... --out preds.csv`` in a fresh process (Python
   start-up, model load, decode, lung segmentation, preprocessing, classification, CSV). Wall time.
2. **The same work in-process, stage by stage** (decode, segmenter forward, mask post-processing + QC,
   classifier preprocessing, classifier forward), with the model already loaded: where the time goes.
3. **Bare forward passes** on the already preprocessed tensors (classifier alone; lung U-Net alone), same
   batch size, precision and memory format as the product uses.

Writes ``benchmarks/results/predict_throughput.json`` and ``.md``.

    python benchmarks/predict_throughput.py --manifest ../shared/data/cxr/manifest.csv      # shipped model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model  # benchmarks/_machine.py

RESULTS = Path(__file__).resolve().parent / "results"


def sample(manifest: Path, n: int, seed: int) -> list[str]:
    from covidcxr.data.manifest import read_manifest

    df = read_manifest(manifest)
    per = max(1, n // df["source"].nunique())
    parts = [g.sample(min(len(g), per), random_state=seed) for _, g in df.groupby("source")]
    picked = pd.concat(parts)
    if len(picked) < n:
        picked = pd.concat([picked, df.drop(picked.index).sample(n - len(picked), random_state=seed)])
    return picked["image"].astype(str).head(n).tolist()


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def stages(model_dir: Path, paths: list[str], batch_size: int) -> dict:
    """Stage timings of the predict path with the model loaded, plus bare forward passes."""
    from covidcxr.classification.artifact import load_artifact
    from covidcxr.classification.loop import decode_images

    art = load_artifact(model_dir, "cpu")
    seg = art.segmenter
    art.predict(decode_images(paths[:batch_size], 1), batch_size=batch_size)  # warm-up (oneDNN primitives)
    images, t_decode = _timed(decode_images, paths, 1)
    probs, t_seg_fwd = _timed(seg.predict_proba, images)
    results, t_post = _timed(lambda: [seg._result(im, p) for im, p in zip(images, probs)])
    masks, qc = [r.mask for r in results], [list(r.qc_flags) for r in results]

    def prep() -> torch.Tensor:
        return art.preprocess_batch(images, masks, qc)

    x, t_prep = _timed(prep)
    _, t_cls = _timed(art.forward_batches, x, batch_size=batch_size)
    # The same whole call a user's predict makes (decoded images in, probabilities out).
    _, t_predict = _timed(art.predict, images, batch_size=batch_size)

    # Bare forward passes: the networks alone on ready tensors, same batch size / precision / memory format.
    model = art.model
    use_bf16 = isinstance(art.autocast(), torch.autocast)

    def bare_cls() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size].contiguous(memory_format=art.memory_format))

    from covidcxr.transforms.joint import prepare_batch

    xs = prepare_batch(images, seg.config).contiguous(memory_format=seg.memory_format)

    def bare_seg() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=seg.precision == "bf16"):
            for s in range(0, len(xs), seg.batch_size):
                seg.model(xs[s : s + seg.batch_size])

    bare_cls()
    _, t_bare_cls = _timed(bare_cls)
    bare_seg()
    _, t_bare_seg = _timed(bare_seg)
    n = len(paths)
    return {
        "n": n, "batch_size": batch_size, "classifier_bf16": use_bf16, "segmenter_precision": seg.precision,
        "seconds": {"decode": t_decode, "segmenter_forward": t_seg_fwd, "mask_postprocess_qc": t_post,
                    "classifier_preprocess": t_prep, "classifier_forward": t_cls, "predict_call": t_predict,
                    "bare_classifier_forward": t_bare_cls, "bare_segmenter_forward": t_bare_seg},
        "img_per_s": {"bare_classifier_forward": n / t_bare_cls, "bare_segmenter_forward": n / t_bare_seg,
                      "bare_both_forward": n / (t_bare_cls + t_bare_seg),
                      "in_process_decode_to_prob": n / (t_decode + t_predict)},
    }


def end_to_end(model_dir: Path, paths: list[str], batch_size: int) -> dict:
    exe = Path(sys.executable).with_name("covidcxr")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "preds.csv"
        cmd = [str(exe), "predict", *paths, "--model", str(model_dir), "--out", str(out),
               "--batch-size", str(batch_size)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"covidcxr predict failed ({proc.returncode}): {proc.stderr[-2000:]}")
        rows = len(pd.read_csv(out))
    # Start-up alone (import + model load, no image), to separate the fixed cost from the per-image one.
    probe = [str(exe), "predict", paths[0], "--model", str(model_dir)]
    t0 = time.perf_counter()
    subprocess.run(probe, capture_output=True, text=True, check=True)
    one = time.perf_counter() - t0
    return {"command": "covidcxr predict <N images> --model M --out preds.csv --batch-size B", "wall_s": wall,
            "rows": rows, "img_per_s": len(paths) / wall, "one_image_wall_s": one,
            "img_per_s_excluding_startup": (len(paths) - 1) / max(1e-9, wall - one)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    p.add_argument("--model", type=Path, default=None, help="model artifact (default: the shipped classifier)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "predict_throughput.json")
    args = p.parse_args(argv)
    from covidcxr.classification.artifact import resolve_model_dir

    model_dir, _ = resolve_model_dir(args.model)
    paths = sample(args.manifest, args.n, args.seed)
    e2e = end_to_end(model_dir, paths, args.batch_size)
    st = stages(model_dir, paths, args.batch_size)
    bare = st["img_per_s"]
    result = {
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": str(model_dir), "n_images": len(paths), "end_to_end": e2e, "stages": st,
        "ratio_end_to_end_vs_bare_classifier": e2e["img_per_s"] / bare["bare_classifier_forward"],
        "ratio_end_to_end_vs_bare_segmenter_plus_classifier": e2e["img_per_s"] / bare["bare_both_forward"],
        "ratio_in_process_vs_bare_segmenter_plus_classifier": bare["in_process_decode_to_prob"]
        / bare["bare_both_forward"],
        "command": " ".join(["python benchmarks/predict_throughput.py", *(argv or sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sec = st["seconds"]
    m = result["machine"]
    lines = [
        "# `covidcxr predict` end to end vs the bare networks",
        "",
        (f"Machine: {m['cpu']} ({', '.join(m['flags'])}), {m['threads']} torch threads, torch {m['torch']}. "
        f"Model `{model_dir.name}`, {len(paths)} real dev images (all sources), batch {args.batch_size}; classifier "
        f"bf16 autocast = {st['classifier_bf16']}, segmenter {st['segmenter_precision']}, channels-last."),
        "",
        "| measurement | seconds | img/s |",
        "|---|---:|---:|",
        (f"| `covidcxr predict` end to end (new process: start-up, load, decode, segment, classify, CSV) | "
        f"{e2e['wall_s']:.2f} | {e2e['img_per_s']:.1f} |"),
        (f"| same, start-up excluded (one-image run subtracted: {e2e['one_image_wall_s']:.2f} s) | "
        f"{e2e['wall_s'] - e2e['one_image_wall_s']:.2f} | {e2e['img_per_s_excluding_startup']:.1f} |"),
        (f"| in process: decode + predict call | {sec['decode'] + sec['predict_call']:.2f} | "
        f"{bare['in_process_decode_to_prob']:.1f} |"),
        (f"| bare classifier forward (preprocessed tensors) | {sec['bare_classifier_forward']:.2f} | "
        f"{bare['bare_classifier_forward']:.1f} |"),
        (f"| bare lung U-Net forward (preprocessed tensors) | {sec['bare_segmenter_forward']:.2f} | "
        f"{bare['bare_segmenter_forward']:.1f} |"),
        (f"| bare U-Net + classifier forward | {sec['bare_classifier_forward'] + sec['bare_segmenter_forward']:.2f} | "
        f"{bare['bare_both_forward']:.1f} |"),
        "",
        "Where the in-process time goes: " + ", ".join(
            f"{k.replace('_', ' ')} {sec[k]:.2f} s" for k in ("decode", "segmenter_forward", "mask_postprocess_qc",
                                                              "classifier_preprocess", "classifier_forward")) + ".",
        "",
        (f"Ratios: end to end / bare classifier = **{result['ratio_end_to_end_vs_bare_classifier']:.2f}x**; end to end"
        f" / bare (U-Net + classifier) = **{result['ratio_end_to_end_vs_bare_segmenter_plus_classifier']:.2f}x**; "
        f"in process / bare (U-Net + classifier) = {result['ratio_in_process_vs_bare_segmenter_plus_classifier']:.2f}x."),
        "",
        f"Command: `{result['command']}`",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
