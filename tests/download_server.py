"""Hostile HTTP cases for the download tests, served on 127.0.0.1 by ``ImageServer``.

``hostile_server()`` starts a server with one route per case; ``CASES`` lists every path with
the drop reason the download stage must give it (``None``: the image must be kept). Host names
(``polite.test``, ...) reach the same server through a ``StaticResolver``; the server answers
``/robots.txt`` according to the Host header.
"""

from __future__ import annotations

import functools
import io
import threading
import time
import zlib

import numpy as np
from PIL import Image

from wit_pipeline.loopback import ImageServer


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth RGB test picture (gradients, so JPEG round trips stay close)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, size=3)
    arr = np.stack(
        [
            (base[0] + x * 2) % 256,
            (base[1] + y * 3) % 256,
            (base[2] + x + y) % 256,
        ],
        axis=-1,
    ).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@functools.lru_cache(maxsize=2)
def png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zero pixels, about 100 KB compressed.

    Decoded to 8 bits per pixel it would need ``side**2`` bytes (900 MB at 30,000).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grayscale
    comp = zlib.compressobj(6)
    row = b"\x00" * (1 + (side + 7) // 8)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def gif_bomb(screen: int = 100, frame: int = 30_000) -> bytes:
    """A GIF whose logical screen is ``screen`` square and whose first frame is ``frame`` square.

    Its screen size says 100x100; decoding it needs ``frame**2`` pixels (900 million at 30,000).
    """
    screen_descriptor = screen.to_bytes(2, "little") * 2 + bytes([0x80, 0, 0])  # 2-colour table
    palette = b"\x00\x00\x00\xff\xff\xff"
    image_descriptor = b"\x2c" + bytes(4) + frame.to_bytes(2, "little") * 2 + b"\x00"
    pixels = bytes([2, 2, 0x4C, 0x01, 0])  # LZW minimum code size 2: clear, 0, end
    return b"GIF89a" + screen_descriptor + palette + image_descriptor + pixels + b"\x3b"


def animated_gif() -> bytes:
    frames = [photo(seed=1).convert("P"), photo(seed=2).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def send(req, status: int, body: bytes, ctype: str = "image/jpeg", **headers) -> None:
    req.close_connection = True
    req.send_plain(status, body, ctype, **headers)


def redirect(req, location: str, status: int = 302) -> None:
    req.close_connection = True
    req.send_response(status)
    req.send_header("Location", location)
    req.send_header("Content-Length", "0")
    req.end_headers()


JPEG = encode(photo(), "JPEG", quality=90)
PNG = encode(photo(seed=3), "PNG")

# path -> expected reason (None = kept). Hosts other than 127.0.0.1 are noted in the path.
CASES: dict[str, str | None] = {
    "/ok.jpg": None,
    "/mislabelled.png": None,  # a JPEG served as image/png: content decides
    "/served-as-html.jpg": None,  # a JPEG served as text/html
    "/cmyk.jpg": None,
    "/palette.png": None,
    "/palette-trns.png": None,
    "/alpha.png": None,
    "/gray-alpha.png": None,
    "/animated.gif": None,
    "/webp.webp": None,
    "/flaky": None,  # 503 once, then 200
    "/chain/3": None,  # three redirects, then the image
    "/xrobots-other-bot": None,  # X-Robots-Tag for another crawler
    "/notfound.jpg": "http_404",
    "/gone.jpg": "http_410",
    "/error500.jpg": "http_500",
    "/always503.jpg": "http_503",
    "/slow.jpg": "timeout",
    "/drip.jpg": "timeout",
    "/chain/9": "too_many_redirects",
    "/loop": "too_many_redirects",
    "/to-metadata": "blocked_address",
    "/to-private": "blocked_address",
    "/to-mapped-v6": "blocked_address",
    "/to-decimal-ip": "blocked_address",
    "/to-name": "blocked_address",  # a host name that resolves to 169.254.169.254
    "/to-file": "bad_redirect",
    "/to-ftp": "bad_redirect",
    "/truncated.jpg": "decode_error",
    "/truncated-png.png": "decode_error",
    "/html.jpg": "not_image",
    "/svg.jpg": "not_image",
    "/empty.jpg": "empty_body",
    "/short-body.jpg": "truncated",
    "/garbage.jpg": "decode_error",
    "/bomb.png": "too_large",
    "/bomb.gif": "too_large",  # a 100x100 screen around a 30,000x30,000 frame
    "/tiny.png": "too_small",
    "/wide.png": "bad_aspect_ratio",
    "/xrobots-noai": "opt_out",
    "/xrobots-ours": "opt_out",
    "/xrobots-noimageindex": "opt_out",
    "/xrobots-img2dataset": "opt_out",  # scoped to img2dataset, whose users we are
    "/tdm-header.jpg": "opt_out",  # tdm-reservation: 1 on the image response
    "/tdm-header-zero.jpg": None,  # tdm-reservation: 0
    # Redirects to other origins: their robots.txt and tdmrep.json apply before the request.
    "/to-disallowed": "robots",  # -> redirect-strict.test, whose robots.txt says Disallow: /
    "/to-allowed": None,  # -> redirect-open.test, whose robots.txt allows
    "/to-robots-down": "robots",  # -> redirect-down.test, whose robots.txt answers 503
    "/to-tdm-reserved": "opt_out",  # -> tdm-redirect.test, whose tdmrep.json reserves it
    "/to-taken": "takedown",  # -> taken.test, a blocklist domain (never resolved or asked)
    "/taken-url.jpg": "takedown",  # a blocklist url entry: never requested
}

# The opt-out signal (detail) and policy file of the opt_out and robots cases above; the
# policy is on this host unless a host is named. (path -> (detail, policy host, policy path)).
OPT_OUT_POLICIES: dict[str, tuple[str, str, str]] = {
    "/xrobots-noai": ("x-robots-tag:noai", "", "/xrobots-noai"),
    "/xrobots-ours": ("x-robots-tag:noimageai", "", "/xrobots-ours"),
    "/xrobots-noimageindex": ("x-robots-tag:noimageindex", "", "/xrobots-noimageindex"),
    "/xrobots-img2dataset": ("x-robots-tag:noai", "", "/xrobots-img2dataset"),
    "/tdm-header.jpg": ("tdm-reservation:header", "", "/tdm-header.jpg"),
    "/to-tdm-reserved": ("tdmrep.json", "tdm-redirect.test", "/.well-known/tdmrep.json"),
}

# The takedown entries the hostile run uses ({port}: the server's).
BLOCKLIST = """\
# takedown requests
domain taken.test
url http://127.0.0.1:{port}/taken-url.jpg  # one image
"""

TDM_RULES = b"""[
  {"location": "/mixed/open*", "tdm-reservation": 0},
  {"location": "/reserved/", "tdm-reservation": 1, "tdm-policy": "https://tdm.test/policy.json"},
  {"location": "/mixed/", "tdm-reservation": 1},
  {"location": "/odd/", "tdm-reservation": 2},
  {"tdm-reservation": 1},
  {"location": "/free/", "tdm-reservation": 0},
  {"location": "/*.jpg$", "tdm-reservation": 1}
]"""


def hostile_server(images_dir: str | None = None) -> ImageServer:
    server = ImageServer(images_dir)
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def count(path: str) -> int:
        with lock:
            hits[path] = hits.get(path, 0) + 1
            return hits[path]

    def static(body: bytes, ctype: str = "image/jpeg", status: int = 200, **headers):
        return lambda req: send(req, status, body, ctype, **headers)

    rgb = photo(seed=5)
    routes = {
        "/ok.jpg": static(JPEG),
        "/mislabelled.png": static(JPEG, "image/png"),
        "/served-as-html.jpg": static(JPEG, "text/html"),
        "/cmyk.jpg": static(encode(rgb.convert("CMYK"), "JPEG", quality=95)),
        "/palette.png": static(encode(rgb.convert("P"), "PNG"), "image/png"),
        "/palette-trns.png": static(encode(rgb.convert("P"), "PNG", transparency=0), "image/png"),
        "/alpha.png": static(encode(rgb.convert("RGBA"), "PNG"), "image/png"),
        "/gray-alpha.png": static(encode(rgb.convert("LA"), "PNG"), "image/png"),
        "/animated.gif": static(animated_gif(), "image/gif"),
        "/webp.webp": static(encode(rgb, "WEBP"), "image/webp"),
        "/xrobots-other-bot": static(JPEG, X_Robots_Tag="otherbot: noai, noimageai"),
        "/notfound.jpg": static(b"no such image", "text/plain", 404),
        "/gone.jpg": static(b"gone", "text/plain", 410),
        "/error500.jpg": static(b"boom", "text/plain", 500),
        "/always503.jpg": static(b"busy", "text/plain", 503),
        "/truncated.jpg": static(JPEG[: len(JPEG) // 2]),
        "/truncated-png.png": static(PNG[: len(PNG) // 2], "image/png"),
        "/html.jpg": static(b"<!doctype html><html><body>Not an image</body></html>"),
        "/svg.jpg": static(
            b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"></svg>',
            "image/svg+xml",
        ),
        "/empty.jpg": static(b""),
        "/garbage.jpg": static(bytes(range(256)) * 8),
        "/bomb.png": static(png_bomb(), "image/png"),
        "/bomb.gif": static(gif_bomb(), "image/gif"),
        "/tiny.png": static(encode(photo(10, 10), "PNG"), "image/png"),
        "/wide.png": static(encode(photo(400, 40), "PNG"), "image/png"),
        "/xrobots-noai": static(JPEG, X_Robots_Tag="noai"),
        "/xrobots-ours": static(JPEG, X_Robots_Tag="wit-pipeline: noimageai"),
        "/xrobots-noimageindex": static(JPEG, X_Robots_Tag="noarchive, noimageindex"),
        "/xrobots-img2dataset": static(JPEG, X_Robots_Tag="img2dataset: noai"),
        "/tdm-header.jpg": static(JPEG, tdm_reservation="1"),
        "/tdm-header-zero.jpg": static(JPEG, tdm_reservation="0"),
        "/taken-url.jpg": static(JPEG),
        "/to-metadata": lambda req: redirect(req, "http://169.254.169.254/latest/meta-data/"),
        "/to-private": lambda req: redirect(req, "http://10.1.2.3:8080/internal.jpg", 301),
        "/to-mapped-v6": lambda req: redirect(req, "http://[::ffff:169.254.169.254]/", 307),
        "/to-decimal-ip": lambda req: redirect(req, "http://2852039166/x.jpg", 308),
        # A name, not an address: only the guard's check of what it resolves to can refuse it.
        "/to-name": lambda req: redirect(req, "http://metadata.test/latest/meta-data/"),
        "/to-file": lambda req: redirect(req, "file:///etc/passwd"),
        "/to-ftp": lambda req: redirect(req, "ftp://127.0.0.1/x.jpg"),
        "/loop": lambda req: redirect(req, "/loop"),
    }
    port = server.port
    for path, target in {
        "/to-disallowed": "redirect-strict.test/r.jpg",
        "/to-allowed": "redirect-open.test/r.jpg",
        "/to-robots-down": "redirect-down.test/r.jpg",
        "/to-tdm-reserved": "tdm-redirect.test/reserved/r.jpg",
        "/to-taken": "taken.test/t.jpg",
    }.items():
        host, _, rest = target.partition("/")
        routes[path] = functools.partial(
            lambda req, u: redirect(req, u), u=f"http://{host}:{port}/{rest}"
        )

    def flaky(req):
        if count("/flaky") == 1:
            send(req, 503, b"try again", "text/plain", Retry_After="0")
        else:
            send(req, 200, JPEG)

    def chain(req):
        n = int(req.path.rsplit("/", 1)[1])
        if n == 0:
            send(req, 200, JPEG)
        else:
            redirect(req, f"/chain/{n - 1}")

    def slow(req):
        time.sleep(8)
        send(req, 200, JPEG)

    def jpeg_headers(req):
        """The headers of a full JPEG answer; the handler then writes (some of) the body."""
        req.close_connection = True
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(len(JPEG)))
        req.end_headers()

    def drip(req):
        jpeg_headers(req)
        deadline = time.monotonic() + 30
        for i in range(len(JPEG)):
            if time.monotonic() > deadline:
                return
            req.wfile.write(JPEG[i : i + 1])
            req.wfile.flush()
            time.sleep(0.1)

    def short_body(req):
        jpeg_headers(req)
        req.wfile.write(JPEG[:100])
        req.wfile.flush()

    routes.update({"/flaky": flaky, "/slow.jpg": slow, "/drip.jpg": drip})
    routes["/short-body.jpg"] = short_body
    for n in range(10):
        routes[f"/chain/{n}"] = chain
    for path, handler in routes.items():
        server.route(path, handler)

    # robots.txt per Host header.
    server.route(
        "/robots.txt",
        static(
            b"User-agent: *\nDisallow: /private/\n\nUser-agent: wit-pipeline\n"
            b"Disallow: /no-wit/\nAllow: /no-wit/except-this.jpg\n",
            "text/plain",
        ),
        host="polite.test",
    )
    server.route(
        "/robots.txt",
        static(b"User-agent: *\nDisallow: /private/\n", "text/plain"),
        host="strict.test",
    )
    server.route("/private/s.jpg", static(JPEG), host="strict.test")
    server.route("/robots.txt", static(b"down", "text/plain", 503), host="robots-down.test")
    server.route("/robots.txt", static(b"gone", "text/plain", 404), host="norobots.test")
    for path in ("/private/a.jpg", "/no-wit/b.jpg", "/no-wit/except-this.jpg", "/open/c.jpg"):
        server.route(path, static(JPEG), host="polite.test")
    server.route("/d.jpg", static(JPEG), host="robots-down.test")
    server.route("/e.jpg", static(JPEG), host="norobots.test")

    # Redirect targets on other origins, each with its own policies.
    deny_all = static(b"User-agent: *\nDisallow: /\n", "text/plain")
    server.route("/robots.txt", deny_all, host="redirect-strict.test")
    server.route(
        "/robots.txt", static(b"User-agent: *\nAllow: /\n", "text/plain"), host="redirect-open.test"
    )
    server.route("/robots.txt", static(b"down", "text/plain", 503), host="redirect-down.test")
    for host in ("redirect-strict.test", "redirect-open.test", "redirect-down.test"):
        server.route("/r.jpg", static(JPEG), host=host)

    # TDMRep: tdmrep.json reserving some paths, allowing everything, broken, slow, too large.
    tdm_json = static(TDM_RULES, "application/json")
    for host in ("tdm.test", "tdm-redirect.test"):
        server.route("/.well-known/tdmrep.json", tdm_json, host=host)
    server.route(
        "/.well-known/tdmrep.json",
        static(b'[{"location": "/", "tdm-reservation": 0}]', "application/json"),
        host="tdm-open.test",
    )
    server.route(
        "/.well-known/tdmrep.json",
        static(b'[{"location": "/", "tdm-reservation": 1', "application/json"),
        host="tdm-broken.test",
    )

    def slow_tdmrep(req):
        time.sleep(5)  # beyond the run's timeout: the origin does not implement TDMRep
        send(req, 200, b'[{"location": "/", "tdm-reservation": 1}]', "application/json")

    server.route("/.well-known/tdmrep.json", slow_tdmrep, host="tdm-slow.test")
    filler = b", ".join([b'{"location": "/filler/", "tdm-reservation": 0}'] * 12_000)
    big = b"[" + filler + b', {"location": "/", "tdm-reservation": 1}]'
    server.route("/.well-known/tdmrep.json", static(big, "application/json"), host="tdm-big.test")
    for host, path in TDM_HOST_PATHS:
        server.route(path, static(JPEG), host=host)
    return server


# The TDMRep hosts' images (served whatever their tdmrep.json says).
TDM_HOST_PATHS = (
    ("tdm.test", "/reserved/a.jpg"),
    ("tdm.test", "/free/b.jpg"),
    ("tdm.test", "/mixed/open-c.jpg"),
    ("tdm.test", "/mixed/d.jpg"),
    ("tdm.test", "/odd/e.jpg"),
    ("tdm.test", "/other/x.jpg"),
    ("tdm.test", "/other/x.png"),
    ("tdm-open.test", "/reserved/f.jpg"),
    ("tdm-broken.test", "/g.jpg"),
    ("tdm-slow.test", "/h.jpg"),
    ("tdm-big.test", "/i.jpg"),
    ("tdm-redirect.test", "/reserved/r.jpg"),
)


# URLs on named hosts and their expected reasons: (host, path) -> reason.
HOST_CASES: dict[tuple[str, str], str | None] = {
    # Our own group replaces the * group (RFC 9309), so * rules do not apply to us here...
    ("polite.test", "/private/a.jpg"): None,
    # ...but they do where there is no group for us.
    ("strict.test", "/private/s.jpg"): "robots",
    ("polite.test", "/no-wit/b.jpg"): "robots",
    ("polite.test", "/no-wit/except-this.jpg"): None,
    ("polite.test", "/open/c.jpg"): None,
    ("robots-down.test", "/d.jpg"): "robots",
    ("norobots.test", "/e.jpg"): None,
    ("metadata.test", "/f.jpg"): "blocked_address",  # resolves to 169.254.169.254
    ("intranet.test", "/g.jpg"): "blocked_address",  # resolves to 10.0.0.5 and fd00::5
    ("nxdomain.test", "/h.jpg"): "dns_error",
    # TDMRep: the first rule that matches decides; 0, no match, a value other than 0 or 1, or
    # a file that is broken, too slow or too large: no reservation.
    ("tdm.test", "/reserved/a.jpg"): "opt_out",
    ("tdm.test", "/free/b.jpg"): None,
    ("tdm.test", "/mixed/open-c.jpg"): None,  # an earlier rule releases it
    ("tdm.test", "/mixed/d.jpg"): "opt_out",
    ("tdm.test", "/odd/e.jpg"): None,  # first match says 2, a protocol error: unset
    ("tdm.test", "/other/x.jpg"): "opt_out",  # "/*.jpg$"
    ("tdm.test", "/other/x.png"): None,  # no rule matches: fetched
    ("tdm-open.test", "/reserved/f.jpg"): None,
    ("tdm-broken.test", "/g.jpg"): None,
    ("tdm-slow.test", "/h.jpg"): None,
    ("tdm-big.test", "/i.jpg"): None,
    # Takedown domain entries cover subdomains; such URLs are never requested.
    ("taken.test", "/direct.jpg"): "takedown",
    ("cdn.taken.test", "/s.jpg"): "takedown",
}

RESOLVER_TABLE = {
    "polite.test": ["127.0.0.1"],
    "strict.test": ["127.0.0.1"],
    "robots-down.test": ["127.0.0.1"],
    "norobots.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["10.0.0.5", "fd00::5"],
    **{
        host: ["127.0.0.1"]
        for host in (
            "redirect-strict.test",
            "redirect-open.test",
            "redirect-down.test",
            "tdm.test",
            "tdm-open.test",
            "tdm-broken.test",
            "tdm-slow.test",
            "tdm-big.test",
            "tdm-redirect.test",
        )
    },
}
