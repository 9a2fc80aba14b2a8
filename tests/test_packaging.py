"""The built wheel: it holds every module and data file git tracks, and a non-editable install of it predicts.

A copy of the files git would commit (tracked, plus untracked ones that ``.gitignore`` does not exclude, i.e. what
``git add -A`` would take) is built, so the working tree gets no ``build/`` or ``*.egg-info`` and a fresh clone of
that tree is proven to build. The wheel's contents are compared with that file list, and the wheel is installed with
``pip --target`` into a temporary folder whose ``covidcxr`` (not the editable ``src/``) imports every module and
runs ``python -m covidcxr predict`` with the shipped classifier.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG_PREFIX = "src/covidcxr/"
# Files outside src/ that the build reads (pyproject's readme, and whatever else a clean clone would hold).
BUILD_INPUTS = ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "LICENSE.txt", "setup.py", "setup.cfg")


def _source_files() -> list[str]:
    """Files (repo-relative POSIX paths) git tracks or would add (not ignored) that exist; skips without git.

    Untracked, non-ignored files count: a module created but not yet committed is part of the next commit, and a
    build of tracked files only would be missing it. A tracked file deleted in the working tree does not count.
    """
    if shutil.which("git") is None:
        pytest.skip("git is not available: the wheel is checked against `git ls-files`")
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"`git ls-files` failed here ({exc}); not a git checkout?")
    files = sorted({f for f in out.decode().split("\0") if f})
    if not any(f.startswith(PKG_PREFIX) for f in files):
        pytest.skip(f"git knows no file under {PKG_PREFIX} (not this repository's checkout?)")
    return [f for f in files if (REPO / f).is_file()]


# Run in the installed package's interpreter: covidcxr's __path__ and __file__, the shipped model folder, then the
# __file__ of every submodule (all imported, so a module importing one the wheel lacks fails here).
_PROBE = """
import importlib, pkgutil, covidcxr
from covidcxr.classification.artifact import shipped_model_dir
names = [m.name for m in pkgutil.walk_packages(covidcxr.__path__, "covidcxr.") if not m.name.endswith(".__main__")]
mods = [importlib.import_module(n) for n in names]
print(*covidcxr.__path__, covidcxr.__file__, shipped_model_dir(), sep="\\n")
print(*(m.__file__ for m in mods), sep="\\n")
"""


def _require_build_tools() -> None:
    """Skip unless pip and a setuptools that can write wheels are importable by this interpreter."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not installed for {sys.executable}")
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed (needed by --no-build-isolation)")
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    # setuptools >= 70.1 ships bdist_wheel itself; older ones need the `wheel` package.
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {version} needs the `wheel` package to build wheels")


def _run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_INDEX="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
def test_wheel_ships_all_files_and_installed_cli_predicts(tmp_path: Path) -> None:
    _require_build_tools()
    tracked = _source_files()

    # --- 1. build the wheel from a copy of the source (the repo stays clean) ------------------------------------
    src_copy = tmp_path / "checkout"
    for rel in tracked:
        if rel.startswith("src/") or rel in BUILD_INPUTS:
            dest = src_copy / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist)], cwd=src_copy, env=_pip_env(), timeout=600)
    wheels = list(dist.glob("covidcxr-*.whl"))
    assert len(wheels) == 1, f"expected one covidcxr wheel in {dist}: {sorted(p.name for p in dist.iterdir())}"
    wheel = wheels[0]

    # --- 2. the wheel holds every git module and data file at its package path -----------------------------
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        bad = zf.testzip()
    assert bad is None, f"corrupt member in {wheel.name}: {bad}"
    expected = {rel[len("src/"):] for rel in tracked if rel.startswith(PKG_PREFIX)}
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks {len(missing)} tracked file(s): {missing}"
    data_files = {n for n in expected if not n.endswith(".py")}
    for needed in ("covidcxr/weights/lung_unet.safetensors", "covidcxr/weights/covid_classifier/model.safetensors",
                   "covidcxr/weights/covid_classifier/config.json", "covidcxr/web/static/index.html",
                   "covidcxr/weights/input_type.npz", "covidcxr/weights/input_type.json"):
        assert needed in data_files, f"{needed} is not tracked by git any more"
    # Every folder holding modules is a regular package (a forgotten __init__.py would become a namespace package).
    py_dirs = {str(PurePosixPath(n).parent) for n in names if n.startswith("covidcxr/") and n.endswith(".py")}
    no_init = sorted(d for d in py_dirs if f"{d}/__init__.py" not in names)
    assert not no_init, f"modules outside a regular package (no __init__.py) in the wheel: {no_init}"
    subpackages = {d for d in py_dirs if d.count("/") == 1}
    for sub in ("io", "data", "transforms", "models", "evaluation", "segmentation", "classification", "retrieval",
                "service", "web", "cli"):
        assert f"covidcxr/{sub}" in subpackages, f"sub-package covidcxr.{sub} is not in {wheel.name}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], "compiled files in the wheel"
    top_level = {n.split("/", 1)[0] for n in names}
    assert all(t == "covidcxr" or t.endswith(".dist-info") for t in top_level), (
        f"unexpected top-level entries in the wheel: {sorted(top_level)}")
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "covidcxr = covidcxr.cli:main" in entry_points

    # --- 3. a non-editable install of the wheel runs `python -m covidcxr predict` with the shipped model --------
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
          str(wheel)], cwd=tmp_path, env=_pip_env(), timeout=300)

    import numpy as np

    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.files import save_png

    work = tmp_path / "work"  # cwd outside the repository: '' on sys.path must not find src/
    work.mkdir()
    image = save_png(work / "synthetic_covid.png", draw_cxr(np.random.default_rng(0), "covid", size=256)[0])

    env = _pip_env()
    env.update(PYTHONPATH=str(site), COVIDCXR_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    # PYTHONPATH precedes site-packages and the editable install's .pth entry, and covidcxr is a regular package,
    # so once the installed covidcxr is imported none of its submodules or data can come from src/. Check it.
    # Importing every module also catches one that imports a module the wheel lacks.
    probe = _run([sys.executable, "-c", _PROBE], cwd=work, env=env, timeout=300)
    site_resolved = site.resolve()
    loaded = probe.stdout.splitlines()
    imported = {Path(f).resolve().relative_to(site_resolved).as_posix() for f in loaded[1:2] + loaded[3:]}
    wheel_modules = {n for n in names if n.endswith(".py") and not n.endswith("/__main__.py")}
    assert imported == wheel_modules, (
        f"imported modules differ from the wheel's: not imported {sorted(wheel_modules - imported)}, "
        f"extra {sorted(imported - wheel_modules)}")
    for line in loaded:
        assert Path(line).resolve().is_relative_to(site_resolved), (
            f"the subprocess imported covidcxr from {line}, not from the installed wheel in {site}")

    out_csv = work / "predictions.csv"
    proc = _run([sys.executable, "-m", "covidcxr", "predict", str(image), "--device", "cpu", "--out", str(out_csv)],
                cwd=work, env=env, timeout=600)
    assert "P(covid)" in proc.stdout, proc.stdout
    shipped = [str(root / "covidcxr" / "weights" / "covid_classifier") for root in (site, site_resolved)]
    assert any(s in proc.stderr for s in shipped), (
        f"predict did not use the wheel's shipped classifier:\n{proc.stderr}")
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["image"] == str(image)
    assert 0.0 <= float(rows[0]["prob_covid"]) <= 1.0
    assert rows[0]["label"] in ("covid", "non_covid")
    assert f"{float(rows[0]['prob_covid']):.4f}" in proc.stdout


# --------------------------------------------------------------------------------- install without the [train] extra
_TORCH_STACK = ("torch", "torchvision", "lightning", "pytorch_lightning", "monai", "timm", "pytorch_grad_cam",
                "triton", "nvidia")


def _dependency_closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions a requirement list needs (markers evaluated, extras not taken)."""
    from packaging.requirements import Requirement

    todo, found = list(requirements), {}
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed here; the closure cannot be assembled offline")
        found[key] = dist
        todo += dist.requires or []
    return found


def _link_distributions(dists: dict[str, importlib.metadata.Distribution], dest: Path) -> None:
    """Symlink each distribution's top-level entries (packages, modules, .libs, .dist-info) into ``dest``."""
    dest.mkdir(parents=True)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            src = root / top
            if src.exists() and not (dest / top).exists() and top not in ("bin", "__pycache__"):
                (dest / top).symlink_to(src)


@pytest.mark.slow
def test_wheel_without_extras_predicts_explains_and_serves(tmp_path: Path) -> None:
    """A fresh venv holding the wheel and only its declared (non-extra) dependencies: no torch, Lightning, MONAI,
    timm or torchvision. ``predict``, ``explain`` and ``serve`` run there on a shipped sample with the shipped model.

    Offline by construction: the dependencies are the distributions already installed for this interpreter, linked
    into the venv by the wheel's own ``Requires-Dist`` closure (a registry install needs the network).
    """
    _require_build_tools()
    tracked = _source_files()
    src_copy = tmp_path / "checkout"
    for rel in tracked:
        if rel.startswith("src/") or rel in BUILD_INPUTS:
            (src_copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src_copy / rel)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(dist)], cwd=src_copy, env=_pip_env(), timeout=600)
    wheel = next(dist.glob("covidcxr-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert "onnxruntime" in " ".join(core)
    names = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in core}
    assert not names & {"torch", "torchvision", "lightning", "monai", "timm", "grad-cam"}, names
    closure = _dependency_closure(core)
    assert not set(closure) & {"torch", "torchvision", "lightning", "monai", "timm"}, sorted(closure)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=_pip_env(), timeout=120)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path,
                     env=_pip_env(), timeout=60).stdout.strip())
    deps = tmp_path / "deps"
    _link_distributions(closure, deps)
    (site / "covidcxr_deps.pth").write_text(f"{deps}\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
          str(wheel)], cwd=tmp_path, env=_pip_env(), timeout=300)

    env = _pip_env()
    env.update(COVIDCXR_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    work = tmp_path / "work"
    work.mkdir()
    code = (f"import importlib.util as u, covidcxr; print(covidcxr.__file__); "
            f"print([m for m in {_TORCH_STACK!r} if u.find_spec(m)])")
    probe = _run([str(py), "-c", code], cwd=work, env=env, timeout=120)
    file_line, torch_line = probe.stdout.splitlines()[-2:]
    assert Path(file_line).resolve().is_relative_to(site.resolve()) and torch_line == "[]", probe.stdout
    sample = site / "covidcxr" / "samples" / "hannover_c9280a30.png"
    cli = [str(py), "-m", "covidcxr"]
    proc = _run([*cli, "predict", str(sample), "--out", str(work / "p.csv")], cwd=work, env=env, timeout=300)
    assert "P(covid)" in proc.stdout and str(site / "covidcxr" / "weights" / "covid_classifier") in proc.stderr
    with (work / "p.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["label"] in ("covid", "non_covid") and 0.0 <= float(row["prob_covid"]) <= 1.0
    _run([*cli, "explain", str(sample), "--out", str(work / "explain")], cwd=work, env=env, timeout=300)
    assert any(p.name.endswith("_gradcam_overlay.png") for p in (work / "explain").iterdir())
    # serve: an index of the shipped samples, then one upload analysed over HTTP on the loopback interface.
    samples = sorted((site / "covidcxr" / "samples").glob("*.png"))
    rows = ["image,patient_id,label"] + [f"{p},{p.stem},{('covid', 'non_covid')[i % 2]}" for i, p in enumerate(samples)]
    (work / "m.csv").write_text("\n".join(rows) + "\n")
    _run([*cli, "index", "build", "--manifest", str(work / "m.csv"), "--split", "all", "--out", str(work / "idx")],
         cwd=work, env=env, timeout=300)
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*cli, "serve", "--index", str(work / "idx"), "--port", str(port), "-k", "2"], cwd=work,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.5)
        r = httpx.post(url + "/api/v1/analyze", files={"file": (sample.name, sample.read_bytes(), "image/png")},
                       timeout=120)
        assert r.status_code == 200, r.text[:2000]
        body = r.json()
        assert body["status"] == "ok" and 0.0 <= body["probability"] <= 1.0, body
    finally:
        server.terminate()
        server.wait(timeout=30)
