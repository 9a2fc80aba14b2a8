"""The package layout is the architecture: imports point one way, and the torch-free layers stay torch-free.

Layers, lowest first (a module may import its own layer and the ones below, never one above)::

    errors, vocab  ->  device, io  ->  data  ->  transforms, models, evaluation, training  ->  segmentation
    ->  classification  ->  retrieval  ->  service  ->  cli, web, pacs, demo

Every import statement counts, including those inside functions (a lazy import pointing up is still a cycle in
the design). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "covidcxr"

LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "vocab": 0,
    "device": 1, "io": 1, "runtime": 1,
    "data": 2,
    "transforms": 3, "models": 3, "evaluation": 3, "training": 3,
    "segmentation": 4,
    "classification": 5,
    "retrieval": 6,
    "service": 7,
    "cli": 8, "web": 8, "pacs": 8, "demo": 8, "__main__": 8,
}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        out.append(("covidcxr." + ".".join(parts) if parts != ("__init__",) else "covidcxr", path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "covidcxr":  # from covidcxr import data, __version__
                found += [(node.lineno, f"covidcxr.{a.name}") for a in node.names if a.name != "__version__"]
            elif node.module.startswith("covidcxr."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("covidcxr.")]
    return found


def test_every_top_level_module_has_a_layer() -> None:
    tops = {_top(m) for m, _ in _modules()}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS (and docs/ARCHITECTURE.md)"


def test_imports_point_one_way() -> None:
    upward = []
    for module, path in _modules():
        own = LAYERS[_top(module)]
        for line, target in _imports(path):
            if LAYERS.get(_top(target), 99) > own:
                upward.append(f"{path.relative_to(PKG)}:{line}: {module} (layer {own}) imports {target} "
                              f"(layer {LAYERS.get(_top(target))})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_rule_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check must be able to fail: a data module importing the classifier is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from covidcxr.classification.artifact import load_artifact\n")
    assert _imports(bad) == [(2, "covidcxr.classification.artifact")]
    assert LAYERS[_top("covidcxr.classification.artifact")] > LAYERS["data"]


@pytest.mark.parametrize("module", ["covidcxr.retrieval.index", "covidcxr.retrieval.metrics", "covidcxr.evaluation.metrics",
                                    "covidcxr.evaluation.report", "covidcxr.data", "covidcxr.io", "covidcxr.vocab",
                                    "covidcxr.retrieval.archive", "covidcxr.retrieval.shards",
                                    "covidcxr.retrieval.compressed", "covidcxr.classification.input_type",
                                    "covidcxr.classification.ood"])
def test_torch_free_modules(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} imports {out}"


@pytest.mark.parametrize("pattern", ["cli/*.py", "web/app.py"])
def test_front_ends_are_thin(pattern: str) -> None:
    # The CLI and the web app call covidcxr.service: they load no model, walk no manifest and re-read no config
    # (web/toy.py builds throw-away assets for tests and benchmarks; it is not the app).
    banned = ("load_artifact(", "LungSegmenter.load(", "predict_manifest(", '/ "config.json"', "train_classifier(",
              "build_ensemble(")
    hits = [f"{path.relative_to(PKG)}:{n}: {line.strip()}"
            for path in sorted(PKG.glob(pattern))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if any(b in line for b in banned) and not line.lstrip().startswith("#")]
    assert not hits, "front end doing the service's work:\n" + "\n".join(hits)


# Training-only modules: the only ones that may import torch, Lightning, torchvision, MONAI, timm or pytorch-grad-cam.
TRAINING_MODULES = {
    "covidcxr.training", "covidcxr.demo", "covidcxr.web.toy", "covidcxr.retrieval.distributed",
    "covidcxr.transforms.augment", "covidcxr.transforms.joint",
    "covidcxr.models.classifier", "covidcxr.models.export", "covidcxr.models.pretrained", "covidcxr.models.registry",
    "covidcxr.models.unet", "covidcxr.segmentation.data", "covidcxr.segmentation.train",
    "covidcxr.classification.cache", "covidcxr.classification.export", "covidcxr.classification.module",
    "covidcxr.classification.train", "covidcxr.device",
}
# Inference modules that also hold a training-side function (saving/exporting weights): torch only inside those.
TRAINING_FUNCTIONS = {
    "covidcxr.classification.artifact": {"save_artifact"},
    "covidcxr.segmentation.weights": {"save_unet", "load_unet", "load_unet_state", "export_segmenter"},
}
TORCH_STACK = ("torch", "torchvision", "lightning", "pytorch_lightning", "monai", "timm", "pytorch_grad_cam")


def _torch_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, enclosing top-level function)`` of every torch-stack import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module]
            for name in names:
                if name.split(".")[0] in TORCH_STACK or name.startswith("safetensors.torch"):
                    found.append((child.lineno, name, func))
            inner = child.name if func is None and isinstance(child, (ast.FunctionDef, ast.ClassDef)) else func
            visit(child, inner)

    visit(tree, None)
    return found


def test_no_inference_module_imports_torch() -> None:
    # Inference, serving, PACS and search run exported networks (covidcxr.runtime): `pip install covidcxr` has no
    # torch, so not even a lazy import of it may sit on those paths.
    bad = []
    for module, path in _modules():
        if module in TRAINING_MODULES:
            continue
        allowed = TRAINING_FUNCTIONS.get(module, set())
        bad += [f"{path.relative_to(PKG)}:{line}: {module} imports {name}" + (f" in {func}" if func else "")
                for line, name, func in _torch_imports(path) if func not in allowed]
    assert not bad, "torch-stack imports in inference modules:\n" + "\n".join(bad)


def test_the_torch_rule_catches_a_lazy_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                   "def f():\n    import torch.nn\n")
    assert _torch_imports(bad) == [(5, "torch.nn", "f")]


def test_inference_runs_with_the_torch_stack_blocked(tmp_path: Path) -> None:
    # Predict and explain with the shipped model while any import of torch, Lightning, MONAI, timm, torchvision
    # or pytorch-grad-cam fails: nothing on those paths needs them.
    code = f"""
import sys
for name in {TORCH_STACK!r}:
    sys.modules[name] = None
from covidcxr.cli import main
sample = sorted(__import__("covidcxr").__path__)[0] + "/samples/hannover_c9280a30.png"
assert main(["predict", sample, "--out", {str(tmp_path / "p.csv")!r}]) == 0
assert main(["explain", sample, "--out", {str(tmp_path / "x")!r}]) == 0
assert main(["train", "--manifest", "m.csv", "--out", {str(tmp_path / "t")!r}]) == 2
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install 'covidcxr[train]'" in proc.stderr
    assert (tmp_path / "p.csv").is_file() and any((tmp_path / "x").iterdir())
