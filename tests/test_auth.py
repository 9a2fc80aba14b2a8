"""Access control, least exposure and bounded load of the web service (token, pseudonymous ids, audit log, 503)."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from covidcxr.cli import build_parser
from covidcxr.cli.serve_cmd import serve_settings
from covidcxr.data.synth import draw_cxr
from covidcxr.errors import ConfigError
from covidcxr.service.settings import TOKEN_ENV, ServeSettings, check_exposure, is_loopback, read_token
from covidcxr.web.app import create_app, serve, token_matches
from covidcxr.web.toy import ToyAssets, make_toy_assets

torch.set_num_threads(2)

TOKEN = "t0ken-for-tests-QXZ-8c1f2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyAssets:
    return make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=9, image_size=80, seg_mode="mask")


@pytest.fixture(scope="module")
def client(toy: ToyAssets) -> TestClient:
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=K, max_upload_mb=0.5, token=TOKEN))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def png() -> bytes:
    image = draw_cxr(np.random.default_rng(7), "covid", size=72)[0]
    buf = io.BytesIO()
    Image.fromarray(np.uint8(image * 255)).save(buf, format="PNG")
    return buf.getvalue()


def _post(client: TestClient, data: bytes, headers: dict | None = None, name: str = "QXZNAME.png"):
    return client.post("/api/v1/analyze", files={"file": (name, data, "image/png")}, headers=headers or {})


def _real_ids(client: TestClient) -> tuple[set[str], set[str]]:
    meta = client.app.state.service.index.metadata_
    return set(map(str, meta["case_id"])), set(map(str, meta["patient_id"]))


def _assert_401(r) -> None:
    assert r.status_code == 401, r.text
    assert set(r.json()) == {"detail"} and "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    assert TOKEN not in r.text


# ---------------------------------------------------------------------------------------------- token
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}],
    ids=["none", "wrong", "basic", "no-scheme", "longer", "empty"],
)
def test_api_routes_need_the_token(client, png, headers) -> None:
    _assert_401(_post(client, png, headers))
    _assert_401(client.get("/api/v1/cases/whatever/thumbnail", headers=headers))
    _assert_401(client.get("/api/v1/nowhere", headers=headers))


def test_with_the_token_analyze_and_thumbnail_answer(client, png) -> None:
    r = _post(client, png, AUTH)
    assert r.status_code == 200, r.text
    case = r.json()["similar_cases"][0]
    thumb = client.get(case["thumbnail_url"], headers=AUTH)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert client.get(case["thumbnail_url"]).status_code == 401
    lower = {"authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive (RFC 9110)
    assert client.get(case["thumbnail_url"], headers=lower).status_code == 200


def test_unauthenticated_upload_is_refused_before_the_body_is_read(client) -> None:
    r = _post(client, bytes(2_000_000))  # over the 0.5 MB limit: without the token, 401 (not 413) comes first
    _assert_401(r)


def test_page_static_files_and_docs_stay_open(client) -> None:
    for url in ("/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json"):
        assert client.get(url).status_code == 200, url
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    analyze = schema["paths"]["/api/v1/analyze"]["post"]
    assert {"401", "503"} <= set(analyze["responses"]) and analyze["security"] == [{"bearerAuth": []}]
    assert "Retry-After" in analyze["responses"]["503"]["headers"]
    thumb = schema["paths"]["/api/v1/cases/{case_id}/thumbnail"]["get"]
    assert "401" in thumb["responses"] and thumb["security"] == [{"bearerAuth": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_healthz_is_minimal_without_the_token(client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.get("/healthz", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    full = client.get("/healthz", headers=AUTH).json()
    assert full["status"] == "ok" and full["index_cases"] == 9 and re.fullmatch(r"[0-9a-f]{12}", full["model"])


def test_token_matches() -> None:
    assert token_matches(None, None) and token_matches("anything", None)
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"  bearer   {TOKEN} ", TOKEN)
    for value in (None, "", "Bearer", f"Token {TOKEN}", f"Bearer {TOKEN[:-1]}", "Bearer \u00e9"):
        assert not token_matches(value, TOKEN), value


def test_settings_never_show_the_token() -> None:
    settings = ServeSettings(token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings) and "token=<set>" in repr(settings)
    assert "token=None" in repr(ServeSettings())
    with pytest.raises(ConfigError, match="token: empty"):
        ServeSettings(token="  ")


def test_token_from_file_or_environment(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token(path, environ={TOKEN_ENV: "other"}) == TOKEN  # the file wins
    assert read_token(None, environ={TOKEN_ENV: " from-env "}) == "from-env"
    assert read_token(None, environ={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(tmp_path / "empty", environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing", environ={})
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        read_token(None, environ={TOKEN_ENV: ""})


# ---------------------------------------------------------------------------------------------- exposure
@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True),
                                                ("::1", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.20", False), ("example.org", False)])
def test_is_loopback(host, loopback) -> None:
    assert is_loopback(host) is loopback


def test_public_host_without_a_token_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"--host 0\.0\.0\.0 .*--token-file PATH.*COVIDCXR_TOKEN"):
        check_exposure(ServeSettings(host="0.0.0.0"))
    check_exposure(ServeSettings(host="0.0.0.0", token=TOKEN))  # with a token: allowed
    # serve() checks before loading the model or binding anything (the model path does not even exist).
    with pytest.raises(ConfigError, match="0.0.0.0"):
        serve(tmp_path / "no-model", tmp_path / "no-index", ServeSettings(host="0.0.0.0", port=0))


def test_serve_command_settings(tmp_path) -> None:
    parser = build_parser()
    base = ["serve", "--model", "m", "--index", "i"]
    with pytest.raises(ConfigError, match="192.168.1.20"):
        serve_settings(parser.parse_args([*base, "--host", "192.168.1.20"]), environ={})
    settings = serve_settings(parser.parse_args([*base, "--host", "0.0.0.0"]), environ={TOKEN_ENV: TOKEN})
    assert settings.token == TOKEN and not settings.show_real_ids and settings.queue_size == 8
    path = tmp_path / "tok"
    path.write_text(TOKEN)
    settings = serve_settings(parser.parse_args([*base, "--token-file", str(path), "--show-real-ids",
                                                 "--queue-size", "2", "--max-side", "2000"]), environ={})
    assert (settings.token, settings.show_real_ids, settings.queue_size, settings.max_side) == (TOKEN, True, 2, 2000)
    open_local = serve_settings(parser.parse_args(base), environ={})
    assert open_local.token is None and open_local.max_side == 4300


def test_loopback_without_a_token_warns(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="covidcxr")
    check_exposure(ServeSettings())
    warnings = [r for r in caplog.records if "without an access token" in r.getMessage()]
    assert len(warnings) == 1 and "--token-file" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------------- pseudonyms
def test_similar_cases_carry_stable_pseudonyms(client, png) -> None:
    real_cases, real_patients = _real_ids(client)
    first = _post(client, png, AUTH).json()["similar_cases"]
    second = _post(client, png, AUTH).json()["similar_cases"]
    assert len(first) == K and first == second  # same upload, same ids: stable across requests
    for case in first:
        assert re.fullmatch(r"[0-9a-f]{12}", case["case_id"]) and re.fullmatch(r"[0-9a-f]{12}", case["patient_id"])
        assert case["case_id"] not in real_cases and case["patient_id"] not in real_patients
        assert case["thumbnail_url"] == f"/api/v1/cases/{case['case_id']}/thumbnail"
        assert client.get(case["thumbnail_url"], headers=AUTH).status_code == 200
    body = _post(client, png, AUTH).text
    for real in real_cases | real_patients:
        assert f'"{real}"' not in body
    for real in sorted(real_cases)[:3]:  # the archive's ids do not open thumbnails
        r = client.get(f"/api/v1/cases/{real}/thumbnail", headers=AUTH)
        assert r.status_code == 404 and real not in r.text


def test_pseudonyms_are_keyed_by_the_server_secret(client, toy) -> None:
    service = client.app.state.service
    other = create_app(toy.model_dir, toy.index_dir, ServeSettings(token="another-token")).state.service
    again = create_app(toy.model_dir, toy.index_dir, ServeSettings(token=TOKEN)).state.service
    random_key = create_app(toy.model_dir, toy.index_dir, ServeSettings()).state.service
    try:
        ids = [s.public_id("case", "case004") for s in (service, other, again, random_key)]
        assert ids[0] == ids[2]  # the same token: the same pseudonyms after a restart
        assert len({ids[0], ids[1], ids[3]}) == 3
        assert service.public_id("patient", "case004") != ids[0]  # case and patient ids never share a pseudonym
    finally:
        for s in (other, again, random_key):
            s.close()


def test_show_real_ids_sends_the_archive_ids(toy, png) -> None:
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=K, show_real_ids=True))
    with TestClient(app) as c:
        real_cases, real_patients = _real_ids(c)
        cases = _post(c, png).json()["similar_cases"]  # no token configured: open (loopback) mode
        assert {x["case_id"] for x in cases} <= real_cases and {x["patient_id"] for x in cases} <= real_patients
        assert c.get(cases[0]["thumbnail_url"]).status_code == 200
        assert c.get("/api/v1/cases/case004/thumbnail").status_code == 200
        assert c.get("/healthz").json()["index_cases"] == 9  # open mode: full health


# ---------------------------------------------------------------------------------------------- audit log
def test_one_audit_line_per_analysis_without_identifiers(client, png, caplog) -> None:
    caplog.set_level(logging.INFO, logger="covidcxr.audit")
    ok = _post(client, png, AUTH).json()
    bad = _post(client, b"\x89PNG\r\n\x1a\n" + bytes(40), AUTH)
    assert bad.status_code == 422
    lines = [r.getMessage() for r in caplog.records if r.name == "covidcxr.audit"]
    assert len(lines) == 2
    pattern = (r"analysis request_id=(?P<id>[0-9a-f]{12}) time=(?P<t>\S+\+00:00) status=(?P<s>ok|no_result|error) "
               r"probability=(?P<p>none|\d\.\d{3}) duration_ms=\d+")
    first, second = (re.fullmatch(pattern, line) for line in lines)
    assert first and second, lines
    assert first["id"] == ok["request_id"] and first["s"] == ok["status"]
    assert first["p"] == ("none" if ok["probability"] is None else f"{ok['probability']:.3f}")
    assert second["s"] == "error" and second["p"] == "none"
    assert client.app.state.service.in_flight == 0  # the failed analysis gave its slot back
    real_cases, real_patients = _real_ids(client)
    shown = {c["case_id"] for c in ok["similar_cases"]} | {c["patient_id"] for c in ok["similar_cases"]}
    for line in lines:
        assert "QXZNAME" not in line and "upload" not in line and TOKEN not in line
        assert not any(i in line for i in real_cases | real_patients | shown)


# ---------------------------------------------------------------------------------------------- load
def test_full_queue_answers_503_at_once(toy, png) -> None:
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=2, queue_size=0))  # 1 thread + 0 queued
    with TestClient(app) as c:
        service = app.state.service
        answers: list[int] = []
        with service._model_lock:  # the first analysis waits for the model: its slot stays taken
            worker = threading.Thread(target=lambda: answers.append(_post(c, png).status_code))
            worker.start()
            deadline = time.monotonic() + 30
            while service.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert service.in_flight == 1
            t0 = time.perf_counter()
            r = _post(c, png)
            assert time.perf_counter() - t0 < 5  # answered without waiting for the slot
        worker.join(timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert set(r.json()) == {"detail"} and "busy" in r.json()["detail"]
        assert r.headers["cache-control"] == "no-store"
        assert answers == [200] and service.in_flight == 0
        assert _post(c, png).status_code == 200  # the slot is free again


def test_a_cancelled_queued_analysis_gives_its_slot_back(client, png) -> None:
    service = client.app.state.service  # 1 analysis thread: the second job waits in the executor's queue
    with service._model_lock:
        assert service.admit() and service.admit()
        running = service.submit_admitted(png)
        queued = service.submit_admitted(png)
        deadline = time.monotonic() + 30
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued.cancel()
        assert service.in_flight == 1  # the cancelled job's slot is back; the running one holds its own
    assert running.result(timeout=60)["status"] in ("ok", "no_result")
    assert service.in_flight == 0


def test_max_side_setting_reduces_large_uploads(toy, png) -> None:
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=2, max_side=40))
    with TestClient(app) as c:
        r = _post(c, png)
    assert r.status_code == 200, r.text
    image = r.json()["image"]
    assert max(image["height"], image["width"]) <= 40
    assert any("reduced from 72 x 72" in w for w in image["warnings"])


@pytest.mark.parametrize(("kwargs", "match"), [({"queue_size": -1}, "queue_size=-1"), ({"max_side": 0}, "max_side=0")])
def test_bad_load_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        ServeSettings(**kwargs)


def test_settings_defaults() -> None:
    s = ServeSettings()
    assert (s.token, s.show_real_ids, s.queue_size, s.max_side, s.max_in_flight) == (None, False, 8, 4300, 9)


def test_tls_settings_need_both_existing_files(tmp_path) -> None:
    from covidcxr.errors import ConfigError
    from covidcxr.service.settings import ServeSettings

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with pytest.raises(ConfigError, match="TLS needs both"):
        ServeSettings(ssl_certfile=cert)
    with pytest.raises(ConfigError, match="cert.pem: ssl-certfile not found"):
        ServeSettings(ssl_certfile=cert, ssl_keyfile=key)
    cert.write_text("x")
    key.write_text("y")
    assert ServeSettings(ssl_certfile=cert, ssl_keyfile=key).ssl_keyfile == key


def test_cli_explain_says_no_result_on_a_blank_image(tmp_path, capsys) -> None:
    import numpy as np

    from covidcxr.cli import main
    from covidcxr.io.files import save_png

    blank = save_png(tmp_path / "blank.png", np.zeros((256, 256), np.float32))
    # A reasoned refusal is an answer: exit 0 (1 is for inputs that could not be read; README, exit status).
    assert main(["explain", str(blank), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no result: not a usable frontal chest X-ray" in out and "picture other than a chest X-ray" in out
