"""Images per second through a real Orthanc on loopback (``covidcxr pacs run``) vs ``covidcxr predict``, in one run.

The same ``--n`` seeded synthetic DX/CR radiographs (DICOM, ``--size`` px, MONOCHROME1 and 2) are

1. analysed by ``covidcxr predict FILES --out preds.csv`` in a fresh process (start-up, model load, decode,
   segmentation, classification: no heat map, no DICOM objects);
2. stored in a fresh local Orthanc (DICOMweb plugin, authentication on) and processed by ``covidcxr pacs run`` in a
   fresh process: QIDO-RS search, WADO-RS retrieval, the full analysis (segmentation, QC, probability, Grad-CAM),
   the SR and Secondary Capture built with highdicom, STOW-RS back into each study, the SQLite ledger;
3. the same ``pacs run`` once more (everything in the ledger: the cost of a rerun that adds nothing).

Process wall times include Python start-up and model load; the ``pacs run`` report also gives the loop time
(first study searched to last result stored), which excludes them. Writes ``benchmarks/results/pacs.json`` and
``.md``.

    python benchmarks/pacs.py --n 32 --size 512
    python benchmarks/pacs.py --n 32 --manifest ../shared/data/cxr/manifest.csv   # real CXRs, wrapped as DX DICOM
"""

from __future__ import annotations

import argparse
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

RESULTS = Path(__file__).resolve().parent / "results"


def make_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` synthetic frontal radiographs, one study each (DX/CR alternating, MONOCHROME1 every third)."""
    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.dicom import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        image, _, info = draw_cxr(rng, i % 2, size=size)
        paths.append(write_dicom(folder / f"img{i:03d}.dcm", image, photometric="MONOCHROME1" if i % 3 == 2
                                 else "MONOCHROME2", modality="CR" if i % 2 else "DX", view=info["view"],
                                 patient_id=f"BENCH{i:03d}^X", study_date="20240301"))
    return paths


def real_images(folder: Path, manifest: Path, n: int, seed: int) -> list[Path]:
    """``n`` real CXRs of the manifest (per-source sample), each written as a DX DICOM of its own study (8-bit)."""
    from _sample import sample

    from covidcxr.io.dicom import write_dicom
    from covidcxr.io.image import load_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image_path in enumerate(sample(manifest, n, seed)):
        image, meta = load_image(image_path)
        view = meta.view if meta.view in ("PA", "AP") else None
        paths.append(write_dicom(folder / f"img{i:03d}.dcm", np.round(image * 255).astype(np.uint8), bits_stored=8,
                                 modality="DX", view=view, patient_id=f"BENCH{i:03d}^X", study_date="20240301"))
    return paths


def _timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - t0, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="images (default 32)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="model artifact (default: the shipped one)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="use real CXRs of this manifest (wrapped as DX DICOM) instead of synthetic ones")
    parser.add_argument("--out", type=Path, default=RESULTS / "pacs.json")
    args = parser.parse_args()

    import pydicom
    import torch

    from covidcxr.classification.artifact import resolve_model_dir
    from covidcxr.device import available_cpus, inference_bf16
    from covidcxr.pacs.client import PacsAuth, PacsClient
    from covidcxr.pacs.orthanc import OrthancServer

    model_dir, _ = resolve_model_dir(args.model)
    load_before = os.getloadavg()
    exe = [sys.executable, "-m", "covidcxr"]
    with tempfile.TemporaryDirectory(prefix="covidcxr-bench-pacs-") as tmp:
        tmp = Path(tmp)
        paths = (real_images(tmp / "images", args.manifest, args.n, args.seed) if args.manifest is not None
                 else make_images(tmp / "images", args.n, args.size, args.seed))
        env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCXR_PACS_")}

        # Warm-up (not timed): load torch and the model once, so the first timed process does not pay for
        # reading the libraries back into the page cache after other work evicted them.
        subprocess.run([sys.executable, "-c", ("import torch, covidcxr.classification.artifact as a; "
                        "a.load_artifact(a.resolve_model_dir(None)[0], 'cpu')")], check=True, capture_output=True)
        predict_s, proc = _timed_run([*exe, "predict", *map(str, paths), "--model", str(model_dir), "--device",
                                      "cpu", "--out", str(tmp / "preds.csv")], env)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"covidcxr predict failed:\n{proc.stderr[-3000:]}")

        with OrthancServer(workdir=tmp / "orthanc") as server:
            client = PacsClient(server.dicomweb_url, PacsAuth("basic", server.user, server.password))
            t0 = time.perf_counter()
            for path in paths:
                ds = pydicom.dcmread(path)
                client.store([ds], str(ds.StudyInstanceUID))
            stow_s = time.perf_counter() - t0
            env.update(COVIDCXR_PACS_USER=server.user, COVIDCXR_PACS_PASSWORD=server.password)
            run = [*exe, "pacs", "run", "--url", server.dicomweb_url, "--model", str(model_dir), "--device", "cpu",
                   "--ledger", str(tmp / "ledger.sqlite")]
            pacs_s, proc = _timed_run([*run, "--report", str(tmp / "report.json")], env)
            if proc.returncode != 0:
                raise SystemExit(f"covidcxr pacs run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            report = json.loads((tmp / "report.json").read_text())
            rerun_s, proc = _timed_run([*run, "--report", str(tmp / "rerun.json")], env)
            rerun = json.loads((tmp / "rerun.json").read_text())
            stats = server.rest("/statistics")
            orthanc_version = server.rest("/system")["Version"]

    per_instance = [o["seconds"] for o in report["outcomes"]]
    n = args.n
    result = {
        "benchmark": "pacs",
        "images": n, "size": None if args.manifest else args.size, "seed": args.seed, "model": str(model_dir),
        "data": (f"real CXRs of {args.manifest} (per-source sample, 8-bit DX DICOM)" if args.manifest else
                 f"synthetic DX/CR radiographs of {args.size} px"),
        "predict_process_s": round(predict_s, 3), "predict_images_per_s": round(n / predict_s, 2),
        "pacs_process_s": round(pacs_s, 3), "pacs_images_per_s": round(n / pacs_s, 2),
        "pacs_loop_s": report["seconds"], "pacs_loop_images_per_s": round(n / report["seconds"], 2),
        "pacs_per_instance_median_s": round(float(np.median(per_instance)), 3),
        "pacs_per_instance_p90_s": round(float(np.quantile(per_instance, 0.9)), 3),
        "pacs_counts": {k: v for k, v in report["counts"].items() if v},
        "rerun_process_s": round(rerun_s, 3), "rerun_counts": {k: v for k, v in rerun["counts"].items() if v},
        "stow_sources_s": round(stow_s, 3),
        "orthanc": {"version": orthanc_version, "instances_after": stats["CountInstances"]},
        "ratio_pacs_to_predict": round(predict_s / pacs_s, 3),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "cpus": available_cpus(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "bf16_inference": inference_bf16("cpu"),
                    # The machine may be shared: 1-minute load averages before and after the run.
                    "load_avg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "command": "python benchmarks/pacs.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# `covidcxr pacs run` through Orthanc on loopback vs `covidcxr predict`",
        "",
        (f"Machine: {m['cpu']} ({', '.join(m['flags'])}), {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
         f"torch {m['torch']}, bf16 inference autocast {m['bf16_inference']}; Orthanc {orthanc_version} with the "
         f"DICOMweb plugin on 127.0.0.1 (basic auth); 1-minute load average {m['load_avg_1min'][0]} before, "
         f"{m['load_avg_1min'][1]} after (other work on the machine slows both measurements). "
         f"{n} {result['data']} (seed {args.seed}), one study each; model "
         f"`{Path(model_dir).name}`, device cpu."),
        "",
        "| measurement | seconds | img/s |",
        "|---|---:|---:|",
        (f"| `covidcxr predict` (new process: start-up, load, decode, segment, classify, CSV) | {predict_s:.2f} | "
         f"{n / predict_s:.2f} |"),
        (f"| `covidcxr pacs run` (new process: start-up, load, QIDO, WADO, analysis + Grad-CAM, SR + SC, STOW, "
         f"ledger) | {pacs_s:.2f} | {n / pacs_s:.2f} |"),
        (f"| `pacs run` loop only (first search to last store; start-up and load excluded) | {report['seconds']:.2f} "
         f"| {n / report['seconds']:.2f} |"),
        f"| `pacs run` again (all in the ledger: adds nothing) | {rerun_s:.2f} | - |",
        "",
        (f"Per instance in the loop: median {result['pacs_per_instance_median_s']:.3f} s, 90th percentile "
         f"{result['pacs_per_instance_p90_s']:.3f} s. Outcomes: {result['pacs_counts']}; rerun: "
         f"{result['rerun_counts']}. Storing the {n} sources over STOW-RS took {stow_s:.2f} s."),
        "",
        (f"Ratio pacs / predict (images/s, whole processes): **{predict_s / pacs_s:.2f}x**. `predict` batches the "
         "networks and computes no heat map; `pacs run` analyses one image at a time with Grad-CAM (one extra "
         "backward pass) and builds and sends two DICOM objects per image."),
        "",
        f"Command: `{result['command']}`",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
