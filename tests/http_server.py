"""A loopback HTTP/1.1 test server (stdlib only) for download tests and benchmarks.

Usage::

    with LoopbackServer() as server:
        url = server.add("/a.jpg", jpeg_bytes)                       # 200, Content-Length, keep-alive
        server.add("/missing", b"nope", status=404, content_type="text/plain")
        server.add("/slow.jpg", jpeg_bytes, delay=2.0)               # sleeps before answering
        server.add_sequence("/flaky.jpg", [{"status": 500}, {"body": jpeg_bytes}])   # last one repeats
        server.add_handler("/reset", lambda handler: handler.close_now())           # anything else
        ...
        server.hits["/a.jpg"], server.requests[-1]["headers"]["User-Agent"], server.max_active

Routes are looked up by the full request path (query string included) first, then by the path without the query.
Unknown paths get a 404. Everything listens on 127.0.0.1 on a free port; threads are daemons, the listen backlog
is large and connections are kept alive, so hundreds of concurrent clients are fine.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LoopbackHandler", "LoopbackServer"]

_CHUNK = 64 * 1024


class LoopbackHandler(BaseHTTPRequestHandler):
    """Request handler: HTTP/1.1 keep-alive, routes from the owning ``LoopbackServer``."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    # ---- helpers for custom handlers ---------------------------------------------------------------------------

    def close_now(self, reset: bool = True) -> None:
        """Close the connection without sending anything (``reset``: with an RST instead of a FIN)."""
        if reset:
            # SO_LINGER with a zero timeout turns close() into an RST ("connection reset by peer").
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def send_simple(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None,
        chunked: bool = False,
        head: bool = False,
    ) -> None:
        """Send one complete response (Content-Length, or chunked transfer encoding)."""
        extra = dict(headers or {})
        names = {name.lower() for name in extra}
        self.send_response(status)
        if "content-type" not in names and content_type:
            self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif "content-length" not in names:
            self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, str(value))
        self.end_headers()
        if head:
            return
        try:
            if chunked:
                for start in range(0, len(body), _CHUNK):
                    piece = body[start : start + _CHUNK]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---- dispatch ----------------------------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        owner = self.server.owner
        path = self.path
        route_key = owner._route_key(path)
        owner._enter(path, self.command, {name.title(): value for name, value in self.headers.items()})
        try:
            route = owner._routes.get(route_key) if route_key is not None else None
            if route is None:
                self.send_simple(b"not found", status=404, content_type="text/plain", head=head)
                return
            kind, value = route
            if kind == "handler":
                value(self)
                return
            if kind == "sequence":
                response = owner._next_in_sequence(route_key, value)
            else:
                response = value
            response = dict(response)
            delay = float(response.pop("delay", 0.0))
            if delay > 0:
                time.sleep(delay)
            self.send_simple(
                response.get("body", b""),
                status=response.get("status", 200),
                content_type=response.get("content_type", "image/jpeg"),
                headers=response.get("headers"),
                chunked=response.get("chunked", False),
                head=head,
            )
        finally:
            owner._leave()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True
    owner: LoopbackServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up mid-response are normal here (timeouts, size caps): no traceback."""


class LoopbackServer:
    """Threaded HTTP/1.1 server on ``127.0.0.1`` (free port), as a context manager.

    Attributes:
        hits (collections.Counter): requests per path (as requested, query included).
        requests (list[dict]): one ``{"method", "path", "headers"}`` dict per request, in arrival order; header
            names are title-cased (``"User-Agent"``).
        active (int): requests being handled right now.
        max_active (int): the largest ``active`` seen (to check a client's concurrency bound).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._routes: dict[str, tuple[str, Any]] = {}
        self._sequence_pos: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self._httpd = _Server((host, port), LoopbackHandler)
        self._httpd.owner = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> LoopbackServer:
        """Start serving in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="loopback-http"
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- routes ------------------------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    def add(
        self,
        path: str,
        body: bytes = b"",
        *,
        status: int = 200,
        content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        chunked: bool = False,
    ) -> str:
        """Serve a fixed response at ``path`` (``delay`` seconds before it); return the URL."""
        response = {
            "body": body,
            "status": status,
            "content_type": content_type,
            "headers": headers,
            "delay": delay,
            "chunked": chunked,
        }
        return self._set(path, ("static", response))

    def add_sequence(self, path: str, responses: list[dict[str, Any]]) -> str:
        """Serve ``responses`` (dicts of ``add()`` keyword arguments) to successive requests; the last repeats."""
        if not responses:
            raise ValueError("add_sequence needs at least one response")
        with self._lock:
            self._sequence_pos[self._normalise(path)] = 0
        return self._set(path, ("sequence", [dict(r) for r in responses]))

    def add_handler(self, path: str, fn: Callable[[BaseHTTPRequestHandler], None]) -> str:
        """Let ``fn(handler)`` answer requests to ``path`` (redirect loops, resets, slow bodies ...)."""
        return self._set(path, ("handler", fn))

    # ---- internals ---------------------------------------------------------------------------------------------

    @staticmethod
    def _normalise(path: str) -> str:
        return path if path.startswith("/") else "/" + path

    def _set(self, path: str, route: tuple[str, Any]) -> str:
        path = self._normalise(path)
        with self._lock:
            self._routes[path] = route
        return self.url(path)

    def _route_key(self, path: str) -> str | None:
        if path in self._routes:
            return path
        bare = path.split("?", 1)[0]
        return bare if bare in self._routes else None

    def _next_in_sequence(self, key: str, responses: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            position = self._sequence_pos.get(key, 0)
            self._sequence_pos[key] = position + 1
        return responses[min(position, len(responses) - 1)]

    def _enter(self, path: str, method: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits[path] += 1
            self.requests.append({"method": method, "path": path, "headers": headers})
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1
