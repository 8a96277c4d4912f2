"""A threaded HTTP server on loopback: the demo web, benchmark images, test routes.

``ImageServer(directory)`` serves the files under ``directory`` at ``/img/<path>`` (``mount="/"``
serves them at the root, as the demo web is), with a ``Content-Type`` guessed from the name.
Anything else is answered by a route: ``server.route("/path", handler)`` where
``handler(request)`` writes the response itself (``request.send_plain``; optionally only for
requests whose ``Host`` header names a given host), or a table of declared answers
(``load_routes``: a file to serve with a status and headers, a redirect, or a bare status; the
demo web's ``routes.json``). Everything else is a 404. Every request is logged
(``server.requests``), so tests can prove that a URL was never fetched. The hostile cases of the
download tests (slow drips, bombs, redirects to private addresses) live in
``tests/download_server.py``.

``python -m wit_pipeline.loopback DIR [PORT]`` serves ``DIR`` at ``/img/`` in the foreground
(the download and build benchmarks).
"""

from __future__ import annotations

import http.server
import json
import mimetypes
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any
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
            elif path.startswith(owner.mount):
                owner.send_file(self, path[len(owner.mount) :])
            else:
                self.send_plain(404, b"not found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def do_HEAD(self):
        self.do_GET()

    def send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """Answer ``status`` with ``headers`` and ``body`` (no body for a HEAD request)."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_plain(self, status: int, body: bytes, content_type: str = "text/plain", **headers):
        """``send`` with a ``Content-Type``; keyword headers are spelled ``X_Robots_Tag=...``."""
        extra = {k.replace("_", "-"): v for k, v in headers.items()}
        self.send(status, body, {"Content-Type": content_type, **extra})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    owner: ImageServer

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away (timed out, killed): nothing to report
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class ImageServer:
    """Serve ``directory`` at ``http://127.0.0.1:PORT{mount}<path>`` from a background thread.

    The port is bound when the server is made (``OSError`` when it is taken); ``start()`` or
    ``with`` serves until ``stop()``. ``tls=(certfile, keyfile)`` serves HTTPS instead of HTTP.
    """

    def __init__(
        self,
        directory: str | None = None,
        *,
        mount: str = "/img/",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[str, str] | None = None,
    ):
        if not (mount.startswith("/") and mount.endswith("/")):
            raise ValueError(f"mount must start and end with '/', got {mount!r}")
        self.directory = os.path.abspath(directory) if directory else None
        self.mount = mount
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

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: what a URL of this server starts with."""
        return self.url("")

    def url(self, path: str, host: str = "") -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str, handler: Handler, *, host: str = "") -> None:
        """Answer ``path`` (for requests whose Host is ``host``; "" for any) with ``handler``."""
        self._routes[(host.lower(), path)] = handler

    def load_routes(self, path: str) -> None:
        """Add the declared answers of a JSON file ``{path: {file, status, headers, redirect}}``.

        ``redirect``: that status (default 302) with ``Location``; no ``file``: that status
        (default 404) and no page; else the file (relative to the served directory) with that
        status and those headers over the guessed ``Content-Type``.
        """
        with open(path) as f:
            table = json.load(f)
        for url_path, spec in table.items():
            self.route(url_path, _declared(self, spec))

    def paths_requested(self) -> list[str]:
        with self._lock:
            return [p for _, p in self.requests]

    def send_file(
        self,
        req: _RequestHandler,
        name: str,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer with the file ``name`` under the served directory, or 404.

        A name with an empty, ``.`` or ``..`` part, or any part starting with ``.``, is never
        served: nothing outside the directory, and no hidden file, can be reached.
        """
        parts = name.split("/")
        if not self.directory or any(not p or p.startswith(".") for p in parts):
            req.send_plain(404, b"not found")
            return
        try:
            with open(os.path.join(self.directory, *parts), "rb") as f:
                data = f.read()
        except OSError:  # missing, a directory, unreadable
            req.send_plain(404, b"not found")
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        req.send(status, data, {"Content-Type": ctype, **(headers or {})})

    def start(self) -> ImageServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="loopback-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        """Serve in the calling thread until Ctrl-C, then close the socket."""
        try:
            self._httpd.serve_forever(poll_interval=0.05)
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _declared(server: ImageServer, spec: Mapping[str, Any]) -> Handler:
    """The handler of one ``load_routes`` entry."""
    if spec.get("redirect"):
        status, location = int(spec.get("status", 302)), str(spec["redirect"])
        return lambda req: req.send(status, b"", {"Location": location})
    if spec.get("file") is None:
        status = int(spec.get("status", 404))
        return lambda req: req.send_plain(status, b"not found")
    name, status = str(spec["file"]), int(spec.get("status", 200))
    headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
    return lambda req: server.send_file(req, name, status, headers)


if __name__ == "__main__":
    images = ImageServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"serving {sys.argv[1]} at {images.url(images.mount)}", flush=True)
    images.serve_forever()
