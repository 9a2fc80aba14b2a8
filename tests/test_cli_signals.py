"""Interrupted training through the CLI, and its log output.

SIGTERM / SIGINT during ``covidcxr train`` or ``covidcxr segment train`` stop after the current step, save a
resumable ``checkpoints/last.ckpt`` and exit 128 + signal (143 / 130); ``--resume`` continues from it. Every log
line of a training run appears once (Lightning's records went through its own handler and ours), without
Lightning's advertising tips or its known deprecation warnings.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

# Printed by Lightning at the start of ``fit``, after our signal handlers are installed and before the first step.
FIT_STARTED = "Loading `train_dataloader` to estimate number of stepping batches"
CLASSIFIER = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--no-progress"]
SEGMENTER = ["--input-size", "32", "--channels", "4,8,16", "--batch-size", "4", "--num-workers", "0",
             "--accelerator", "cpu", "--precision", "32-true", "--no-progress", "--no-eval"]
_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)( [\w.]+)?: (.*)$")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 2 shared cores: no thread thrash


def _covidcxr(*args: str) -> list[str]:
    return [sys.executable, "-m", "covidcxr", "-v", *args]


def _default_signals() -> None:
    """In the child before exec: default dispositions and no blocked signals, whatever the test runner inherited.

    The product rightly keeps an inherited SIG_IGN (a background job, ``nohup``); the scenario under test is a user
    pressing Ctrl-C in an ordinary shell, so the child must not inherit the caller's ignored SIGINT.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, preexec_fn=_default_signals, **kwargs)  # noqa: PLW1509 (no threads start it)


@pytest.fixture(params=["parent_default", "parent_ignores_sigint"])
def parent_sigint(request: pytest.FixtureRequest):
    """Run a test from a process with the default SIGINT handling, and again from one that ignores SIGINT."""
    before = signal.getsignal(signal.SIGINT)
    if request.param == "parent_ignores_sigint":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield request.param
    finally:
        signal.signal(signal.SIGINT, before)


def _interrupt(args: list[str], log: Path, signum: int) -> tuple[int, str]:
    """Run ``covidcxr -v ARGS``, send ``signum`` once ``fit`` has started; return the exit code and stderr."""
    with log.open("w") as err:
        proc = _popen(_covidcxr(*args), stdout=subprocess.DEVNULL, stderr=err, env=_env())
    try:
        deadline = time.monotonic() + 120  # a guard against a hung run, not a measurement
        while FIT_STARTED not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be interrupted:\n{log.read_text()[-3000:]}"
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text()


def assert_clean_log(stderr: str) -> None:
    """Each log record once, no Lightning tips, no known deprecation noise."""
    prefixes: dict[str, set[str]] = defaultdict(set)
    for line in stderr.splitlines():
        match = _LOG_LINE.match(line)
        if match:
            prefixes[match[3]].add(match[1] + (match[2] or ""))
    twice = {message: p for message, p in prefixes.items() if len(p) > 1}
    assert not twice, f"log records printed by two handlers: {twice}"
    assert not re.search(r"^INFO: ", stderr, re.MULTILINE), "Lightning's own handler still prints"
    assert sum("GPU available" in line for line in stderr.splitlines()) == 1
    for noise in ("Tip:", "litlogger", "litmodels", "LeafSpec", "exists and is not empty", "weights_only",
                  "resuming from a checkpoint that ended before the epoch ended"):
        assert noise not in stderr, f"{noise!r} in the log:\n{stderr[-3000:]}"


def _global_step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_143_and_resume_continues(synth_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    train = ["train", "--manifest", str(synth_cohort), "--out", str(out), *CLASSIFIER]
    rc, stderr = _interrupt([*train, "--epochs", "50"], tmp_path / "train.log", signal.SIGTERM)
    assert rc == 143, stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert "interrupted by SIGTERM" in stderr and "--resume" in stderr
    assert _global_step(last) < 50 * 4  # saved where it stopped, far from the end
    assert not (out / "config.json").exists()  # no artifact from a stopped run
    assert_clean_log(stderr)

    resumed = subprocess.run(_covidcxr(*train, "--epochs", "2", "--resume"), capture_output=True, text=True,
                             env=_env(), timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr
    assert (out / "config.json").is_file() and "model artifact" in resumed.stdout
    assert_clean_log(resumed.stderr)
    history = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(history) > 2 and not (out / "logs" / "version_0" / "metrics.before_resume.csv").exists()


@pytest.mark.slow
def test_sigint_during_segmenter_training_exits_130_with_last_checkpoint(synth_cohort: Path, tmp_path: Path,
                                                                         parent_sigint: str) -> None:
    # Also from a parent that ignores SIGINT (nohup, a background job, some CI runners): the child is started with
    # default dispositions, as from an interactive shell.
    out = tmp_path / "seg"
    args = ["segment", "train", "--manifest", str(synth_cohort), "--out", str(out), "--epochs", "50", *SEGMENTER]
    rc, stderr = _interrupt(args, tmp_path / "seg.log", signal.SIGINT)
    assert rc == 130, stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "interrupted by SIGINT" in stderr and "--resume" in stderr
    assert not (out / "lung_unet.safetensors").exists()
    assert_clean_log(stderr)


def test_children_start_with_default_sigint_even_when_the_parent_ignores_it(parent_sigint: str) -> None:
    # Without _default_signals the child would inherit SIG_IGN and Python would leave it ignored.
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    with_default = _popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert with_default.communicate(timeout=60)[0].strip() == "True"
    inherited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert inherited.stdout.strip() == ("False" if parent_sigint == "parent_ignores_sigint" else "True")


def test_interrupted_maps_to_128_plus_signal(monkeypatch, capsys, tmp_path: Path) -> None:
    """main(): Interrupted -> 128 + signal with the resume hint; KeyboardInterrupt anywhere -> 130."""
    from covidcxr.cli import classify_cmd, main
    from covidcxr.errors import Interrupted

    def stopped(args):
        raise Interrupted(signal.SIGTERM, tmp_path / "last.ckpt")

    monkeypatch.setattr(classify_cmd, "_cmd_train", stopped)
    assert main(["train", "--manifest", "m.csv", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SIGTERM" in err and "--resume" in err and "last.ckpt" in err

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(classify_cmd, "_cmd_train", ctrl_c)
    assert main(["train", "--manifest", "m.csv", "--out", str(tmp_path)]) == 130
    assert "SIGINT" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not None  # main restored the handler it replaced


def test_sigterm_outside_training_exits_143(monkeypatch, capsys, tmp_path: Path) -> None:
    from covidcxr.cli import data_cmd, main

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    monkeypatch.setattr(data_cmd, "_cmd_synth", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "synth", "--out", str(tmp_path)]) == 143
    assert "SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
