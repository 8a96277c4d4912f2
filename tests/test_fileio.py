"""fileio: atomic writes on local disks and on fsspec filesystems with object-store semantics.

``failing-memory://`` is fsspec's memory filesystem with an object store's uploads (as gcsfs and
s3fs do them): a written file goes up in parts and the object appears, whole, only when the
upload commits at close, which fsspec does also when the ``with`` block raised. That is the
hazard :func:`fileio.atomic_write` guards against. Its :class:`Faults` make a write raise after
N bytes, the commit fail, or the server-side copy behind ``fs.mv`` fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from wit_pipeline import fileio, shards

PROTOCOL = "failing-memory"
BASE = f"{PROTOCOL}://bucket/out"


@dataclasses.dataclass(frozen=True)
class Faults:
    after_bytes: int | None = None  # a write raises once its file would pass this many bytes
    commit: bool = False  # the upload's commit (at close) fails
    copy: bool = False  # the server-side copy behind ``mv`` fails
    match: str = ""  # only for files whose (temporary) path contains this


class _Upload(AbstractBufferedFile):
    """An object upload: buffered parts, the object appears whole when the last part commits."""

    DEFAULT_BLOCK_SIZE = 256  # small parts: most files here go up in several

    def _initiate_upload(self):
        self.parts: list[bytes] = []

    def write(self, data):
        faults = self.fs.faults
        limit = faults.after_bytes
        if limit is not None and faults.match in self.path and self.loc + len(data) > limit:
            super().write(bytes(data[: max(0, limit - self.loc)]))
            raise OSError(f"injected: connection lost after {limit} bytes of {self.path}")
        return super().write(data)

    def _upload_chunk(self, final=False):
        self.parts.append(self.buffer.getvalue())
        if final:
            if self.fs.faults.commit and self.fs.faults.match in self.path:
                raise OSError(f"injected: commit of {self.path} failed")
            self.fs.store[self.path] = MemoryFile(self.fs, self.path, b"".join(self.parts))
        return True


class FailingMemoryFileSystem(MemoryFileSystem):
    protocol = PROTOCOL
    store: ClassVar[dict] = {}  # its own objects, apart from memory://'s
    pseudo_dirs: ClassVar[list[str]] = [""]
    faults = Faults()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix(f"{PROTOCOL}://")
        return super()._strip_protocol(path)

    def _open(
        self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs
    ):
        if mode == "rb":
            return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        assert mode == "wb", mode
        return _Upload(self, self._strip_protocol(path), mode, block_size or "default")

    def cp_file(self, path1, path2, **kwargs):
        if self.faults.copy and self.faults.match in self._strip_protocol(path1):
            raise OSError(f"injected: copy {path1} -> {path2} failed")
        super().cp_file(path1, path2, **kwargs)


fsspec.register_implementation(PROTOCOL, FailingMemoryFileSystem, clobber=True)


@pytest.fixture(autouse=True)
def _empty_store():
    def reset():
        FailingMemoryFileSystem.store.clear()
        FailingMemoryFileSystem.pseudo_dirs[:] = [""]
        FailingMemoryFileSystem.faults = Faults()

    reset()
    yield
    reset()


def inject(faults: Faults) -> None:
    FailingMemoryFileSystem.faults = faults


def objects() -> dict[str, bytes]:
    """Everything in the store: path -> bytes."""
    return {p: f.getvalue() for p, f in sorted(FailingMemoryFileSystem.store.items())}


def local_files(root: pathlib.Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# What the stages write: a stats file, a completion marker, a Parquet part, a webdataset shard

STATS = {
    "counters": {"input": 120_000, "kept": 20_000, "dropped:no_match": 100_000},
    "query_counts": {str(i): i * 7 for i in range(1200)},  # over 8 KiB of text
}
MARKER = {"step": "download", "fingerprint": "0f" * 32, "elapsed_s": 12.5, "shards": 3}
TABLE = pa.table(
    {
        "key": [f"{i:04x}" for i in range(40)],
        "caption": [f"a photo of a dog number {i} é" for i in range(40)],
        "query_ids": [[i, i + 1] for i in range(40)],
    }
)
SAMPLES = [
    shards.Sample(
        key=f"{i:04x}",
        image=bytes(range(256)) * (i + 1),
        caption=f"a photo of a dog number {i} é",
        meta={"uid": f"u{i}", "query_ids": [i, i + 1]},
    )
    for i in range(3)
]


def write_stats(base: str) -> None:
    fileio.write_json(fileio.join(base, "gather", "stats.json"), STATS)


def write_marker(base: str) -> None:
    fileio.write_json(fileio.join(base, "done", "download.json"), MARKER)


def write_parquet(base: str) -> None:
    path = fileio.join(base, "gather", "candidates", "part-00000-of-00001.parquet")
    with fileio.atomic_write(path, "wb") as f:
        pq.write_table(TABLE, f, compression="zstd")


def write_shard(base: str) -> None:
    shards.write_shard(fileio.join(base, "shards"), 0, SAMPLES, TABLE.slice(0, 3))


WRITERS: dict[str, Callable[[str], None]] = {
    "stats": write_stats,
    "marker": write_marker,
    "parquet": write_parquet,
    "shard": write_shard,
}


def expected_objects(kind: str, tmp_path: pathlib.Path) -> dict[str, bytes]:
    """The objects a successful write leaves: the same bytes as the same write to a local disk."""
    local = tmp_path / "local"
    WRITERS[kind](str(local))
    return {f"/bucket/out/{rel}": data for rel, data in local_files(local).items()}


FAULTS: dict[str, Callable[[int], Faults]] = {
    "raises_mid_write": lambda size: Faults(after_bytes=size // 2),
    "commit_fails": lambda size: Faults(commit=True),
    "move_fails": lambda size: Faults(copy=True),
}


def test_the_hazard_fsspec_publishes_a_failed_upload():
    """Why the temporary name: writing the final name directly publishes what was written."""
    fs = fsspec.filesystem(PROTOCOL)
    with (
        pytest.raises(RuntimeError, match="writer crashed"),
        fs.open(f"{BASE}/done/download.json", "wb") as f,
    ):
        f.write(b'{"step": "downl')
        raise RuntimeError("writer crashed")
    assert objects() == {"/bucket/out/done/download.json": b'{"step": "downl'}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_failed_write_leaves_nothing_and_a_rerun_writes_it_whole(kind, fault, tmp_path):
    expected = expected_objects(kind, tmp_path)
    assert len(expected) == (2 if kind == "shard" else 1)
    # Half the smallest file: for a shard, the tar (written first, the larger) fails.
    inject(FAULTS[fault](min(len(v) for v in expected.values())))
    with pytest.raises(OSError, match="injected"):
        WRITERS[kind](BASE)
    assert objects() == {}  # nothing under a final name, no temporary left behind

    inject(Faults())  # the rerun: the transient failure is gone
    WRITERS[kind](BASE)
    assert objects() == expected


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_shard_whose_parquet_fails_is_unfinished_until_the_rerun(fault, tmp_path):
    expected = expected_objects("shard", tmp_path)
    tar, parquet = "/bucket/out/shards/00000.tar", "/bucket/out/shards/00000.parquet"
    assert sorted(expected) == [parquet, tar]
    directory = f"{BASE}/shards"
    inject(dataclasses.replace(FAULTS[fault](len(expected[parquet])), match="00000.parquet"))
    with pytest.raises(OSError, match="injected"):
        write_shard(BASE)
    assert objects() == {tar: expected[tar]}
    assert not shards.is_finished(directory, 0)
    assert shards.list_shards(directory) == []

    inject(Faults())
    write_shard(BASE)
    assert objects() == expected
    assert shards.is_finished(directory, 0)
    assert shards.list_shards(directory) == [f"{PROTOCOL}://{tar}"]
    got = list(shards.iter_samples(f"{PROTOCOL}://{tar}"))
    assert [(g["__key__"], g["jpg"]) for g in got] == [(s.key, s.image) for s in SAMPLES]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failed_rewrite_keeps_the_previous_file(fault):
    path = f"{BASE}/gather/stats.json"
    fileio.write_json(path, {"counters": {"input": 1, "kept": 1}})
    before = objects()
    assert list(before) == ["/bucket/out/gather/stats.json"]
    inject(FAULTS[fault](1000))
    with pytest.raises(OSError, match="injected"):
        fileio.write_json(path, STATS)
    assert objects() == before
    inject(Faults())
    fileio.write_json(path, STATS)
    assert fileio.read_json(path) == STATS


@pytest.mark.parametrize("error", [RuntimeError("writer crashed"), KeyboardInterrupt()])
def test_an_exception_inside_the_block_publishes_nothing(error):
    path = f"{BASE}/gather/candidates/part-00000-of-00001.parquet"
    with pytest.raises(type(error)), fileio.atomic_write(path, "wb") as f:
        f.write(b"PAR1" + bytes(1000))  # several parts already uploaded
        assert objects() == {}  # nothing is visible while the file is written
        raise error
    assert objects() == {}
    assert not fileio.exists(path)


def test_text_mode_and_the_temporary_name():
    path = f"{BASE}/report.md"
    with fileio.atomic_write(path, "w") as f:
        f.write("# report é\n")
        name = f.buffer.path  # the upload in progress
    assert re.fullmatch(r"/bucket/out/\.report\.md\.[0-9a-f]{32}\.tmp", name), name
    assert objects() == {"/bucket/out/report.md": "# report é\n".encode()}


def test_killed_writers_temporaries_are_invisible_and_removable():
    """What a SIGKILL between upload and move leaves: unlisted, and removed on request."""
    directory = f"{BASE}/shards"
    write_shard(BASE)
    fs = fsspec.filesystem(PROTOCOL)
    left = sorted(
        fileio.temporary_path(f"{directory}/{name}")
        for name in ("00001.tar", "00001.parquet", "00002.tar")
    )
    for t in left:
        fs.pipe(t, b"partial")
    tar, parquet = (f"{PROTOCOL}:///bucket/out/shards/00000.{ext}" for ext in ("tar", "parquet"))
    assert shards.list_shards(directory) == [tar]
    assert fileio.expand_inputs([directory]) == [parquet, tar]
    assert fileio.expand_inputs([f"{directory}/*"]) == [parquet, tar]
    hidden = fileio.expand_inputs([f"{directory}/.*"])  # asked for by name, as glob does
    assert [h.rsplit("/", 1)[1] for h in hidden] == [t.rsplit("/", 1)[1] for t in left]
    assert all(fileio.is_temporary(h) for h in hidden)

    as_listed = [t.replace("://", ":///") for t in left]
    assert fileio.remove_temporaries(directory, prefix="00001.") == as_listed[:2]
    assert sorted(objects()) == [
        "/bucket/out/shards/.00002.tar." + left[2].split(".tar.", 1)[1],
        "/bucket/out/shards/00000.parquet",
        "/bucket/out/shards/00000.tar",
    ]
    assert fileio.remove_temporaries(directory) == as_listed[2:]
    assert sorted(objects()) == ["/bucket/out/shards/00000.parquet", "/bucket/out/shards/00000.tar"]
    assert fileio.remove_temporaries(f"{BASE}/missing") == []


# ---------------------------------------------------------------------------------------------
# Local files: unchanged (temporary beside the file, fsync, os.replace)


def test_local_atomic_write(tmp_path):
    path = tmp_path / "gather" / "stats.json"
    fileio.write_json(str(path), {"b": 1, "a": "é"})  # makes the directory
    text = '{\n  "a": "é",\n  "b": 1\n}\n'
    assert path.read_text(encoding="utf-8") == text

    with (
        pytest.raises(RuntimeError, match="writer crashed"),
        fileio.atomic_write(str(path), "w") as f,
    ):
        f.write('{"partial": ')
        f.flush()
        inflight, final = sorted(os.listdir(path.parent))  # the temporary is beside it
        assert final == "stats.json"
        assert re.fullmatch(r"\.stats\.json\.[0-9a-f]{32}\.tmp", inflight), inflight
        raise RuntimeError("writer crashed")
    assert path.read_text(encoding="utf-8") == text
    assert sorted(os.listdir(path.parent)) == ["stats.json"]

    with fileio.atomic_write(f"file://{path}", "wb") as f:
        f.write(b"new")
        assert sorted(os.listdir(path.parent))[1] == "stats.json"
        assert fileio.is_temporary(sorted(os.listdir(path.parent))[0])
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(path.parent)) == ["stats.json"]


def test_local_temporaries_are_invisible_and_removable(tmp_path):
    write_shard(str(tmp_path))
    directory = tmp_path / "shards"
    left = [fileio.temporary_path(str(directory / "00001.tar")), str(directory / "._SUCCESS")]
    for t in left:
        pathlib.Path(t).write_bytes(b"partial")
    tar, parquet = str(directory / "00000.tar"), str(directory / "00000.parquet")
    assert shards.list_shards(str(directory)) == [tar]
    assert fileio.expand_inputs([str(directory)]) == [parquet, tar]
    assert fileio.remove_temporaries(str(directory), prefix="00002.") == []
    assert fileio.remove_temporaries(str(directory)) == left[:1]
    assert sorted(os.listdir(directory)) == ["._SUCCESS", "00000.parquet", "00000.tar"]


@pytest.mark.parametrize("mode", ["w", "wb", "a", "ab", "r+b", "x"])
def test_open_file_only_reads(tmp_path, mode):
    with pytest.raises(ValueError, match="atomic_write"):
        fileio.open_file(str(tmp_path / "x"), mode)
    with pytest.raises(ValueError, match="atomic_write"):
        fileio.open_file(f"{BASE}/x", mode)
    assert os.listdir(tmp_path) == [] and objects() == {}


def test_read_json_round_trip_on_the_store():
    fileio.write_json(f"{BASE}/done/download.json", MARKER)
    assert fileio.read_json(f"{BASE}/done/download.json") == MARKER
    assert json.loads(objects()["/bucket/out/done/download.json"]) == MARKER
