import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import shards


def _samples(n):
    return [
        shards.Sample(
            key=f"{i:04x}",
            image=bytes([i]) * (10 + i),
            caption=f"caption {i} é",
            meta={"uid": f"u{i}", "query_ids": [i, i + 1], "caption": f"caption {i} é"},
        )
        for i in range(n)
    ]


def test_write_shard_round_trip(tmp_path):
    samples = _samples(3)
    table = pa.table({"key": [s.key for s in samples], "uid": [s.meta["uid"] for s in samples]})
    info = shards.write_shard(str(tmp_path), 7, samples, table)
    assert info.num_samples == 3
    assert (tmp_path / "00007.tar").exists() and (tmp_path / "00007.parquet").exists()
    assert info.sha256 == hashlib.sha256((tmp_path / "00007.tar").read_bytes()).hexdigest()
    back = list(shards.iter_samples(info.tar))
    assert [b["__key__"] for b in back] == ["0000", "0001", "0002"]
    assert back[1]["jpg"] == bytes([1]) * 11
    assert back[1]["txt"].decode() == "caption 1 é"
    assert json.loads(back[1]["json"]) == samples[1].meta
    assert pq.read_table(info.parquet).to_pylist()[2] == {"key": "0002", "uid": "u2"}
    assert shards.is_finished(str(tmp_path), 7)
    assert not shards.is_finished(str(tmp_path), 8)
    assert shards.shard_info(str(tmp_path), 7) == info


def test_tars_are_byte_identical_across_writes(tmp_path):
    table = pa.table({"k": [1, 2]})
    a = shards.write_shard(str(tmp_path / "a"), 0, _samples(2), table)
    b = shards.write_shard(str(tmp_path / "b"), 0, _samples(2), table)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a/00000.parquet").read_bytes() == (
        tmp_path / "b/00000.parquet"
    ).read_bytes()


def test_webdataset_reads_our_tars(tmp_path):
    import webdataset as wds

    shards.write_shard(str(tmp_path), 0, _samples(4), pa.table({"k": [0, 1, 2, 3]}))
    got = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == ["0000", "0001", "0002", "0003"]
    assert got[3]["txt"] == "caption 3 é".encode()


def test_manifest_and_brace_pattern(tmp_path):
    infos = [
        shards.write_shard(str(tmp_path), i, _samples(2), pa.table({"k": [0, 1]})) for i in range(3)
    ]
    doc = shards.write_manifest(str(tmp_path), infos, config={"a": 1})
    assert doc["num_shards"] == 3 and doc["num_samples"] == 6
    assert doc["train_data"] == "{00000..00002}.tar"
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][1]["tar"] == "00001.tar"
    assert shards.read_table(str(tmp_path)).num_rows == 6
    assert [p.rsplit("/", 1)[1] for p in shards.list_shards(str(tmp_path))] == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]


def test_bad_keys_are_refused():
    with pytest.raises(ValueError):
        shards.Sample(key="a.b", image=b"", caption="", meta={})
