"""A real S3-compatible server on 127.0.0.1: moto's standalone server (``moto_server``).

moto is installed in its own virtual environment (``.venv-servers``, made by ``make servers``) so
its dependencies never mix with the project's. Objects are uploaded with plain HTTP PUTs (moto's
server does not check signatures), so the test process needs no S3 client; GDAL reads them back
through ``/vsis3/`` with credentials, as against any S3 endpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import free_port, port_open, stop, wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class S3Server:
    """A running moto server."""

    endpoint: str
    """``127.0.0.1:PORT`` (what GDAL's ``AWS_S3_ENDPOINT`` takes)."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.endpoint}"

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/{bucket}", method="PUT"), timeout=10).close()

    def upload(self, bucket: str, key: str, path: Path) -> None:
        """Put a local file at ``s3://bucket/key``."""
        req = urllib.request.Request(
            f"{self.url}/{bucket}/{key}", data=Path(path).read_bytes(), method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(req, timeout=30).close()

    def gdal_env(self) -> dict[str, str]:
        """The environment an AWS user sets for a local S3 endpoint (dummy credentials)."""
        return {
            "AWS_ACCESS_KEY_ID": "rtsmap-test",
            "AWS_SECRET_ACCESS_KEY": "rtsmap-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_S3_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/", timeout=5).close()
        return True
    except OSError:
        return False


def moto_executable() -> str | None:
    """``moto_server`` from ``$RTSMAP_SERVERS_VENV``, the repository's ``.venv-servers``, or PATH."""
    venv = os.environ.get("RTSMAP_SERVERS_VENV")
    for root in ([Path(venv)] if venv else []) + [REPO / ".venv-servers"]:
        exe = root / "bin" / "moto_server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("moto_server")


@contextlib.contextmanager
def moto_server(*, timeout: float = 60.0) -> Iterator[S3Server]:
    """Run ``moto_server`` on a free port until the block ends.

    Raises
    ------
    RuntimeError
        If moto is not installed, exits, or does not listen within ``timeout`` seconds.
    """
    exe = moto_executable()
    if exe is None:
        raise RuntimeError("moto_server is not installed (make servers creates .venv-servers with moto[server])")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_open(port), proc, "moto_server", timeout)
        server = S3Server(f"127.0.0.1:{port}")
        # moto imports its backends on the first request: wait until one is answered.
        wait_until(lambda: _answers(server.url), proc, "moto_server", timeout)
        yield server
    finally:
        stop(proc)
