"""WARC files (``.warc``, ``.warc.gz``): HTML responses -> ``<img>`` URL/alt pairs.

Records are read with FastWARC, chosen over warcio by measurement (``benchmarks/bench_warc.py``:
faster, and it also reads uncompressed files). Neither library survives damage in the middle of
a file: both stop at the first corrupt gzip member or malformed record, losing the rest of the
file. ``iter_records`` therefore adds recovery on top: when a record fails (decompression error,
malformed header, block shorter than its ``Content-Length``, ``WARC-Block-Digest`` mismatch) it
is counted and reading resumes at the next gzip member (``.warc.gz``: Common Crawl writes one
member per record) or the next ``WARC/1.`` header line (``.warc``). A truncated last member
is counted too, never returned as if complete.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from wit_pipeline.config import GatherConfig
from wit_pipeline.stages.gather.readers import PageImage, page_opt_out
from wit_pipeline.stages.gather.readers.html import decode_html, extract_page

GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/1."
_SCAN_CHUNK = 1 << 20
_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass(frozen=True)
class Record:
    """One WARC record: the headers we use and its block (possibly only a prefix)."""

    record_type: str
    target_uri: str
    content_type: str
    identified_payload_type: str
    block: bytes
    offset: int
    complete: bool = True
    date: str = ""  # WARC-Date: when the crawler fetched it


def _find(f: IO[bytes], start: int, magic: bytes) -> int | None:
    """Offset of the first ``magic`` at or after ``start``, or None at end of file."""
    f.seek(start)
    pos = start
    tail = b""
    while True:
        chunk = f.read(_SCAN_CHUNK)
        if not chunk:
            return None
        data = tail + chunk
        i = data.find(magic)
        if i >= 0:
            return pos - len(tail) + i
        tail = data[-(len(magic) - 1) :]
        pos += len(chunk)


def _digest_ok(block: bytes, digest: str | None) -> bool | None:
    """Check ``WARC-Block-Digest`` (``sha1:BASE32`` or hex); None when absent or unsupported."""
    if not digest or ":" not in digest:
        return None
    algo, _, value = digest.partition(":")
    algo = algo.strip().lower().replace("-", "")
    try:
        raw = hashlib.new(algo, block).digest()
    except ValueError:
        return None
    value = value.strip()
    try:
        if len(value) == 2 * len(raw):
            return binascii.unhexlify(value) == raw
        return base64.b32decode(value.upper()) == raw
    except (binascii.Error, ValueError):
        return None


def iter_records(
    f: IO[bytes],
    *,
    record_types: Sequence[str] = ("response",),
    counter: collections.Counter | None = None,
    verify_digests: bool = True,
    max_block_bytes: int = 0,
    prefix: str = "warc",
) -> Iterator[Record]:
    """Yield the complete records of the given types from a seekable WARC stream, surviving damage.

    Counters (``<prefix>:...``): ``records`` (yielded), ``read_errors`` (records of a wanted type,
    or data at a resume point, that could not be read), ``truncated_records``,
    ``digest_mismatches``, ``resyncs`` (times reading resumed at a later record boundary). A record larger than
    ``max_block_bytes`` (0 = no limit) is yielded with only that prefix and ``complete=False``.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    counter = counter if counter is not None else collections.Counter()
    wanted = 0
    for t in record_types:
        wanted |= int(getattr(WarcRecordType, t))
    f.seek(0)
    magic = GZIP_MAGIC if f.read(2) == GZIP_MAGIC[:2] else WARC_MAGIC
    pos = 0
    while True:
        f.seek(pos)
        # Every record type is parsed (only headers; unread blocks are skipped) so that ``last``
        # is always the record just before a failure, whatever its type.
        records = iter(ArchiveIterator(f, record_types=WarcRecordType.any_type, parse_http=False))
        last = None
        while True:
            try:
                rec = next(records)
            except StopIteration:
                return
            except Exception:  # fastwarc raises OSError for corrupt gzip or malformed headers
                if last is None:
                    # The data at ``pos`` itself is broken: count it and skip past it.
                    counter[f"{prefix}:read_errors"] += 1
                    resume = pos + 1
                else:
                    # Broken after the last good record (its own tail, or what follows):
                    # resume at the next boundary after it; if that is the broken spot, the
                    # retry counts it.
                    resume = last + 1
                break
            last = rec.stream_pos
            if not int(rec.record_type) & wanted:
                continue
            headers = rec.headers
            length = rec.content_length
            limited = bool(max_block_bytes) and length > max_block_bytes
            try:
                block = rec.reader.read(max_block_bytes) if limited else rec.reader.read()
            except Exception:
                counter[f"{prefix}:read_errors"] += 1
                resume = last + 1
                break
            if not limited:
                if len(block) != length:
                    counter[f"{prefix}:truncated_records"] += 1
                    resume = last + 1
                    break
                if verify_digests and _digest_ok(block, headers.get("WARC-Block-Digest")) is False:
                    counter[f"{prefix}:digest_mismatches"] += 1
                    resume = last + 1
                    break
            counter[f"{prefix}:records"] += 1
            yield Record(
                record_type=str(headers.get("WARC-Type") or ""),
                target_uri=(headers.get("WARC-Target-URI") or "").strip().strip("<>"),
                content_type=headers.get("Content-Type") or "",
                identified_payload_type=headers.get("WARC-Identified-Payload-Type") or "",
                block=block,
                offset=last,
                complete=not limited,
                date=str(headers.get("WARC-Date") or "").strip(),
            )
        counter[f"{prefix}:resyncs"] += 1
        found = _find(f, resume, magic)
        if found is None:
            return
        pos = found


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    fields: tuple[tuple[str, str], ...] = ()  # every header line: (lower-case name, value)

    def all_headers(self) -> dict[str, list[str]]:
        """Every value of every header, repeated ones apart (``X-Robots-Tag`` reads each)."""
        out: dict[str, list[str]] = {}
        for name, value in self.fields:
            out.setdefault(name, []).append(value)
        return out


def parse_http_response(block: bytes) -> HttpResponse | None:
    """Split an HTTP response block into status, headers and body; None when malformed."""
    end = block.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end = block.find(b"\n\n")
        sep = 2
        if end < 0:
            return None
    head = block[:end].decode("latin-1").splitlines()
    if not head:
        return None
    parts = head[0].split(None, 2)
    if len(parts) < 2 or not parts[0].upper().startswith("HTTP/"):
        return None
    try:
        status = int(parts[1])
    except ValueError:
        return None
    headers: dict[str, str] = {}
    fields = []
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        value = value.strip()
        fields.append((name, value))
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return HttpResponse(status, headers, block[end + sep :], tuple(fields))


def _dechunk(body: bytes) -> bytes:
    out = []
    pos = 0
    while pos < len(body):
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size_field = body[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(body[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


def decode_body(response: HttpResponse) -> bytes | None:
    """The entity body with transfer and content encodings removed; None if undecodable.

    Common Crawl stores bodies already decoded (``X-Crawler-Content-Encoding``); other crawlers
    (wget, warcprox, Heritrix) keep the encodings as sent.
    """
    body = response.body
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            body = zlib.decompressobj(wbits=47).decompress(body)
        elif encoding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:
                body = zlib.decompress(body, -15)
        elif encoding == "br":
            try:
                import brotli
            except ImportError:
                return None
            body = brotli.decompress(body)
        elif encoding not in ("", "identity"):
            return None
    except Exception:  # zlib.error, brotli.error
        return None
    return body


def _is_html(response: HttpResponse, record: Record) -> bool:
    ctype = response.headers.get("content-type", "").lower()
    if ctype:
        return ctype.startswith(_HTML_TYPES) or "html" in ctype.split(";", 1)[0]
    if record.identified_payload_type:
        return record.identified_payload_type.lower().startswith(_HTML_TYPES)
    head = response.body[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def iter_page_images(
    f: IO[bytes], *, cfg: GatherConfig, counter: collections.Counter
) -> Iterator[PageImage]:
    """``(image URL, caption, page URL, opt-out signal, WARC-Date)`` for every ``<img>`` of
    every HTML response; the signal is the page's own (its meta tags and its response's
    ``X-Robots-Tag`` and ``tdm-reservation`` headers: ``readers.page_opt_out``), counted
    as ``warc:opt_out_pages``."""
    max_html = cfg.max_html_bytes
    for record in iter_records(
        f,
        record_types=("response",),
        counter=counter,
        verify_digests=cfg.verify_digests,
        max_block_bytes=max_html + 65536 if max_html else 0,
    ):
        response = parse_http_response(record.block)
        if response is None:
            counter["warc:bad_http"] += 1
            continue
        if not 200 <= response.status < 300:
            counter["warc:skipped_status"] += 1
            continue
        if not _is_html(response, record):
            counter["warc:skipped_not_html"] += 1
            continue
        body = decode_body(response)
        if body is None:
            counter["warc:undecodable_bodies"] += 1
            continue
        if not record.complete or (max_html and len(body) > max_html):
            counter["warc:html_truncated"] += 1
            body = body[:max_html]
        text, status = decode_html(body, response.headers.get("content-type"))
        if status != "ok":
            counter[f"warc:charset_{status}"] += 1
        counter["warc:html_pages"] += 1
        page_url = record.target_uri
        images, metas = extract_page(
            text,
            page_url,
            src_attributes=cfg.src_attributes,
            srcset_attributes=cfg.srcset_attributes,
            caption_attributes=cfg.caption_attributes,
        )
        signal = page_opt_out(cfg, response.all_headers(), metas) if images else None
        if signal is not None:
            counter["warc:opt_out_pages"] += 1
        for url, caption in images:
            yield url, caption, page_url, signal, record.date
