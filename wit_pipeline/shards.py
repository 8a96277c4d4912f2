"""Webdataset shards: deterministic tars plus a Parquet table per shard, and a manifest.

A shard ``NNNNN`` is two files in one directory: ``NNNNN.tar`` (members ``KEY.jpg``, ``KEY.txt``,
``KEY.json`` per sample, the layout open_clip's webdataset loader reads) and ``NNNNN.parquet``
(one row per sample, for pandas, DuckDB or HF ``datasets``). Tars are byte-identical for the
same samples: fixed member order, mtime 0, no user names. Both files are written atomically and
the Parquet file is renamed into place last, so its presence marks a finished shard: a rerun
after a crash skips finished shards and redoes the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import fileio

MANIFEST = "manifest.json"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def dumps_meta(meta: Mapping[str, Any]) -> bytes:
    """Canonical JSON for ``KEY.json``: sorted keys, no spaces, UTF-8."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample: an encoded image, its caption and its metadata."""

    key: str
    image: bytes
    caption: str
    meta: Mapping[str, Any]
    image_ext: str = "jpg"

    def __post_init__(self):
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"invalid webdataset key {self.key!r}: no dots or slashes allowed")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    tar: str
    parquet: str
    num_samples: int
    tar_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tar"] = os.path.basename(self.tar)
        d["parquet"] = os.path.basename(self.parquet)
        return d


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in order: ``KEY.<ext>``, ``KEY.txt``, ``KEY.json``."""
    return [
        (f"{sample.key}.{sample.image_ext}", sample.image),
        (f"{sample.key}.txt", sample.caption.encode("utf-8")),
        (f"{sample.key}.json", dumps_meta(sample.meta)),
    ]


def members_tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The tar archive of ``(name, data)`` members, in the given order, with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name, data)
    return buf.getvalue()


def tar_bytes(samples: Sequence[Sample]) -> bytes:
    """The tar archive of ``samples``, in the given order, byte-for-byte reproducible."""
    return members_tar_bytes(m for s in samples for m in sample_members(s))


def iter_members(tar_path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every file member of a tar, in file order (bytes as stored)."""
    with fileio.open_file(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]


def shard_paths(directory: str, shard_id: int) -> tuple[str, str]:
    name = shard_name(shard_id)
    return fileio.join(directory, f"{name}.tar"), fileio.join(directory, f"{name}.parquet")


def is_finished(directory: str, shard_id: int) -> bool:
    """True when the shard's Parquet file (written last) exists."""
    tar_path, parquet_path = shard_paths(directory, shard_id)
    return fileio.exists(parquet_path) and fileio.exists(tar_path)


def write_shard(
    directory: str,
    shard_id: int,
    samples: Sequence[Sample],
    table: pa.Table,
) -> ShardInfo:
    """Write ``NNNNN.tar`` then ``NNNNN.parquet`` atomically; return the shard's info.

    ``table`` holds one row per sample (or per pair, for download shards) and is written as is.
    """
    tar_path, parquet_path = shard_paths(directory, shard_id)
    data = tar_bytes(samples)
    with fileio.atomic_write(tar_path, "wb") as f:
        f.write(data)
    with fileio.atomic_write(parquet_path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return ShardInfo(
        shard_id=shard_id,
        tar=tar_path,
        parquet=parquet_path,
        num_samples=len(samples),
        tar_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def shard_info(directory: str, shard_id: int) -> ShardInfo:
    """Info of a finished shard, read back from disk (for reruns that skip it)."""
    tar_path, parquet_path = shard_paths(directory, shard_id)
    h = hashlib.sha256()
    size = 0
    with fileio.open_file(tar_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    with fileio.open_file(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        keys = {m.name.split(".", 1)[0] for m in tar}
    return ShardInfo(shard_id, tar_path, parquet_path, len(keys), size, h.hexdigest())


def iter_samples(tar_path: str) -> Iterator[dict[str, Any]]:
    """Yield ``{"__key__": key, ext: bytes, ...}`` per sample of a tar, in file order."""
    current: dict[str, Any] | None = None
    for name, data in iter_members(tar_path):
        key, _, ext = name.partition(".")
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def list_shards(directory: str) -> list[str]:
    """Finished shard tars in ``directory`` (those with a Parquet beside them), sorted."""
    tars = []
    try:
        names = fileio.expand_inputs([fileio.join(directory, "*.tar")])
    except Exception:
        return []
    for t in names:
        if fileio.exists(t[: -len(".tar")] + ".parquet"):
            tars.append(t)
    return sorted(tars)


def read_table(directory: str, columns: Sequence[str] | None = None) -> pa.Table:
    """All shard Parquet files of ``directory`` as one table (in shard order)."""
    tables = [
        pq.read_table(t[: -len(".tar")] + ".parquet", columns=columns)
        for t in list_shards(directory)
    ]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def brace_pattern(infos: Sequence[ShardInfo]) -> str:
    """``{00000..000NN}.tar`` for open_clip's ``--train-data`` when shard ids are contiguous."""
    ids = sorted(i.shard_id for i in infos)
    if not ids:
        return ""
    if ids == list(range(ids[0], ids[-1] + 1)):
        if len(ids) == 1:
            return f"{shard_name(ids[0])}.tar"
        return f"{{{shard_name(ids[0])}..{shard_name(ids[-1])}}}.tar"
    return ",".join(f"{shard_name(i)}.tar" for i in ids)


def write_manifest(
    directory: str,
    infos: Sequence[ShardInfo],
    *,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json``: shard list, counts, sizes, sha256 and the config used."""
    infos = sorted(infos, key=lambda i: i.shard_id)
    doc = {
        "num_shards": len(infos),
        "num_samples": sum(i.num_samples for i in infos),
        "total_bytes": sum(i.tar_bytes for i in infos),
        "train_data": brace_pattern(infos),
        "shards": [i.to_dict() for i in infos],
        "config": dict(config or {}),
        **dict(extra or {}),
    }
    fileio.write_json(fileio.join(directory, MANIFEST), doc)
    return doc
