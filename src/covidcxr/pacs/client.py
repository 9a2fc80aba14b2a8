"""DICOMweb access to a PACS (``dicomweb-client``): QIDO-RS search, WADO-RS retrieval, STOW-RS store.

Credentials come from the environment or a file, never from the command line or the URL, and never reach a log
line or an error message: HTTP basic (``$COVIDCXR_PACS_USER`` + ``$COVIDCXR_PACS_PASSWORD``, or a file holding
``user:password``) or a bearer token (``$COVIDCXR_PACS_TOKEN`` or a file holding it). TLS certificates are verified
(against the system store or ``ca_bundle``); there is no switch to turn that off.

Transient failures (connection errors, time-outs, HTTP 408/429/500/502/503/504) are retried with exponential
back-off (:class:`RetryPolicy`); refused credentials (401/403) end the run at once with :class:`PacsError`.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from covidcxr.errors import ConfigError, PacsError
from covidcxr.service.settings import read_secret_file

log = logging.getLogger(__name__)

USER_ENV = "COVIDCXR_PACS_USER"
PASSWORD_ENV = "COVIDCXR_PACS_PASSWORD"
TOKEN_ENV = "COVIDCXR_PACS_TOKEN"
PAGE_SIZE = 500
"""QIDO results asked per request (``limit``/``offset`` paging)."""

T = TypeVar("T")


@dataclass(frozen=True)
class PacsAuth:
    """How to authenticate: ``kind`` is ``'none'``, ``'basic'`` or ``'bearer'``; the secret is never printed."""

    kind: str = "none"
    user: str | None = None
    secret: str | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        """What the log may say about the credentials (their kind only)."""
        return {"none": "no authentication", "basic": "HTTP basic", "bearer": "bearer token"}[self.kind]


def read_auth(*, token_file: str | Path | None = None, basic_auth_file: str | Path | None = None,
              environ: Mapping[str, str] | None = None) -> PacsAuth:
    """The PACS credentials: a file given on the command line first, else the environment, else none.

    Args:
        token_file: File holding a bearer token.
        basic_auth_file: File holding ``user:password``.
        environ: Environment (default ``os.environ``).

    Raises:
        ConfigError: Both files given, an unreadable/empty/malformed file, or a variable set but empty.
    """
    if token_file is not None and basic_auth_file is not None:
        raise ConfigError("give --token-file or --basic-auth-file, not both")
    if token_file is not None:
        return PacsAuth("bearer", secret=read_secret_file(token_file, "--token-file"))
    if basic_auth_file is not None:
        user, sep, password = read_secret_file(basic_auth_file, "--basic-auth-file").partition(":")
        if not sep or not user:
            raise ConfigError(f"--basic-auth-file {basic_auth_file}: expected one line 'user:password'")
        return PacsAuth("basic", user=user, secret=password)
    env = os.environ if environ is None else environ
    if TOKEN_ENV in env:
        token = str(env[TOKEN_ENV]).strip()
        if not token:
            raise ConfigError(f"${TOKEN_ENV} is set but empty")
        return PacsAuth("bearer", secret=token)
    if USER_ENV in env:
        user = str(env[USER_ENV]).strip()
        if not user:
            raise ConfigError(f"${USER_ENV} is set but empty")
        if PASSWORD_ENV not in env:
            raise ConfigError(f"${USER_ENV} is set but ${PASSWORD_ENV} is not")
        return PacsAuth("basic", user=user, secret=str(env[PASSWORD_ENV]))
    return PacsAuth()


def check_url(url: str) -> str:
    """``url`` without a trailing slash, refused when it is not http(s) or carries credentials.

    Raises:
        ConfigError: Another scheme, no host, or ``user:password@`` in the URL (the message does not repeat it).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r}: expected http(s)://host[:port]/dicom-web")
    if parts.username or parts.password:
        raise ConfigError(f"--url: credentials in the URL are refused (they would show in process lists and logs); "
                          f"use ${USER_ENV}/${PASSWORD_ENV}, ${TOKEN_ENV} or a credentials file")
    return url.rstrip("/")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient HTTP failures: ``attempts`` tries in all, waiting ``base_delay * 2**n`` (capped)."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    statuses: tuple[int, ...] = (408, 429, 500, 502, 503, 504)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts={self.attempts}: must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError("retry delays must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based)."""
        return min(self.max_delay, self.base_delay * 2**attempt)


class AuthRefusedError(PacsError):
    """The PACS answered 401/403: nothing further can work with these credentials."""


class TransientError(PacsError):
    """A request still failing after every retry (network error, time-out, HTTP 5xx/429)."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ConfigError(f"unknown DICOM keyword {keyword!r}")
    return f"{tag:08X}"


def value(item: Mapping[str, Any], keyword: str, default: Any = None) -> Any:
    """The first value of ``keyword`` in a DICOM JSON object (QIDO result), else ``default``."""
    element = item.get(_tag(keyword)) or {}
    values = element.get("Value") or []
    return values[0] if values else default


class PacsClient:
    """A DICOMweb server: search, retrieve and store with retries, credentials kept out of sight.

    Args:
        url: DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (no credentials in it).
        auth: Credentials (:func:`read_auth`).
        ca_bundle: PEM file of trusted CAs (default: the system store). Verification is always on.
        timeout: Seconds per HTTP request.
        retry: Retry policy of transient failures.
        sleep: Waiting function (tests pass a no-op).
    """

    def __init__(self, url: str, auth: PacsAuth | None = None, *, ca_bundle: str | Path | None = None,
                 timeout: float = 30.0, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.url = check_url(url)
        self.auth = auth or PacsAuth()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        session = requests.Session()
        session.verify = str(ca_bundle) if ca_bundle is not None else True
        if self.auth.kind == "basic":
            session.auth = (str(self.auth.user), str(self.auth.secret))
        elif self.auth.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.auth.secret}"
        self._client = DICOMwebClient(self.url, session=session, timeout=timeout)
        self._client.set_http_retry_params(retry=False)  # retries are ours (one policy, logged)

    def __repr__(self) -> str:
        return f"PacsClient({self.url!r}, auth={self.auth.source})"

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request with the retry policy; ``what`` names it (UIDs, never credentials)."""
        import requests

        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except requests.HTTPError as exc:
                status = _status(exc)
                if status in (401, 403):
                    raise AuthRefusedError(f"{what}: the PACS refused the credentials ({self.auth.source}; HTTP "
                                    f"{status}) at {self.url}") from None
                if status not in self.retry.statuses:
                    raise PacsError(f"{what}: HTTP {status} from {self.url}") from None
                reason = f"HTTP {status}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = type(exc).__name__
            if attempt + 1 < self.retry.attempts:
                wait = self.retry.delay(attempt)
                log.warning("%s: %s; retry %d of %d in %.1f s", what, reason, attempt + 1,
                            self.retry.attempts - 1, wait)
                self._sleep(wait)
        raise TransientError(f"{what}: {reason} after {self.retry.attempts} attempts ({self.url})")

    def _paged(self, what: str, search: Callable[..., list[dict[str, Any]]], **kwargs: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self._call(what, lambda: search(limit=PAGE_SIZE, offset=len(out), **kwargs))
            out.extend(page)
            if len(page) < PAGE_SIZE:
                return out

    # ------------------------------------------------------------------ QIDO-RS
    def check(self) -> None:
        """One cheap search, so a wrong URL or refused credentials show before any work."""
        self._call("QIDO studies (connection check)", lambda: self._client.search_for_studies(limit=1))

    def find_studies(self, *, since: str | None = None) -> list[str]:
        """Study Instance UIDs, all or those with StudyDate on or after ``since`` (``YYYYMMDD``)."""
        filters = {"StudyDate": f"{since}-"} if since else None
        found = self._paged("QIDO studies", self._client.search_for_studies, search_filters=filters)
        return [str(value(s, "StudyInstanceUID")) for s in found if value(s, "StudyInstanceUID")]

    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study: ``series_uid``, ``modality``, ``body_part``, ``description``."""
        found = self._paged(f"QIDO series of study {study_uid}", self._client.search_for_series,
                            study_instance_uid=study_uid, fields=["BodyPartExamined", "SeriesDescription"])
        return [{"series_uid": str(value(s, "SeriesInstanceUID", "")), "modality": str(value(s, "Modality", "")),
                 "body_part": str(value(s, "BodyPartExamined", "") or ""),
                 "description": str(value(s, "SeriesDescription", "") or "")} for s in found]

    def find_instances(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """The instances of a series: ``sop_uid``, ``sop_class``, ``view`` (ViewPosition when the PACS returns it)."""
        found = self._paged(f"QIDO instances of series {series_uid}", self._client.search_for_instances,
                            study_instance_uid=study_uid, series_instance_uid=series_uid, fields=["ViewPosition"])
        return [{"sop_uid": str(value(i, "SOPInstanceUID", "")), "sop_class": str(value(i, "SOPClassUID", "")),
                 "view": value(i, "ViewPosition")} for i in found]

    # ------------------------------------------------------------------ WADO-RS / STOW-RS
    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """One instance as Part-10 bytes, in its stored transfer syntax (no transcoding asked of the PACS)."""
        import pydicom

        ds = self._call(f"WADO instance {sop_uid}", lambda: self._client.retrieve_instance(
            study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)))
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        return buf.getvalue()

    def store(self, datasets: Sequence[Any], study_uid: str) -> None:
        """Store result objects into ``study_uid``; re-sending an instance the PACS already holds is harmless.

        Raises:
            PacsError: The PACS reported any instance as failed.
        """
        response = self._call(f"STOW {len(datasets)} instance(s) to study {study_uid}",
                              lambda: self._client.store_instances(list(datasets), study_instance_uid=study_uid))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            uids = ", ".join(str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed)
            raise PacsError(f"STOW to study {study_uid}: the PACS refused instance(s) {uids}")
