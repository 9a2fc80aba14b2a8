"""The API keeps its own OpenAPI contract: schemathesis drives the ASGI app in-process with generated requests.

Every answer must be documented (status code, content type, body schema, headers) with the default checks, schema-
valid and schema-invalid requests alike, and none may be a 500. A toy model and index (``covidcxr.web.toy``) stand
behind the app, as in test_web.py.

schemathesis' own pytest integration (``schema.parametrize()`` / ``from_fixture``) fails on pytest 9 (it reads the
removed ``Node._nodeid``), so each operation's hypothesis strategy is driven from a plain parametrized test.
"""

from __future__ import annotations

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from covidcxr.service.settings import ServeSettings
from covidcxr.web.app import create_app
from covidcxr.web.toy import make_toy_assets

torch.set_num_threads(2)

pytestmark = pytest.mark.slow

OPERATIONS = [("/healthz", "GET"), ("/api/v1/cases/{case_id}/thumbnail", "GET"), ("/api/v1/analyze", "POST")]
MAX_EXAMPLES = 30
TOKEN = "contract-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # with it, every documented answer but 401; without it, 401


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    toy = make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=9, image_size=80, seg_mode="mask")
    app = create_app(toy.model_dir, toy.index_dir, ServeSettings(k=3, max_upload_mb=0.5, token=TOKEN))
    with TestClient(app):  # one lifespan (the service's analysis threads stop at its end), as under uvicorn
        yield schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(app))


def _without_lifespan(app):
    """The app minus its lifespan: schemathesis' ASGI client starts and stops one per request."""

    async def wrapped(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": kind + ".complete"})  # lifespan.startup/shutdown.complete
                if kind == "lifespan.shutdown":
                    return
        await app(scope, receive, send)

    return wrapped


def test_every_operation_is_covered(api_schema) -> None:
    found = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Only the upload has inputs that can be invalid (no params on /healthz, any string is a case id).
CASES = [(p, m, GenerationMode.POSITIVE) for p, m in OPERATIONS] + [("/api/v1/analyze", "POST", GenerationMode.NEGATIVE)]


@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_api_keeps_its_contract(api_schema, path, method, mode) -> None:
    operation = api_schema[path][method]
    # A schema cannot say "a decodable PNG, JPEG or DICOM": schema-valid uploads are random bytes, which the service
    # answers with its documented 413/415/422 (status_code_conformance still checks that). That a real image is
    # accepted is tested in test_web.py.
    excluded = [positive_data_acceptance] if path == "/api/v1/analyze" else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(headers=AUTH, excluded_checks=excluded)

    check()
