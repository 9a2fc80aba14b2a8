"""FastAPI app: the radiologist's page at ``/`` and the REST API under ``/api/v1`` (no logic: it calls :mod:`api`).

Endpoints:

* ``POST /api/v1/analyze``: multipart upload (PNG, JPEG or DICOM) -> probability, label at the stored threshold,
  QC flags, Grad-CAM and lung-outline overlays (base64 PNG), the k most similar cases, model version.
* ``GET /api/v1/cases/{case_id}/thumbnail``: PNG thumbnail of an indexed case (looked up by id, never a path).
* ``GET /healthz``; OpenAPI docs at ``/docs`` (Swagger UI served from the package, no CDN: it works offline).

Access: with a token configured (``ServeSettings.token``), every ``/api/`` request needs ``Authorization: Bearer
<token>`` (:class:`TokenAuth`, checked before the body is read; 401 with ``WWW-Authenticate: Bearer`` otherwise);
the page, ``/static/``, ``/docs`` and ``/openapi.json`` stay open, and ``/healthz`` answers only ``{"status": "ok"}``
without the token. At most ``inference_threads + queue_size`` analyses are in flight; more get 503 with
``Retry-After: 1`` at once.

Every response carries a Content-Security-Policy and ``X-Content-Type-Options: nosniff``; every ``/api/``
response (results, thumbnails, errors: patient data) ``Cache-Control: no-store``. Errors, FastAPI's own validation
errors included, have one shape: ``{"detail": "<reason>"}`` (:class:`ErrorBody`). :func:`serve` truncates the
client-supplied request line in uvicorn's log records (:class:`TruncateLoggedUrls`).

The model and index are loaded once by :func:`create_app`; the CPU-bound analysis runs in the service's analysis
thread pool, so the event loop keeps serving (health checks, thumbnails, the page, other uploads) while requests
are being analysed.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from covidcxr import __version__
from covidcxr.errors import (
    CaseIndexError,
    ConfigError,
    CxrError,
    ImageReadError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from covidcxr.service.case_service import CaseService
from covidcxr.service.settings import ServeSettings, check_exposure

log = logging.getLogger(__name__)

MULTIPART_SLACK = 64 * 1024
"""Bytes allowed on top of the upload limit for the multipart envelope (boundaries, part headers)."""
# The page only loads its own files and the data: URLs of the overlays it receives.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# Swagger UI runs only its own same-origin scripts (no inline script: see static/swagger-ui/init.js) but sets inline
# styles (React style attributes, highlighted code) and shows data: SVG icons.
_DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
_DOCS_HTML = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>covidcxr - API docs</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{OPENAPI_PATH}"></div>
<script src="/static/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/swagger-ui/init.js"></script>
</body>
</html>
"""
LOGGED_URL_CHARS = 200
"""Most characters of one client-supplied string (path + query, method) that a log record keeps."""
API_PREFIX = "/api/"
UNAUTHORIZED = "missing or invalid access token: send the header 'Authorization: Bearer <token>'"
BUSY = "server busy: too many analyses in flight; retry in a moment"
RETRY_AFTER_S = 1


class ErrorBody(BaseModel):
    """The one error shape of the API."""

    detail: str = Field(description="Why the request was refused (never contains patient identifiers)")


def _error_doc(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        doc["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}
    return doc


_UNAUTHORIZED_DOC = ("Missing or wrong access token (only when the server has one)",
                     {"WWW-Authenticate": "Bearer"})


class SecurityHeaders:
    """Add the Content-Security-Policy, ``nosniff`` and (on ``/api/``) ``Cache-Control: no-store`` to every response.

    A plain ASGI middleware wrapped around the whole app (outside FastAPI's error middleware), so error answers,
    static files, the docs and the 413 of :class:`ContentLengthLimit` get the headers too.

    Args:
        app: The ASGI app.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        csp = _DOCS_CSP if path == DOCS_PATH else _PAGE_CSP
        patient_data = path.startswith("/api/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = csp
                headers["X-Content-Type-Options"] = "nosniff"
                if patient_data:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def token_matches(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as a Bearer credential (constant-time compare).

    Always True when no token is configured (open mode).
    """
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.strip().encode("latin-1", "replace"), token.encode("utf-8"))


class TokenAuth:
    """Answer 401 (JSON, ``WWW-Authenticate: Bearer``) to ``/api/`` requests without the configured token.

    A plain ASGI middleware outside the routing, so an unauthenticated upload is refused before its body is read.

    Args:
        app: The ASGI app.
        token: The access token; None lets every request through.
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app, self._token = app, token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._token and scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            raw = dict(scope.get("headers") or []).get(b"authorization")
            if not token_matches(raw.decode("latin-1") if raw is not None else None, self._token):
                response = JSONResponse({"detail": UNAUTHORIZED}, status_code=401,
                                        headers={"Cache-Control": "no-store", "WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PNGResponse(Response):
    """A PNG image (so the schema documents ``image/png`` only)."""

    media_type = "image/png"


class _App(FastAPI):
    """FastAPI with :class:`SecurityHeaders` outside every other middleware (500 answers included), and a schema
    without the validation-error shape FastAPI adds to routes with parameters (its 422s use :class:`ErrorBody`)."""

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack())

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    answer = operation.get("responses", {}).get("422", {})
                    if "HTTPValidationError" in str(answer.get("content")):
                        del operation["responses"]["422"]  # a route whose parameters cannot be invalid
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            service = getattr(self.state, "service", None)
            if service is not None and service.settings.token:  # the docs' "Authorize" button; API routes only
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearerAuth": {"type": "http", "scheme": "bearer",
                                   "description": "The server's access token (--token-file or $COVIDCXR_TOKEN)"}}
                for path, operations in schema.get("paths", {}).items():
                    if path.startswith(API_PREFIX):
                        for operation in operations.values():
                            operation["security"] = [{"bearerAuth": []}]
            self.openapi_schema = schema
        return self.openapi_schema


class TruncateLoggedUrls(logging.Filter):
    """Shorten long string arguments of a log record (uvicorn's access line: client, method, path + query).

    A client chooses the path; a 100,000-character case id must not become a 100,000-character log line.

    Args:
        limit: Characters kept of each string argument.
    """

    def __init__(self, limit: int = LOGGED_URL_CHARS) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and len(a) > self.limit for a in record.args):
            record.args = tuple(
                f"{a[: self.limit]}...[{len(a) - self.limit} more chars]"
                if isinstance(a, str) and len(a) > self.limit else a
                for a in record.args
            )
        return True


def uvicorn_log_config(limit: int = LOGGED_URL_CHARS) -> dict[str, Any]:
    """Uvicorn's default logging config with :class:`TruncateLoggedUrls` on its access and error loggers."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["truncate_urls"] = {"()": TruncateLoggedUrls, "limit": limit}
    for name in ("uvicorn.access", "uvicorn.error"):
        config["loggers"].setdefault(name, {})
        config["loggers"][name]["filters"] = [*config["loggers"][name].get("filters", []), "truncate_urls"]
    return config


class ContentLengthLimit:
    """Answer 413 (JSON, with the limit) before reading a body whose Content-Length is over the limit.

    Bodies without a Content-Length (chunked) are counted while streamed by FastAPI's ``max_body_size`` on the
    route; this middleware only makes the common case cheap and its answer explicit.

    Args:
        app: The ASGI app.
        path: The upload path it guards.
        max_body: Largest accepted body in bytes.
        message: Reason sent with the 413.
    """

    def __init__(self, app: Any, path: str, max_body: int, message: str) -> None:
        self.app, self.path, self.max_body, self.message = app, path, max_body, message

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body:
                response = JSONResponse({"detail": self.message}, status_code=413,
                                        headers={"Cache-Control": "no-store", "Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


UPLOAD_FIELD = File(..., description="PNG, JPEG or DICOM file")


def static_dir() -> Path:
    """Folder of the page's static files (``index.html``, ``app.js``, ``style.css``)."""
    return Path(str(resources.files("covidcxr.web") / "static"))


def create_app(model_dir: str | Path, index_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """Load the model and index once and build the app.

    Args:
        model_dir: Classifier or ensemble artifact folder.
        index_dir: Case index built with this model's embeddings.
        settings: Service settings (upload limit, k, kept uploads, ...).

    Returns:
        The FastAPI application.

    Raises:
        ModelError, CaseIndexError: Model or index missing, corrupt or not matching each other.
    """
    return build_app(CaseService.load(model_dir, index_dir, settings))


def build_app(service: CaseService) -> FastAPI:
    """Build the app around an already loaded :class:`~covidcxr.api.CaseService`.

    Args:
        service: The loaded service.

    Returns:
        The FastAPI application.
    """
    settings = service.settings
    body_limit = settings.max_upload_bytes + MULTIPART_SLACK
    # Starlette spools uploads over 1 MB to a temporary file; raising the spool size keeps uploads (which may be
    # DICOMs with patient data) in memory only. The body limit above bounds that memory per request.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, body_limit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = _App(
        lifespan=lifespan,
        title="covidcxr",
        version=__version__,
        openapi_url=OPENAPI_PATH,
        docs_url=None,  # served below from the package's own Swagger UI files (the default loads them from a CDN)
        redoc_url=None,  # ReDoc also comes from a CDN and is not vendored
        description="COVID-19 probability, lung segmentation QC, Grad-CAM and similar cases for one frontal chest "
                    "X-ray. Research software: not a medical device.",
    )
    app.state.service = service
    static = static_dir()
    too_large = f"upload exceeds the limit of {settings.max_upload_mb:g} MB"
    app.add_middleware(ContentLengthLimit, path="/api/v1/analyze", max_body=body_limit, message=too_large)
    app.add_middleware(TokenAuth, token=settings.token)  # added last: outermost, before the size guard

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status,
                            headers={"Cache-Control": "no-store", **(headers or {})})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error(413, too_large) if exc.status_code == 413 else error(exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():  # e.g. the Allow header of a 405 (RFC 9110)
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 (no file field, not multipart) in the API's one error shape; the submitted values
        # ("input") are left out on purpose.
        reasons = []
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            reasons.append(f"{where}: {problem.get('msg', 'invalid')}" if where else str(problem.get("msg")))
        return error(422, "invalid request: " + "; ".join(reasons or ["invalid"]))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(_DOCS_HTML)

    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/healthz", tags=["service"], summary="Liveness; model/index facts only with the access token")
    def healthz(request: Request) -> dict[str, Any]:
        return service.health(full=token_matches(request.headers.get("authorization"), settings.token))

    @app.post(
        "/api/v1/analyze",
        tags=["analysis"],
        summary="Analyse one chest X-ray (PNG, JPEG or DICOM)",
        max_body_size=body_limit,
        responses={
            400: _error_doc("Malformed multipart body"),
            413: _error_doc("Upload (or image) larger than the limit"),
            415: _error_doc("Not a PNG, JPEG or DICOM file (recognised by content), or a DICOM object that is refused"),
            422: _error_doc("Corrupt, truncated or empty image, a missing file field, or a body that is not "
                            "multipart/form-data"),
            500: _error_doc("The analysis failed (details in the server log)"),
            401: _error_doc(*_UNAUTHORIZED_DOC),
            503: _error_doc("Too many analyses in flight (running + queued); retry after the given seconds",
                            {"Retry-After": "Seconds to wait before retrying"}),
        },
    )
    async def analyze(file: UploadFile = UPLOAD_FIELD) -> JSONResponse:
        if file.size is not None and file.size > settings.max_upload_bytes:
            return error(413, too_large)
        if not service.admit():  # bounded queue: refuse at once rather than wait
            await file.close()
            return error(503, BUSY, {"Retry-After": str(RETRY_AFTER_S)})
        try:
            data = await file.read()
            await file.close()
        except BaseException:
            service.release()
            raise
        try:  # the job gives its slot back when it ends (or is cancelled unstarted), not when this coroutine does
            result = await asyncio.wrap_future(service.submit_admitted(data))
        except ImageTooLargeError as exc:
            return error(413, str(exc))
        except UnsupportedImageError as exc:
            return error(415, str(exc))
        except (ImageReadError, ConfigError) as exc:
            return error(422, str(exc))
        except CxrError as exc:
            log.error("analysis failed: %s", exc)
            return error(500, "analysis failed; see the server log")
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @app.get(
        "/api/v1/cases/{case_id:path}/thumbnail",
        tags=["cases"],
        summary="Thumbnail of an indexed case",
        response_class=PNGResponse,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "PNG thumbnail (sent with Cache-Control: no-store)"},
            # Spelled out: with a model, FastAPI would document the error under the route's image/png.
            404: {"description": "Unknown case or image unavailable",
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
            401: {"description": _UNAUTHORIZED_DOC[0],
                  "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
        },
    )
    async def thumbnail(case_id: str) -> Response:
        real = service.real_case_id(case_id)  # the id shown to clients (a pseudonym unless show_real_ids)
        if real is None or not service.has_case(real):
            return error(404, "unknown case id")
        try:
            png = await run_in_threadpool(service.thumbnail_png, real)
        except CaseIndexError:
            return error(404, "case image unavailable on this server")  # the exception names the real id
        return PNGResponse(png, headers={"Cache-Control": "no-store"})

    return app


def serve(model_dir: str | Path, index_dir: str | Path, settings: ServeSettings | None = None) -> None:
    """Load the model and index and serve the app with uvicorn until interrupted.

    Args:
        model_dir: Classifier or ensemble artifact folder.
        index_dir: Case index folder.
        settings: Host, port and service settings.

    Raises:
        ConfigError: A non-loopback host without a token (see :func:`~covidcxr.service.analysis.check_exposure`).
    """
    import uvicorn

    settings = settings or ServeSettings()
    check_exposure(settings)  # before loading anything: a public host needs a token
    logging.getLogger("covidcxr.audit").setLevel(logging.INFO)  # audit lines whatever the CLI's verbosity
    app = create_app(model_dir, index_dir, settings)
    tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)} \
        if settings.ssl_certfile is not None else {}
    uvicorn.run(app, host=settings.host, port=int(settings.port), log_level="info", server_header=False,
                log_config=uvicorn_log_config(), **tls)
