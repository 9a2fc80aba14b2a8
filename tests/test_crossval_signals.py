"""A ``covidcxr crossval`` killed and resumed gives what an uninterrupted one gives (real subprocesses, signals)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

TINY = ["--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--num-workers", "0",
        "--no-progress", "--n-boot", "20", "--patience", "0", "--folds", "3", "--no-ensemble"]
FIT_STARTED = "Loading `train_dataloader` to estimate number of stepping batches"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _covidcxr(*args: str) -> list[str]:
    return [sys.executable, "-m", "covidcxr", "-v", *args]


def _kill_when(args: list[str], log: Path, ready, signum: int = signal.SIGTERM) -> int:
    """Run ``covidcxr -v ARGS`` (default signal dispositions), send ``signum`` once ``ready(stderr)``; exit code."""
    with log.open("w") as err:
        proc = subprocess.Popen(_covidcxr(*args), stdout=subprocess.DEVNULL, stderr=err, env=_env())
    try:
        deadline = time.monotonic() + 300  # a guard against a hung run, not a measurement
        while not ready(log.read_text()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be interrupted:\n{log.read_text()[-3000:]}"
        proc.send_signal(signum)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_covidcxr(*args), capture_output=True, text=True, env=_env(), timeout=600, check=False)


@pytest.fixture(scope="module")
def uninterrupted(synth_cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv_whole") / "cv"
    done = _run(["crossval", "--manifest", str(synth_cohort), "--out", str(out), *TINY])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_result(a: Path, b: Path, except_fold: int | None = None) -> None:
    oof_a, oof_b = pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv")
    assert len(oof_a) == len(oof_b) and (oof_a["row"] == oof_b["row"]).all()
    assert (oof_a["fold"] == oof_b["fold"]).all()
    if except_fold is not None:  # the fold resumed after some steps: a valid prediction for each of its rows
        keep = (oof_a["fold"] != except_fold).to_numpy()
        assert oof_b.loc[~keep, "prob"].between(0, 1).all()
        oof_a, oof_b = oof_a[keep], oof_b[keep]
    pd.testing.assert_frame_equal(oof_a, oof_b)
    if except_fold is None:
        metrics = [json.loads((d / "report" / "metrics.json").read_text()) for d in (a, b)]
        for m in metrics:
            m.pop("files", None)  # paths of the two folders
        assert metrics[0] == metrics[1]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["between_folds", "in_fold_training"])
def test_killed_and_resumed_crossval_equals_an_uninterrupted_one(synth_cohort: Path, uninterrupted: Path,
                                                                 tmp_path: Path, where: str) -> None:
    """Killed between folds: the resumed run is bit-identical. Killed while a fold trains: the fold resumes from
    its ``last.ckpt``; stopped before its first step the whole result is bit-identical, stopped later the fold
    continues with a fresh shuffle of the epoch (as ``covidcxr train --resume`` documents) and only the other folds
    are compared bit for bit."""
    out = tmp_path / "cv"
    args = ["crossval", "--manifest", str(synth_cohort), "--out", str(out), *TINY]
    if where == "between_folds":  # fold 0 finished, fold 1 not yet training
        def ready(_: str) -> bool:
            return (out / "fold_0" / "heldout.csv").is_file()
    else:  # fold 1 is training: it saves checkpoints/last.ckpt and stops
        def ready(log: str) -> bool:
            return log.count(FIT_STARTED) >= 2

    rc = _kill_when(args, tmp_path / "kill.log", ready)
    stderr = (tmp_path / "kill.log").read_text()
    assert rc == 143, stderr[-3000:]
    assert (out / "fold_0" / "heldout.csv").is_file() and not (out / "oof.csv").exists()
    stopped_at = re.search(r"SIGTERM received: stopped at step (\d+)", stderr)
    if where == "in_fold_training":
        assert (out / "fold_1" / "checkpoints" / "last.ckpt").is_file() and stopped_at, stderr[-3000:]

    again = _run(args)  # without --resume: refused, nothing lost
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fold 0: finished earlier" in resumed.stderr
    if where == "in_fold_training":
        assert "resuming from checkpoints/last.ckpt" in resumed.stderr
        assert "Restored all states from the checkpoint" in resumed.stderr
    _same_result(uninterrupted, out, except_fold=1 if stopped_at and int(stopped_at[1]) > 0 else None)
