"""Load benchmark of ``covidcxr serve``: latency, errors and memory under concurrent uploads.

It starts the server as a subprocess on a free loopback port, waits for ``/healthz``, sends a few warm-up requests,
then ``--requests`` uploads of one synthetic chest X-ray at ``--concurrency`` (httpx), and reports the latency
percentiles, throughput, the error count (must be 0) and the server's resident memory (VmRSS from /proc) after the
warm-up, at its peak during the run and at the end (steady state). Results go to ``benchmarks/results/serve.json``
and ``serve.md``.

Mixed load (``--big-every N``): every N-th measured request uploads a 10,000 x 8,000 all-zeros PNG instead (a small
file that decodes to a big image: 80 MP, reduced while decoding to the server's ``--max-side``). The report then adds
the server's peak RSS against its idle RSS after the warm-up (target: peak <= 2x idle), the 503 answers (bounded
queue) and the latency of the normal requests alone. 503s are counted apart, not as errors.

Without ``--model``/``--index`` it builds a toy model and index under a temporary folder (random ResNet-18 at
``--input-size``, tiny lung U-Net, ``--cases`` synthetic cases): the service does all the real work (decode,
segment, classify, Grad-CAM, search, PNG encoding), only the weights are meaningless.

Usage::

    python benchmarks/serve_load.py                               # toy model, 200 requests at concurrency 8
    python benchmarks/serve_load.py --model out/model --index out/index --requests 500 --image some.dcm
    python benchmarks/serve_load.py --big-every 10 --out benchmarks/results/serve_mixed.json   # mixed load
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags, cpu_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model artifact (default: build a toy one)")
    p.add_argument("--index", type=Path, default=None, help="case index (default: build a toy one)")
    p.add_argument("--shipped", action="store_true",
                   help="serve the shipped classifier with an index it builds of --cases images (the first rows of "
                        "--index-manifest, else a synthetic cohort); upload a CC BY sample CXR unless --image")
    p.add_argument("--synthetic-upload", action="store_true",
                   help="with --shipped: upload the synthetic --image-size CXR instead of a CC BY sample")
    p.add_argument("--index-manifest", type=Path, default=None, help="manifest whose first --cases rows are indexed")
    p.add_argument("--image", type=Path, default=None, help="file to upload (default: synthetic PNG)")
    p.add_argument("--image-size", type=int, default=1024, help="side of the synthetic upload (default 1024)")
    p.add_argument("--input-size", type=int, default=224, help="toy model input size (default 224)")
    p.add_argument("--cases", type=int, default=200, help="toy index size (default 200)")
    p.add_argument("--requests", type=int, default=200, help="measured requests (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests first (default 4)")
    p.add_argument("-k", type=int, default=8, help="similar cases per request (default 8)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--big-every", type=int, default=0, metavar="N",
                   help="every N-th request uploads a 10,000 x 8,000 all-zeros PNG (default 0: never)")
    p.add_argument("--big-size", type=int, nargs=2, default=(10_000, 8_000), metavar=("W", "H"),
                   help="size of that big PNG (default 10000 8000)")
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json", help="JSON result (a .md is written too)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except OSError:
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.samples


def build_toy(root: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    from covidcxr.web.toy import make_toy_assets

    t0 = time.perf_counter()
    toy = make_toy_assets(root, input_size=args.input_size, n_cases=args.cases, image_size=256, seg_mode="mask")
    info = {"kind": "toy (random weights)", "arch": "resnet18", "input_size": args.input_size,
            "index_cases": args.cases, "build_seconds": round(time.perf_counter() - t0, 1)}
    return toy.model_dir, toy.index_dir, info


def build_shipped(root: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """The shipped classifier and an index of ``args.cases`` images embedded with it."""
    from covidcxr.classification.artifact import load_artifact, shipped_model_dir
    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.synth import make_cohort
    from covidcxr.retrieval.workflow import build_index

    t0 = time.perf_counter()
    if args.index_manifest is not None:
        df, source = read_manifest(args.index_manifest).head(args.cases), str(args.index_manifest)
    else:
        df, source = read_manifest(make_cohort(root / "cohort", n_patients=args.cases, size=512)), "synthetic cohort"
    model = shipped_model_dir()
    build_index(load_artifact(model, "cpu"), df, root / "index", progress=False, num_workers=2)
    cfg = json.loads((model / "config.json").read_text())
    info = {"kind": "shipped classifier", "arch": cfg["arch"], "input_size": cfg["input_size"],
            "seg_mode": cfg["seg_mode"], "index_cases": len(df), "index_source": source,
            "build_seconds": round(time.perf_counter() - t0, 1)}
    return model, root / "index", info


def make_upload(root: Path, args: argparse.Namespace) -> tuple[bytes, str]:
    if args.image is not None:
        return args.image.read_bytes(), args.image.name
    if args.shipped and not args.synthetic_upload:
        from covidcxr.demo import SAMPLES, SAMPLES_DIR

        name = min(SAMPLES)
        return (SAMPLES_DIR / name).read_bytes(), name
    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.files import save_png

    image, _, _ = draw_cxr(np.random.default_rng(0), "covid", size=args.image_size)
    path = save_png(root / "upload.png", image)
    return path.read_bytes(), "upload.png"


def make_big_upload(width: int, height: int) -> bytes:
    """An all-zeros grayscale PNG of ``width x height``: tiny file, big decoded image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def start_server(model: Path, index: Path, port: int, k: int, log_path: Path) -> subprocess.Popen:
    code = ("import sys; from covidcxr.cli import main; "
            f"sys.exit(main(['serve', '--model', {str(model)!r}, '--index', {str(index)!r}, "
            f"'--host', '127.0.0.1', '--port', '{port}', '-k', '{k}', '--device', 'cpu']))")
    log = open(log_path, "w")  # noqa: SIM115 - the server keeps writing after this function returns
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming ready")
        try:
            r = httpx.get(url + "/healthz", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


async def run_load(url: str, data: bytes, name: str, n: int, concurrency: int, timeout: float,
                   big: bytes | None = None, big_every: int = 0) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []  # normal requests answered 200
    big_latencies: list[float] = []
    errors: list[str] = []
    busy = {"normal": 0, "big": 0}  # 503 answers of the bounded queue
    server_ms: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        is_big = big is not None and big_every > 0 and i % big_every == big_every - 1
        body, fname = (big, "big.png") if is_big else (data, name)
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/api/v1/analyze", files={"file": (fname, body, "application/octet-stream")})
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            elapsed = time.perf_counter() - t0
            if r.status_code == 503:
                busy["big" if is_big else "normal"] += 1
            elif r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            elif is_big:
                big_latencies.append(elapsed)
            else:
                latencies.append(elapsed)
                server_ms.append(float(r.json()["timing_ms"]["total"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "big_latencies": big_latencies, "errors": errors, "busy": busy,
            "server_ms": server_ms, "wall": wall}


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * scale
    return {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 90, 95, 99)} | {
        "mean": round(float(arr.mean()), 1), "max": round(float(arr.max()), 1)}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lat, srv, mem = result["latency_ms"], result["server_time_ms"], result["server_rss_mb"]
    lines = [
        "# Serve load benchmark",
        "",
        (f"`{result['command']}` on {result['machine']['cpus']} CPU cores ({result['machine'].get('cpu_model')}, "
        f"flags {', '.join(result['machine'].get('cpu_flags') or [])}; {result['machine']['platform']}), "
        f"{result['date']}; 1-min load average {result['machine']['loadavg_1min_before']} before, "
        f"{result['machine']['loadavg_1min_after']} after."),
        "",
        (f"Model: {result['model']['kind']} {result['model'].get('arch', '')}, "
        f"input {result['model'].get('input_size', '?')} px; index: {result['index_cases']} cases; "
        f"upload: {result['upload']['name']} ({result['upload']['bytes'] / 1e6:.2f} MB); k = {result['k']}."),
        "",
        "| requests | concurrency | errors | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| {result['requests']} | {result['concurrency']} | {result['errors']} | {result['throughput_rps']} | "
        f"{lat.get('p50')} | {lat.get('p95')} | {lat.get('p99')} | {lat.get('max')} |"),
        "",
        (f"Server-side time per request (decode to JSON, excluding queueing): p50 {srv.get('p50')} ms, "
        f"p95 {srv.get('p95')} ms. Client latency includes waiting for a free worker: requests are analysed one "
        "at a time under the model lock, so at concurrency c the latency is about c x the service time."),
        "",
        (f"Server memory (RSS): {mem['after_warmup']:.0f} MiB after warm-up, peak {mem['peak']:.0f} MiB during the "
        f"run, {mem['end']:.0f} MiB at the end (steady state; growth over the run {mem['growth']:+.0f} MiB)."),
        "",
    ]
    mixed = result.get("mixed")
    if mixed:
        lines += [
            "## Mixed load",
            "",
            (f"Every {mixed['big_every']}th request ({mixed['big_requests']} of {result['requests']}) uploaded a "
             f"{mixed['big_size'][0]:,} x {mixed['big_size'][1]:,} all-zeros PNG ({mixed['big_bytes'] / 1e3:.0f} kB "
             "file; decoded at the server's max side)."),
            "",
            ("| idle RSS after warm-up (MiB) | peak RSS (MiB) | peak / idle | target <= 2x | 503 (normal / big) | "
             "normal p50 (ms) | normal p95 (ms) | big p50 (ms) |"),
            "|---:|---:|---:|:---:|---:|---:|---:|---:|",
            (f"| {mem['after_warmup']:.0f} | {mem['peak']:.0f} | {mixed['peak_over_idle']:.2f} | "
             f"{'met' if mixed['target_met'] else 'MISSED'} | {mixed['busy_503']['normal']} / "
             f"{mixed['busy_503']['big']} | {lat.get('p50')} | {lat.get('p95')} | "
             f"{mixed['big_latency_ms'].get('p50')} |"),
            "",
            "The latency table above counts the normal requests only.",
            "",
        ]
    if result["error_samples"]:
        lines += ["Errors (first few):", ""] + [f"- `{e}`" for e in result["error_samples"]] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine inflates the latencies: record it
    with tempfile.TemporaryDirectory(prefix="covidcxr-serve-load-") as tmp:
        root = Path(tmp)
        if (args.model is None) != (args.index is None):
            raise SystemExit("give both --model and --index, or neither (a toy model and index are built)")
        if args.shipped:
            model, index, model_info = build_shipped(root / "shipped", args)
        elif args.model is None:
            model, index, model_info = build_toy(root / "toy", args)
        else:
            model, index = args.model, args.index
            cfg = json.loads((model / "config.json").read_text())
            model_info = {"kind": cfg.get("kind", "classifier"), "arch": cfg.get("arch"),
                          "input_size": cfg.get("input_size")}
        data, name = make_upload(root, args)
        big = make_big_upload(*args.big_size) if args.big_every > 0 else None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, index, port, args.k, root / "server.log")
        try:
            t0 = time.perf_counter()
            health = wait_ready(url, proc)
            startup = time.perf_counter() - t0
            rss_start = rss_mb(proc.pid)
            warm = asyncio.run(run_load(url, data, name, args.warmup, 1, args.timeout))
            if warm["errors"]:
                raise RuntimeError(f"warm-up failed: {warm['errors'][:3]}")
            rss_warm = rss_mb(proc.pid)
            sampler = RssSampler(proc.pid)
            sampler.start()
            run = asyncio.run(run_load(url, data, name, args.requests, args.concurrency, args.timeout,
                                       big=big, big_every=args.big_every))
            samples = sampler.stop()
            time.sleep(1.0)
            rss_end = rss_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        server_log = (root / "server.log").read_text()[-2000:]

    result = {
        "benchmark": "serve_load",
        "command": " ".join(["python benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1min_before": load_before, "loadavg_1min_after": round(os.getloadavg()[0], 2)},
        "model": model_info | {"version": health["model"]},
        "index_cases": health["index_cases"],
        "k": args.k,
        "upload": {"name": name, "bytes": len(data)},
        "server_startup_s": round(startup, 1),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "errors": len(run["errors"]),
        "error_samples": run["errors"][:5],
        "wall_s": round(run["wall"], 2),
        "throughput_rps": round(len(run["latencies"]) / run["wall"], 2) if run["wall"] > 0 else None,
        "latency_ms": percentiles(run["latencies"]),
        "server_time_ms": percentiles(run["server_ms"], scale=1.0),
        "server_rss_mb": {
            "start": round(rss_start, 1),
            "after_warmup": round(rss_warm, 1),
            "peak": round(max(samples, default=rss_end), 1),
            "end": round(rss_end, 1),
            "growth": round(rss_end - rss_warm, 1),
        },
    }
    if big is not None:
        peak = result["server_rss_mb"]["peak"]
        ratio = peak / rss_warm if rss_warm > 0 else float("nan")
        result["mixed"] = {
            "big_every": args.big_every, "big_size": list(args.big_size), "big_bytes": len(big),
            "big_requests": sum(1 for i in range(args.requests) if i % args.big_every == args.big_every - 1),
            "peak_over_idle": round(ratio, 3), "target": "peak <= 2x idle (after warm-up)",
            "target_met": bool(ratio <= 2.0), "busy_503": run["busy"],
            "big_latency_ms": percentiles(run["big_latencies"]),
        }
    result["busy_503"] = sum(run["busy"].values())
    if run["errors"]:
        result["server_log_tail"] = server_log
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out.with_suffix(".md"))
    print(json.dumps({k: result[k] for k in ("requests", "concurrency", "errors", "busy_503", "throughput_rps",
                                              "latency_ms", "server_rss_mb", "mixed") if k in result}, indent=2))
    return 0 if not run["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
