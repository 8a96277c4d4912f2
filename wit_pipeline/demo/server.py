"""A small threaded HTTP server on loopback that serves the generated demo web."""

from __future__ import annotations

import contextlib
import http.server
import json
import mimetypes
import os
import threading
from collections.abc import Iterator
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DemoServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        self.server.hits[path] = self.server.hits.get(path, 0) + 1
        route = self.server.routes.get(path)
        if route is not None:
            if route.get("redirect"):
                self._send(route.get("status", 302), b"", {"Location": route["redirect"]})
                return
            if route.get("file") is None:
                self._send(route.get("status", 404), b"not found", {"Content-Type": "text/plain"})
                return
        rel = (route or {}).get("file") or path.lstrip("/")
        full = os.path.realpath(os.path.join(self.server.root, rel))
        if not full.startswith(self.server.root + os.sep) or not os.path.isfile(full):
            self._send(404, b"not found", {"Content-Type": "text/plain"})
            return
        with open(full, "rb") as f:
            body = f.read()
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        headers = {"Content-Type": ctype, **dict((route or {}).get("headers") or {})}
        self._send((route or {}).get("status", 200), body, headers)


class DemoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.root = os.path.realpath(root)
        self.routes: dict[str, dict[str, Any]] = {}
        self.hits: dict[str, int] = {}

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def load_routes(self, path: str) -> None:
        with open(path) as f:
            self.routes = json.load(f)


@contextlib.contextmanager
def serve(root: str, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[DemoServer]:
    """Run a ``DemoServer`` for ``root`` in a background thread for the ``with`` block."""
    os.makedirs(root, exist_ok=True)
    server = DemoServer(root, host, port)
    thread = threading.Thread(target=server.serve_forever, name="demo-web", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
