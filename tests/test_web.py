"""The web service (covidcxr.web.app + covidcxr.api) through FastAPI's TestClient on a tiny toy model and index."""

from __future__ import annotations

import base64
import io
import itertools
import logging
import re
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import covidcxr.classification.artifact as artifact_mod
import covidcxr.io.dicom as dicom_mod
import covidcxr.io.image as io_mod
from covidcxr.cli import build_parser
from covidcxr.data.synth import draw_cxr
from covidcxr.demo import serve_command
from covidcxr.io.dicom import write_dicom
from covidcxr.io.image import sniff_format
from covidcxr.service.analysis import ServeSettings
from covidcxr.web.app import MULTIPART_SLACK, create_app
from covidcxr.web.toy import ToyAssets, make_toy_assets

torch.set_num_threads(2)

K = 5
MAX_MB = 0.5
MARKERS = ("QXZMARKER^WEBTEST", "PIDQXZ77231", "19230417")  # PatientName, PatientID, PatientBirthDate


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyAssets:
    return make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=9, image_size=80, seg_mode="mask")


@pytest.fixture(scope="module")
def client(toy: ToyAssets) -> TestClient:
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=K, max_upload_mb=MAX_MB))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def cxr() -> np.ndarray:
    return draw_cxr(np.random.default_rng(7), "covid", size=72)[0]


def _encode(image: np.ndarray, fmt: str, tmp_path: Path) -> bytes:
    if fmt == "dicom":
        path = write_dicom(tmp_path / "x.dcm", image, photometric="MONOCHROME1", view="PA")
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = MARKERS
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.uint8(image * 255)).save(buf, format={"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[fmt])
    return buf.getvalue()


def _post(client: TestClient, data: bytes, name: str = "image.png", **kwargs):
    return client.post("/api/v1/analyze", files={"file": (name, data, "application/octet-stream")}, **kwargs)


def _png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return im.size


# ---------------------------------------------------------------------------------------------- endpoints
def test_healthz(client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["index_cases"] == 9 and body["k"] == K
    assert re.fullmatch(r"[0-9a-f]{12}", body["model"])


def test_page_static_files_and_docs(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="drop-zone"' in page.text and 'id="cases-grid"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/analyze", "/api/v1/cases/{case_id}/thumbnail", "/healthz"} <= set(paths)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_analyze_returns_the_full_result(client, cxr, tmp_path, fmt) -> None:
    r = _post(client, _encode(cxr, fmt, tmp_path), name=f"x.{fmt}")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    res = r.json()
    assert 0.0 <= res["probability"] <= 1.0
    assert res["threshold"] == pytest.approx(0.5)
    assert res["label"] == ("covid" if res["probability"] >= res["threshold"] else "non_covid")
    assert isinstance(res["qc_flags"], list) and set(res["qc_messages"]) == set(res["qc_flags"])
    assert res["lung_energy_fraction"] is None or 0.0 <= res["lung_energy_fraction"] <= 1.0
    assert res["image"]["format"] == fmt and (res["image"]["height"], res["image"]["width"]) == (72, 72)
    if fmt == "dicom":
        assert res["image"]["view"] == "PA" and res["image"]["modality"] == "DX"
        assert any("MONOCHROME1" in w for w in res["image"]["warnings"])
    ov = res["overlays"]
    for key in ("image_png", "heatmap_png", "lung_outline_png"):
        assert _png_size(ov[key]) == (ov["width"], ov["height"]), key
    cases = res["similar_cases"]
    assert len(cases) == K and [c["rank"] for c in cases] == list(range(1, K + 1))
    assert all(c["score"] >= d["score"] for c, d in itertools.pairwise(cases))
    for c in cases:
        assert c["label"] in ("covid", "non_covid") and c["patient_id"].startswith("P")
        assert c["thumbnail_url"] == f"/api/v1/cases/{c['case_id']}/thumbnail"
        assert "image" not in c  # server file paths are never sent
    assert res["model"]["version"] == client.get("/healthz").json()["model"]
    assert res["model"]["arch"] == "resnet18"


def test_thumbnail_of_a_returned_case(client, toy) -> None:
    r = client.get("/api/v1/cases/case004/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) <= 160
    assert client.get("/api/v1/cases/case004/thumbnail").content == r.content  # cached, same bytes


@pytest.mark.parametrize(
    "case_id",
    ["nope", "..%2F..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "case004%00", "images/case004.png"],
)
def test_thumbnail_ids_are_looked_up_never_used_as_paths(client, case_id) -> None:
    r = client.get(f"/api/v1/cases/{case_id}/thumbnail")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")


def test_thumbnail_of_a_case_whose_image_is_gone_is_404(client, toy) -> None:
    path = toy.images[8]
    moved = path.with_suffix(".moved")
    path.rename(moved)
    try:
        r = client.get("/api/v1/cases/case008/thumbnail")
    finally:
        moved.rename(path)
    assert r.status_code == 404 and "unavailable" in r.json()["detail"]
    assert str(path) not in r.text


# ---------------------------------------------------------------------------------------------- rejections
def test_upload_over_the_limit_by_content_length_is_413(client) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(int(MAX_MB * 1e6) + MULTIPART_SLACK)
    r = _post(client, big)
    assert r.status_code == 413
    assert "limit of 0.5 MB" in r.json()["detail"]


def test_upload_over_the_limit_when_streamed_without_content_length_is_413(client) -> None:
    boundary = "covidcxrboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    chunk = bytes(64 * 1024)
    n_chunks = int(MAX_MB * 1e6 / len(chunk)) + 4

    def body():
        yield head + b"\x89PNG\r\n\x1a\n"
        for _ in range(n_chunks):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/api/v1/analyze", content=body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert "limit" in r.json()["detail"]


def test_file_just_over_the_limit_inside_the_multipart_slack_is_413(client) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(int(MAX_MB * 1e6) + 10)
    r = _post(client, data)
    assert r.status_code == 413


def test_image_over_the_pixel_limit_is_413(client, cxr, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(io_mod, "MAX_PIXELS", 1000)
    monkeypatch.setattr(dicom_mod, "MAX_PIXELS", 1000)
    r = _post(client, _encode(cxr, "png", tmp_path))
    assert r.status_code == 413 and "exceeds the limit of 1,000" in r.json()["detail"]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"hello, this is not an image", 415, "not a PNG, JPEG or DICOM file"),
        (b"GIF89a" + bytes(200), 415, "not a PNG, JPEG or DICOM file"),
        (b"%PDF-1.7\n" + bytes(300), 415, "not a PNG, JPEG or DICOM file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), 422, "upload:"),
        (b"", 422, "empty file"),
    ],
    ids=["text", "gif", "pdf", "truncated-png", "empty"],
)
def test_non_images_and_corrupt_files_are_refused_with_the_reason(client, data, status, reason) -> None:
    r = _post(client, data)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]


def test_tiff_is_not_an_accepted_upload(client, cxr, tmp_path) -> None:
    r = _post(client, _encode(cxr, "tiff", tmp_path), name="x.png")  # the name is never trusted
    assert r.status_code == 415 and "not a PNG, JPEG or DICOM" in r.json()["detail"]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"modality": "CT"}, "modality CT is not a projection radiograph"), ({"frames": 3}, "multi-frame DICOM")],
)
def test_unsupported_dicom_is_415_with_the_reason(client, cxr, tmp_path, kwargs, reason) -> None:
    frames = kwargs.pop("frames", None)
    array = np.stack([cxr] * frames) if frames else cxr
    path = write_dicom(tmp_path / "bad.dcm", array, patient_id=MARKERS[1], **kwargs)
    r = _post(client, path.read_bytes(), name="bad.dcm")
    assert r.status_code == 415
    assert reason in r.json()["detail"]
    assert MARKERS[1] not in r.text


def test_missing_file_field_is_422(client) -> None:
    r = client.post("/api/v1/analyze", data={"other": "x"})
    assert r.status_code == 422


# ---------------------------------------------------------------------------------------------- privacy
def test_dicom_patient_identifiers_never_reach_responses_or_logs(client, cxr, tmp_path, caplog) -> None:
    data = _encode(cxr, "dicom", tmp_path)
    assert all(m.encode() in data for m in MARKERS[:2])  # the markers are really in the upload
    caplog.set_level(logging.DEBUG)
    bodies = [_post(client, data, name=f"{MARKERS[0]}.dcm").text]
    truncated = data[: len(data) - 500]  # header intact, pixel data cut: an error path
    bodies.append(_post(client, truncated, name=f"{MARKERS[1]}.dcm").text)
    assert '"probability"' in bodies[0]
    for marker in (*MARKERS, "QXZMARKER"):
        for body in bodies:
            assert marker not in body
        assert marker not in caplog.text
    assert "analysis" in caplog.text  # the request was logged, only without identifiers


def test_uploads_are_not_kept_by_default_and_kept_under_server_names_when_asked(toy, cxr, tmp_path) -> None:
    from starlette.formparsers import MultiPartParser

    keep = tmp_path / "kept"
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=2, keep_uploads=keep))
    with TestClient(app) as c:
        data = _encode(cxr, "png", tmp_path)
        r = c.post("/api/v1/analyze", files={"file": ("../../evil name.png", data, "image/png")})
    assert r.status_code == 200
    kept = list(keep.iterdir())
    assert len(kept) == 1
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{12}\.png", kept[0].name)
    assert kept[0].read_bytes() == data
    assert not list(tmp_path.glob("**/evil*"))
    # Without --keep-uploads nothing is written: uploads stay in memory (not spooled to a temp file).
    assert MultiPartParser.spool_max_size >= ServeSettings().max_upload_bytes


# ---------------------------------------------------------------------------------------------- service
def test_model_is_loaded_once_and_concurrent_requests_all_succeed(toy, cxr, tmp_path, monkeypatch) -> None:
    calls = []
    real = artifact_mod.load_artifact

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(artifact_mod, "load_artifact", counting)
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=3))
    data = _encode(cxr, "png", tmp_path)
    results: list[int] = []
    with TestClient(app) as c:
        def worker() -> None:
            results.append(_post(c, data).status_code)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert c.get("/healthz").status_code == 200
    assert results == [200] * 4
    assert len(calls) == 1


def test_serve_command_round_trips_through_the_cli_parser() -> None:
    cmd = serve_command(Path("out dir/model"), "out/index")
    assert cmd.startswith("covidcxr serve ")
    import shlex

    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (str(args.model), str(args.index)) == ("out dir/model", "out/index")
    assert args.host == "127.0.0.1" and args.port == 8000


def test_serve_defaults_bind_loopback_with_a_50_mb_limit() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--index", "i"])
    assert args.host == "127.0.0.1" and args.max_upload_mb == 50 and args.k == 8 and args.keep_uploads is None
    settings = ServeSettings()
    assert settings.host == "127.0.0.1" and settings.max_upload_bytes == 50_000_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_upload_mb": 0}, "max_upload_mb=0"), ({"k": 0}, "k=0"), ({"port": 70000}, "port=70000")],
)
def test_bad_settings_are_refused(kwargs, match) -> None:
    from covidcxr.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        ServeSettings(**kwargs)


def test_index_built_with_another_model_is_refused(toy, tmp_path) -> None:
    from covidcxr.errors import IndexMismatchError
    from covidcxr.retrieval.index import CaseIndex

    other = CaseIndex(model_hash="0" * 64).fit(np.eye(4, 512, dtype=np.float32),
                                               [{"case_id": f"c{i}", "patient_id": "p", "label": 1} for i in range(4)])
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        create_app(toy.model_dir, other.save(tmp_path / "idx"))


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(b"\x89PNG\r\n\x1a\nxxxx", "png"), (b"\xff\xd8\xff\xe0xx", "jpeg"), (bytes(128) + b"DICMxx", "dicom"),
     (b"II*\x00", None), (b"", None)],
)
def test_sniff_format(data, fmt) -> None:
    assert sniff_format(data) == fmt
