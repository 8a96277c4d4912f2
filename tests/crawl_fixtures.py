"""Builders for WARC and WAT test files in the exact published layouts, damage included.

Records follow WARC/1.0 as Common Crawl writes it (one gzip member per record, sha1 base32
``WARC-Block-Digest``); WAT documents follow Common Crawl's metadata layout
(Container/Envelope/Payload-Metadata/HTTP-Response-Metadata/HTML-Metadata/Links).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid
from urllib.parse import urljoin

QUERIES = ["dog", "beach", "cat", "hot dog", "puppy", "snow"]


def http_response(
    body: bytes,
    *,
    status: int = 200,
    content_type: str | None = "text/html; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def sha1_b32(data: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def warc_record(
    warc_type: str,
    target_uri: str | None,
    block: bytes,
    *,
    content_type: str = "application/http; msgtype=response",
    digest: str | None = "auto",
    content_length: int | None = None,
) -> bytes:
    headers = [
        "WARC/1.0",
        f"WARC-Type: {warc_type}",
        "WARC-Date: 2020-08-08T17:27:41Z",
        f"WARC-Record-ID: <urn:uuid:{uuid.UUID(int=len(block) * 7919 + len(warc_type))}>",
        f"Content-Length: {len(block) if content_length is None else content_length}",
        f"Content-Type: {content_type}",
    ]
    if target_uri is not None:
        headers.append(f"WARC-Target-URI: {target_uri}")
    if digest == "auto":
        headers.append(f"WARC-Block-Digest: {sha1_b32(block)}")
    elif digest is not None:
        headers.append(f"WARC-Block-Digest: {digest}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + block + b"\r\n\r\n"


def warcinfo() -> bytes:
    return warc_record(
        "warcinfo",
        None,
        b"isPartOf: TEST\r\npublisher: wit-pipeline tests\r\n",
        content_type="application/warc-fields",
    )


def request(uri: str) -> bytes:
    host = uri.split("/")[2]
    block = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return warc_record("request", uri, block, content_type="application/http; msgtype=request")


def gz(record: bytes) -> bytes:
    return gzip.compress(record, mtime=0)


# ---------------------------------------------------------------------------------------------
# The WARC fixture: every outcome of the reader and of the gather filters, with exact counts.

PAGE1_URI = "http://example.com/dir/page.html"
PAGE1 = b"""<!doctype html><html><head><title>t</title><base href="/static/"></head><body>
<img src="dog.jpg" alt="A dog on the beach">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="https://cdn.example.com/cat.jpg"
     alt="A cat &amp;amp; a dog   sleeping">
<img src="javascript:void(0)" alt="a hot dog stand">
<img src="blob:https://example.com/1234" alt="a red dog toy">
<img src="data:image/png;base64,iVBORw0KGgo=" alt="a small dog">
<img alt="a dog without a source">
<img src="//cdn.example.com/sunset.jpg">
<img src="empty.jpg" alt="">
<img src="tiny.jpg" alt="dog">
<img src="dog.jpg" alt="A dog on the beach">
<img src="http://[::1/bad.jpg" alt="a broken dog url">
<img src="https://example.com/fr.jpg" alt="Un chien qui joue sur la plage avec son ma\xc3\xaetre">
<img src="https://example.com/nomatch.jpg" alt="Sunset over the mountains">
<img srcset="https://example.com/small.jpg 1x, https://example.com/big.jpg 2x" alt="A puppy playing">
</body></html>"""

PAGE2_URI = "http://example.org/ru"
PAGE2 = """<html><body><img src="a.jpg" alt="Собака бежит по пляжу летом"></body></html>""".encode(
    "cp1251"
)

PAGE3_URI = "http://example.net/broken-bytes"
PAGE3 = b'<html><body><img src="b.jpg" alt="A dog \xff\xfe on the grass"></body></html>'

PAGE4_URI = "http://example.net/klingon"
PAGE4 = b'<html><body><img src="c.jpg" alt="A dog in the snow"></body></html>'

PAGE5_URI = "http://example.edu/latin1"
PAGE5 = (
    b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
    b'</head><body><img src="/img/caf\xe9.jpg" alt="A dog sitting in a caf\xe9 by the beach">'
    b"</body></html>"
)

PAGE_LOST_URI = "http://lost.example.com/"
PAGE_LOST = b'<html><body><img src="lost.jpg" alt="A lost dog on the beach"></body></html>'

PAGE_TAIL_URI = "http://tail.example.com/"
PAGE_TAIL = b'<html><body><img src="tail.jpg" alt="A dog at the end of the file"></body></html>'


def warc_records() -> list[bytes]:
    """The intact records of the fixture, in file order."""
    return [
        warcinfo(),
        request(PAGE1_URI),
        warc_record("response", PAGE1_URI, http_response(PAGE1)),
        warc_record(
            "metadata", PAGE1_URI, b"fetchTimeMs: 12\r\n", content_type="application/warc-fields"
        ),
        warc_record(
            "response",
            PAGE2_URI,
            http_response(PAGE2, content_type="text/html; charset=windows-1251"),
        ),
        warc_record("response", PAGE3_URI, http_response(PAGE3)),
        warc_record(
            "response", PAGE4_URI, http_response(PAGE4, content_type="text/html; charset=x-klingon")
        ),
        warc_record("response", PAGE5_URI, http_response(PAGE5, content_type="text/html")),
        warc_record(
            "response",
            "http://example.com/photo.jpg",
            http_response(b"\xff\xd8\xff\xe0 not really a jpeg", content_type="image/jpeg"),
        ),
        warc_record("response", "http://example.com/missing", http_response(PAGE4, status=404)),
        warc_record(
            "response",
            "http://example.com/wrong-digest",
            http_response(PAGE_LOST),
            digest=sha1_b32(b"x"),
        ),
    ]


def corrupt_member(member: bytes) -> bytes:
    """Flip bytes inside a gzip member's deflate data: decompression fails."""
    damaged = bytearray(member)
    for i in range(20, min(60, len(damaged) - 8)):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def damaged_warc_gz() -> bytes:
    """The fixture as .warc.gz with a corrupt member, garbage between members and a truncated
    last member, around intact records that must all still be read."""
    members = [gz(r) for r in warc_records()]
    broken = corrupt_member(gz(warc_record("response", PAGE_LOST_URI, http_response(PAGE_LOST))))
    garbage = b"this is not gzip data\x00" * 5
    tail = gz(warc_record("response", PAGE_TAIL_URI, http_response(PAGE_TAIL)))
    return (
        b"".join(members[:5])
        + broken
        + b"".join(members[5:8])
        + garbage
        + b"".join(members[8:])
        + tail[: len(tail) // 2]
    )


def damaged_plain_warc() -> bytes:
    """The fixture as uncompressed .warc with one record whose Content-Length is too long
    (it swallows the start of the next record) and a truncated last record."""
    records = warc_records()
    lying = warc_record(
        "response",
        PAGE_LOST_URI,
        http_response(PAGE_LOST),
        content_length=len(http_response(PAGE_LOST)) + 40,
    )
    tail = warc_record("response", PAGE_TAIL_URI, http_response(PAGE_TAIL))
    return b"".join(records[:5]) + lying + b"".join(records[5:]) + tail[: len(tail) - 30]


def encoded_response_warc() -> bytes:
    """A non-Common-Crawl WARC: a gzip Content-Encoding body sent with chunked transfer."""
    body = gzip.compress(b'<html><body><img src="/p.jpg" alt="A puppy in the snow"></body></html>')
    chunked = b"%x\r\n" % 10 + body[:10] + b"\r\n" + b"%x\r\n" % (len(body) - 10) + body[10:]
    chunked += b"\r\n0\r\n\r\n"
    block = http_response(
        chunked,
        headers=(("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")),
    )
    return gz(warcinfo()) + gz(warc_record("response", "https://wget.example/", block))


# ---------------------------------------------------------------------------------------------
# WAT

WAT_PAGE_URI = "http://blog.example.com/posts/1"


def wat_document(
    target_uri: str,
    warc_type: str = "response",
    *,
    status: str = "200",
    html: dict | None = None,
) -> dict:
    envelope = {
        "Format": "WARC",
        "WARC-Header-Length": "577",
        "Block-Digest": "sha1:QXLZPJ4UUKOBZFWZWSAGHPHBT7X7UD2Q",
        "Actual-Content-Length": "36578",
        "WARC-Header-Metadata": {
            "WARC-Type": warc_type,
            "WARC-Date": "2020-08-08T17:27:41Z",
            "WARC-Record-ID": "<urn:uuid:c4c112a5-3503-4483-abf8-51a0dd86dd53>",
            "Content-Length": "36578",
            "Content-Type": f"application/http; msgtype={warc_type}",
            "WARC-Target-URI": target_uri,
        },
        "Payload-Metadata": {
            "Actual-Content-Type": f"application/http; msgtype={warc_type}",
        },
    }
    if warc_type == "response":
        http = {
            "Response-Message": {"Version": "HTTP/1.1", "Status": status, "Reason": "OK"},
            "Headers": {"Content-Type": "text/html"},
            "Headers-Length": "257",
            "Entity-Length": "36331",
            "Entity-Trailing-Slop-Length": "0",
            "Entity-Digest": "sha1:CUJAG44UJDP64LTXHBIFKPXD54UHBP4S",
        }
        if html is not None:
            http["HTML-Metadata"] = html
        envelope["Payload-Metadata"]["HTTP-Response-Metadata"] = http
    return {
        "Container": {
            "Filename": "CC-MAIN-20200808165417-20200808195417-00395.warc.gz",
            "Compressed": True,
            "Offset": "940",
            "Gzip-Metadata": {
                "Deflate-Length": "10885",
                "Header-Length": "10",
                "Footer-Length": "8",
                "Inflated-Length": "37155",
            },
        },
        "Envelope": envelope,
    }


WAT_HTML = {
    "Head": {
        "Title": "A blog post",
        "Base": "https://static.example.com/media/",
        "Metas": [{"name": "viewport", "content": "width=device-width"}],
        "Link": [{"path": "LINK@/href", "rel": "stylesheet", "url": "/s.css"}],
    },
    "Links": [
        {"path": "A@/href", "url": "/about", "text": "About"},
        {"path": "IMG@/src", "url": "dog.jpg", "alt": "A happy dog on the beach"},
        {"path": "IMG@/src", "url": "http://cdn.example.com/cat.png", "alt": "A cat asleep"},
        {"path": "IMG@/src", "url": "spacer.gif"},
        {"path": "IMG@/src", "url": "data:image/gif;base64,R0lGOD", "alt": "a dog icon"},
        {"path": "IMG@/src", "url": "puppy.jpg", "alt": "Welpe im Schnee", "title": "Welpe"},
        {"path": "A@/href", "url": "http://example.com/x", "text": "dog"},
    ],
}


def wat_records() -> list[bytes]:
    def meta(doc_or_bytes, uri: str) -> bytes:
        block = (
            doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
        )
        return warc_record("metadata", uri, block, content_type="application/json")

    return [
        warcinfo(),
        meta(wat_document(WAT_PAGE_URI, "request"), WAT_PAGE_URI),
        meta(wat_document(WAT_PAGE_URI, html=WAT_HTML), WAT_PAGE_URI),
        meta(wat_document(WAT_PAGE_URI, "metadata"), WAT_PAGE_URI),
        meta(wat_document("http://example.com/img.png"), "http://example.com/img.png"),
        meta(wat_document("http://example.com/gone", status="404", html={"Links": []}), "x"),
        meta(b'{"Envelope": {"WARC-Header-Metadata": ', "http://broken.example.com/"),
    ]


def wat_gz() -> bytes:
    return b"".join(gz(r) for r in wat_records())


# ---------------------------------------------------------------------------------------------
# Page-level opt-outs: one page per signal (and per way of not opting out), each with one image.

OPT_OUT_DATE = "2020-08-08T17:27:41Z"  # every fixture record's WARC-Date


def _opt_page(n: int, head: str = "") -> bytes:
    return (
        f"<!doctype html><html><head>{head}</head><body>"
        f'<img src="/img/{n}.jpg" alt="A dog on the beach {n}"></body></html>'
    ).encode()


# (page URL, <head> markup, response headers, the page's signal or None)
OPT_OUT_PAGES: list[tuple[str, str, tuple[tuple[str, str], ...], str | None]] = [
    (
        "http://a.example/meta-robots",
        '<META NAME="Robots" CONTENT="NoIndex, NOAI">',
        (),
        "robots-meta:noai",
    ),
    (
        "http://a.example/meta-img2dataset",
        '<meta name="img2dataset" content="noimageai">',
        (),
        "img2dataset-meta:noimageai",
    ),
    (
        "http://a.example/meta-ours",
        '<meta name="WIT-Pipeline" content="noai">',
        (),
        "wit-pipeline-meta:noai",
    ),
    ("http://a.example/meta-other-agent", '<meta name="googlebot" content="noai">', (), None),
    ("http://a.example/meta-noindex", '<meta name="robots" content="noindex">', (), None),
    (
        "http://b.example/xrt",
        "",
        (("X-ROBOTS-TAG", "noarchive, NoImageAI"),),
        "x-robots-tag:noimageai",
    ),
    (
        "http://b.example/xrt-ours",
        "",
        (("X-Robots-Tag", "wit-pipeline: noai"),),
        "x-robots-tag:noai",
    ),
    (
        "http://b.example/xrt-other-agent",
        "",
        (("X-Robots-Tag", "otherbot: noai, noimageai"),),
        None,
    ),
    # Two headers: the agent of the first does not carry over to the second.
    (
        "http://b.example/xrt-two",
        "",
        (("X-Robots-Tag", "googlebot: noindex"), ("x-robots-tag", "noai")),
        "x-robots-tag:noai",
    ),
    ("http://c.example/tdm-header", "", (("TDM-Reservation", "1"),), "tdm-reservation:header"),
    (
        "http://c.example/tdm-meta",
        '<meta name="TDM-Reservation" content="1">',
        (),
        "tdm-reservation:meta",
    ),
    # TDMRep: the meta supersedes the header; 0 reserves nothing.
    (
        "http://c.example/tdm-meta-lifts",
        '<meta name="tdm-reservation" content="0">',
        (("tdm-reservation", "1"),),
        None,
    ),
    ("http://c.example/tdm-zero", "", (("tdm-reservation", "0"),), None),
]


def opt_out_warc() -> bytes:
    """A .warc.gz with one response per ``OPT_OUT_PAGES`` entry."""
    records = [warcinfo()]
    for n, (uri, head, headers, _) in enumerate(OPT_OUT_PAGES):
        block = http_response(_opt_page(n, head), headers=headers)
        records.append(warc_record("response", uri, block))
    return b"".join(gz(r) for r in records)


def opt_out_image(n: int) -> tuple[str, str]:
    """``(image URL, caption)`` of ``OPT_OUT_PAGES[n]``'s image."""
    return urljoin(OPT_OUT_PAGES[n][0], f"/img/{n}.jpg"), f"A dog on the beach {n}"


# WAT documents of pages with opt-outs: (page URL, Metas, Headers, signal or None).
WAT_OPT_OUT_PAGES: list[tuple[str, list[dict], dict, str | None]] = [
    ("http://w.example/meta", [{"name": "ROBOTS", "content": "noai"}], {}, "robots-meta:noai"),
    ("http://w.example/xrt", [], {"X-Robots-Tag": "noimageai"}, "x-robots-tag:noimageai"),
    (
        "http://w.example/xrt-list",
        [],
        {"X-Robots-Tag": ["googlebot: noai", "noai"]},
        "x-robots-tag:noai",
    ),
    ("http://w.example/tdm", [], {"tdm-reservation": "1"}, "tdm-reservation:header"),
    (
        "http://w.example/tdm-meta",
        [{"name": "tdm-reservation", "content": "1"}],
        {},
        "tdm-reservation:meta",
    ),
    (
        "http://w.example/other",
        [{"name": "otherbot", "content": "noai"}],
        {"X-Robots-Tag": "otherbot: noai"},
        None,
    ),
]


def opt_out_wat() -> bytes:
    """A .wat.gz with one HTML page per ``WAT_OPT_OUT_PAGES`` entry, one image link each."""
    records = [warcinfo()]
    for n, (uri, metas, headers, _) in enumerate(WAT_OPT_OUT_PAGES):
        html = {
            "Head": {"Title": "t", "Metas": metas},
            "Links": [
                {"path": "IMG@/src", "url": f"/img/{n}.jpg", "alt": f"A puppy in the snow {n}"}
            ],
        }
        doc = wat_document(uri, html=html)
        http = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]
        http["Headers"] = {"Content-Type": "text/html", **headers}
        block = json.dumps(doc).encode()
        records.append(warc_record("metadata", uri, block, content_type="application/json"))
    return b"".join(gz(r) for r in records)
