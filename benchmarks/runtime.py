"""The inference runtime against the torch path it replaced, side by side in one run (issue 18's targets).

One command::

    python benchmarks/runtime.py --manifest ../shared/data/cxr/manifest.csv

measures, on ``--n`` real development CXRs (the shipped model's validation rows, default 200):

* ``covidcxr predict`` of one image, whole process: wall time and peak RSS (target <= 1.0 s, <= 0.4 GB), next to
  the torch path of ``--baseline-ref`` (the last commit before the ONNX runtime; its source is taken with
  ``git archive``, nothing is installed);
* ``covidcxr predict`` of all ``--n`` images, whole process (target >= 1.5x the torch path);
* in process: the manifest loop (decode, U-Net, mask post-processing, preprocessing, classifier, gate) against the
  bare ONNX U-Net + classifier forward passes on the same tensors (target >= 0.8x);
* per network, images/s at batch 16: torch float32, ONNX Runtime float32, OpenVINO float32 and bf16 (OpenVINO only
  when importable; it is not a dependency: ``pip install openvino`` for this comparison);
* parity on the ``--n`` images: ONNX path vs the torch path in float32 (the shipped model's current config in
  both): max |dP(covid)| (target <= 1e-4), label, QC-flag and gate-status differences (target 0); and the ONNX path
  run again with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (torch's switches: ONNX Runtime has no ISA
  switch, it dispatches on CPUID);
* the inference-only virtualenv (``pip install`` of the wheel without extras): ``du`` (target <= 1 GB), unless
  ``--skip-venv`` (``--venv DIR`` measures an existing one);
* ``covidcxr serve`` with the shipped model and 300 indexed cases at concurrency 8 (``benchmarks/serve_load.py``):
  p95 latency (target no worse than 0.85 s), unless ``--skip-serve``.

Results: ``benchmarks/results/runtime.json`` and ``runtime.md``, with the machine (CPU model, SIMD flags, cores) and
the load average before and after (the machine may be shared).

``--part in-process`` runs only the in-process comparison (the loop, the same loop with ``pipeline=False``, and the
bare networks, interleaved ``--in-process-repeats`` times) and writes ``results/runtime_in_process.json`` / ``.md``;
``--src DIR`` measures another source tree (e.g. the main checkout's ``src``) with the same script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from _machine import cpu_flags, cpu_model

BASELINE_REF = "457160f"  # last commit whose inference ran on torch (before issue 18)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_process(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Run a command and return its wall time in seconds; fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def timed(cmd: list[str], env: dict[str, str], cwd: Path, repeats: int) -> dict[str, Any]:
    """Median wall time of ``repeats`` runs after one warm-up run (libraries in the page cache)."""
    run_process(cmd, env, cwd)
    walls = [run_process(cmd, env, cwd) for _ in range(repeats)]
    return {"seconds": round(float(np.median(walls)), 3), "all_seconds": [round(w, 3) for w in walls]}


def peak_rss_gb(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Peak RSS of one run, from ``/usr/bin/time``-free ``wait4``."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}")
    return round(usage.ru_maxrss / 1e6, 3)


def env_for(src: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that runs the tree at ``src``. Its bytecode is cached (in a folder per tree, outside it), as pip
    compiles an installed package: a shell with ``PYTHONDONTWRITEBYTECODE`` would otherwise recompile every module of
    the tree in every timed run (~0.08 s per process here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cache = Path(tempfile.gettempdir()) / "covidcxr-runtime-pycache" / hashlib.sha256(str(src).encode()).hexdigest()[:12]
    env.update(PYTHONPATH=str(src), PYTHONPYCACHEPREFIX=str(cache), COVIDCXR_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               **(extra or {}))
    return env


# ------------------------------------------------------------------------------------------- in-process parts
IN_PROCESS = r"""
import inspect, json, sys, time
import numpy as np, pandas as pd
from covidcxr.classification.artifact import load_artifact, shipped_model_dir
from covidcxr.classification.loop import predict_manifest, decode_images
from covidcxr.device import available_cpus
from covidcxr.transforms.preprocess import segmenter_input
paths, repeats = json.loads(open(sys.argv[1]).read()), int(sys.argv[2])
art = load_artifact(shipped_model_dir(), "cpu")
seg = art.segmenter
df = pd.DataFrame({"image": paths})
predict_manifest(art, df.head(16), num_workers=available_cpus())  # warm-up
t0 = time.perf_counter(); images = decode_images(paths, available_cpus()); t_decode = time.perf_counter() - t0
xs = segmenter_input(images, seg.config)
results = seg.predict(images)
masks = [r.mask for r in results]
xc = art.preprocess_batch(images, masks, [[] for _ in images])
serial = "pipeline" in inspect.signature(predict_manifest).parameters  # a tree with the pipelined loop
import os
cpu = {}
def clock(fn, key=None):  # wall seconds; the process's CPU seconds (user + system) go to cpu[key]
    t0, c0 = time.perf_counter(), os.times(); fn(); c1 = os.times()
    if key:
        cpu.setdefault(key, []).append(c1.user - c0.user + c1.system - c0.system)
    return time.perf_counter() - t0
split = "split" in inspect.signature(seg.network.run).parameters  # a tree whose loop splits batches over sessions
runs = {"unet_s": [], "classifier_s": [], "manifest_loop_s": [], **({"manifest_loop_serial_s": []} if serial else {}),
        **({"unet_split_s": [], "classifier_split_s": []} if split else {})}
for _ in range(repeats):  # interleaved, so a neighbour's load on a shared machine hits all of them alike
    runs["unet_s"].append(clock(lambda: seg.network.run(xs, ["logits"], batch_size=16), "unet"))
    # The outputs the loop asks for: logits, embedding and the feature map its mirror check reads.
    runs["classifier_s"].append(clock(lambda: art.network.run(xc, ["logits", "embedding", "feature_map"],
                                                              batch_size=16), "classifier"))
    if split:  # the networks alone the loop's way: each batch split into parts run at once on one 1-thread session
        from covidcxr.runtime import inference_threads
        k = inference_threads()  # the loop's own split
        runs["unet_split_s"].append(clock(lambda: seg.network.run(xs, ["logits"], batch_size=16, split=k)))
        runs["classifier_split_s"].append(clock(lambda: art.network.run(
            xc, ["logits", "embedding", "feature_map"], batch_size=16, split=k)))
    runs["manifest_loop_s"].append(clock(lambda: predict_manifest(art, df, batch_size=32,
                                                                  num_workers=available_cpus()), "manifest_loop"))
    if serial:
        runs["manifest_loop_serial_s"].append(clock(lambda: predict_manifest(art, df, batch_size=32, pipeline=False,
                                                                             num_workers=available_cpus())))
out = {"n": len(paths), "repeats": repeats, "decode_s": t_decode, **{k: float(np.median(v)) for k, v in runs.items()},
       "all_seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()}}
out["bare_networks_s"] = out["unet_s"] + out["classifier_s"]
if split:
    out["bare_networks_split_s"] = out["unet_split_s"] + out["classifier_split_s"]
out["cpu_s"] = {k: round(float(np.median(v)), 2) for k, v in cpu.items()}
print(json.dumps(out))
"""

PREDICT_ROWS = r"""
import json, sys
import pandas as pd
from covidcxr.classification.artifact import load_artifact
from covidcxr.classification.loop import predict_manifest
paths, model, out = json.loads(open(sys.argv[1]).read()), sys.argv[2], sys.argv[3]
res, _ = predict_manifest(load_artifact(model, "cpu"), pd.DataFrame({"image": paths}), num_workers=2, bf16=False)
res.to_csv(out, index=False)
"""

NETWORKS = r"""
import json, sys, time
import numpy as np, torch
from covidcxr.classification.artifact import shipped_model_dir, load_artifact
from covidcxr.classification.export import load_torch_classifier
from covidcxr.segmentation.weights import load_unet, default_weights_path
from covidcxr.device import available_cpus
torch.set_num_threads(available_cpus())
reps, bs = int(sys.argv[1]), 16
art = load_artifact(shipped_model_dir(), "cpu")
seg = art.segmenter
s_c, s_u = int(art.config["input_size"]), int(seg.config["input_size"])
rng = np.random.default_rng(0)
xc, xu = rng.random((bs, 1, s_c, s_c), dtype=np.float32), rng.random((bs, 1, s_u, s_u), dtype=np.float32)
def rate(fn, x):
    fn(x)
    t0 = time.perf_counter()
    for _ in range(reps): fn(x)
    return round(reps * len(x) / (time.perf_counter() - t0), 1)
out = {}
cls = load_torch_classifier(shipped_model_dir()); unet, cfg, _ = load_unet(None)
from covidcxr.transforms.joint import normalise
with torch.inference_mode():
    out["torch_fp32"] = {"classifier": rate(lambda x: cls(torch.from_numpy(x)), xc),
                         "unet": rate(lambda x: unet(normalise(torch.from_numpy(x), cfg["normalisation"])), xu)}
out["onnxruntime_fp32"] = {"classifier": rate(lambda x: art.network.run(x, ["logits", "embedding"]), xc),
                           "unet": rate(lambda x: seg.network.run(x, ["logits"]), xu)}
try:
    import openvino as ov
except ImportError:
    ov = None
if ov is not None:
    core = ov.Core()
    for hint in ("f32", "bf16"):
        row = {}
        for name, path, x in (("classifier", art.network.path, xc), ("unet", seg.network.path, xu)):
            try:
                comp = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                          "INFERENCE_NUM_THREADS": available_cpus()})
                req = comp.create_infer_request()
                row[name] = rate(lambda x: req.infer({0: x}), x)
                row[name + "_precision"] = str(comp.get_property("INFERENCE_PRECISION_HINT"))
            except Exception as exc:
                row[name] = None; row[name + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
        out[f"openvino_{hint}"] = row
    out["openvino_version"] = ov.__version__
import onnxruntime
out["onnxruntime_version"] = onnxruntime.__version__
out["torch_version"] = torch.__version__
print(json.dumps(out))
"""


MASKS = r"""
import json, sys
import numpy as np, torch
from covidcxr.classification.artifact import load_artifact, shipped_model_dir
from covidcxr.device import available_cpus
from covidcxr.io.image import load_image
from covidcxr.segmentation.weights import load_unet
from covidcxr.transforms.joint import prepare_batch
torch.set_num_threads(available_cpus())
paths = json.loads(open(sys.argv[1]).read())
art = load_artifact(shipped_model_dir(), "cpu"); seg = art.segmenter
unet, cfg, _ = load_unet(None)
unet = unet.to(memory_format=torch.channels_last)  # as the torch path ran it
from covidcxr.classification.export import load_torch_classifier
from covidcxr.evaluation.calibration import apply_temperature
cls = load_torch_classifier(shipped_model_dir())
rows, same_input_dp = [], []
for i in range(0, len(paths), 16):
    ims = [load_image(p)[0] for p in paths[i:i + 16]]
    p_onnx = seg.predict_proba(ims)
    with torch.inference_mode():
        x = prepare_batch(ims, cfg).contiguous(memory_format=torch.channels_last)
        p_torch = torch.sigmoid(unet(x))[:, 0].numpy()
        res_o, res_t = seg.postprocess_batch(ims, p_onnx), seg.postprocess_batch(ims, p_torch)
        # The classifiers alone: torch float32 and ONNX Runtime on the very same inputs (the ONNX path's masks).
        xc = art.preprocess_batch(ims, [r.mask for r in res_o])
        lt = cls(torch.from_numpy(xc)).double().numpy()
    same_input_dp.append(np.abs(art.forward_batches(xc)[0] - apply_temperature(lt[:, 1] - lt[:, 0], art.temperature)))
    for im, ro, rt, po, pt, path in zip(ims, res_o, res_t, p_onnx, p_torch, paths[i:i + 16]):
        mo, mt = ro.mask, rt.mask
        diff = int((mo != mt).sum())
        dm = 0.0
        if diff:
            dm = float(art.forward_margins(art.preprocess_batch([im], [mo]))[0][0]
                       - art.forward_margins(art.preprocess_batch([im], [mt]))[0][0])
        rows.append({"image": path, "max_abs_dprob_256px": float(np.abs(po - pt).max()), "mask_pixels_differing": diff,
                     "pixels": int(mo.size), "margin_change_from_mask": dm})
worst = max(rows, key=lambda r: abs(r["margin_change_from_mask"]))
print(json.dumps({"n": len(rows), "images_with_a_mask_difference": sum(r["mask_pixels_differing"] > 0 for r in rows),
                  "mask_pixels_differing": sum(r["mask_pixels_differing"] for r in rows),
                  "pixels": sum(r["pixels"] for r in rows),
                  "max_abs_dprob_256px": max(r["max_abs_dprob_256px"] for r in rows),
                  "max_abs_margin_change_from_one_mask": abs(worst["margin_change_from_mask"]),
                  "worst_image": worst["image"].rsplit("/", 1)[-1],
                  "classifier_same_inputs_max_abs_dprob": float(np.concatenate(same_input_dp).max())}))
"""


def python_json(code: str, args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"in-process step failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parity(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """How far two predict_manifest tables of the same rows differ."""
    both = a.merge(b, on="image", suffixes=("_a", "_b"))
    qc_a, qc_b = (both[c].astype("string").fillna("") for c in ("qc_flags_a", "qc_flags_b"))
    return {"n": len(both), "max_abs_dprob": float(np.abs(both["prob_a"] - both["prob_b"]).max()),
            "label_flips": int((both["pred_label_a"] != both["pred_label_b"]).sum()),
            "qc_flag_differences": int((qc_a != qc_b).sum()),
            "gate_status_differences": int((both["status_a"] != both["status_b"]).sum())}


def venv_size(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    venv = args.venv
    if venv is None:
        dist = tmp / "dist"
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
                        str(dist), "-q"], check=True, cwd=tmp)
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheel = next(dist.glob("covidcxr-*.whl"))
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True)
    du = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout.split()[0]
    code = ("import importlib.util as u; "
            "print([m for m in ('torch', 'torchvision', 'lightning', 'monai', 'timm') if u.find_spec(m)])")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False)
    return {"path": str(venv), "du_mb": int(du), "training_packages_present": probe.stdout.strip(),
            "command": f"du -sm {venv}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=ROOT.parent / "shared" / "data" / "cxr" / "manifest.csv")
    p.add_argument("--n", type=int, default=200, help="development images (shipped model's validation rows)")
    p.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the torch path compared against")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the one-image predict (median)")
    p.add_argument("--network-reps", type=int, default=5, help="batches timed per network and runtime")
    p.add_argument("--venv", type=Path, default=None, help="measure this inference-only venv instead of building one")
    p.add_argument("--skip-venv", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--serve-requests", type=int, default=200, help="measured uploads per server (default 200)")
    p.add_argument("--in-process-repeats", type=int, default=3,
                   help="interleaved timed runs of the in-process loop and of the bare networks (median)")
    p.add_argument("--part", choices=("all", "in-process"), default="all",
                   help="'in-process': only the manifest loop vs the bare networks (results in runtime_in_process.*)")
    p.add_argument("--src", type=Path, default=ROOT / "src",
                   help="source tree measured as the ONNX path (default: this checkout's src)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default results/runtime.json, or runtime_in_process.json with --part)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("runtime.json" if args.part == "all" else "runtime_in_process.json")

    from covidcxr.data.manifest import read_manifest

    load_before = load_average()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="covidcxr-runtime-"))
    new_src = args.src.resolve()

    df = read_manifest(args.manifest)
    lookup = {Path(str(p)).name: str(p) for p in df["image"]}
    shipped = new_src / "covidcxr" / "weights" / "covid_classifier"
    # The shipped model's validation rows, or (a model calibrated out of fold) an even spread of its out-of-fold rows.
    if (shipped / "val_predictions.csv").is_file():
        names = pd.read_csv(shipped / "val_predictions.csv")["image"].tolist()
    else:
        names = pd.read_csv(shipped / "oof_predictions.csv")["image"].tolist()
        names = names[:: max(1, len(names) // args.n)]
    paths = [lookup[Path(str(n)).name] for n in names][: args.n]
    paths_file = tmp / "paths.json"
    paths_file.write_text(json.dumps(paths))
    one = paths[0]
    machine = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": len(os.sched_getaffinity(0)),
               "platform": platform.platform(), "load_average_before": load_before}
    command = "python benchmarks/runtime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part == "in-process":
        return in_process_only(args, paths_file, env_for(new_src), tmp, machine, command, t_start)
    base_src = tmp / "baseline"
    base_src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_ref, "src"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive, check=True)
    base_src = base_src / "src"
    result: dict[str, Any] = {
        "benchmark": "runtime",
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "baseline": {"ref": args.baseline_ref, "what": "torch path (auto precision = float32 without native bf16)"},
        "n_images": len(paths),
    }
    cli = [sys.executable, "-m", "covidcxr", "predict"]
    new_env, base_env = env_for(new_src), env_for(base_src)

    # 1. one image, whole process
    result["predict_one"] = {
        "onnx": timed([*cli, one, "--out", str(tmp / "one_new.csv")], new_env, tmp, args.repeats),
        "torch": timed([*cli, one, "--out", str(tmp / "one_base.csv")], base_env, tmp, args.repeats),
    }
    for key, env in (("onnx", new_env), ("torch", base_env)):
        result["predict_one"][key]["peak_rss_gb"] = peak_rss_gb([*cli, one, "--out", str(tmp / "rss.csv")], env, tmp)
    # 1b. one hospital-size image (the dev images are ~400 px; detector images are ~3000 px): the same dev CXR
    # enlarged to 3000 x 3600, no target
    from PIL import Image

    large = tmp / "large_3000x3600.png"
    with Image.open(one) as im:
        im.convert("L").resize((3000, 3600), Image.Resampling.BICUBIC).save(large)
    result["predict_one_large"] = {
        key: timed([*cli, str(large), "--out", str(tmp / f"large_{key}.csv")], env, tmp, args.repeats)
        for key, env in (("onnx", new_env), ("torch", base_env))}
    # 2. n images, whole process
    many = {}
    for key, env in (("onnx", new_env), ("torch", base_env)):
        many[key] = {"seconds": round(run_process([*cli, *paths, "--out", str(tmp / f"many_{key}.csv")], env, tmp), 2)}
    many["speedup"] = round(many["torch"]["seconds"] / many["onnx"]["seconds"], 2)
    result["predict_many"] = many
    # 3. in process: the manifest loop against the bare networks
    result["in_process"] = in_process(args, paths_file, new_env, tmp)
    # 4. per network and runtime
    result["networks_img_per_s"] = python_json(NETWORKS, [str(args.network_reps)], new_env, tmp)
    # 5. parity: ONNX vs torch float32 (the same, current config in both), and under the AVX2 switches
    cfg = json.loads((shipped / "config.json").read_text())
    same_cfg = tmp / "shipped_fp32"
    import shutil

    shutil.copytree(shipped, same_cfg)
    (same_cfg / "config.json").write_text(json.dumps({**cfg, "bf16_inference": False}))
    tables = {}
    for key, env in (("onnx", new_env), ("torch_fp32", base_env), ("onnx_avx2", env_for(new_src, AVX2_ENV)),
                     ("torch_fp32_avx2", env_for(base_src, AVX2_ENV))):
        out_csv = tmp / f"parity_{key}.csv"
        subprocess.run([sys.executable, "-c", PREDICT_ROWS, str(paths_file), str(same_cfg), str(out_csv)], env=env,
                       cwd=tmp, check=True, capture_output=True)
        tables[key] = pd.read_csv(out_csv)
    # Where the two differ: the U-Net's probabilities agree to ~1e-4, but a pixel at the 0.5 threshold can flip,
    # and in `mask` mode one lung pixel moves the dilated mask's edge, which the classifier sees.
    result["mask_parity"] = python_json(MASKS, [str(paths_file)], new_env, tmp)
    result["parity"] = {"onnx_vs_torch_fp32": parity(tables["onnx"], tables["torch_fp32"]),
                        "onnx_vs_onnx_avx2_env": parity(tables["onnx"], tables["onnx_avx2"]),
                        "torch_fp32_vs_torch_fp32_avx2": parity(tables["torch_fp32"], tables["torch_fp32_avx2"])}
    # 6. venv size, 7. serve
    if not args.skip_venv:
        result["venv"] = venv_size(args, tmp)
    if not args.skip_serve:
        result["serve"] = {}
        for key, env, name in (("onnx", new_env, "runtime_serve"), ("torch", base_env, "runtime_serve_torch")):
            serve_json = RESULTS / f"{name}.json"
            subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--shipped", "--index-manifest",
                            str(args.manifest), "--cases", "300", "--requests", str(args.serve_requests),
                            "--concurrency", "8", "--out", str(serve_json)], env=env, cwd=ROOT, check=True,
                           capture_output=True)
            serve = json.loads(serve_json.read_text())
            result["serve"][key] = {"file": f"benchmarks/results/{name}.md", "latency_ms": serve.get("latency_ms"),
                                    "server_ms": serve.get("server_time_ms"), "errors": serve.get("errors")}
    result["machine"]["load_average_after"] = load_average()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = targets(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from covidcxr.io.files import write_json

    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(args.out.with_suffix(".md").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def in_process(args: argparse.Namespace, paths_file: Path, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """The manifest loop against the bare U-Net + classifier on the same tensors (medians of interleaved runs)."""
    inproc = python_json(IN_PROCESS, [str(paths_file), str(args.in_process_repeats)], env, tmp)
    # Each run's loop is timed right after its bare networks, so on a shared machine the pair sees about the same
    # load: the ratio is the median of the per-run ratios.
    runs = inproc["all_seconds"]
    bare = [u + c for u, c in zip(runs["unet_s"], runs["classifier_s"], strict=True)]
    for key, loop in (("ratio", "manifest_loop_s"), ("ratio_serial", "manifest_loop_serial_s")):
        if loop in runs:
            inproc[key] = round(float(np.median([b / t for b, t in zip(bare, runs[loop], strict=True)])), 3)
    if "unet_split_s" in runs:  # against the networks run the loop's way (split into parts on a 1-thread session)
        split = [u + c for u, c in zip(runs["unet_split_s"], runs["classifier_split_s"], strict=True)]
        inproc["ratio_vs_split"] = round(float(np.median([b / t for b, t in zip(split, runs["manifest_loop_s"],
                                                                                 strict=True)])), 3)
    return inproc


def in_process_line(ip: dict[str, Any]) -> str:
    serial = (f"; the same loop with its stages one after the other (`pipeline=False`) {ip['manifest_loop_serial_s']:.2f}"
              f" s ({ip['ratio_serial']:.2f}x)" if "manifest_loop_serial_s" in ip else "")
    return (f"In process ({ip['n']} images, medians of {ip.get('repeats', 1)} interleaved runs; the ratio is the median "
            f"of the runs' bare/loop ratios): manifest loop {ip['manifest_loop_s']:.2f} s; bare networks "
            f"{ip['bare_networks_s']:.2f} s (U-Net {ip['unet_s']:.2f} s + classifier {ip['classifier_s']:.2f} s); "
            f"ratio {ip['ratio']:.2f}x{serial}; decoding alone {ip['decode_s']:.2f} s." + split_line(ip) + cpu_line(ip))


def split_line(ip: dict[str, Any]) -> str:
    if "bare_networks_split_s" not in ip:
        return ""
    return (f" The bare networks are ONNX Runtime's usual way of running them (one session, each operator spread over "
            f"the threads: what the issue measured). Run the loop's way, each batch split into parts run at once on one "
            f"single-threaded session, they take {ip['bare_networks_split_s']:.2f} s (U-Net {ip['unet_split_s']:.2f} s + classifier "
            f"{ip['classifier_split_s']:.2f} s), and the loop reaches {ip['ratio_vs_split']:.2f}x of that.")


def cpu_line(ip: dict[str, Any]) -> str:
    c = ip.get("cpu_s")
    if not c:
        return ""
    return (f" CPU seconds (user + system, medians): loop {c['manifest_loop']:.1f}, bare networks "
            f"{c['unet'] + c['classifier']:.1f} (U-Net {c['unet']:.1f} + classifier {c['classifier']:.1f}): the loop's "
            f"wall time is about its CPU time over the cores, so overlap cannot hide the work outside the networks "
            "here.")


def in_process_only(args: argparse.Namespace, paths_file: Path, env: dict[str, str], tmp: Path,
                    machine: dict[str, Any], command: str, t_start: float) -> int:
    """``--part in-process``: the in-process comparison alone, written to its own results file."""
    import shutil

    from covidcxr.io.files import write_json

    ip = in_process(args, paths_file, env, tmp)
    machine["load_average_after"] = load_average()
    src = args.src.resolve()
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True,
                           check=False).stdout.strip()
    commit += "+uncommitted changes" if dirty else ""  # the run measured the working tree, not the commit
    result = {"benchmark": "runtime_in_process", "command": command,
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine,
              "source": {"path": str(src), "commit": commit}, "in_process": ip,
              "seconds": round(time.perf_counter() - t_start, 1),
              "target": {"what": "in process vs bare U-Net + classifier", "target": ">= 0.8x",
                         "holds": ip["ratio"] >= 0.8}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    m = machine
    md = "\n".join([
        "# In process: the manifest loop vs the bare ONNX U-Net + classifier",
        "",
        (f"`{command}` on {m['cpus']} CPU cores ({m['cpu_model']}, flags {', '.join(m['cpu_flags']) or 'none'}; "
         f"{m['platform']}), {result['date']}; source `{src}` ({commit or 'no git'}); 1/5/15-min load average "
         f"{m['load_average_before']} before, {m['load_average_after']} after (a shared machine: timings are upper "
         "bounds). Networks in ONNX Runtime float32, batch 16; the loop (`predict_manifest`, chunks of 32) decodes, "
         "segments, post-processes masks, preprocesses, classifies and gates the same images."),
        "",
        "| what | measured | target | holds |",
        "|---|---:|---|:---:|",
        f"| in process vs bare U-Net + classifier | {ip['ratio']:.2f}x | >= 0.8x | {'yes' if ip['ratio'] >= 0.8 else 'NO'} |",
        "",
        in_process_line(ip),
        "",
        f"All runs (s): {json.dumps(ip['all_seconds'])}",
    ]) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    one, many, par = r["predict_one"], r["predict_many"], r["parity"]
    rows = [
        ("predict one image, whole process", f"{one['onnx']['seconds']:.2f} s", f"{one['torch']['seconds']:.2f} s",
         "<= 1.0 s", one["onnx"]["seconds"] <= 1.0),
        ("predict one image, peak RSS", f"{one['onnx']['peak_rss_gb']:.2f} GB", f"{one['torch']['peak_rss_gb']:.2f} GB",
         "<= 0.4 GB", one["onnx"]["peak_rss_gb"] <= 0.4),
        *([("predict one 3000 x 3600 image (a dev CXR enlarged), whole process",
            f"{r['predict_one_large']['onnx']['seconds']:.2f} s", f"{r['predict_one_large']['torch']['seconds']:.2f} s",
            "(no target)", None)] if "predict_one_large" in r else []),
        (f"predict {r['n_images']} images, whole process", f"{many['onnx']['seconds']:.1f} s",
         f"{many['torch']['seconds']:.1f} s", ">= 1.5x the torch path", many["speedup"] >= 1.5),
        ("in process vs bare U-Net + classifier", f"{r['in_process']['ratio']:.2f}x", "", ">= 0.8x",
         r["in_process"]["ratio"] >= 0.8),
        ("max |dP(covid)| vs torch float32", f"{par['onnx_vs_torch_fp32']['max_abs_dprob']:.1e}", "", "<= 1e-4",
         par["onnx_vs_torch_fp32"]["max_abs_dprob"] <= 1e-4),
        ("label / QC / gate differences vs torch float32",
         "{label_flips} / {qc_flag_differences} / {gate_status_differences}".format(**par["onnx_vs_torch_fp32"]),
         "", "0 / 0 / 0", par["onnx_vs_torch_fp32"]["label_flips"] == 0
         and par["onnx_vs_torch_fp32"]["qc_flag_differences"] == 0
         and par["onnx_vs_torch_fp32"]["gate_status_differences"] == 0),
        ("label flips with the AVX2 switches", str(par["onnx_vs_onnx_avx2_env"]["label_flips"]), "", "0",
         par["onnx_vs_onnx_avx2_env"]["label_flips"] == 0),
    ]
    if "venv" in r:
        rows.append(("inference-only venv (du)", f"{r['venv']['du_mb']} MB", "", "<= 1 GB (1024 MB)",
                     r["venv"]["du_mb"] <= 1024))
    if "serve" in r and r["serve"].get("onnx", {}).get("latency_ms"):
        p95 = r["serve"]["onnx"]["latency_ms"]["p95"]
        base = r["serve"].get("torch", {}).get("latency_ms", {}).get("p95")
        rows.append(("serve p95, concurrency 8, 300 cases", f"{p95 / 1000:.2f} s",
                     f"{base / 1000:.2f} s" if base else "", "<= the torch path (0.85 s on the issue's machine)",
                     base is not None and p95 <= base))
    return [{"what": w, "measured": m, "torch_path": b, "target": t, "holds": None if h is None else bool(h)}
            for w, m, b, t, h in rows]


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Inference runtime: ONNX Runtime (float32) vs the torch path",
        "",
        (f"`{r['command']}` on {m['cpus']} CPU cores ({m['cpu_model']}, flags {', '.join(m['cpu_flags']) or 'none'};"
         f" {m['platform']}), {r['date']}; 1/5/15-min load average {m['load_average_before']} before, "
         f"{m['load_average_after']} after (a shared machine: timings are upper bounds). Torch path: "
         f"`git archive {r['baseline']['ref']}`, {r['baseline']['what']}. {r['n_images']} development CXRs "
         "(the shipped model's validation rows, or an even spread of its out-of-fold rows)."),
        "",
        "| what | ONNX Runtime | torch path | target | holds |",
        "|---|---:|---:|---|:---:|",
    ]
    verdict = {True: "yes", False: "NO", None: ""}
    lines += [f"| {t['what']} | {t['measured']} | {t['torch_path']} | {t['target']} | {verdict[t['holds']]} |"
              for t in r["targets"]]
    nets = r["networks_img_per_s"]
    lines += ["", ("Images/s per network, batch 16, "
              f"{m['cpus']} threads (onnxruntime {nets.get('onnxruntime_version')}, torch {nets.get('torch_version')}"
              + (f", OpenVINO {nets['openvino_version']}" if "openvino_version" in nets else ", OpenVINO not installed")
              + "):"), "", "| runtime | classifier | U-Net |", "|---|---:|---:|"]
    for key in ("torch_fp32", "onnxruntime_fp32", "openvino_f32", "openvino_bf16"):
        if key in nets:
            row = nets[key]
            prec = row.get("classifier_precision")
            note = f" (computed in {prec.split(chr(39))[1]})" if prec and chr(39) in prec else ""
            lines.append(f"| {key}{note} | {row.get('classifier')} | {row.get('unet')} |")
    lines += ["", in_process_line(r["in_process"]), ""]
    lines += ["Parity tables (n, max |dP|, label flips, QC differences, gate differences):", ""]
    for key, v in r["parity"].items():
        lines.append(f"- {key}: {v['n']}, {v['max_abs_dprob']:.2e}, {v['label_flips']}, {v['qc_flag_differences']}, "
                     f"{v['gate_status_differences']}")
    for key, v in r.get("serve", {}).items():
        if v.get("server_ms"):
            lines += ["", (f"Serve, {key}: server-side time per request (decode to JSON) p50 {v['server_ms']['p50']:.0f} ms, "
                           f"p95 {v['server_ms']['p95']:.0f} ms; client p95 {v['latency_ms']['p95']:.0f} ms "
                           f"(`{v['file']}`).")]
    mp = r.get("mask_parity")
    if mp:
        lines += ["", (f"Where ONNX and torch float32 can still differ: the U-Net probabilities (256 px) agree within "
                       f"{mp['max_abs_dprob_256px']:.1e} (both compute the input's mean and SD in float64; with the "
                       "float32 statistics of commit 88cf88b, ONNX Runtime's in-graph sums put them 3.5e-4 apart, 3 "
                       "mask pixels flipped and P(covid) differed by up to 2.5e-3), and "
                       f"{mp['mask_pixels_differing']} of {mp['pixels']:,} full-size mask pixels "
                       f"({mp['images_with_a_mask_difference']} of {mp['n']} images) sit on the 0.5 threshold and flip; "
                       "in `mask` mode one lung pixel can move the dilated mask's edge, here changing the classifier's "
                       f"margin by up to {mp['max_abs_margin_change_from_one_mask']:.1e} ({mp['worst_image']}). " + (
                           "With identical inputs (the ONNX path's masks) the torch and ONNX classifiers agree within "
                           f"{mp['classifier_same_inputs_max_abs_dprob']:.1e} in P(covid)."
                           if "classifier_same_inputs_max_abs_dprob" in mp else
                           "With identical masks the networks agree to float rounding."))]
    if "venv" in r:
        lines += ["", (f"Inference-only venv: `{r['venv']['command']}` = {r['venv']['du_mb']} MB; training packages "
                       f"importable in it: {r['venv']['training_packages_present']}.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
