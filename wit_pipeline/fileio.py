"""Paths, globs and atomic writes over local files and fsspec URLs (gs://, s3://, ...).

Stages read and write through these helpers so that the same code runs on a laptop and on
Dataflow workers. Writes are atomic: a file either has its final complete content or does not
exist, which is what lets reruns skip finished work.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

import fsspec

from wit_pipeline.errors import WitError

_GLOB_CHARS = frozenset("*?[")


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _strip_file(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URLs and ``os.path.join`` for local paths."""
    if is_local(base):
        return os.path.join(_strip_file(base), *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    try:
        fs, _ = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:  # e.g. gcsfs not installed
        raise WitError(f"cannot open {path}: {e}") from None
    return fs


def expand_inputs(patterns: Sequence[str], *, suffixes: Sequence[str] = ()) -> list[str]:
    """Expand files, directories and globs (local or fsspec URLs) into a sorted file list.

    A directory expands to the files directly inside it (filtered by ``suffixes`` when given).
    A pattern that matches nothing is an error: a silently empty input is a lost crawl.
    """
    out: list[str] = []
    for pattern in patterns:
        found: list[str] = []
        if is_local(pattern):
            p = _strip_file(pattern)
            if any(c in p for c in _GLOB_CHARS):
                found = sorted(f for f in _glob.glob(p, recursive=True) if os.path.isfile(f))
            elif os.path.isdir(p):
                found = sorted(
                    os.path.join(p, f)
                    for f in os.listdir(p)
                    if os.path.isfile(os.path.join(p, f)) and not f.startswith((".", "_"))
                )
                if suffixes:
                    found = [f for f in found if f.endswith(tuple(suffixes))]
            elif os.path.isfile(p):
                found = [p]
        else:
            fs = filesystem(pattern)
            protocol = pattern.split("://", 1)[0]
            if any(c in pattern for c in _GLOB_CHARS):
                found = sorted(fs.glob(pattern))
            elif fs.isdir(pattern):
                found = sorted(f for f in fs.ls(pattern, detail=False) if fs.isfile(f))
                if suffixes:
                    found = [f for f in found if f.endswith(tuple(suffixes))]
            elif fs.exists(pattern):
                found = [pattern]
            found = [f if "://" in f else f"{protocol}://{f}" for f in found]
        if not found:
            raise WitError(f"input not found: {pattern}")
        out.extend(found)
    # Keep order, drop repeats (two patterns may match the same file).
    return list(dict.fromkeys(out))


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(_strip_file(path))
    return filesystem(path).exists(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(_strip_file(path), exist_ok=True)
    else:
        filesystem(path).makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open a local path or URL; ``compression="infer"`` may be passed for .gz/.bz2."""
    if is_local(path):
        path = _strip_file(path)
        if "compression" not in kwargs:
            return open(path, mode)
    return fsspec.open(path, mode, **kwargs).open()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` so that readers see either nothing or the complete file.

    Local files are written beside their destination and renamed into place; object stores
    (GCS, S3) publish an object only when its upload completes, so they are written directly.
    """
    if not is_local(path):
        with fsspec.open(path, mode) as f:
            yield f
        return
    path = _strip_file(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path: str) -> Any:
    with open_file(path, "r") as f:
        return json.load(f)
