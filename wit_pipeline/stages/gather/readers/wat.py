"""WAT files (Common Crawl's metadata extracts): image links with their alt text.

A WAT file is a WARC file of ``metadata`` records whose block is one JSON document per
original WARC record. For an HTML response the layout is::

    {"Container": {...},
     "Envelope": {
       "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": "<page URL>", ...},
       "Payload-Metadata": {
         "HTTP-Response-Metadata": {
           "Response-Message": {"Status": "200", ...},
           "HTML-Metadata": {
             "Head": {"Base": "<base href>", "Title": ..., ...},
             "Links": [{"path": "IMG@/src", "url": "a.jpg", "alt": "A dog"},
                       {"path": "A@/href", "url": "...", "text": "..."}, ...]}}}}}

Every ``Links`` entry whose ``path`` is ``IMG@/<attribute>`` (``src`` in Common Crawl's
extracts) is one pair; relative URLs are resolved against ``Head.Base`` and the page URL.
WAT files are 3-4x smaller than the WARC files they describe and need no HTML parsing, which
is why MetaCLIP reads them; they keep no lazy-load attributes, only ``src``.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import IO, Any

from wit_pipeline.config import GatherConfig
from wit_pipeline.stages.gather.readers import PageImage, page_opt_out
from wit_pipeline.stages.gather.readers.html import resolve_url
from wit_pipeline.stages.gather.readers.warc import iter_records


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def images_from_wat_json(
    doc: Any, *, cfg: GatherConfig, counter: collections.Counter
) -> list[tuple[str | None, str | None, str]]:
    """``(image URL, caption, page URL)`` for every image link of one WAT JSON document."""
    envelope = _get(doc, "Envelope")
    warc_headers = _get(envelope, "WARC-Header-Metadata") or {}
    if warc_headers.get("WARC-Type") != "response":
        return []
    http = _get(envelope, "Payload-Metadata", "HTTP-Response-Metadata")
    if not isinstance(http, dict):
        counter["wat:skipped_not_http"] += 1
        return []
    status = _get(http, "Response-Message", "Status")
    try:
        if status is not None and not 200 <= int(status) < 300:
            counter["wat:skipped_status"] += 1
            return []
    except (TypeError, ValueError):
        pass
    html_meta = http.get("HTML-Metadata")
    if not isinstance(html_meta, dict):
        counter["wat:skipped_not_html"] += 1
        return []
    counter["wat:html_pages"] += 1
    page_url = str(warc_headers.get("WARC-Target-URI") or "").strip().strip("<>")
    base = page_url
    base_href = _get(html_meta, "Head", "Base")
    if isinstance(base_href, str) and base_href.strip():
        base = resolve_url(page_url, base_href.strip())
    paths = {f"IMG@/{a}" for a in cfg.src_attributes}
    out: list[tuple[str | None, str | None, str]] = []
    for link in html_meta.get("Links") or ():
        if not isinstance(link, dict) or link.get("path") not in paths:
            continue
        raw = link.get("url")
        url = resolve_url(base, raw.strip()) if isinstance(raw, str) and raw.strip() else None
        caption = None
        for attr in cfg.caption_attributes:
            value = link.get(attr)
            if isinstance(value, str) and value.strip():
                caption = value
                break
        out.append((url, caption, page_url))
    return out


def page_signal(doc: Any, *, cfg: GatherConfig) -> str | None:
    """The opt-out signal of the page a WAT document describes (``readers.page_opt_out``):
    its ``Head.Metas`` (``{"name": ..., "content": ...}``) and its response ``Headers``."""
    http = _get(doc, "Envelope", "Payload-Metadata", "HTTP-Response-Metadata")
    if not isinstance(http, dict):
        return None
    headers: dict[str, list[str]] = {}
    raw = http.get("Headers")
    for name, value in raw.items() if isinstance(raw, dict) else ():
        values = value if isinstance(value, list) else [value]
        headers.setdefault(str(name).lower(), []).extend(str(v) for v in values)
    metas = []
    for meta in _get(http, "HTML-Metadata", "Head", "Metas") or ():
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            name = meta["name"].strip().lower()
            if name:
                metas.append((name, str(meta.get("content") or "")))
    return page_opt_out(cfg, headers, metas)


def iter_page_images(
    f: IO[bytes], *, cfg: GatherConfig, counter: collections.Counter
) -> Iterator[PageImage]:
    """``(image URL, caption, page URL, opt-out signal, WARC-Date)`` for every image link of
    every page (``images_from_wat_json``, ``page_signal``; ``wat:opt_out_pages`` counted)."""
    for record in iter_records(
        f,
        record_types=("metadata",),
        counter=counter,
        verify_digests=cfg.verify_digests,
        prefix="wat",
    ):
        if "json" not in record.content_type.lower():
            counter["wat:skipped_not_json"] += 1
            continue
        try:
            doc = json.loads(record.block)
        except (UnicodeDecodeError, ValueError):
            counter["wat:bad_json"] += 1
            continue
        images = images_from_wat_json(doc, cfg=cfg, counter=counter)
        if not images:
            continue
        signal = page_signal(doc, cfg=cfg)
        if signal is not None:
            counter["wat:opt_out_pages"] += 1
        date = str(_get(doc, "Envelope", "WARC-Header-Metadata", "WARC-Date") or "").strip()
        for url, caption, page_url in images:
            yield url, caption, page_url, signal, date
