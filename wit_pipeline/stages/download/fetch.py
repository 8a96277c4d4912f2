"""The download stage's fetch side: img2dataset driven for one shard, behind our guard.

img2dataset does the fetching, decoding, resizing and re-encoding: its per-shard ``Downloader``
runs with a sample writer of ours (``_Collector``) that keeps each URL's ``plan.Outcome`` in
memory, and a resizer of ours (``ProbingResizer``) that refuses decompression bombs, tiny and
oddly shaped images and non-images from their headers (``header_size``) before img2dataset's
resizer decodes them. Every request goes through the process's guarded ``urllib`` opener
(``guarded_http`` over ``netguard``; ``make_guard`` and ``fetch_options`` build it from the
config), and errors keep their stable reasons through img2dataset's error strings
(``reason_from_message``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from wit_pipeline import optout, shards
from wit_pipeline.config import DownloadConfig
from wit_pipeline.stages.download import guarded_http, netguard, robots
from wit_pipeline.stages.download.plan import Outcome

# img2dataset 1.47 reports these resizer and downloader messages as plain strings.
_IMG2DATASET_MESSAGES = {
    "image too small": "too_small",
    "image area too large": "too_large",
    "aspect ratio too large": "bad_aspect_ratio",
    "image decoding error": "decode_error",
    "use of image disallowed by x-robots-tag directive": "opt_out",
}


def reason_from_message(message: str | None, *, default: str) -> tuple[str, str]:
    """Map an img2dataset error message (ours are ``wit:<reason>: ...``) to a reason."""
    parsed = netguard.parse_reason(message)
    if parsed is not None:
        return parsed
    text = (message or "").strip()
    reason = _IMG2DATASET_MESSAGES.get(text.lower(), default)
    if reason == optout.OPT_OUT:  # img2dataset's own X-Robots-Tag check: name the signal
        return reason, "x-robots-tag"
    return reason, text[:500]


# X-Robots-Tag directives scoped to these agents apply to us too, besides our product token:
# site owners address the tool that dataset builders run.
OPT_OUT_AGENTS = ("img2dataset",)


def fetch_options(config: DownloadConfig) -> guarded_http.FetchOptions:
    return guarded_http.FetchOptions(
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        retries=config.retries,
        retry_backoff=config.retry_backoff,
        max_redirects=config.max_redirects,
        max_bytes=config.max_bytes,
        user_agent=config.user_agent,
        user_agent_token=user_agent_token(config.user_agent),
        disallowed_header_directives=tuple(config.disallowed_header_directives),
        per_host_concurrency=config.per_host_concurrency,
        per_host_rate=config.per_host_rate,
        ca_bundle=config.ca_bundle,
        opt_out_agents=OPT_OUT_AGENTS,
        respect_tdmrep=config.respect_tdmrep,
        max_retry_wait=config.max_retry_wait,
    )


def user_agent_token(user_agent: str) -> str:
    """The product token (``wit-pipeline`` of ``wit-pipeline/0.1 (+...)``), lower-cased."""
    return robots._product_token(user_agent)


def make_guard(config: DownloadConfig, resolver: netguard.Resolver | None = None) -> netguard.Guard:
    return netguard.Guard(
        policy=netguard.AddressPolicy(allow_loopback=config.allow_loopback),
        resolver=resolver or netguard.system_resolver,
        connect_timeout=config.connect_timeout,
    )


def _looks_like_text(data: bytes) -> bool:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"<", b"{", b"["):
        return True
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` read from a JPEG, PNG or GIF header, else ``None``.

    For a GIF, the size Pillow gives it: the logical screen grown to hold the first frame.

    A few microseconds, against ~80 for ``PIL.Image.open`` (which parses every JPEG segment);
    anything this does not recognize, or finds malformed, is left to PIL.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_size(data)
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return ("JPEG", width, height) if width and height else None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _gif_size(data: bytes) -> tuple[str, int, int] | None:
    """A GIF's logical screen grown to hold its first frame, as Pillow sizes it on open.

    The screen size alone is not enough: a GIF may declare a 100x100 screen and a first frame
    of 30,000x30,000 (a decompression bomb), which Pillow decodes at the frame's size.
    """
    n = len(data)
    if n < 13:
        return None
    width = int.from_bytes(data[6:8], "little")
    height = int.from_bytes(data[8:10], "little")
    packed = data[10]
    i = 13
    if packed & 0x80:  # global colour table
        i += 3 << ((packed & 0x07) + 1)
    while i < n:
        block = data[i]
        if block == 0x2C:  # image descriptor: left, top, width, height
            if i + 9 > n:
                return None
            left, top, w, h = (
                int.from_bytes(data[i + 1 + 2 * k : i + 3 + 2 * k], "little") for k in range(4)
            )
            return "GIF", max(width, left + w), max(height, top + h)
        if block != 0x21:  # trailer or garbage before any frame: left to PIL
            return None
        i += 2  # extension introducer and label, then data sub-blocks up to an empty one
        while i < n and data[i]:
            i += data[i] + 1
        i += 1
    return None


class ProbingResizer:
    """img2dataset's ``Resizer`` behind a header probe that refuses before decoding.

    PIL reads only the image header (``Image.open`` is lazy), so a decompression bomb (a small
    file announcing a huge canvas), an image below ``min_image_size`` or beyond
    ``max_aspect_ratio``, an empty body and a non-image (HTML, JSON, SVG, text) are refused
    with a reason without being decoded. Everything else goes to img2dataset's resizer, which
    decodes, resizes and re-encodes. Errors carry ``wit:<reason>:`` so the reason survives
    img2dataset's error strings.
    """

    def __init__(self, resizer, config: DownloadConfig):
        self.resizer = resizer
        self.max_area = config.max_image_area
        self.min_size = config.min_image_size
        self.max_aspect = config.max_aspect_ratio

    def probe(self, data: bytes) -> str | None:
        """``None`` when the image may be decoded, else ``wit:<reason>: detail``."""
        if not data:
            return "wit:empty_body: 0 bytes"
        fast = header_size(data)
        if fast is not None:
            fmt, width, height = fast
            return self._check_size(fmt, width, height)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                fmt = im.format or "?"
        except Image.DecompressionBombError as e:
            return f"wit:too_large: {e}"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            if _looks_like_text(data):
                return f"wit:not_image: body looks like text/markup ({len(data)} bytes)"
            return f"wit:decode_error: unrecognized image data ({type(e).__name__})"
        return self._check_size(fmt, width, height)

    def _check_size(self, fmt: str, width: int, height: int) -> str | None:
        if width <= 0 or height <= 0:
            return f"wit:decode_error: {fmt} header gives {width}x{height}"
        if width * height > self.max_area:
            return f"wit:too_large: {fmt} {width}x{height} exceeds {self.max_area:.0f} pixels"
        if min(width, height) < self.min_size:
            return f"wit:too_small: {fmt} {width}x{height} below {self.min_size} pixels"
        if max(width, height) / min(width, height) > self.max_aspect:
            return f"wit:bad_aspect_ratio: {fmt} {width}x{height} beyond {self.max_aspect:g}"
        return None

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        refusal = self.probe(data)
        if refusal is not None:
            return None, None, None, None, None, refusal
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


class _Collector:
    """A ``sample_writer_class`` for img2dataset's ``Downloader`` that keeps results in memory.

    The Downloader calls ``write`` for every URL of the shard (success or failure) from one
    thread; the DoFn turns the collected outcomes into shard files once the shard is done.
    """

    def __init__(self):
        self.outcomes: dict[str, Outcome] = {}

    def __call__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, fmt):
        return self

    def write(self, img_str, key, caption, meta):
        wit_key = meta["wit_key"]
        if img_str is not None and meta.get("status") == "success":
            self.outcomes[wit_key] = Outcome(
                image=bytes(img_str),
                width=meta.get("width"),
                height=meta.get("height"),
                original_width=meta.get("original_width"),
                original_height=meta.get("original_height"),
                sha256=meta.get("sha256"),
            )
            return
        default = "decode_error" if meta.get("status") == "failed_to_resize" else "download_error"
        reason, detail = reason_from_message(meta.get("error_message"), default=default)
        detail, policy_url, fetched = optout.split_policy(detail)
        self.outcomes[wit_key] = Outcome(
            reason=reason, detail=detail, policy_url=policy_url, policy_fetched=fetched
        )

    def close(self):
        pass


def make_img2dataset_resizer(config: DownloadConfig):
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format="jpg",
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_area,
        max_aspect_ratio=config.max_aspect_ratio,
    )


def fetch_with_img2dataset(
    records: Sequence[Mapping[str, Any]],
    *,
    shard_id: int,
    config: DownloadConfig,
    resizer,
    workdir: str,
) -> dict[str, Outcome]:
    """Download, validate and resize ``records`` with img2dataset's ``Downloader``.

    The guarded opener must already be installed in this process (the download DoFn,
    ``transforms._DownloadShardFn``, does it); img2dataset's own retries are off because the
    opener retries only retryable errors.
    """
    if not records:
        return {}
    from img2dataset.downloader import Downloader

    collector = _Collector()
    ipc_path = os.path.join(workdir, f"{shards.shard_name(shard_id)}.feather")
    table = pa.table(
        {
            "url": [r["url"] for r in records],
            "wit_key": [r["key"] for r in records],
        }
    )
    with pa.OSFile(ipc_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    downloader = Downloader(
        sample_writer_class=collector,
        resizer=resizer,
        thread_count=config.threads,
        save_caption=False,
        extract_exif=False,
        output_folder=workdir,
        column_list=["url", "wit_key"],
        timeout=config.timeout,
        number_sample_per_shard=max(2, len(records)),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=user_agent_token(config.user_agent),
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )
    try:
        downloader.download_shard((shard_id, ipc_path))
    finally:
        for leftover in (ipc_path, os.path.join(workdir, f"{shard_id:05d}_stats.json")):
            if os.path.exists(leftover):
                os.remove(leftover)
    return collector.outcomes
