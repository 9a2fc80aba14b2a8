"""A throw-away local Orthanc PACS (DICOMweb plugin on, authentication on) for tests and benchmarks.

Not used by ``covidcxr pacs``: it starts Debian's ``Orthanc`` binary on a free loopback port with a temporary
storage folder and configuration, waits for ``/system`` and stops it on exit. :func:`find_orthanc` says why it
cannot (binary or plugin missing), so tests can skip with that reason.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from covidcxr.errors import PacsError

log = logging.getLogger(__name__)

_BINARIES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                 "/usr/lib/*/orthanc/libOrthancDicomWeb.so*", "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")


def find_orthanc() -> tuple[str | None, str | None, str]:
    """``(binary, DICOMweb plugin, why not)``: paths found, or None and the reason (for a test skip)."""
    binary = os.environ.get("COVIDCXR_ORTHANC")
    for name in () if binary else _BINARIES:
        binary = shutil.which(name) or (name if Path(name).is_file() else None)
        if binary:
            break
    if binary is None:
        return None, None, "the Orthanc binary is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    plugin = os.environ.get("COVIDCXR_ORTHANC_DICOMWEB")
    if plugin is None:
        import glob

        found = [p for g in _PLUGIN_GLOBS for p in sorted(glob.glob(g)) if Path(p).is_file()]  # Debian's path first
        plugin = found[0] if found else None
    if plugin is None:
        return binary, None, "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return binary, plugin, ""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """A local Orthanc, as a context manager.

    Args:
        user, password: The one registered user (HTTP basic).
        workdir: Folder for storage, index and configuration (default: a new temporary folder, removed on exit).
        startup_timeout: Seconds to wait for ``/system``.
    """

    def __init__(self, *, user: str = "covidcxr", password: str = "test-password", workdir: str | Path | None = None,
                 startup_timeout: float = 30.0) -> None:
        self.user, self.password = user, password
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="covidcxr-orthanc-"))
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """REST root, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root."""
        return f"{self.url}/dicom-web"

    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until it answers.

        Raises:
            PacsError: Orthanc or its plugin is missing, or it did not come up (its log tail in the message).
        """
        binary, plugin, why = find_orthanc()
        if binary is None or plugin is None:
            raise PacsError(why)
        self.port = free_port()
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "covidcxr-test", "HttpPort": self.port, "DicomPort": free_port(),
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "LimitFindResults": 0, "LimitFindInstances": 0,
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        self._log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen([binary, str(cfg_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                self.rest("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        tail = (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise PacsError(f"Orthanc did not start on port {self.port}:\n{tail}")

    def rest(self, path: str, *, method: str = "GET", data: bytes | None = None) -> Any:
        """One authenticated REST call; JSON-decoded answer."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def upload(self, data: bytes) -> Any:
        """Store one DICOM file through the REST API (``POST /instances``)."""
        return self.rest("/instances", method="POST", data=data)

    def stop(self) -> None:
        """Terminate Orthanc (kill after 10 s) and remove its temporary folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
