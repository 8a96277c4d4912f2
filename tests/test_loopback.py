"""The loopback HTTP server (``wit_pipeline.loopback``): files, routes, declared answers, logs."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from wit_pipeline.loopback import ImageServer


def fetch(server: ImageServer, path: str, *, method: str = "GET", host: str = ""):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        headers = {"Host": f"{host}:{server.port}"} if host else {}
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest.fixture
def site(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.html").write_bytes(b"<p>hi</p>")
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    return tmp_path


def test_files_are_served_under_the_mount_and_nothing_else(site):
    with ImageServer(str(site)) as srv:
        assert srv.base_url == f"http://127.0.0.1:{srv.port}"
        assert srv.url("/img/a.jpg") == f"http://127.0.0.1:{srv.port}/img/a.jpg"
        status, headers, body = fetch(srv, "/img/a.jpg?x=1")
        assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"jpeg bytes")
        assert headers["Content-Length"] == "10"
        assert fetch(srv, "/img/sub/page.html")[1]["Content-Type"] == "text/html"
        assert fetch(srv, "/img/data.bin")[1]["Content-Type"] == "application/octet-stream"
        for path in [
            "/a.jpg",  # outside the mount
            "/img/.hidden",
            "/img/sub/../a.jpg",
            "/img/../" + site.name + "/a.jpg",
            "/img//a.jpg",
            "/img/sub",  # a directory
            "/img/sub/",
            "/img/missing.jpg",
            "/robots.txt",
        ]:
            assert fetch(srv, path)[:3:2] == (404, b"not found"), path
        assert srv.paths_requested()[:2] == ["/img/a.jpg?x=1", "/img/sub/page.html"]
        assert len(srv.requests) == 3 + 9


def test_mount_at_the_root_and_head_requests(site):
    with ImageServer(str(site), mount="/") as srv:
        assert fetch(srv, "/sub/page.html")[2] == b"<p>hi</p>"
        status, headers, body = fetch(srv, "/a.jpg", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, "10", b"")
        assert fetch(srv, "/")[0] == 404
    with pytest.raises(ValueError, match="mount must start and end with '/'"):
        ImageServer(str(site), mount="/img")


def test_routes_by_host_come_before_files(site):
    with ImageServer(str(site)) as srv:
        srv.route("/img/a.jpg", lambda req: req.send_plain(200, b"routed", X_Robots_Tag="noai"))
        srv.route("/robots.txt", lambda req: req.send_plain(200, b"Disallow: /"), host="x.test")
        status, headers, body = fetch(srv, "/img/a.jpg")
        assert (status, headers["X-Robots-Tag"], body) == (200, "noai", b"routed")
        assert fetch(srv, "/robots.txt", host="x.test")[2] == b"Disallow: /"
        assert fetch(srv, "/robots.txt", host="y.test")[0] == 404
        assert srv.requests[-2:] == [("x.test", "/robots.txt"), ("y.test", "/robots.txt")]


def test_declared_routes(site):
    routes = {
        "/gone.jpg": {"file": None, "status": 404, "headers": {}, "redirect": None},
        "/teapot": {"file": None, "status": 418, "headers": {}, "redirect": None},
        "/away.jpg": {"file": None, "status": 302, "headers": {}, "redirect": "http://10.0.0.1/"},
        "/moved": {"redirect": "/a.jpg", "status": 301},
        "/noai.jpg": {"file": "a.jpg", "status": 200, "headers": {"X-Robots-Tag": "noai"}},
        "/as-jpeg.jpg": {"file": "sub/page.html", "headers": {"Content-Type": "image/jpeg"}},
        "/escape.jpg": {"file": "../a.jpg"},
    }
    (site / "routes.json").write_text(json.dumps(routes))
    with ImageServer(str(site), mount="/") as srv:
        srv.load_routes(str(site / "routes.json"))
        assert fetch(srv, "/gone.jpg")[:3:2] == (404, b"not found")
        assert fetch(srv, "/teapot")[0] == 418
        status, headers, body = fetch(srv, "/away.jpg")
        assert (status, headers["Location"], body) == (302, "http://10.0.0.1/", b"")
        status, headers, _ = fetch(srv, "/moved")
        assert (status, headers["Location"], headers["Content-Length"]) == (301, "/a.jpg", "0")
        status, headers, body = fetch(srv, "/noai.jpg")
        assert (status, headers["X-Robots-Tag"], body) == (200, "noai", b"jpeg bytes")
        status, headers, body = fetch(srv, "/as-jpeg.jpg")
        assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"<p>hi</p>")
        assert fetch(srv, "/escape.jpg")[0] == 404


def test_a_taken_port_fails_when_the_server_is_made(site):
    with ImageServer(str(site)) as srv, pytest.raises(OSError):
        ImageServer(str(site), port=srv.port)


def test_module_serves_a_directory_in_the_foreground(site):
    proc = subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline.loopback", str(site)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {site} at http://127.0.0.1:") and line.endswith("/img/\n")
        port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/img/a.jpg")
        assert conn.getresponse().read() == b"jpeg bytes"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
