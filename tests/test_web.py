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
from covidcxr.service.settings import ServeSettings
from covidcxr.web.app import LOGGED_URL_CHARS, MULTIPART_SLACK, TruncateLoggedUrls, create_app, uvicorn_log_config
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


def _thumb_url(client: TestClient, real_case_id: str) -> str:
    """Thumbnail URL of an index case under the id clients see (a pseudonym by default)."""
    return f"/api/v1/cases/{client.app.state.service.public_id('case', real_case_id)}/thumbnail"


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
    assert client.get("/redoc").status_code == 404  # ReDoc would load its script from a CDN
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
        assert c["label"] in ("covid", "non_covid") and re.fullmatch(r"[0-9a-f]{12}", c["patient_id"])
        assert c["thumbnail_url"] == f"/api/v1/cases/{c['case_id']}/thumbnail"
        assert "image" not in c  # server file paths are never sent
    assert res["model"]["version"] == client.get("/healthz").json()["model"]
    assert res["model"]["arch"] == "resnet18"


def test_thumbnail_of_a_returned_case(client, toy) -> None:
    r = client.get(_thumb_url(client, "case004"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) <= 160
    assert client.get(_thumb_url(client, "case004")).content == r.content  # cached, same bytes


@pytest.mark.parametrize(
    "case_id",
    ["nope", "..%2F..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "case004%00", "images/case004.png",
     "case004"],  # the archive's real id: clients see pseudonyms
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
        r = client.get(_thumb_url(client, "case008"))
    finally:
        moved.rename(path)
    assert r.status_code == 404 and "unavailable" in r.json()["detail"]
    assert str(path) not in r.text and "case008" not in r.text


def test_docs_load_only_same_origin_assets(client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert urls and not re.search(r"(?i)(https?:)?//", r.text)  # nothing from another host
    assets = [u for u in urls if not u.startswith("data:")]
    assert any(u.endswith("swagger-ui-bundle.js") for u in assets) and any(u.endswith(".css") for u in assets)
    for url in assets:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
        assert "https://cdn" not in asset.text
    schema_url = re.search(r'data-openapi-url="([^"]+)"', r.text).group(1)
    assert client.get(schema_url).json()["info"]["title"] == "covidcxr"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-eval" not in csp  # no inline script on the docs page
    assert "<script>" not in r.text


def _csp_directives(header: str) -> dict[str, str]:
    return dict((part.strip().split(" ", 1) + [""])[:2] for part in header.split(";") if part.strip())


@pytest.mark.parametrize(
    ("method", "url"),
    [("GET", "/"), ("GET", "/healthz"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/static/app.js"),
     ("GET", "/static/swagger-ui/swagger-ui.css"), ("GET", "/static/nope.js"), ("GET", "/api/v1/cases/case004/thumbnail"),
     ("GET", "/api/v1/cases/nope/thumbnail"), ("POST", "/api/v1/analyze"), ("PUT", "/healthz"), ("GET", "/nowhere")],
)
def test_every_response_carries_the_security_headers(client, method, url) -> None:
    r = client.request(method, url)
    assert r.headers["x-content-type-options"] == "nosniff"
    csp = _csp_directives(r.headers["content-security-policy"])
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["object-src"] == "'none'"
    assert csp["frame-ancestors"] == "'none'"
    if url.startswith("/api/"):
        assert r.headers["cache-control"] == "no-store"


def test_patient_data_is_never_cached(client, cxr, tmp_path) -> None:
    r = client.get(_thumb_url(client, "case004"))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    r = _post(client, _encode(cxr, "png", tmp_path))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_upload_413_from_the_content_length_guard_has_the_headers(client) -> None:
    r = _post(client, bytes(int(MAX_MB * 1e6) + MULTIPART_SLACK + 10))
    assert r.status_code == 413
    assert r.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in r.headers
    assert r.headers["cache-control"] == "no-store"


def test_405_names_the_allowed_methods(client) -> None:
    for method, url, allowed in (("PUT", "/healthz", "GET"), ("GET", "/api/v1/analyze", "POST"),
                                 ("DELETE", "/api/v1/cases/case004/thumbnail", "GET")):
        r = client.request(method, url)
        assert r.status_code == 405, (method, url)
        assert allowed in r.headers["allow"]
        assert set(r.json()) == {"detail"}


def test_fastapi_validation_errors_have_the_api_error_shape(client) -> None:
    for kwargs in ({"data": {"other": "x"}}, {"json": {"file": "x"}}, {}):
        r = client.post("/api/v1/analyze", **kwargs)
        assert r.status_code == 422, kwargs
        body = r.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str) and "file" in body["detail"]


def test_malformed_multipart_is_a_documented_400(client) -> None:
    r = client.post("/api/v1/analyze", content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400 and isinstance(r.json()["detail"], str)
    responses = client.get("/openapi.json").json()["paths"]["/api/v1/analyze"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "500"} <= set(responses)
    for code in ("400", "413", "415", "422", "500"):
        assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


# ---------------------------------------------------------------------------------------------- logging
def _access_record(path: str) -> logging.LogRecord:
    # uvicorn's access line: '%s - "%s %s HTTP/%s" %d' % (client, method, path + query, http version, status)
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", "GET", path, "1.1", 404), None)


def test_long_urls_are_truncated_in_log_records() -> None:
    path = "/api/v1/cases/" + "x" * 100_000 + "/thumbnail?q=" + "y" * 1000
    record = _access_record(path)
    assert TruncateLoggedUrls().filter(record)
    line = record.getMessage()
    assert len(line) < LOGGED_URL_CHARS + 120 and "127.0.0.1:5000" in line and line.endswith(" 404")
    short = _access_record("/healthz")
    TruncateLoggedUrls().filter(short)
    assert short.getMessage() == '127.0.0.1:5000 - "GET /healthz HTTP/1.1" 404'


def test_serve_log_config_truncates_uvicorn_access_lines(caplog) -> None:
    import logging.config

    names = ("uvicorn", "uvicorn.access", "uvicorn.error")
    saved = {n: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate)
             for n in names for lg in [logging.getLogger(n)]}
    try:
        logging.config.dictConfig(uvicorn_log_config())
        access = logging.getLogger("uvicorn.access")
        access.addHandler(caplog.handler)
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/" + "z" * 100_000, "1.1", 404)
    finally:
        for n, (handlers, filters, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.filters[:], lg.level, lg.propagate = handlers, filters, level, propagate
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert len(lines) == 1 and len(lines[0]) < LOGGED_URL_CHARS + 120


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


def test_blank_upload_gets_no_result_and_no_verdict(client, tmp_path) -> None:
    from covidcxr.io.files import save_png

    data = save_png(tmp_path / "blank.png", np.zeros((128, 128), np.float32)).read_bytes()
    r = _post(client, data, "blank.png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "no_result" and body["probability"] is None and body["label"] is None
    assert "blank_image" in body["no_result_reasons"]
    assert body["no_result_reason"].startswith("no result: not a usable frontal chest X-ray")
    assert body["similar_cases"] == [] and body["overlays"]["heatmap_png"] is None
    assert body["lung_energy_fraction"] is None
