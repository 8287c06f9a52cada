"""Serve a local folder over HTTP with nginx on 127.0.0.1, for ``rtsmap demo --remote``.

nginx is what many data providers serve COGs with: byte ranges, HEAD, keep-alive, as GDAL's
``/vsicurl/`` expects of a real server. It runs in the foreground as one process
(``daemon off; master_process off``) with its configuration, pid, logs and temporary folders in a
folder the caller gives, on a free port of 127.0.0.1 only, so it needs no root, touches nothing
of the system's nginx and stops with the block.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rtsmap.pipeline.errors import ConfigError

# The access log records what GDAL asked for: method, path, status, body bytes, Range header.
_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {state}/access.log ranges;
    client_body_temp_path {state}/client;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    types {{ image/tiff tif tiff; application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@dataclass(frozen=True)
class Served:
    """A folder nginx is serving."""

    url: str
    """``http://127.0.0.1:PORT``: the folder's root."""
    access_log: Path
    """One line per request: method, path, status, body bytes sent, Range header."""

    def log_lines(self) -> list[list[str]]:
        """The access log so far, each line split into its fields."""
        if not self.access_log.exists():
            return []
        return [line.split(" ", 4) for line in self.access_log.read_text().splitlines()]

    def traffic(self) -> tuple[int, int]:
        """Requests answered so far and the body bytes sent."""
        lines = self.log_lines()
        return len(lines), sum(int(line[3]) for line in lines if len(line) > 3 and line[3].isdigit())


def nginx_executable() -> str | None:
    """Path of nginx (PATH, then /usr/sbin, where Debian puts it), or None where it is not installed."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def serve_folder(root: Path, state: Path, *, timeout: float = 20.0) -> Iterator[Served]:
    """Serve ``root`` with nginx on a free 127.0.0.1 port until the block ends.

    Parameters
    ----------
    root
        The folder to serve.
    state
        A folder for nginx's configuration, pid, logs and temporary files (created; its
        ``access.log`` is started afresh).
    timeout
        Seconds nginx may take to listen.

    Yields
    ------
    Served

    Raises
    ------
    ConfigError
        If nginx is not installed, exits at start, or does not listen within ``timeout``.
    """
    exe = nginx_executable()
    if exe is None:
        raise ConfigError("nginx is not installed; install the nginx package (apt-get install nginx)")
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    (state / "access.log").unlink(missing_ok=True)
    port = _free_port()
    conf = state / "nginx.conf"
    conf.write_text(_CONF.format(state=state, port=port, root=Path(root).resolve()))
    proc = subprocess.Popen(
        [exe, "-p", str(state), "-e", str(state / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None:
                log = (state / "error.log").read_text(errors="replace") if (state / "error.log").exists() else ""
                raise ConfigError(f"nginx exited at start with status {proc.returncode}: {log.strip()[-300:]}")
            if time.monotonic() > deadline:
                raise ConfigError(f"nginx did not listen on 127.0.0.1:{port} within {timeout:.0f} s")
            time.sleep(0.05)
        yield Served(f"http://127.0.0.1:{port}", state / "access.log")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
