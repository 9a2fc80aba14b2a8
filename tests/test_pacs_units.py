"""The PACS client's parts without a server: credentials, URL check, retries, ledger, dates, the result objects."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covidcxr.errors import ConfigError, NotFrontalChestError, PacsError
from covidcxr.pacs.client import (
    AuthRefusedError,
    PacsAuth,
    PacsClient,
    RetryPolicy,
    TransientError,
    check_url,
    read_auth,
    value,
)
from covidcxr.pacs.ledger import Ledger
from covidcxr.pacs.runner import Outcome, RunSummary, parse_since


# ------------------------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize(("environ", "kind", "user"), [
    ({}, "none", None),
    ({"COVIDCXR_PACS_TOKEN": " tok "}, "bearer", None),
    ({"COVIDCXR_PACS_USER": "alice", "COVIDCXR_PACS_PASSWORD": "pw"}, "basic", "alice"),
])
def test_read_auth_from_environment(environ: dict[str, str], kind: str, user: str | None) -> None:
    auth = read_auth(environ=environ)
    assert (auth.kind, auth.user) == (kind, user)
    assert "tok" not in repr(auth) and "pw" not in repr(auth)


@pytest.mark.parametrize(("environ", "match"), [
    ({"COVIDCXR_PACS_TOKEN": "  "}, "COVIDCXR_PACS_TOKEN is set but empty"),
    ({"COVIDCXR_PACS_USER": "alice"}, "COVIDCXR_PACS_PASSWORD is not"),
])
def test_read_auth_refuses_half_set_environment(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_auth(environ=environ)


def test_read_auth_files(tmp_path: Path) -> None:
    token, basic, bad = tmp_path / "token", tmp_path / "basic", tmp_path / "bad"
    token.write_text("secret-token\n")
    basic.write_text("bob:pa:ss\n")
    bad.write_text("no-colon\n")
    assert read_auth(token_file=token, environ={}).secret == "secret-token"
    auth = read_auth(basic_auth_file=basic, environ={"COVIDCXR_PACS_TOKEN": "ignored"})
    assert (auth.kind, auth.user, auth.secret) == ("basic", "bob", "pa:ss")
    with pytest.raises(ConfigError, match="expected one line 'user:password'"):
        read_auth(basic_auth_file=bad)
    with pytest.raises(ConfigError, match="not both"):
        read_auth(token_file=token, basic_auth_file=basic)
    with pytest.raises(ConfigError, match="cannot read it"):
        read_auth(token_file=tmp_path / "missing")


@pytest.mark.parametrize(("url", "match"), [
    ("ftp://pacs/dicom-web", "expected http"),
    ("https://alice:s3cret@pacs.example.org/dicom-web", "credentials in the URL are refused"),
])
def test_check_url_refuses(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        check_url(url)
    assert "s3cret" not in str(info.value)


# ------------------------------------------------------------------------------------------------ retries
class _Response:
    def __init__(self, status: int) -> None:
        self.status_code = status


def _http_error(status: int) -> Exception:
    import requests

    return requests.HTTPError(f"{status}", response=_Response(status))


def _client(attempts: int = 3) -> tuple[PacsClient, list[float]]:
    waits: list[float] = []
    client = PacsClient("http://127.0.0.1:9/dicom-web", PacsAuth("basic", "u", "secret-pw"),
                        retry=RetryPolicy(attempts=attempts, base_delay=0.5, max_delay=1.0), sleep=waits.append)
    return client, waits


def test_transient_errors_are_retried_with_backoff() -> None:
    client, waits = _client(attempts=4)
    failures = [_http_error(503), _http_error(502), _http_error(429)]

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    assert client._call("QIDO studies", flaky) == "ok"
    assert waits == [0.5, 1.0, 1.0]  # exponential, capped at max_delay


def test_persistent_network_errors_end_as_transient_error() -> None:
    import requests

    client, waits = _client(attempts=3)
    calls = []

    def down() -> None:
        calls.append(1)
        raise requests.ConnectionError("refused")

    with pytest.raises(TransientError, match="WADO instance 1.2.3: ConnectionError after 3 attempts"):
        client._call("WADO instance 1.2.3", down)
    assert len(calls) == 3 and len(waits) == 2


@pytest.mark.parametrize(("status", "error", "match"), [
    (401, AuthRefusedError, "refused the credentials .*HTTP basic.*HTTP 401"),
    (404, PacsError, "HTTP 404"),
])
def test_permanent_http_errors_are_not_retried(status: int, error: type[Exception], match: str) -> None:
    client, waits = _client()

    def refuse() -> None:
        raise _http_error(status)

    with pytest.raises(error, match=match) as info:
        client._call("QIDO studies", refuse)
    assert waits == [] and "secret-pw" not in str(info.value) and "secret-pw" not in repr(client)


def test_retry_policy_validates() -> None:
    with pytest.raises(ConfigError, match="attempts=0"):
        RetryPolicy(attempts=0)


def test_qido_value() -> None:
    item = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080060": {"vr": "CS"}}
    assert value(item, "StudyInstanceUID") == "1.2.3"
    assert value(item, "Modality", "none") == "none"


# ------------------------------------------------------------------------------------------------ ledger
def test_ledger_records_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite"
    with Ledger(path) as ledger:
        assert ledger.get("1.2.3", "h") is None
        ledger.begin("1.2.3", "h", "9.9", generation=0)
        entry = ledger.get("1.2.3", "h")
        assert entry.status == "pending" and not entry.final and entry.attempts == 1
        ledger.finish("1.2.3", "h", "9.9", "stored", result_uids=["4.5", "6.7"])
    with Ledger(path) as ledger:  # a new process sees what the last one recorded
        entry = ledger.get("1.2.3", "h")
        assert entry.final and entry.result_uids == ["4.5", "6.7"]
        assert ledger.get("1.2.3", "other-model") is None  # keyed by model too
        with pytest.raises(ConfigError, match="ledger status 'done'"):
            ledger.finish("1.2.3", "h", "9.9", "done")
        assert [e.sop_instance_uid for e in ledger.entries("stored")] == ["1.2.3"]


def test_ledger_refuses_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError, match="schema version 99"):
        Ledger(path)


# ------------------------------------------------------------------------------------------------ runner parts
@pytest.mark.parametrize(("text", "expected"), [("2024-03-01", "20240301"), ("20240301", "20240301")])
def test_parse_since(text: str, expected: str) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01", "2024031"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--since"):
        parse_since(text)


def test_summary_exit_code_and_counts() -> None:
    summary = RunSummary([Outcome("s", "x", "1", "stored"), Outcome("s", "x", "2", "skipped", "modality CT")])
    assert summary.exit_code == 0 and summary.counts["stored"] == 1
    summary.outcomes.append(Outcome("s", "x", "3", "refused", "corrupt"))
    assert summary.exit_code == 1 and [o.sop_uid for o in summary.failed] == ["3"]


class _FakeClient:
    """Studies and series as QIDO would list them (no network)."""

    def __init__(self, series: list[dict[str, Any]], instances: dict[str, list[dict[str, Any]]]) -> None:
        self.series, self.instances = series, instances

    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        return self.series

    def find_instances(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        return self.instances[series_uid]


class _FakeAnalyzer:
    model_hash = "h" * 64


def test_candidates_skip_other_modalities_and_ignore_our_results(tmp_path: Path) -> None:
    from covidcxr.pacs.runner import PacsRunner

    series = [
        {"series_uid": "dx", "modality": "DX", "body_part": "CHEST", "description": ""},
        {"series_uid": "ct", "modality": "CT", "body_part": "", "description": ""},
        {"series_uid": "hand", "modality": "CR", "body_part": "HAND", "description": ""},
        {"series_uid": "sr", "modality": "SR", "body_part": "", "description": "covidcxr COVID-19 AI result"},
        {"series_uid": "sc", "modality": "OT", "body_part": "", "description": "covidcxr heat map"},
    ]
    instances = {"dx": [{"sop_uid": "1", "view": "PA"}, {"sop_uid": "2", "view": "LL"}], "ct": [{"sop_uid": "3"}],
                 "hand": [{"sop_uid": "4"}], "sr": [{"sop_uid": "5"}], "sc": [{"sop_uid": "6"}]}
    with Ledger(tmp_path / "l.sqlite") as ledger:
        runner = PacsRunner(_FakeClient(series, instances), _FakeAnalyzer(), ledger, dry_run=True)
        found = {inst["sop_uid"]: why for _, inst, why in runner.candidates("study")}
    assert found["1"] is None
    assert "lateral" in found["2"] and "modality CT" in found["3"] and "CHEST" in found["4"]
    assert "5" not in found and "6" not in found


# ------------------------------------------------------------------------------------------------ result objects
def _source(tmp_path: Path, **attrs: Any) -> Any:
    import pydicom

    from covidcxr.io.dicom import write_dicom

    path = write_dicom(tmp_path / "src.dcm", np.full((64, 64), 0.5), view="PA", patient_id="PAT^One",
                       study_date="20240301")
    ds = pydicom.dcmread(path)
    for key, val in attrs.items():
        setattr(ds, key, val)
    return ds


@pytest.mark.parametrize("status", ["ok", "no_result"])
def test_sr_round_trip(tmp_path: Path, status: str) -> None:
    import highdicom as hd
    import pydicom

    from covidcxr.service.dicom_results import (
        DicomResult,
        ModelIdentity,
        build_sr,
        read_result_sr,
        reference_header,
        result_uid,
    )

    source = _source(tmp_path, PatientAge="050Y", InstitutionName="Somewhere")
    ok = status == "ok"
    result = DicomResult(str(source.SOPInstanceUID), str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                         status, 0.8125 if ok else None, "covid" if ok else None, 0.5,
                         ["lung_area_low"], 0.75 if ok else None, [] if ok else ["out_of_distribution"],
                         0.25 if ok else None)
    model = ModelIdentity("covidcxr COVID-19 classifier (resnet18)", "abcdef012345", "abcdef012345" + "0" * 52)
    sr = build_sr(reference_header(source), result, model)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    hd.sr.ComprehensiveSR.from_dataset(back)
    got = read_result_sr(back)
    assert got["status"] == status and got["qc_flags"] == ["lung_area_low"]
    assert got["probability"] == (pytest.approx(0.8125) if ok else None)
    assert got["label"] == ("covid" if ok else None)
    assert got["knn_covid_share"] == (pytest.approx(0.25) if ok else None)
    assert got["no_result_reasons"] == ([] if ok else ["out_of_distribution"])
    assert got["algorithm"]["version"] == "abcdef012345"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == "PAT^One"
    assert "PatientAge" not in back and "InstitutionName" not in back
    # Same source, model and generation: the same UID (a rerun re-sends, never duplicates); a reprocess: a new one.
    assert back.SOPInstanceUID == result_uid(str(source.SOPInstanceUID), model.weights_hash, "sr", 0)
    assert result_uid(str(source.SOPInstanceUID), model.weights_hash, "sr", 1) != back.SOPInstanceUID


@pytest.mark.parametrize(("attrs", "match"), [
    ({"BodyPartExamined": "HAND"}, "body part HAND is not a chest"),
    ({"ViewPosition": "LL"}, "lateral view"),
])
def test_check_frontal_chest_refuses(tmp_path: Path, attrs: dict[str, str], match: str) -> None:
    from covidcxr.service.dicom_results import check_frontal_chest

    with pytest.raises(NotFrontalChestError, match=match):
        check_frontal_chest(_source(tmp_path, **attrs), "1.2.3")


def test_read_result_sr_refuses_a_foreign_report(tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from covidcxr.service.dicom_results import read_result_sr, reference_header

    source = reference_header(_source(tmp_path))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="someone else"),
        measurements=[hd.sr.Measurement(hd.sr.CodedConcept("X", "99X", "x"), 1.0,
                                        hd.sr.CodedConcept("1", "UCUM", "no units"))])
    device = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                   observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                                       uid=hd.UID()))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
                                     imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(evidence=[source], content=report, series_instance_uid=hd.UID(), series_number=1,
                               sop_instance_uid=hd.UID(), instance_number=1)
    with pytest.raises(ConfigError, match="no covidcxr measurement group"):
        read_result_sr(sr)


@pytest.mark.parametrize(("auth", "header", "basic"), [
    (PacsAuth("bearer", secret="tok-1"), "Bearer tok-1", None),
    (PacsAuth("basic", "alice", "pw"), None, ("alice", "pw")),
    (PacsAuth(), None, None),
])
def test_client_session_carries_the_credentials_and_verifies_tls(auth: PacsAuth, header: str | None,
                                                                   basic: tuple[str, str] | None,
                                                                   tmp_path: Path) -> None:
    session = PacsClient("https://pacs.example.org/dicom-web/", auth)._client._session
    assert session.headers.get("Authorization") == header
    assert session.auth == basic
    assert session.verify is True
    bundle = tmp_path / "ca.pem"
    assert PacsClient("https://pacs.example.org/dicom-web", auth, ca_bundle=bundle)._client._session.verify == \
        str(bundle)


def test_analyzer_adds_the_similar_case_share_with_an_index(tmp_path: Path) -> None:
    from covidcxr.classification.artifact import load_artifact, shipped_model_dir
    from covidcxr.io.dicom import write_dicom
    from covidcxr.io.image import load_image
    from covidcxr.service.analysis import pick_segmenter
    from covidcxr.service.dicom_results import DicomAnalyzer, read_result_sr

    class _Match:
        def __init__(self, label: str) -> None:
            self.label = label

    class _Index:
        def __init__(self) -> None:
            self.k: int | None = None

        def search(self, embeddings: np.ndarray, k: int) -> list[list[_Match]]:
            self.k = k
            return [[_Match("covid"), _Match("non_covid"), _Match("covid"), _Match("covid")][:k]]

    samples = Path(__file__).resolve().parents[1] / "src" / "covidcxr" / "samples"
    image, _ = load_image(min(samples.glob("*.png")))
    path = write_dicom(tmp_path / "x.dcm", image, view="PA", modality="DX")
    artifact = load_artifact(shipped_model_dir(), "cpu")
    segmenter, key = pick_segmenter(artifact, None)
    index = _Index()
    analyzer = DicomAnalyzer(artifact, segmenter, segmenter_key=key, index=index, k=4)
    result = analyzer.analyze_bytes(path.read_bytes(), "1.2.3")
    assert result.status == "ok", result.no_result_reasons
    assert index.k == 4 and result.knn_covid_share == pytest.approx(0.75)
    assert read_result_sr(result.datasets[0])["knn_covid_share"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="k=0"):
        DicomAnalyzer(artifact, segmenter, k=0)


def test_a_study_that_cannot_be_listed_fails_alone(tmp_path: Path) -> None:
    from covidcxr.pacs.runner import PacsRunner

    class _Flaky(_FakeClient):
        def find_series(self, study_uid: str) -> list[dict[str, Any]]:
            if study_uid == "bad":
                raise TransientError("QIDO series of study bad: HTTP 503 after 4 attempts")
            return self.series

    client = _Flaky([{"series_uid": "dx", "modality": "DX", "body_part": "", "description": ""}],
                    {"dx": [{"sop_uid": "1", "view": None}]})
    with Ledger(tmp_path / "l.sqlite") as ledger:
        summary = PacsRunner(client, _FakeAnalyzer(), ledger, dry_run=True).run(study_uids=["bad", "good"])
    assert [(o.study_uid, o.status) for o in summary.outcomes] == [("bad", "failed"), ("good", "would_process")]
    assert "HTTP 503" in summary.outcomes[0].reason and summary.exit_code == 1
