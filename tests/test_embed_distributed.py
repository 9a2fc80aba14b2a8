"""Distributed embedding on Lightning: 2 local processes give the same shards as 1; a killed run resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.classification.artifact import model_hash
from covidcxr.data.manifest import read_manifest
from covidcxr.errors import ConfigError
from covidcxr.retrieval import shards
from covidcxr.retrieval.distributed import embed_to_shards
from covidcxr.retrieval.index import CaseIndex

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)
CLI = [sys.executable, "-m", "covidcxr"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_tiny_artifact) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("dist") / "model", seed=0)


@pytest.fixture(scope="module")
def reference(model: Path, synth_cohort: Path, tmp_path_factory) -> Path:
    """Shards of a single-process run (in this process), shard size 4."""
    out = tmp_path_factory.mktemp("dist") / "one"
    summary = embed_to_shards(model, model_hash(model), read_manifest(synth_cohort), out, shard_size=4,
                              accelerator="cpu", devices=1, num_workers=1, progress=False)
    assert summary.world_size == 1 and summary.embedded == summary.n_shards
    return out


def _assert_same_shards(a: Path, b: Path) -> None:
    plan_a, paths_a = shards.complete_shards(a)
    plan_b, paths_b = shards.complete_shards(b)
    assert plan_a == plan_b
    for pa, pb in zip(paths_a, paths_b, strict=True):
        ea, ra = shards.read_shard(pa)
        eb, rb = shards.read_shard(pb)
        np.testing.assert_array_equal(ea, eb)  # bit-identical, not merely close
        pd.testing.assert_frame_equal(ra, rb)


def _embed_cmd(model: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "index", "embed", "--model", str(model), "--manifest", str(manifest), "--out", str(out),
            "--accelerator", "cpu", "--num-workers", "1", "--no-progress", *extra]


def test_two_local_workers_write_the_same_shards_as_one(model: Path, synth_cohort: Path, reference: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "two"
    run = subprocess.run(_embed_cmd(model, synth_cohort, out, "--devices", "2", "--shard-size", "4"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    said = " ".join(run.stdout.split())  # rich wraps long lines
    assert "2 process(es)" in said and said.count("embeddings:") == 1  # only rank 0 reports
    _assert_same_shards(reference, out)
    # ... and the index built from them answers like one built from the single-process shards.
    build = subprocess.run([*CLI, "index", "build", "--from-embeddings", str(out), "--out", str(tmp_path / "idx")],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    idx = CaseIndex.load(tmp_path / "idx", expect_model_hash=model_hash(model))
    emb, rows = shards.read_shard(shards.shard_path(reference, 0))
    assert idx.search(emb[:1], 1)[0][0].case_id == rows["case_id"].iloc[0]
    assert len(idx) == len(read_manifest(synth_cohort))


def test_a_killed_run_resumes_to_the_same_shards(model: Path, synth_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = _embed_cmd(model, synth_cohort, out, "--shard-size", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("shard-*.npz"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = shards.read_plan(out)
    done = len(list(out.glob("shard-*.npz")))
    assert 3 <= done < plan.n_shards  # killed mid-way
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{done} were already done" in " ".join(run.stdout.split())
    assert not list(out.glob(".shard-*"))  # no temporary file of the killed run left
    single = tmp_path / "single"
    embed_to_shards(model, model_hash(model), read_manifest(synth_cohort), single, shard_size=1,
                    accelerator="cpu", devices=1, num_workers=1, progress=False)
    _assert_same_shards(single, out)


def test_resuming_with_another_model_is_refused(model: Path, synth_cohort: Path, reference: Path,
                                                make_tiny_artifact, tmp_path: Path) -> None:
    other = make_tiny_artifact(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="different run \\(model_hash differ"):
        embed_to_shards(other, model_hash(other), read_manifest(synth_cohort), reference, shard_size=4,
                        accelerator="cpu", devices=1, progress=False)


def test_index_build_with_devices_embeds_into_shards_then_indexes(model: Path, synth_cohort: Path, reference: Path,
                                                                 tmp_path: Path, capsys) -> None:
    from covidcxr.cli import main

    args = ["index", "build", "--model", str(model), "--manifest", str(synth_cohort), "--split", "all",
            "--out", str(tmp_path / "idx"), "--devices", "1", "--accelerator", "cpu", "--shard-size", "4",
            "--embeddings", str(tmp_path / "emb"), "--num-workers", "1", "--no-progress"]
    assert main(args) == 0
    _assert_same_shards(reference, tmp_path / "emb")
    assert len(CaseIndex.load(tmp_path / "idx")) == len(read_manifest(synth_cohort))
    capsys.readouterr()
    assert main(args) == 2  # the index exists: refused before any embedding, nothing replaced
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--thumbnails", "--force"]) == 2
