"""Final shards: dedup -> balance -> webdataset tars + Parquet, read back every way users do."""

import argparse
import hashlib
import json
import re
import subprocess
import sys

import download_fixture as fx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import cli, config, shards, stage, steps
from wit_pipeline.stages import balance
from wit_pipeline.train import open_clip as open_clip_train


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(directory):
    """``{file name: sha256}`` of the shard files of a directory."""
    return {
        p.name: _sha(p)
        for p in sorted(directory.iterdir())
        if p.suffix in (".tar", ".parquet") or p.name == "sizes.json"
    }


@pytest.fixture(scope="module")
def download_dir(shared_data, tmp_path_factory):
    ds = fx.planted_dataset(shared_data)
    d = tmp_path_factory.mktemp("download")
    fx.write_download_dir(d, ds["samples"], per_shard=7)
    return ds, d


CFG = config.apply_overrides(config.BuildConfig(), {"shards.samples_per_shard": 8})


@pytest.fixture(scope="module")
def final(download_dir, tmp_path_factory):
    """``wit dedup --finalize``: dedup, balance and final shards in one pipeline."""
    _, d = download_dir
    out = tmp_path_factory.mktemp("final")
    args = ["dedup", "--input", str(d), "--finalize", str(out)]
    assert cli.main([*args, "--set", "shards.samples_per_shard=8"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert config.from_dict(config.BuildConfig, stats["config"]) == CFG
    return out, stats


def test_counters_balance_and_name_every_drop(download_dir, final):
    ds, _ = download_dir
    out, stats = final
    n_in = len(ds["samples"])
    c = stats["counters"]
    assert c["input"] == n_in
    assert c["dropped:near_duplicate"] == 4
    assert "dropped:eval_contamination" not in c  # no eval sets configured here
    assert c["dropped:undecodable_image"] == 1
    table = pq.read_table(out / "rejected")
    assert table.schema == stage.REJECTED_SCHEMA
    rejected = table.to_pylist()
    no_query = [r for r in rejected if r["reason"] == "no_query"]
    assert c["dropped:no_query"] == len(no_query) > 0
    # every row names the stage that dropped it (one schema for every stage)
    assert {(r["stage"], r["reason"]) for r in rejected} == {
        ("dedup", "undecodable_image"),
        ("dedup", "near_duplicate"),
        ("balance", "no_query"),
    }
    assert {r["detail"] for r in no_query} == {"matches no query"}
    assert all(r["uids"] and r["key"] for r in rejected)
    # t = 20,000 is far above every count here: balancing drops only what matches no query
    assert "dropped:balanced_out" not in c
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert c["kept"] == manifest["num_samples"] == n_in - 5 - len(no_query)
    assert stats["pair_counters"]["input"] == sum(len(s["pairs"]) for s in ds["samples"])
    assert stats["unit"] == "image"


def test_shards_hold_samples_in_key_order_with_the_configured_size(final):
    out, _ = final
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    n = manifest["num_samples"]
    sizes = [s["num_samples"] for s in manifest["shards"]]
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert manifest["train_data"] == f"{{00000..{len(sizes) - 1:05d}}}.tar"
    assert manifest["config"]["shards"]["samples_per_shard"] == 8
    keys = [k for i in range(len(sizes)) for k in _keys(out / "shards" / f"{i:05d}.tar")]
    assert keys == sorted(keys) and len(keys) == n
    assert json.loads((out / "shards" / "sizes.json").read_text()) == {
        f"{i:05d}.tar": s for i, s in enumerate(sizes)
    }
    for s in manifest["shards"]:
        assert _sha(out / "shards" / s["tar"]) == s["sha256"]


def _keys(tar):
    return [s["__key__"] for s in shards.iter_samples(str(tar))]


def test_tar_members_match_the_parquet_rows(download_dir, final):
    ds, _ = download_dir
    out, _ = final
    images = {s["key"]: s["image"] for s in ds["samples"]}
    for tar in sorted((out / "shards").glob("*.tar")):
        rows = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
        samples = list(shards.iter_samples(str(tar)))
        assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
        for row, s in zip(rows, samples, strict=True):
            assert sorted(s) == ["__key__", "jpg", "json", "txt"]
            assert s["jpg"] == images[row["key"]]  # the downloaded bytes, untouched
            assert s["txt"].decode() == row["caption"] in row["captions"]
            assert json.loads(s["json"]) == row
            assert row["query_ids"] and row["phash"] and len(row["phash"]) == 16
            assert row["uids"] == sorted(row["uids"])


def test_survivor_keeps_every_caption_of_its_group(download_dir, final):
    ds, _ = download_dir
    out, _ = final
    rows = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    up = rows[ds["planted"]["upscaled"]["key"]]
    assert sorted(up["captions"]) == sorted(
        [ds["base"][2]["pairs"][0]["caption"], "big version with grass"]
    )
    assert up["duplicates"][0]["key"] == ds["base"][2]["key"]
    multi = rows[ds["planted"]["multi"]["key"]]
    assert len(multi["captions"]) == 3


def test_rerun_is_byte_identical_and_removes_stale_shards(download_dir, final, tmp_path):
    _, d = download_dir
    out, _ = final
    first = _tree(out / "shards")
    again = tmp_path / "again"
    small = config.apply_overrides(CFG, {"shards.samples_per_shard": 3})
    steps.run_finalize([str(d)], str(again), small)
    assert len(list((again / "shards").glob("*.tar"))) > len(first) // 2
    # another runner and bundling, into a directory holding more (stale) shards: the same bytes
    steps.run_finalize([str(d)], str(again), CFG, runner="BundleBasedDirectRunner")
    assert _tree(again / "shards") == first


def test_webdataset_and_open_clip_loader_read_the_shards(final, monkeypatch):
    import open_clip
    import open_clip_train.data as open_clip_data
    import torch
    import webdataset as wds
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms

    out, stats = final
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    pattern = str(out / "shards" / manifest["train_data"])
    got = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil"))
    assert len(got) == stats["counters"]["kept"]
    assert got[0]["jpg"].size[0] > 0 and isinstance(got[0]["txt"], str)

    args = argparse.Namespace(
        train_data=pattern,
        val_data=pattern,
        train_num_samples=None,  # read from sizes.json, as open_clip does
        val_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=4,
        workers=0,
        world_size=1,
    )
    preprocess = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    tokenizer = open_clip.get_tokenizer("RN50")
    # open_clip_train 3.3's training reader fails at the end of each shard with the installed
    # webdataset (wit_pipeline/train/open_clip.py); use the reader that module installs
    if open_clip_train.needs_reader_fix():
        with pytest.raises(KeyError, match="fname"):
            list(
                open_clip_data.tarfile_to_samples_nothrow(
                    [{"url": pattern.split("{")[0] + "00000.tar"}]
                )
            )
        monkeypatch.setattr(
            open_clip_data,
            "tarfile_to_samples_nothrow",
            open_clip_train._tarfile_to_samples_nothrow,
        )
    train = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    n = stats["counters"]["kept"]
    assert train.dataloader.num_samples == -(-n // 4) * 4
    images, texts = next(iter(train.dataloader))
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)
    val = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    seen = sum(len(b[0]) for b in val.dataloader)
    assert seen == n
    assert torch.is_tensor(images)


def test_open_clip_trainer_runs_on_the_shards(final, tmp_path):
    """``python -m wit_pipeline.train.open_clip``: open_clip's trainer, past the end of a shard."""
    out, _ = final
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    pattern = str(out / "shards" / manifest["train_data"])
    args = ["--train-data", pattern, "--train-num-samples", "16", "--dataset-type", "webdataset"]
    args += ["--model", "wit-nano", "--batch-size", "4", "--workers", "0", "--epochs", "1"]
    args += ["--device", "cpu", "--precision", "fp32", "--logs", str(tmp_path), "--name", "t"]
    args += ["--save-frequency", "1", "--zeroshot-frequency", "0", "--val-frequency", "0"]
    args += ["--report-to", "", "--log-every-n-steps", "1", "--seed", "0", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "wit_pipeline.train.open_clip", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # 16 samples from shards of 8: two shard ends; every step is logged
    steps = [int(m) for m in re.findall(r"Train Epoch: 0 \[\s*(\d+)/16 ", log)]
    assert steps == [4, 8, 12, 16]
    assert "KeyError" not in log
    assert (tmp_path / "t" / "checkpoints" / "epoch_1.pt").is_file()


def test_hf_datasets_loads_the_parquet_files(final, tmp_path):
    import datasets

    out, stats = final
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(out / "shards" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds.num_rows == stats["counters"]["kept"]
    row = ds[0]
    assert set(row) >= {"key", "url", "caption", "captions", "uids", "query_ids", "phash"}
    assert isinstance(row["pairs"][0]["query_ids"], list)


def test_dedup_then_balance_commands_give_the_same_shards(download_dir, final, tmp_path):
    _, d = download_dir
    out, stats = final
    assert cli.main(["dedup", "--input", str(d), "--output", str(tmp_path / "dd")]) == 0
    assert (
        cli.main(
            [
                "balance",
                "--input",
                str(tmp_path / "dd"),
                "--output",
                str(tmp_path / "fin"),
                "--samples-per-shard",
                "8",
            ]
        )
        == 0
    )
    assert _tree(tmp_path / "fin" / "shards") == _tree(out / "shards")
    dd = json.loads((tmp_path / "dd" / "stats.json").read_text())
    bal = json.loads((tmp_path / "fin" / "stats.json").read_text())
    assert dd["counters"]["kept"] == bal["counters"]["input"]
    assert bal["counters"]["kept"] == stats["counters"]["kept"]
    counts = pq.read_table(tmp_path / "fin" / "query_counts.parquet").to_pydict()
    assert all(v is not None for v in counts["after_download"] + counts["final"])
    assert all(f >= 0 for f in counts["final"])

    # balance.unit = pair: the final shards hold exactly the pairs balance_records keeps
    pair_args = ["--t", "2", "--set", "balance.unit=pair", "--samples-per-shard", "8"]
    fin = tmp_path / "fin-pair"
    args = ["balance", "--input", str(tmp_path / "dd"), "--output", str(fin), *pair_args]
    assert cli.main(args) == 0
    pairs = [p for r in pq.read_table(tmp_path / "dd" / "samples").to_pylist() for p in r["pairs"]]
    probs = balance.query_probabilities(balance.count_queries(pairs), 2)
    result = balance.balance_records(
        pairs, probs, seed=0, phase="balance", id_field="uid", reason="balanced_out"
    )
    kept = result.kept
    c = stage.flow_counts(result.kept, result.rejected)
    rows = [
        r for f in sorted((fin / "shards").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert sorted(u for r in rows for u in r["uids"]) == sorted(p["uid"] for p in kept)
    pair_stats = json.loads((fin / "stats.json").read_text())["pair_counters"]
    assert pair_stats == {
        "input": len(pairs),
        "kept": len(kept),
        **{k: v for k, v in c.items() if k.startswith("dropped:")},
    }
    assert pair_stats["dropped:balanced_out"] > 0
    assert len(rows) < len(kept)  # some kept samples hold several drawn pairs
    qc = pq.read_table(fin / "query_counts.parquet").to_pydict()
    final = dict(zip(qc["query_id"], qc["final"], strict=True))
    assert {q: n for q, n in final.items() if n} == dict(balance.count_queries(kept))


def test_collapse_false_makes_one_sample_per_pair(download_dir, tmp_path):
    ds, d = download_dir
    cfg = config.apply_overrides(CFG, {"dedup.collapse": False})
    stats = steps.run_finalize([str(d)], str(tmp_path), cfg)
    assert stats["unit"] == "pair"
    rows = shards.read_table(str(tmp_path / "shards")).to_pylist()
    assert all(len(r["uids"]) == 1 and r["key"] == r["uids"][0] for r in rows)
    multi = ds["planted"]["multi"]
    shared = [r for r in rows if r["image_key"] == multi["key"]]
    assert 1 <= len(shared) <= 3
    copy = ds["planted"]["copy"]["key"]
    grouped = [
        r for r in rows if r["duplicate_group"] and copy in (r["image_key"], r["duplicate_group"])
    ]
    assert len(grouped) >= 1
    c = stats["counters"]
    assert "dropped:near_duplicate" not in c
    assert c["input"] == sum(len(s["pairs"]) for s in ds["samples"])
    assert c["kept"] == len(rows)


def test_prebalance_writes_gather_format_candidates(tmp_path):
    schema = pa.schema(
        [
            ("uid", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("query_ids", pa.list_(pa.int32())),
            ("source", pa.string()),
            ("page_url", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float32()),
        ]
    )
    rows = [
        {
            "uid": f"{i:032x}",
            "url": f"http://x.test/{i}.jpg",
            "caption": "dog" if i < 900 else ("cat" if i < 990 else "nothing"),
            "query_ids": [0] if i < 900 else ([1] if i < 990 else []),
            "source": "s.parquet",
            "page_url": None,
            "language": "en",
            "language_score": 1.0,
        }
        for i in range(1000)
    ]
    (tmp_path / "g" / "candidates").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "g/candidates/a.parquet")
    (tmp_path / "g" / "stats.json").write_text(
        json.dumps({"counters": {}, "queries": {"path": "q.txt", "sha256": "x", "count": 2}})
    )
    args = ["balance", "--pre", "--input", str(tmp_path / "g"), "--output", str(tmp_path / "p")]
    code = cli.main([*args, "--t", "50", "--factor", "2"])
    assert code == 0
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    c = stats["counters"]
    assert c["input"] == 1000 and c["dropped:no_query"] == 10
    assert c["kept"] + c["dropped:prebalanced_out"] == 990
    assert stats["queries"]["count"] == 2
    kept = pq.read_table(tmp_path / "p" / "candidates")
    assert kept.schema.names == schema.names and kept.num_rows == c["kept"]
    n_cat = sum(1 for q in kept.column("query_ids").to_pylist() if q == [1])
    assert n_cat == 90  # count 90 < 2 * 50: every cat pair kept
    assert stats["query_counts"] == {"0": c["kept"] - 90, "1": 90}
    counts = pq.read_table(tmp_path / "p" / "query_counts.parquet").to_pydict()
    assert counts["before"] == [900, 90] and counts["p_prebalance"] == [100 / 900, 1.0]
    rejected = pq.read_table(tmp_path / "p" / "rejected")
    assert rejected.schema == stage.REJECTED_SCHEMA
    rows = rejected.to_pylist()
    assert len(rows) == c["dropped:no_query"] + c["dropped:prebalanced_out"]
    assert {r["stage"] for r in rows} == {"prebalance"}
    assert {r["detail"] for r in rows if r["reason"] == "no_query"} == {"matches no query"}
    drawn = [r for r in rows if r["reason"] == "prebalanced_out"]
    assert {r["detail"] for r in drawn} == {f"keep probability {100 / 900:.6g}"}
    assert all(r["uid"] and r["url"] and r["caption"] == "dog" for r in drawn)
