"""Training and inference speed per numeric precision and memory format, and what ``auto`` picks on this machine.

For each architecture: a training step (forward, backward, AdamW step; batch ``--train-batch``) and an inference
pass (batch ``--infer-batch``) at ``--size`` px, in float32 and bf16 autocast, with contiguous and channels-last
tensors, all in one run on the same machine. Writes ``benchmarks/results/precision.json`` and ``precision.md``.

    python benchmarks/precision.py                       # resnet18 + efficientnet_lite0 at 224 px
    python benchmarks/precision.py --archs resnet18 --size 128

On a CPU with AVX-512 the run is repeated in a child process restricted to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``: PyTorch's and oneDNN's own switches), which is how an AVX2-only machine computes:
bf16 there is emulated. Both appear side by side in one result (``--no-avx2`` skips the child run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_flags, cpu_model  # benchmarks/_machine.py

from covidcxr.device import cpu_capability, cpu_native_bf16, inference_bf16, resolve_precision
from covidcxr.models.classifier import create_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(arch: str, size: int, bf16: bool, channels_last: bool, train_batch: int, infer_batch: int,
            warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_classifier(arch, "none").to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(train_batch, 1, size, size).to(memory_format=fmt)
    y = torch.randint(0, 2, (train_batch,))

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t_train = _time(train_step, warmup, steps)
    model.eval()
    xi = torch.rand(infer_batch, 1, size, size).to(memory_format=fmt)

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(xi)

    t_infer = _time(infer, warmup, steps)
    return {"arch": arch, "size": size, "precision": "bf16" if bf16 else "fp32",
            "memory_format": "channels_last" if channels_last else "contiguous",
            "train_step_s": t_train, "train_img_s": train_batch / t_train,
            "infer_batch_s": t_infer, "infer_img_s": infer_batch / t_infer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--infer-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    p.add_argument("--no-avx2", action="store_true", help="skip the AVX2-restricted child run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    isa = "AVX2 (restricted)" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else cpu_capability()
    rows = []
    for arch in args.archs:
        for bf16 in (False, True):
            for cl in (False, True):
                r = measure(arch, args.size, bf16, cl, args.train_batch, args.infer_batch, args.warmup, args.steps)
                r["isa"] = isa
                print(f"{isa:18s} {arch:20s} {r['precision']:5s} {r['memory_format']:14s} train {r['train_img_s']:7.1f} img/s"
                      f"  infer {r['infer_img_s']:7.1f} img/s", flush=True)
                rows.append(r)
    auto = {"training": resolve_precision("auto", "cpu"), "inference_bf16": inference_bf16("cpu", "auto")}
    if args.child:
        print(json.dumps({"rows": rows, "auto_choice": auto, "torch_cpu_capability": cpu_capability(),
                          "onednn_native_bf16": cpu_native_bf16()}))
        return
    runs = [{"isa": isa, "torch_cpu_capability": cpu_capability(), "onednn_native_bf16": cpu_native_bf16(),
             "auto_choice": auto}]
    if not args.no_avx2 and cpu_capability().startswith("AVX512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        cmd = [sys.executable, __file__, "--child", "--archs", *args.archs, "--size", str(args.size),
               "--train-batch", str(args.train_batch), "--infer-batch", str(args.infer_batch),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines()[:-1]))
        child = json.loads(proc.stdout.splitlines()[-1])
        rows += child["rows"]
        runs.append({"isa": "AVX2 (restricted)", "torch_cpu_capability": child["torch_cpu_capability"],
                     "onednn_native_bf16": child["onednn_native_bf16"], "auto_choice": child["auto_choice"]})
    machine = {"cpu": cpu_model(), "flags": cpu_flags(), "torch_cpu_capability": cpu_capability(),
               "onednn_native_bf16": cpu_native_bf16(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    best = {}
    for run in runs:
        for arch in args.archs:
            mine = [r for r in rows if r["arch"] == arch and r["isa"] == run["isa"]]
            top = {k: max(mine, key=lambda r: r[f"{k}_img_s"]) for k in ("train", "infer")}
            best[f"{run['isa']} {arch}"] = {k: f"{v['precision']} {v['memory_format']}" for k, v in top.items()}
    result = {"machine": machine, "auto_choice": auto, "runs": runs, "fastest": best, "settings": vars(args) | {"out": str(args.out)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Precision and memory format: training and inference speed",
        "",
        (f"Machine: {machine['cpu']}, flags {', '.join(machine['flags']) or 'none of avx2/avx512/amx'}, torch CPU "
         f"capability {machine['torch_cpu_capability']}, oneDNN native bf16 {machine['onednn_native_bf16']}, "
         f"{machine['threads']} threads, torch {machine['torch']}."),
        *[f"- ISA {r['isa']} (oneDNN native bf16 {r['onednn_native_bf16']}): `auto` chose training "
          f"`{r['auto_choice']['training']}`, inference bf16 = {r['auto_choice']['inference_bf16']}." for r in runs],
        (f"Input {args.size} px; train batch {args.train_batch}, inference batch {args.infer_batch}; "
         f"{args.steps} timed steps after {args.warmup} warm-up. Command: `python benchmarks/precision.py "
         f"{' '.join(sys.argv[1:])}`."),
        "",
        "| ISA | arch | precision | memory format | train img/s | inference img/s |",
        "|---|---|---|---|---:|---:|",
    ]
    lines += [f"| {r['isa']} | {r['arch']} | {r['precision']} | {r['memory_format']} | {r['train_img_s']:.1f} | "
              f"{r['infer_img_s']:.1f} |" for r in rows]
    lines += ["", "Fastest per arch: " + "; ".join(f"{a}: train {b['train']}, inference {b['infer']}"
                                                   for a, b in best.items())]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
