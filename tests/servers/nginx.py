"""Serve a folder with a real nginx on 127.0.0.1 (range requests, an access log with byte counts).

nginx runs in the foreground as one process (``daemon off; master_process off``) with every path
it writes (pid, logs, temp folders) under a temporary folder, so it needs no root and leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import free_port, port_open, stop, wait_until

_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    log_format bytes '$request_method $uri $status $body_bytes_sent "$http_range"';
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/tiff tif tiff; application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        access_log {tmp}/access.log bytes;
    }}
}}
"""


@dataclass(frozen=True)
class Nginx:
    """A running nginx."""

    url: str
    """``http://127.0.0.1:PORT``."""
    root: Path
    """The folder it serves."""
    access_log: Path
    """One line per request: method, path, status, body bytes sent, Range header."""

    def log_lines(self) -> list[list[str]]:
        """The access log so far, each line split into its fields."""
        if not self.access_log.exists():
            return []
        return [line.split(" ", 4) for line in self.access_log.read_text().splitlines()]


def nginx_executable() -> str | None:
    """Path of nginx (PATH, then /usr/sbin), or None where it is not installed."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


@contextlib.contextmanager
def nginx_server(root: Path, tmp: Path, *, timeout: float = 20.0) -> Iterator[Nginx]:
    """Serve ``root`` on a free port; the config, logs and pid live in ``tmp``.

    Raises
    ------
    RuntimeError
        If nginx is missing, exits, or does not listen within ``timeout`` seconds.
    """
    exe = nginx_executable()
    if exe is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(_CONF.format(tmp=tmp, port=port, root=Path(root).resolve()))
    cmd = [exe, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_open(port), proc, "nginx", timeout)
        yield Nginx(f"http://127.0.0.1:{port}", Path(root), tmp / "access.log")
    finally:
        stop(proc)
