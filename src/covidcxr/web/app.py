"""FastAPI app: the radiologist's page at ``/`` and the REST API under ``/api/v1`` (no logic: it calls :mod:`api`).

Endpoints:

* ``POST /api/v1/analyze``: multipart upload (PNG, JPEG or DICOM) -> probability, label at the stored threshold,
  QC flags, Grad-CAM and lung-outline overlays (base64 PNG), the k most similar cases, model version.
* ``GET /api/v1/cases/{case_id}/thumbnail``: PNG thumbnail of an indexed case (looked up by id, never a path).
* ``GET /healthz``; OpenAPI docs at ``/docs``.

The model and index are loaded once by :func:`create_app`; the CPU-bound analysis runs in the service's analysis
thread pool, so the event loop keeps serving (health checks, thumbnails, the page, other uploads) while requests
are being analysed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
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
from covidcxr.service.analysis import CaseService, ServeSettings

log = logging.getLogger(__name__)

MULTIPART_SLACK = 64 * 1024
"""Bytes allowed on top of the upload limit for the multipart envelope (boundaries, part headers)."""
# The page only loads its own files and the data: URLs of the overlays it receives.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


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

    app = FastAPI(
        lifespan=lifespan,
        title="covidcxr",
        version=__version__,
        description="COVID-19 probability, lung segmentation QC, Grad-CAM and similar cases for one frontal chest "
                    "X-ray. Research software: not a medical device.",
    )
    app.state.service = service
    static = static_dir()
    too_large = f"upload exceeds the limit of {settings.max_upload_mb:g} MB"
    app.add_middleware(ContentLengthLimit, path="/api/v1/analyze", max_body=body_limit, message=too_large)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers={"Cache-Control": "no-store"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return error(413, too_large)
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path == "/":
            response.headers["Content-Security-Policy"] = _PAGE_CSP
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/healthz", tags=["service"], summary="Liveness and loaded model/index")
    def healthz() -> dict[str, Any]:
        return service.health()

    @app.post(
        "/api/v1/analyze",
        tags=["analysis"],
        summary="Analyse one chest X-ray (PNG, JPEG or DICOM)",
        max_body_size=body_limit,
        responses={
            413: {"description": "Upload (or image) larger than the limit"},
            415: {"description": "Not a PNG, JPEG or DICOM file, or a DICOM object that is refused"},
            422: {"description": "Corrupt or truncated image, or a missing file field"},
        },
    )
    async def analyze(file: UploadFile = UPLOAD_FIELD) -> JSONResponse:
        if file.size is not None and file.size > settings.max_upload_bytes:
            return error(413, too_large)
        data = await file.read()
        await file.close()
        try:
            result = await asyncio.get_running_loop().run_in_executor(service.executor, service.analyze_bytes, data)
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
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown case or image unavailable"}},
    )
    async def thumbnail(case_id: str) -> Response:
        if not service.has_case(case_id):
            return error(404, "unknown case id")
        try:
            png = await run_in_threadpool(service.thumbnail_png, case_id)
        except CaseIndexError as exc:
            return error(404, str(exc))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return app


def serve(model_dir: str | Path, index_dir: str | Path, settings: ServeSettings | None = None) -> None:
    """Load the model and index and serve the app with uvicorn until interrupted.

    Args:
        model_dir: Classifier or ensemble artifact folder.
        index_dir: Case index folder.
        settings: Host, port and service settings.
    """
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(model_dir, index_dir, settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the API is reachable from other machines and has no authentication",
                    settings.host)
    uvicorn.run(app, host=settings.host, port=int(settings.port), log_level="info", server_header=False)
