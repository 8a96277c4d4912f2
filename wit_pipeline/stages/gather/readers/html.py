"""HTML pages -> ``<img>`` URL/alt pairs: charset decoding and image extraction.

Both functions are pure and shared by the WARC reader (and by anything else holding HTML).
Parsing uses selectolax's lexbor backend (a fast, spec-compliant HTML5 parser in C).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from urllib.parse import urljoin

from selectolax.lexbor import LexborHTMLParser

# Charset labels as browsers read them (WHATWG Encoding Standard): ISO-8859-1 and ASCII pages
# are decoded as windows-1252, GB2312/GBK as GB18030, Shift_JIS as windows-31J, and so on.
_WHATWG_LABELS = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "windows-1252": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "gb_2312-80": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
    "iso-8859-9": "cp1254",
    "latin5": "cp1254",
    "utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
}
_CHARSET_PARAM = re.compile(rb"charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]+)", re.IGNORECASE)
_META_CHARSET = re.compile(
    rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]+)", re.IGNORECASE | re.DOTALL
)
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_HTTP = ("http://", "https://")


def charset_from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    m = _CHARSET_PARAM.search(content_type.encode("latin-1", "replace"))
    return m.group(1).decode("ascii").lower() if m else None


def _codec(label: str) -> str | None:
    label = label.strip().lower()
    name = _WHATWG_LABELS.get(label, label)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def sniff_charset(body: bytes, content_type: str | None) -> tuple[str | None, bool]:
    """``(codec, known)``: BOM, then the HTTP header, then ``<meta charset>`` in the first 4 KB.

    ``known`` is False when a charset was declared but Python has no codec for it.
    """
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name, True
    declared = charset_from_content_type(content_type)
    if declared is None:
        m = _META_CHARSET.search(body[:4096])
        declared = m.group(1).decode("ascii").lower() if m else None
    if declared is None:
        return None, True
    codec = _codec(declared)
    return codec, codec is not None


def decode_html(body: bytes, content_type: str | None = None) -> tuple[str, str]:
    """Decode an HTML body; returns ``(text, status)``.

    The declared charset (BOM, HTTP header, ``<meta>``) is tried first, then UTF-8, then, for
    pages that declare nothing, windows-1252 (the web's default). ``status`` is ``"ok"`` (the
    first candidate decoded cleanly), ``"fallback"`` (a later one did), ``"unknown_charset"``
    (the declared charset has no codec) or ``"errors"``: no candidate decoded cleanly and
    undecodable bytes became U+FFFD (captions containing it are dropped as ``bad_encoding``).
    """
    codec, known = sniff_charset(body, content_type)
    candidates = [codec] if codec else []
    candidates += [c for c in ("utf-8",) if c != codec]
    if codec is None:
        candidates.append("cp1252")
    for i, name in enumerate(candidates):
        try:
            text = body.decode(name)
        except UnicodeDecodeError:
            continue
        if not known:
            return text, "unknown_charset"
        return text, "ok" if i == 0 else "fallback"
    return body.decode(candidates[0], errors="replace"), "errors"


def resolve_url(base: str, value: str) -> str:
    try:
        return urljoin(base, value)
    except ValueError:  # e.g. "http://[broken" : kept as is, dropped later as bad_url
        return value


def _first_srcset_url(srcset: str) -> str:
    # HTML's srcset grammar: candidates separated by commas; a candidate is a URL (no
    # whitespace; it may itself contain commas) optionally followed by a descriptor.
    s = srcset.lstrip(" \t\n\r\f,")
    url = s.split(None, 1)[0] if s else ""
    return url.rstrip(",")


def pick_image_url(
    attributes: dict,
    base: str,
    src_attributes: Sequence[str],
    srcset_attributes: Sequence[str] = (),
) -> str | None:
    """The image URL of one ``<img>``: the first attribute that resolves to http(s).

    Lazy-loading pages put a placeholder (often a ``data:`` URI) in ``src`` and the real URL in
    ``data-src``; this picks the real one. When no attribute holds an http(s) URL, the first
    non-empty value is returned so the caller can record why it was dropped.
    """
    fallback = None
    for attr in src_attributes:
        value = attributes.get(attr)
        if not value or not value.strip():
            continue
        url = resolve_url(base, value.strip())
        if url[:8].lower().startswith(_HTTP):
            return url
        if fallback is None:
            fallback = url
    for attr in srcset_attributes:
        value = attributes.get(attr)
        if not value:
            continue
        first = _first_srcset_url(value)
        if first:
            url = resolve_url(base, first)
            if url[:8].lower().startswith(_HTTP):
                return url
            if fallback is None:
                fallback = url
    return fallback


def extract_images(
    html_text: str,
    page_url: str,
    *,
    src_attributes: Sequence[str] = ("src",),
    srcset_attributes: Sequence[str] = (),
    caption_attributes: Sequence[str] = ("alt",),
) -> list[tuple[str | None, str | None]]:
    """Every ``<img>`` of a page as ``(absolute URL or None, caption or None)``, in page order.

    Relative URLs are resolved against the first ``<base href>`` (itself resolved against the
    page URL) or the page URL. The caption is the first non-empty attribute among
    ``caption_attributes`` (``alt`` by default), unprocessed.
    """
    return extract_page(
        html_text,
        page_url,
        src_attributes=src_attributes,
        srcset_attributes=srcset_attributes,
        caption_attributes=caption_attributes,
    )[0]


def extract_page(
    html_text: str,
    page_url: str,
    *,
    src_attributes: Sequence[str] = ("src",),
    srcset_attributes: Sequence[str] = (),
    caption_attributes: Sequence[str] = ("alt",),
) -> tuple[list[tuple[str | None, str | None]], list[tuple[str, str]]]:
    """``(images, metas)``: :func:`extract_images`' list and every ``<meta name content>`` of
    the page as ``(name lower-cased, content)``, in page order (one parse for both; the metas
    carry the page's opt-outs: ``robots``, ``tdm-reservation``, ...)."""
    tree = LexborHTMLParser(html_text)
    metas = []
    for node in tree.css("meta[name]"):
        name = (node.attributes.get("name") or "").strip().lower()
        if name:
            metas.append((name, node.attributes.get("content") or ""))
    base = page_url
    base_node = tree.css_first("base[href]")
    if base_node is not None:
        href = (base_node.attributes.get("href") or "").strip()
        if href:
            base = resolve_url(page_url, href)
    out: list[tuple[str | None, str | None]] = []
    for node in tree.css("img"):
        attrs = node.attributes
        url = pick_image_url(attrs, base, src_attributes, srcset_attributes)
        caption = None
        for attr in caption_attributes:
            value = attrs.get(attr)
            if value and value.strip():
                caption = value
                break
        out.append((url, caption))
    return out, metas
