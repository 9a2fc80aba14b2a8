"""``covidcxr --help`` and every ``covidcxr COMMAND [SUB] --help`` exit 0 without importing the heavy stack.

Each help runs in a fresh interpreter under ``python -X importtime``; the modules it imported are read from the
importtime report on stderr, so the check counts imports, not seconds. Commands are enumerated from the parser, so
a new command is covered without editing this file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from covidcxr.cli import build_parser

# Top-level packages that ``--help`` must not import (torch and everything built on it, plus the data stack).
HEAVY = frozenset({
    "torch", "torchvision", "torchmetrics", "lightning", "pytorch_lightning", "lightning_fabric", "timm", "monai",
    "faiss", "cv2", "sklearn", "scipy", "matplotlib", "pandas", "numpy", "PIL", "pydicom", "fastapi", "uvicorn",
    "safetensors",
})
# The command modules are loaded with importlib.import_module, which -X importtime does not report: the script
# also lists sys.modules at exit, so nothing imported that way slips through.
_SCRIPT = """
import sys
from covidcxr.cli import main
try:
    main(sys.argv[1:])
finally:
    print("sys.modules:", *sorted(sys.modules), file=sys.stderr)
"""


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of ``parser``: ``()``, ``("train",)``, ``("index",)``, ``("index", "build")``, ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


def _imported_modules(importtime_report: str) -> list[str]:
    """Module names from ``-X importtime`` lines: ``import time: self [us] | cumulative | [indent]name``."""
    names = []
    for line in importtime_report.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.append(name)
    return names


COMMANDS = _command_paths(build_parser())


def test_every_command_is_enumerated() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "train", "segment", "segment train", "index", "index build", "data synth", "demo"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda p: " ".join(p) or "covidcxr")
def test_help_is_light(command: tuple[str, ...]) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _SCRIPT, *command, "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: covidcxr"), proc.stdout[:500]
    modules = _imported_modules(proc.stderr)
    assert "covidcxr.cli" in modules  # the report was parsed
    loaded = next(line for line in proc.stderr.splitlines() if line.startswith("sys.modules:")).split()[1:]
    assert "covidcxr.cli.classify_cmd" in loaded
    heavy = sorted({m for m in (*modules, *loaded) if m.split(".")[0] in HEAVY})
    assert not heavy, f"covidcxr {' '.join(command)} --help imported {heavy}"


def test_cli_choices_match_the_library() -> None:
    """The CLI spells some choice lists itself (to stay torch-free); they must equal the library's."""
    from covidcxr.classification import config as train
    from covidcxr.cli import classify_cmd
    from covidcxr.models.registry import NORMALIZATIONS, list_architectures
    from covidcxr.vocab import INTENSITY_MODES, SEG_MODES

    assert set(classify_cmd.NORMALIZATION_CHOICES) == set(NORMALIZATIONS)
    assert set(classify_cmd.BALANCE_CHOICES) == set(train.BALANCE_MODES)
    assert set(classify_cmd.VAL_METRIC_CHOICES) == set(train.VAL_METRICS)
    assert set(classify_cmd.THRESHOLD_METHOD_CHOICES) == set(train.THRESHOLD_METHODS)
    assert set(classify_cmd.THRESHOLD_ROWS_CHOICES) == set(train.THRESHOLD_ROWS)
    train_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    choices = {a.dest: a.choices for a in train_parser._actions if a.choices}
    assert tuple(choices["seg_mode"]) == SEG_MODES and tuple(choices["intensity"]) == INTENSITY_MODES
    examples = classify_cmd.ARCH_HELP.split("e.g. ")[1].split(";")[0].split(", ")
    assert set(examples) <= set(list_architectures())
    assert train.TrainConfig().arch == "resnet50"  # the default the help text names


def test_unknown_arch_lists_the_valid_names(tmp_path, capsys) -> None:
    from covidcxr.cli import main

    assert main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--arch", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'nope'; valid:" in err and "resnet50" in err
    assert not (tmp_path / "o").exists()
