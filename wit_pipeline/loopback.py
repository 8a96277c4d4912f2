"""A threaded HTTP server on loopback serving image files (tests, benchmarks, the local demo).

``ImageServer(directory)`` serves ``/img/<name>`` from ``directory`` with a ``Content-Type``
guessed from the name, answers ``/robots.txt`` with 404 unless told otherwise, and can be
extended with routes: ``server.route("/path", handler)`` where ``handler(request)`` writes the
response itself (see ``tests/download_server.py`` for hostile cases). Every request is logged
(``server.requests``) so tests can prove that a URL was never fetched.
"""

from __future__ import annotations

import http.server
import mimetypes
import os
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

Handler = Callable[["_RequestHandler"], None]


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        owner = self.server.owner
        path = urlsplit(self.path).path
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        with owner._lock:
            owner.requests.append((host, self.path))
        handler = owner._routes.get((host, path)) or owner._routes.get(("", path))
        try:
            if handler is not None:
                handler(self)
            elif path.startswith("/img/"):
                owner._serve_file(self, path[len("/img/") :])
            else:
                self.send_plain(404, b"not found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def send_plain(self, status: int, body: bytes, content_type: str = "text/plain", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    owner: ImageServer

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away (timed out, killed): nothing to report
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class ImageServer:
    """Serve ``directory`` at ``http://127.0.0.1:PORT/img/<name>`` from a background thread."""

    def __init__(
        self,
        directory: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[str, str] | None = None,
    ):
        """``tls=(certfile, keyfile)`` serves HTTPS instead of HTTP."""
        self.directory = directory
        self.scheme = "https" if tls else "http"
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], Handler] = {}
        self.host = host
        server_class = _Server6 if ":" in host else _Server
        self._httpd = server_class((host, port), _RequestHandler)
        self._httpd.owner = self
        if tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "") -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str, handler: Handler, *, host: str = "") -> None:
        """Answer ``path`` (for requests whose Host is ``host``; "" for any) with ``handler``."""
        self._routes[(host.lower(), path)] = handler

    def paths_requested(self) -> list[str]:
        with self._lock:
            return [p for _, p in self.requests]

    def _serve_file(self, req: _RequestHandler, name: str) -> None:
        if not self.directory or "/" in name or name.startswith("."):
            req.send_plain(404, b"not found")
            return
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            req.send_plain(404, b"not found")
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        req.send_plain(200, data, ctype)

    def start(self) -> ImageServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(directory: str, port: int) -> None:
    """Run an :class:`ImageServer` in the foreground (``python -m wit_pipeline.loopback``)."""
    server = ImageServer(directory, port=port)
    print(f"serving {directory} at http://127.0.0.1:{server.port}/img/", flush=True)
    server._httpd.serve_forever()


if __name__ == "__main__":
    import sys

    serve_forever(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
