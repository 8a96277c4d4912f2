"""Reading the builder's input files, and what the manifest records about each.

Every source reads its inputs through these helpers: text lines of local or remote files
(``gs://``, ``.gz``/``.bz2`` decompressed), sizes and checksums, and the ``inputs`` record of a
file in the manifest (path or a portable name, kind, size, date, sha256).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from typing import Any

from wit_pipeline import fileio

READ_CHUNK = 1 << 20  # bytes per read of a large input file


def file_size(path: str) -> int:
    return int(fileio.filesystem(path).size(path))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fileio.open_file(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_lines(path: str) -> Iterator[str]:
    """Text lines of a local or remote file, ``.gz``/``.bz2`` decompressed."""
    with fileio.open_file(path, "rb", compression="infer") as f:
        for raw in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
            yield raw.rstrip("\r\n")


_DATE_RE = re.compile(r"(?<!\d)(20\d{2})(\d{2})(\d{2})(?!\d)")


def input_info(
    path: str, kind: str, *, checksum: bool = True, name: str | None = None, **extra: Any
) -> dict[str, Any]:
    """What the manifest records about an input file: path (or a portable ``name``), kind,
    size, date (from a ``YYYYMMDD`` in the file name) and sha256."""
    info: dict[str, Any] = {"path": name or path, "kind": kind, "size": file_size(path)}
    m = _DATE_RE.search(path.rsplit("/", 1)[-1])
    if m:
        info["date"] = f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
    if checksum:
        info["sha256"] = file_sha256(path)
    info.update(extra)
    return info
