"""Paths, globs and atomic writes over local files and fsspec URLs (gs://, s3://, ...).

Stages read and write through these helpers so that the same code runs on a laptop and on
Dataflow workers. Writes are atomic on every filesystem: a file either has its final complete
content or does not exist, which is what lets reruns skip finished work. Every output file is
written through :func:`atomic_write` (or :func:`write_json`); :func:`open_file` only reads.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import gzip
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import fsspec

from wit_pipeline.errors import WitError

_GLOB_CHARS = frozenset("*?[")
_TMP_SUFFIX = ".tmp"

logger = logging.getLogger(__name__)


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
                # As Python's glob: a wildcard matches no dot-name (in-flight atomic writes)
                # unless the pattern's own last part starts with a dot.
                hidden_ok = pattern.rstrip("/").rsplit("/", 1)[-1].startswith(".")
                found = sorted(f for f in fs.glob(pattern) if hidden_ok or not _hidden(f, "."))
            elif fs.isdir(pattern):
                found = sorted(
                    f
                    for f in fs.ls(pattern, detail=False)
                    if not _hidden(f, ".", "_") and fs.isfile(f)
                )
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


def _hidden(path: str, *prefixes: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(prefixes)


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
    """Open a local path or URL for reading; ``compression="infer"`` may be passed for .gz/.bz2.

    Writing goes through :func:`atomic_write`: a file opened for writing here would be visible
    under its final name while (and, on object stores, even after a failed) write.
    """
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_file reads only (mode {mode!r}); write with fileio.atomic_write")
    if is_local(path):
        path = _strip_file(path)
        if "compression" not in kwargs:
            return open(path, mode)
    return fsspec.open(path, mode, **kwargs).open()


def temporary_path(path: str) -> str:
    """A fresh temporary name beside ``path``: ``DIR/.NAME.<32 hex>.tmp``.

    The leading dot and the ``.tmp`` suffix keep it out of every listing of the project (the
    ``*.tar`` / ``*.parquet`` globs, :func:`expand_inputs` on a directory or a ``*`` glob).
    """
    name = f".{os.path.basename(path.rstrip('/'))}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    if is_local(path):
        return os.path.join(os.path.dirname(_strip_file(path)), name)
    return f"{path.rstrip('/').rsplit('/', 1)[0]}/{name}"


def is_temporary(name: str) -> bool:
    """True for a name (or path) that :func:`temporary_path` makes."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(_TMP_SUFFIX)


def remove_temporaries(directory: str, *, prefix: str = "") -> list[str]:
    """Remove the temporaries of writes to ``directory/PREFIX*`` that a killed writer left.

    :func:`atomic_write` removes its temporary when the write fails with an exception; only a
    process killed mid-write (SIGKILL, a preempted VM) leaves one behind. Readers never see them;
    call this where a rerun (re)writes files, before the writers start, to reclaim the space.
    Lists ``directory`` once; returns the removed paths, sorted.
    """
    return remove_entries(
        directory, lambda name: is_temporary(name) and name.startswith(f".{prefix}")
    )


def list_names(directory: str) -> list[str]:
    """Base names of everything directly in ``directory`` (files and folders), sorted.

    Unlike :func:`expand_inputs`, dot-names (temporaries) are listed too, and a missing
    directory is empty rather than an error.
    """
    if is_local(directory):
        d = _strip_file(directory)
        return sorted(os.listdir(d)) if os.path.isdir(d) else []
    fs = filesystem(directory)
    if not fs.isdir(directory):
        return []
    return sorted(f.rstrip("/").rsplit("/", 1)[-1] for f in fs.ls(directory, detail=False))


def remove_entries(directory: str, select: Callable[[str], bool]) -> list[str]:
    """Remove the files and folders directly in ``directory`` whose base name ``select`` accepts.

    The same on a local disk and on every fsspec filesystem (``fs.ls`` and ``fs.rm``), which is
    what a rerun needs to clear what an earlier run left (stale ``part-*-of-N`` files of another
    part count, shards of a larger run, temporaries of a killed writer) wherever the output is.
    Lists ``directory`` once; entries already gone are skipped. Returns the removed paths,
    sorted (remote ones as URLs).
    """
    removed: list[str] = []
    if is_local(directory):
        d = _strip_file(directory)
        for entry in list_names(d):
            if not select(entry):
                continue
            path = os.path.join(d, entry)
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
        return removed
    fs = filesystem(directory)
    if not fs.isdir(directory):
        return removed
    protocol = directory.split("://", 1)[0]
    for f in sorted(fs.ls(directory, detail=False)):
        if not select(f.rstrip("/").rsplit("/", 1)[-1]):
            continue
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f, recursive=True)
            removed.append(f if "://" in f else f"{protocol}://{f}")  # as expand_inputs
    return removed


def replace(src: str, dst: str) -> None:
    """Move the complete file ``src`` to ``dst`` (same filesystem), replacing ``dst`` at once.

    Locally an ``os.replace`` (atomic); on fsspec filesystems ``fs.mv``: a rename where there is
    one, a server-side copy plus a delete on GCS and S3, whose copy publishes the whole object.
    For files staged under another name and published later (``atomic_write`` does both in one
    go).
    """
    if is_local(src):
        dst = _strip_file(dst)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.replace(_strip_file(src), dst)
    else:
        filesystem(src).mv(src, dst)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` so that readers see either nothing or the complete file.

    The file is written under :func:`temporary_path` beside ``path`` and moved into place only
    when the ``with`` block and the close (the upload's commit, on object stores) succeed; on
    any failure the temporary is removed and nothing changes under ``path``. Locally the move
    is an ``os.replace`` after an fsync. On fsspec filesystems it is ``fs.mv``: a rename where
    the filesystem has one, a server-side copy and a delete on GCS and S3, whose copies publish
    the whole object at once. (Writing the final name directly would not do: fsspec commits an
    upload when its ``with`` block closes, even after an exception, so a failed writer would
    publish a truncated file under the final name, and a rerun would skip it.)
    """
    if not is_local(path):
        with _remote_atomic_write(path, mode) as f:
            yield f
        return
    path = _strip_file(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _remote_atomic_write(path: str, mode: str) -> Iterator[IO]:
    fs = filesystem(path)
    tmp = temporary_path(path)
    f = fs.open(tmp, mode)
    try:
        try:
            yield f
        except BaseException:
            # Close before removing: an unclosed fsspec file commits itself when collected,
            # which would publish the temporary after its removal.
            with contextlib.suppress(Exception):
                f.close()
            raise
        f.close()  # the upload's commit: it may fail too
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except FileNotFoundError:
            pass  # never created (the failure came before the upload's commit), or moved
        except Exception as e:  # the write's own error is the one to report
            logger.warning("could not remove the temporary %s: %s", tmp, e)
        raise


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes (local or fsspec URL), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path: str) -> Any:
    with open_file(path, "r") as f:
        return json.load(f)


def read_bytes_gunzipped(path: str, what: str = "file") -> tuple[bytes, bytes]:
    """``(stored bytes, bytes decompressed when gzip)`` of a small file (a query list, a caption
    file), with one-line ``WitError`` messages naming ``what`` it is."""
    try:
        with open_file(path, "rb") as f:
            stored = f.read()
    except FileNotFoundError:
        raise WitError(f"{what} not found: {path}") from None
    except (OSError, IsADirectoryError) as e:
        raise WitError(f"cannot read {what} {path}: {e}") from None
    if stored[:2] != b"\x1f\x8b":
        return stored, stored
    try:
        return stored, gzip.decompress(stored)
    except (OSError, EOFError) as e:
        raise WitError(f"cannot read {what} {path}: not a valid gzip file ({e})") from None


def sniff_format(path: str, raw: bytes, by_suffix: Mapping[str, str]) -> str:
    """A file's format: ``by_suffix[extension]`` (``.gz`` stripped first), else ``parquet`` for
    Parquet's magic bytes, ``json`` for content that parses as JSON, else ``""`` (undecided)."""
    name = path[:-3] if path.endswith(".gz") else path
    fmt = by_suffix.get(os.path.splitext(name)[1].lower())
    if fmt:
        return fmt
    if raw[:4] == b"PAR1":
        return "parquet"
    if raw.lstrip()[:1] in (b"[", b"{"):
        try:
            json.loads(raw)
            return "json"
        except ValueError:
            pass
    return ""
