"""Start a real STAC API (``rustac serve``, in-memory backend) for tests.

Usage::

    with rustac_server([collection_json, items_json]) as url:
        catalog = open_catalog(url)

The server loads the given collection / item-collection files on startup, listens on
127.0.0.1 on a free port, and is terminated when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rustac_executable() -> str:
    """Path of the ``rustac`` command: the repository's venv, next to this Python, or on PATH."""
    for candidate in (REPO / ".venv" / "bin" / "rustac", Path(sys.executable).parent / "rustac"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("rustac")
    if found is None:
        raise RuntimeError("rustac is not installed (pip install rustac)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def rustac_server(hrefs: Sequence[str | Path], *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Serve collections and item collections with ``rustac serve`` and yield the API root URL.

    Parameters
    ----------
    hrefs
        Collection JSON files first, then item-collection files (rustac loads them in order).
    startup_timeout
        Seconds to wait for the server to answer.

    Yields
    ------
    str
        The API root, e.g. ``http://127.0.0.1:40123``.
    """
    port = free_port()
    addr = f"127.0.0.1:{port}"
    cmd = [rustac_executable(), "serve", "--addr", addr, *[str(h) for h in hrefs]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://{addr}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"rustac serve exited with {proc.returncode}: {output[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"rustac serve did not answer on {url} within {startup_timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
