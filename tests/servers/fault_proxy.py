"""A small HTTP proxy that injects faults in front of a real server (nginx), for retry tests.

It forwards every request to one upstream (``host:port``), whatever the request's host, so it
serves both as a reverse proxy (``http://127.0.0.1:PORT/path``) and as a forward proxy that GDAL
reaches through ``GDAL_HTTP_PROXY`` (request line ``GET http://account.blob.core.windows.net/...``):
the second lets Planetary-Computer-style hrefs, which the ``planetary-computer`` package signs
only on ``*.blob.core.windows.net``, be read from 127.0.0.1 without DNS tricks.

Faults are queued by the test and consumed by the next matching requests:

- ``fail(n, status)``: answer ``n`` requests with ``status`` (503, 429, ...) and an empty body;
- ``delay(n, seconds)``: hold ``n`` requests before forwarding them;
- ``drop(n)``: reset ``n`` connections without any answer;
- ``reject_query(text, status=403)``: answer every request whose query string holds ``text``
  with ``status`` (an expired SAS token) until cleared.

Every request's method, path (query included: this is test-only memory, never logged), Range
header and answer status are recorded in ``requests``.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Hop-by-hop headers are not forwarded (RFC 9110 section 7.6.1).
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Record:
    """One request the proxy saw."""

    method: str
    """HTTP method."""
    path: str
    """Path and query as the upstream saw it."""
    range: str | None
    """The Range header, if any."""
    status: int | None
    """Status answered; None for a dropped connection."""


@dataclass
class _Faults:
    fail: list[int] = field(default_factory=list)
    delay: list[float] = field(default_factory=list)
    drop: int = 0
    reject: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    """The proxy's state, shared by its handler threads (see the module docstring)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.requests: list[Record] = []
        self._faults = _Faults()
        self._lock = threading.Lock()
        self.url = ""

    def fail(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status``."""
        with self._lock:
            self._faults.fail.extend([status] * n)

    def delay(self, n: int, seconds: float) -> None:
        """Hold each of the next ``n`` requests ``seconds`` before forwarding it."""
        with self._lock:
            self._faults.delay.extend([seconds] * n)

    def drop(self, n: int) -> None:
        """Close the next ``n`` connections without answering."""
        with self._lock:
            self._faults.drop += n

    def reject_query(self, text: str, status: int = 403) -> None:
        """Answer ``status`` to every request whose query contains ``text``."""
        with self._lock:
            self._faults.reject[text] = status

    def clear(self) -> None:
        """Remove every queued fault and the request record."""
        with self._lock:
            self._faults = _Faults()
            self.requests.clear()

    def _next_fault(self, query: str) -> tuple[str, float | int | None]:
        with self._lock:
            for text, status in self._faults.reject.items():
                if text in query:
                    return "status", status
            if self._faults.drop:
                self._faults.drop -= 1
                return "drop", None
            if self._faults.fail:
                return "status", self._faults.fail.pop(0)
            if self._faults.delay:
                return "delay", self._faults.delay.pop(0)
        return "none", None

    def _record(self, record: Record) -> None:
        with self._lock:
            self.requests.append(record)


def _handler(state: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            kind, value = state._next_fault(parts.query)
            rng = self.headers.get("Range")
            if kind == "drop":
                state._record(Record(self.command, path, rng, None))
                # Reset the connection (SO_LINGER 0 sends RST): curl sees "Connection reset by
                # peer", as when a loaded server or a middlebox drops it.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                return
            if kind == "status":
                state._record(Record(self.command, path, rng, int(value)))
                self.send_response(int(value))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if kind == "delay":
                time.sleep(float(value))
            host, port = state.upstream.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            state._record(Record(self.command, path, rng, resp.status))
            self.send_response(resp.status)
            for key, val in resp.getheaders():
                if key.lower() not in _HOP and key.lower() != "content-length":
                    self.send_header(key, val)
            # HEAD answers keep the upstream's length (that of the body a GET would get).
            self.send_header("Content-Length", resp.getheader("Content-Length", str(len(body))))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet: queries may hold tokens
            pass

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` on a free 127.0.0.1 port in a background thread.

    Parameters
    ----------
    upstream
        ``host:port`` of the real server.

    Yields
    ------
    FaultProxy
        With ``url`` set to ``http://127.0.0.1:PORT``.
    """
    state = FaultProxy(upstream)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
