"""``covidcxr pacs`` against a real Orthanc (DICOMweb plugin, authentication on) on a free loopback port.

Synthetic DX/CR radiographs (MONOCHROME1 and 2), one CC BY sample radiograph, a CT slipped into a study, a lateral
view and a DICOM with truncated pixel data are stored over STOW-RS; ``covidcxr pacs run`` must then leave in each
radiograph's study one SR (and one Secondary Capture when there is a verdict) whose values are those of
``covidcxr predict`` on the same file, report and skip the rest, add nothing on a rerun, and end with exactly one
result per image after being killed half-way. Skipped only when Orthanc (or its DICOMweb plugin) is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from covidcxr.pacs.orthanc import OrthancServer, find_orthanc

_BINARY, _PLUGIN, _WHY = find_orthanc()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_PLUGIN is None, reason=_WHY or "Orthanc not found")]

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "samples"
RESULT_MODALITIES = ("SR", "OT")


# ------------------------------------------------------------------------------------------------ fixtures
def _source_extras(path: Path, **attrs: Any) -> Path:
    """Add header attributes (patient-module extras that must not travel into the results, study UIDs)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for key, val in attrs.items():
        setattr(ds, key, val)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_pacs_files(folder: Path, seed: int = 0, n_synth: int = 4, size: int = 320) -> dict[str, list[Path]]:
    """Radiographs (analysable), a CT and a lateral in the first study, and one file with truncated pixel data."""
    import pydicom

    from covidcxr.data.synth import draw_cxr
    from covidcxr.io.dicom import write_dicom
    from covidcxr.io.image import load_image
    from covidcxr.service.images import _fit_size, _resize

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    radiographs = []
    for i in range(n_synth):
        image, _, _ = draw_cxr(rng, i % 2, size=size)
        path = write_dicom(folder / f"synth{i}.dcm", image, photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                           modality="CR" if i == 1 else "DX", view="AP" if i == 2 else "PA", patient_id=f"P{i}^Test",
                           study_date="20240301")
        radiographs.append(_source_extras(path, PatientAge="061Y", PatientComments="do not copy", BodyPartExamined=
                                          "CHEST" if i % 2 == 0 else ""))
    sample, _ = load_image(min(SAMPLES.glob("*.png")))
    radiographs.append(write_dicom(folder / "sample.dcm", _resize(sample, _fit_size(sample.shape, size)),
                                   view="PA", patient_id="P9^Sample", study_date="20240302"))
    flat = np.clip(0.5 + 0.002 * rng.standard_normal((size, size)), 0, 1)  # blank: the input gate gives no verdict
    radiographs.append(write_dicom(folder / "blank.dcm", flat, view="PA", patient_id="P7^Blank"))
    first_study = str(pydicom.dcmread(radiographs[0]).StudyInstanceUID)
    ct = _source_extras(write_dicom(folder / "ct.dcm", rng.random((64, 64)), modality="CT", patient_id="P0^Test"),
                        StudyInstanceUID=first_study)
    lateral_image, _, _ = draw_cxr(rng, 0, size=size)
    lateral = _source_extras(write_dicom(folder / "lateral.dcm", lateral_image, modality="DX", view="LL",
                                         patient_id="P0^Test"), StudyInstanceUID=first_study)
    corrupt = write_dicom(folder / "corrupt.dcm", rng.random((size, size)), modality="DX", view="PA",
                          patient_id="P8^Broken")
    ds = pydicom.dcmread(corrupt)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # header intact, pixel data truncated
    ds.save_as(corrupt, enforce_file_format=True)
    return {"radiographs": radiographs, "ct": [ct], "lateral": [lateral], "corrupt": [corrupt]}


def stow_all(server: OrthancServer, files: list[Path]) -> None:
    """Store files over STOW-RS, each into its own study."""
    import pydicom

    from covidcxr.pacs.client import PacsAuth, PacsClient

    client = PacsClient(server.dicomweb_url, PacsAuth("basic", server.user, server.password))
    for path in files:
        ds = pydicom.dcmread(path)
        client.store([ds], str(ds.StudyInstanceUID))


def _default_signals() -> None:
    """In the child: default SIGINT/SIGTERM handling, whatever the shell that started the suite ignores."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _env(server: OrthancServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCXR_PACS_")}
    env.update(COVIDCXR_PACS_USER=server.user, COVIDCXR_PACS_PASSWORD=server.password, **extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "covidcxr", *args]


def pacs_run(server: OrthancServer, ledger: Path, *extra: str, report: Path | None = None, verbose: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    args = ["-vv"] * verbose + ["pacs", "run", "--url", server.dicomweb_url, "--ledger", str(ledger), "--device", "cpu", *extra]
    if report is not None:
        args += ["--report", str(report)]
    return subprocess.run(_cli(*args), env=_env(server), capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    with OrthancServer(workdir=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return make_pacs_files(tmp_path_factory.mktemp("pacs_files"))


@pytest.fixture(scope="module")
def predicted(files: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``covidcxr predict`` on the radiograph files: one record per file name."""
    from covidcxr.cli import main

    out = tmp_path_factory.mktemp("predict") / "predictions.json"
    # One image per batch, as the PACS client analyses them: with bf16 autocast (CPUs with native bf16) a batch's
    # composition can move a probability in the third decimal.
    assert main(["predict", *map(str, files["radiographs"]), "--out", str(out), "--device", "cpu",
                 "--batch-size", "1"]) == 0
    records = {Path(r["image"]).name: r for r in json.loads(out.read_text())}
    statuses = {r["status"] for r in records.values()}
    assert statuses == {"ok", "no_result"}, f"the fixture needs verdicts and a refusal, got {statuses}"
    return records


@pytest.fixture(scope="module")
def first_run(orthanc: OrthancServer, files: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory):
    stow_all(orthanc, [p for group in files.values() for p in group])
    work = tmp_path_factory.mktemp("first_run")
    before = orthanc.rest("/statistics")["CountInstances"]
    proc = pacs_run(orthanc, work / "ledger.sqlite", report=work / "report.json", verbose=True)
    return {"proc": proc, "report": json.loads((work / "report.json").read_text()), "ledger": work / "ledger.sqlite",
            "before": before, "after": orthanc.rest("/statistics")["CountInstances"]}


# ------------------------------------------------------------------------------------------------ helpers
def results_in_study(server: OrthancServer, study_uid: str) -> dict[str, list[Any]]:
    """The covidcxr result objects of a study, retrieved over WADO-RS: ``{'SR': [...], 'OT': [...]}``."""
    from covidcxr.pacs.client import PacsAuth, PacsClient

    client = PacsClient(server.dicomweb_url, PacsAuth("basic", server.user, server.password))
    out: dict[str, list[Any]] = {m: [] for m in RESULT_MODALITIES}
    for series in client.find_series(study_uid):
        if series["modality"] not in RESULT_MODALITIES:
            continue
        for inst in client.find_instances(study_uid, series["series_uid"]):
            ds = client._client.retrieve_instance(study_uid, series["series_uid"], inst["sop_uid"])
            out[series["modality"]].append(ds)
    return out


def _done(ledger: Path) -> int:
    """Instances the ledger of a running process holds as done (0 while it is still being created)."""
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(ledger, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM instances WHERE status IN ('stored', 'no_result')").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def _uids(path: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


# ------------------------------------------------------------------------------------------------ tests
def test_run_stores_one_sr_and_capture_per_radiograph_matching_predict(
    first_run: dict[str, Any], files: dict[str, list[Path]], predicted: dict[str, dict[str, Any]],
    orthanc: OrthancServer,
) -> None:
    import highdicom as hd
    import pydicom

    from covidcxr.classification.ood import REASONS
    from covidcxr.service.dicom_results import NOT_FOR_DIAGNOSTIC_USE, read_result_sr

    proc = first_run["proc"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # the corrupt file fails the run
    for path in files["radiographs"]:
        study_uid, sop_uid = _uids(path)
        source = pydicom.dcmread(path, stop_before_pixels=True)
        expected = predicted[path.name]
        results = results_in_study(orthanc, study_uid)
        assert len(results["SR"]) == 1, f"{path.name}: {len(results['SR'])} SRs"
        sr = results["SR"][0]
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        hd.sr.ComprehensiveSR.from_dataset(sr)  # parses as a highdicom SR
        got = read_result_sr(sr)
        assert got["source_sop_uid"] == sop_uid
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop_uid
        assert got["status"] == expected["status"], path.name
        assert got["algorithm"]["version"] == expected["model_hash"][:12]
        assert f"weights_sha256={expected['model_hash']}" in got["algorithm"]["parameters"]
        if expected["status"] == "ok":
            assert got["probability"] == pytest.approx(expected["prob_covid"], abs=1e-4)
            assert got["label"] == expected["label"]
            assert got["threshold"] == pytest.approx(expected["threshold"], abs=1e-9)
            assert 0.0 <= got["lung_energy_fraction"] <= 1.0
            assert len(results["OT"]) == 1
            sc = results["OT"][0]
            assert NOT_FOR_DIAGNOSTIC_USE in sc.SeriesDescription and NOT_FOR_DIAGNOSTIC_USE in sc.ImageComments
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid
            assert sc.pixel_array.shape[-1] == 3
        else:
            assert got["probability"] is None and got["label"] is None
            assert got["no_result_reasons"]
            assert all(REASONS[r] in expected["no_result_reason"] for r in got["no_result_reasons"])
            assert results["OT"] == []
        for ds in [sr, *results["OT"]]:
            assert ds.StudyInstanceUID == study_uid and ds.PatientID == source.PatientID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != sop_uid
            assert "PatientAge" not in ds and "PatientComments" not in ds and "BodyPartExamined" not in ds


def test_ct_lateral_and_corrupt_are_reported_and_skipped(first_run: dict[str, Any],
                                                         files: dict[str, list[Path]]) -> None:
    outcomes = {o["sop_uid"]: o for o in first_run["report"]["outcomes"]}
    (ct,), (lateral,), (corrupt,) = files["ct"], files["lateral"], files["corrupt"]
    assert outcomes[_uids(ct)[1]]["status"] == "skipped"
    assert "modality CT" in outcomes[_uids(ct)[1]]["reason"]
    assert outcomes[_uids(lateral)[1]]["status"] == "skipped"
    assert "lateral" in outcomes[_uids(lateral)[1]]["reason"]
    assert outcomes[_uids(corrupt)[1]]["status"] == "refused"
    assert "pixel data" in outcomes[_uids(corrupt)[1]]["reason"]
    stdout = first_run["proc"].stdout
    assert _uids(corrupt)[1] in stdout and "refused" in stdout  # the summary table names it
    counts = first_run["report"]["counts"]
    assert counts["stored"] + counts["no_result"] == len(files["radiographs"])
    # Nothing was written for the skipped and refused ones: one SR per radiograph, one capture per verdict.
    assert first_run["after"] - first_run["before"] == len(files["radiographs"]) + counts["stored"]


def test_credentials_never_reach_the_output(first_run: dict[str, Any], orthanc: OrthancServer) -> None:
    proc = first_run["proc"]  # ran with -vv (debug logging)
    assert orthanc.password not in proc.stdout + proc.stderr
    assert "P0^Test" not in proc.stdout + proc.stderr  # no patient identifiers in the logs either


def test_second_run_adds_nothing(first_run: dict[str, Any], orthanc: OrthancServer, tmp_path: Path) -> None:
    before = orthanc.rest("/statistics")["CountInstances"]
    proc = pacs_run(orthanc, first_run["ledger"], report=tmp_path / "again.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads((tmp_path / "again.json").read_text())["counts"]
    assert counts["done_before"] == len(first_run["report"]["outcomes"])
    assert sum(v for k, v in counts.items() if k != "done_before") == 0
    assert orthanc.rest("/statistics")["CountInstances"] == before


def test_wrong_password_is_refused_without_echo(orthanc: OrthancServer, tmp_path: Path) -> None:
    env = _env(orthanc)
    env["COVIDCXR_PACS_PASSWORD"] = "wrong-secret-123"
    proc = subprocess.run(_cli("pacs", "run", "--url", orthanc.dicomweb_url, "--ledger", str(tmp_path / "l.sqlite"),
                               "--dry-run"), env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "HTTP 401" in proc.stderr and "wrong-secret-123" not in proc.stdout + proc.stderr


def test_killed_run_restarted_ends_with_one_result_per_image(tmp_path: Path) -> None:
    files = make_pacs_files(tmp_path / "files", seed=3, n_synth=5, size=256)["radiographs"]
    ledger = tmp_path / "ledger.sqlite"
    with OrthancServer(workdir=tmp_path / "orthanc") as server:
        stow_all(server, files)
        args = _cli("pacs", "run", "--url", server.dicomweb_url, "--ledger", str(ledger), "--device", "cpu")
        proc = subprocess.Popen(args, env=_env(server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done, deadline = 0, time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                done = _done(ledger)
                if done >= 1:
                    break
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert 1 <= done < len(files), f"the kill should land half-way ({done} of {len(files)} done)"
        rerun = pacs_run(server, ledger, report=tmp_path / "rerun.json")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        counts = json.loads((tmp_path / "rerun.json").read_text())["counts"]
        assert counts["done_before"] >= done and counts["stored"] + counts["no_result"] + counts["done_before"] \
            == len(files)
        for path in files:
            results = results_in_study(server, _uids(path)[0])
            assert len(results["SR"]) == 1, path.name
            assert len(results["OT"]) <= 1, path.name
        with sqlite3.connect(ledger) as db:
            assert db.execute("SELECT COUNT(*) FROM instances WHERE status = 'pending'").fetchone()[0] == 0


def test_watch_processes_new_studies_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import pydicom

    files = make_pacs_files(tmp_path / "files", seed=5, n_synth=2, size=256)["radiographs"][:2]
    ledger = tmp_path / "ledger.sqlite"
    with OrthancServer(workdir=tmp_path / "orthanc") as server:
        stow_all(server, files[:1])
        args = _cli("pacs", "watch", "--url", server.dicomweb_url, "--ledger", str(ledger), "--device", "cpu",
                    "--interval", "0.5", "--since", "2024-01-01", "--report", str(tmp_path / "watch.json"))
        proc = subprocess.Popen(args, env=_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_signals)  # noqa: PLW1509 (the test starts no threads first)
        try:
            def done() -> int:
                return _done(ledger)

            deadline = time.monotonic() + 180
            while done() < 1 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            stow_all(server, files[1:])  # arrives while watching
            while done() < 2 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert done() == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr[-2000:]
        assert "interrupted by SIGTERM" in stderr
        report = json.loads((tmp_path / "watch.json").read_text())
        assert report["counts"]["stored"] + report["counts"]["no_result"] == 2
        for path in files:
            assert len(results_in_study(server, str(pydicom.dcmread(path).StudyInstanceUID))["SR"]) == 1


def test_predict_dicom_out_writes_the_same_objects(files: dict[str, list[Path]], tmp_path: Path,
                                                   predicted: dict[str, dict[str, Any]]) -> None:
    import pydicom

    from covidcxr.cli import main
    from covidcxr.service.dicom_results import read_result_sr

    paths = files["radiographs"][:2] + files["radiographs"][-1:]  # two verdicts (synthetic), the blank one (none)
    out = tmp_path / "dicom_out"
    # Default batch size: bf16 batches differ from one-image analysis in the third decimal, so the CSV must take the
    # values of the SR it wrote (what the user reads in the table and in the viewer is one number).
    assert main(["predict", *map(str, paths), "--device", "cpu", "--dicom-out", str(out),
                 "--out", str(tmp_path / "preds.csv")]) == 0
    table = pd.read_csv(tmp_path / "preds.csv", keep_default_na=False).set_index("image")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_{k}.dcm" for p in paths for k in ("sr", "sc")
                                                           if k == "sr" or predicted[p.name]["status"] == "ok")
    for path in paths:
        sr = pydicom.dcmread(out / f"{path.stem}_sr.dcm")
        got, expected = read_result_sr(sr), predicted[path.name]
        assert got["status"] == expected["status"]
        assert got["source_sop_uid"] == _uids(path)[1]
        row = table.loc[str(path)]
        assert row["status"] == got["status"]
        if expected["status"] == "ok":
            assert got["probability"] == pytest.approx(expected["prob_covid"], abs=1e-4)
            assert float(row["prob_covid"]) == pytest.approx(got["probability"], abs=1e-6)
            assert (out / f"{path.stem}_sc.dcm").is_file()
        else:
            assert got["no_result_reasons"] and got["probability"] is None


def test_lost_ledger_rerun_resends_identical_objects(first_run: dict[str, Any], files: dict[str, list[Path]],
                                                     orthanc: OrthancServer, tmp_path: Path) -> None:
    # What a crash between STOW and the ledger write leaves behind, taken to the extreme: no record at all. The
    # result UIDs derive from source UID + model hash + generation, so the PACS files the re-sent objects once.
    studies = [_uids(p)[0] for p in files["radiographs"][:2]]
    before = orthanc.rest("/statistics")["CountInstances"]
    proc = pacs_run(orthanc, tmp_path / "fresh-ledger.sqlite", "--study", *studies, report=tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads((tmp_path / "r.json").read_text())["counts"]
    assert counts["stored"] + counts["no_result"] == 2
    assert orthanc.rest("/statistics")["CountInstances"] == before
    for study in studies:
        assert len(results_in_study(orthanc, study)["SR"]) == 1
    # --reprocess: a new result (new UIDs) next to the old one, for what the ledger holds as done.
    old = {str(ds.SOPInstanceUID) for ds in results_in_study(orthanc, studies[0])["SR"]}
    proc = pacs_run(orthanc, tmp_path / "fresh-ledger.sqlite", "--study", studies[0], "--reprocess")
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = {str(ds.SOPInstanceUID) for ds in results_in_study(orthanc, studies[0])["SR"]}
    assert len(new) == 2 and old < new


def test_dry_run_lists_and_writes_nothing(first_run: dict[str, Any], files: dict[str, list[Path]],
                                          orthanc: OrthancServer, tmp_path: Path) -> None:
    study, _ = _uids(files["radiographs"][0])  # holds a radiograph, the CT and the lateral
    before = orthanc.rest("/statistics")["CountInstances"]
    ledger = tmp_path / "dry.sqlite"
    proc = pacs_run(orthanc, ledger, "--study", study, "--dry-run", report=tmp_path / "dry.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads((tmp_path / "dry.json").read_text())["counts"]
    assert (counts["would_process"], counts["skipped"], counts["stored"]) == (1, 2, 0)
    assert orthanc.rest("/statistics")["CountInstances"] == before
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
