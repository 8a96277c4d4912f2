"""WARC library choice: FastWARC vs warcio, speed and robustness on damaged files.

Speed: iterate every record of the real Common Crawl excerpt (replicated in memory) and read
each response block. Robustness: damage the same file (a corrupt gzip member in the middle,
garbage between members, a record with a malformed header, a truncated last response) and
count the HTML responses each reader returns intact; ``wit_pipeline.stages.gather.readers.warc`` (FastWARC
plus recovery) is the third column. Baseline: warcio.

    .venv/bin/python benchmarks/bench_warc.py [--quick] [--copies N]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import time
import warnings
import zlib

import common

from wit_pipeline.stages.gather.readers import warc as warc_reader


def members(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        used = len(data) - pos - len(d.unused_data)
        out.append(data[pos : pos + used])
        pos += used
    return out


def read_fastwarc(data: bytes) -> tuple[int, str]:
    """Responses with a complete block and an HTTP status line, as FastWARC alone returns them."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    n = 0
    try:
        for r in ArchiveIterator(
            io.BytesIO(data), record_types=WarcRecordType.response, parse_http=False
        ):
            block = r.reader.read()
            if len(block) == r.content_length and warc_reader.parse_http_response(block):
                n += 1
    except Exception as e:
        return n, type(e).__name__
    return n, ""


def read_warcio(data: bytes) -> tuple[int, str]:
    """Responses with an HTTP status line (warcio cannot tell a truncated block)."""
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in ArchiveIterator(io.BytesIO(data)):
                if r.rec_type == "response":
                    r.content_stream().read()
                    n += r.http_headers is not None and bool(r.http_headers.get_statuscode())
    except Exception as e:
        return n, type(e).__name__
    return n, ""


def read_ours(data: bytes, verify_digests: bool = True) -> tuple[int, str]:
    """``iter_records`` (recovery, length and sha1 digest checks) plus HTTP parsing."""
    c: collections.Counter[str] = collections.Counter()
    records = warc_reader.iter_records(io.BytesIO(data), counter=c, verify_digests=verify_digests)
    n = sum(1 for r in records if warc_reader.parse_http_response(r.block))
    return n, ", ".join(
        f"{k.split(':')[1]} {v}" for k, v in sorted(c.items()) if k != "warc:records"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--copies", type=int, default=0, help="default 40 (quick: 8)")
    args = ap.parse_args()
    data = (common.shared_data() / "warc" / "cc-main-2020-34-excerpt.warc.gz").read_bytes()
    copies = args.copies or (8 if args.quick else 40)
    big = data * copies

    rows = []
    timings = {}
    for name, fn in [
        ("warcio 1.8 (baseline)", read_warcio),
        ("FastWARC 2.0", read_fastwarc),
        ("wit_pipeline.stages.gather.readers.warc", read_ours),
        (
            "wit_pipeline.stages.gather.readers.warc, verify_digests=False",
            lambda d: read_ours(d, False),
        ),
    ]:
        best = float("inf")
        for _ in range(1 if args.quick else 3):
            t0 = time.perf_counter()
            n, err = fn(big)
            best = min(best, time.perf_counter() - t0)
        assert n == 16 * copies and not err.startswith(("OSError", "Archive")), (name, n, err)
        timings[name] = best
        rows.append([name, f"{n / best:,.0f}", f"{len(big) / best / 2**20:,.1f}"])
    base = timings["warcio 1.8 (baseline)"]
    for r, t in zip(rows, timings.values(), strict=True):
        r.append(f"{base / t:.1f}x")

    m = members(data)
    corrupt = bytearray(m[5])
    for i in range(20, 60):
        corrupt[i] ^= 0xFF
    bad_header = gzip.compress(
        b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: x\r\n\r\nzz\r\n\r\n"
    )
    cases = {
        "intact": data,
        "corrupt gzip member (page 2)": b"".join(m[:5]) + bytes(corrupt) + b"".join(m[6:]),
        "garbage between members": b"".join(m[:5]) + b"not gzip\x00" * 20 + b"".join(m[5:]),
        "malformed record header": b"".join(m[:5]) + bad_header + b"".join(m[5:]),
        "last response truncated": b"".join(m[:47]) + m[47][: len(m[47]) // 2],
    }
    robust = []
    for label, blob in cases.items():
        cells = [label]
        for fn in (read_warcio, read_fastwarc, read_ours):
            n, err = fn(blob)
            cells.append(f"{n}" + (f" ({err})" if err else ""))
        robust.append(cells)

    cmd = "benchmarks/bench_warc.py" + (" --quick" if args.quick else "")
    print(common.header("WARC reading: FastWARC vs warcio", cmd))
    print(f"Real Common Crawl excerpt (16 HTML responses, 136 KB), {copies} copies in memory.\n")
    print(common.table(rows, ["reader", "responses/s", "MiB/s (gzip)", "speed-up"]))
    print()
    print(
        "HTML responses returned with a complete block and a valid HTTP status line, from "
        "damaged copies of the same file (16 in the intact file; warcio cannot tell a truncated "
        "block, so its count for the truncated file includes the partial page):\n"
    )
    print(
        common.table(robust, ["damage", "warcio", "FastWARC", "wit_pipeline (FastWARC + recovery)"])
    )


if __name__ == "__main__":
    main()
