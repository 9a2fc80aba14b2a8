"""Serving settings (``covidcxr serve`` options) and the exposure checks made before anything is loaded.

A non-loopback host needs an access token (from a file or ``$COVIDCXR_TOKEN``); the token is never logged or shown.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.errors import ConfigError
from covidcxr.io.image import MAX_DECODED_SIDE

TOKEN_ENV = "COVIDCXR_TOKEN"
"""Environment variable holding the API access token (``--token-file`` takes precedence)."""

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Service settings (the ``covidcxr serve`` options).

    Attributes:
        host: Interface to bind; loopback by default so nothing is exposed without asking.
        port: TCP port.
        max_upload_mb: Largest accepted upload in MB (10**6 bytes), answered with 413 above.
        keep_uploads: Folder where uploads are kept under server-generated names; None keeps nothing on disk.
        k: Similar cases returned per analysis.
        display_size: Longer side of the image and overlay PNGs sent to the page.
        thumbnail_size: Longer side of case thumbnails.
        segmenter_weights: Lung-segmenter weights; None uses the model's own segmenter, else the shipped one.
        device: Inference device (``auto``, ``cpu``, ``cuda``).
        inference_threads: Worker threads running analyses. The model itself runs one request at a time (it is
            locked); more threads only overlap decoding and PNG encoding, and each thread costs glibc malloc arena
            memory (about 20 MB per thread measured with a ResNet-18), so 1 is the default.
        token: API access token (clients send ``Authorization: Bearer <token>``); None serves the API open (only
            allowed on loopback). Never logged; hidden from ``repr``.
        show_real_ids: Send the archive's real ``case_id``/``patient_id`` of similar cases instead of pseudonyms.
        queue_size: Analyses admitted beyond the running ones (``inference_threads``); more are refused with 503.
        max_side: Longest side of a decoded upload; larger images are reduced while decoding.
        ssl_certfile: TLS certificate (PEM) for uvicorn; None serves plain HTTP (put a TLS reverse proxy in front).
        ssl_keyfile: Its private key (PEM).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 50.0
    keep_uploads: Path | None = None
    k: int = 8
    display_size: int = 768
    thumbnail_size: int = 160
    segmenter_weights: Path | None = None
    device: str = "auto"
    inference_threads: int = 1
    token: str | None = field(default=None, repr=False)
    show_real_ids: bool = False
    queue_size: int = 8
    max_side: int = MAX_DECODED_SIDE
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not str(self.token).strip():
            raise ConfigError("token: empty (set a non-empty secret, or no token for an open loopback server)")
        if int(self.queue_size) < 0:
            raise ConfigError(f"queue_size={self.queue_size}: must be at least 0")
        if isinstance(self.max_side, bool) or int(self.max_side) < 1:
            raise ConfigError(f"max_side={self.max_side}: must be a positive number of pixels")
        self.max_side = int(self.max_side)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for name in ("ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                value = Path(value)
                if not value.is_file():
                    raise ConfigError(f"{value}: {name.replace('_', '-')} not found")
                setattr(self, name, value)
        if not self.max_upload_mb > 0:
            raise ConfigError(f"max_upload_mb={self.max_upload_mb}: must be positive")
        if int(self.k) < 1:
            raise ConfigError(f"k={self.k}: must be at least 1")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"port={self.port}: must be in 0..65535")
        if int(self.inference_threads) < 1:
            raise ConfigError(f"inference_threads={self.inference_threads}: must be at least 1")
        if int(self.display_size) < 64 or int(self.thumbnail_size) < 16:
            raise ConfigError(f"display_size={self.display_size}/thumbnail_size={self.thumbnail_size}: too small")
        if self.keep_uploads is not None:
            self.keep_uploads = Path(self.keep_uploads)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "token")
        return f"ServeSettings({shown}, token={'<set>' if self.token else None})"

    @property
    def max_upload_bytes(self) -> int:
        """Upload limit in bytes."""
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_in_flight(self) -> int:
        """Analyses admitted at once (running + queued)."""
        return int(self.inference_threads) + int(self.queue_size)


def read_secret_file(path: str | Path, option: str) -> str:
    """The stripped content of a secret file (token, ``user:password``); errors name the option, never the secret.

    Raises:
        ConfigError: The file is unreadable or empty.
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({type(exc).__name__})") from exc
    if not text:
        raise ConfigError(f"{option} {path}: the file is empty")
    return text


def read_token(token_file: str | Path | None = None, environ: Any = None) -> str | None:
    """The API access token: the content of ``token_file`` (stripped), else ``$COVIDCXR_TOKEN``, else None.

    Raises:
        ConfigError: The file is unreadable or empty, or the variable is set but empty.
    """
    if token_file is not None:
        return read_secret_file(token_file, "--token-file")
    env = os.environ if environ is None else environ
    if TOKEN_ENV in env:
        token = str(env[TOKEN_ENV]).strip()
        if not token:
            raise ConfigError(f"${TOKEN_ENV} is set but empty")
        return token
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServeSettings, *, warn: bool = True) -> None:
    """Refuse to serve a non-loopback host without a token; warn (``warn``) when serving loopback without one.

    Raises:
        ConfigError: ``settings.host`` is reachable from other machines and no token is configured.
    """
    if settings.token:
        return
    if not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve on --host {settings.host} without an access token: the API would be open to other "
            f"machines. Put a secret in a file and pass --token-file PATH, or set ${TOKEN_ENV} (clients then send "
            "'Authorization: Bearer <token>'), or bind 127.0.0.1")
    if warn:
        log.warning("serving on %s without an access token: the API is open to every local user (set --token-file "
                    "PATH or $%s to require one)", settings.host, TOKEN_ENV)
