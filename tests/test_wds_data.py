"""Training data: shard lists, the deterministic stream, resume positions, decoding."""

from __future__ import annotations

import collections
import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from wit_pipeline import shards
from wit_pipeline.errors import WitError
from wit_pipeline.train import data as wds_data


def _jpeg(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _write(directory, shard_id, keys, *, captions=None, image=True):
    samples = []
    for i, key in enumerate(keys):
        caps = captions[i] if captions else [f"caption of {key}"]
        meta = {"key": key, "caption": caps[0], "captions": caps}
        samples.append(
            shards.Sample(key, _jpeg((i * 7 % 255, 0, 0)) if image else b"", caps[0], meta)
        )
    return shards.write_shard(str(directory), shard_id, samples, pa.table({"key": list(keys)}))


class _Tok:
    """A tokenizer stand-in that records the captions it was given (as ids into a list)."""

    def __init__(self):
        self.seen = []

    def __call__(self, texts):
        self.seen.extend(texts)
        return torch.tensor([[len(t)] for t in texts])


def _stream(paths, *, batch_size=4, workers=1, rank=0, world_size=1, seed=0, buffer=5, tok=None):
    counts = wds_data.shard_sample_counts(paths)
    return wds_data.ShardStream(
        paths,
        counts,
        batch_size=batch_size,
        image_size=16,
        tokenizer_factory=lambda: tok or _Tok(),
        seed=seed,
        shuffle_buffer=buffer,
        workers=workers,
        rank=rank,
        world_size=world_size,
    )


@pytest.fixture
def five_shards(tmp_path):
    infos = [_write(tmp_path, s, [f"s{s}k{i}" for i in range(10)]) for s in range(5)]
    shards.write_manifest(str(tmp_path), infos)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Shard lists and counts


def test_expand_shard_patterns(five_shards, tmp_path):
    d = str(five_shards)
    names = lambda ps: [p.rsplit("/", 1)[-1] for p in ps]  # noqa: E731
    assert names(wds_data.expand_shard_patterns([f"{d}/{{00001..00003}}.tar"])) == [
        "00001.tar",
        "00002.tar",
        "00003.tar",
    ]
    assert names(wds_data.expand_shard_patterns([d])) == [f"{i:05d}.tar" for i in range(5)]
    assert names(wds_data.expand_shard_patterns([f"{d}/0000[24].tar"])) == [
        "00002.tar",
        "00004.tar",
    ]
    both = wds_data.expand_shard_patterns([f"{d}/00000.tar::{d}/00004.tar", f"{d}/00000.tar"])
    assert names(both) == ["00000.tar", "00004.tar"]  # repeats removed, order kept
    with pytest.raises(WitError, match="training shard not found"):
        wds_data.expand_shard_patterns([f"{d}/{{00004..00005}}.tar"])
    with pytest.raises(WitError, match="no training shards"):
        wds_data.expand_shard_patterns([])


def test_counts_from_manifest_and_from_headers(five_shards):
    paths = wds_data.expand_shard_patterns([str(five_shards)])
    assert wds_data.shard_sample_counts(paths) == [10] * 5
    (five_shards / "manifest.json").unlink()
    assert wds_data.shard_sample_counts(paths) == [10] * 5  # counted from tar headers
    assert wds_data._count_tar_samples(paths[0]) == 10


# ---------------------------------------------------------------------------------------------
# Plans


def test_plan_epoch_splits_shards_or_samples():
    plan = wds_data.plan_epoch(
        [10, 20, 30, 40], epoch=0, seed=0, batch_size=8, workers=2, world_size=1
    )
    assert sorted(plan.order) == [0, 1, 2, 3]
    assert plan.by_shard
    per = [0, 0]
    for pos, idx in enumerate(plan.order):
        per[pos % 2] += [10, 20, 30, 40][idx]
    assert list(plan.worker_samples) == per
    assert plan.rank_batches(0, 2) == per[0] // 8 + per[1] // 8
    # The order changes with the epoch and the seed, deterministically.
    orders = {
        wds_data.plan_epoch([1] * 8, epoch=e, seed=0, batch_size=1, workers=1, world_size=1).order
        for e in range(4)
    }
    assert len(orders) > 1
    assert wds_data.plan_epoch(
        [1] * 8, epoch=3, seed=5, batch_size=1, workers=1, world_size=1
    ) == wds_data.plan_epoch([1] * 8, epoch=3, seed=5, batch_size=1, workers=1, world_size=1)
    # Fewer shards than readers: samples are dealt round robin.
    plan = wds_data.plan_epoch([7, 4], epoch=0, seed=0, batch_size=2, workers=2, world_size=2)
    assert not plan.by_shard and plan.worker_samples == (3, 3, 3, 2)
    assert plan.rank_batches(1, 2) == 1 + 1


# ---------------------------------------------------------------------------------------------
# Streams


def _keys(stream, worker_ids):
    out = []
    for w in worker_ids:
        for index, batch, _ in stream.raw_batches(w):
            if index >= stream.skip[w]:
                out.extend(s["__key__"] for s in batch)
    return out


@pytest.mark.parametrize("workers, world_size", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_an_epoch_reads_every_sample_once(five_shards, workers, world_size):
    paths = wds_data.expand_shard_patterns([str(five_shards)])
    seen = []
    for rank in range(world_size):
        s = _stream(paths, batch_size=1, workers=workers, rank=rank, world_size=world_size)
        s.set_epoch(2)
        seen.extend(_keys(s, range(workers)))
    assert collections.Counter(seen) == collections.Counter(
        f"s{s}k{i}" for s in range(5) for i in range(10)
    )


def test_full_batches_only_and_the_step_count_is_exact(five_shards):
    paths = wds_data.expand_shard_patterns([str(five_shards)])
    s = _stream(paths, batch_size=4, workers=2)
    for epoch in range(3):
        s.set_epoch(epoch)
        got = [len(b) for w in range(2) for _, b, _ in s.raw_batches(w)]
        assert all(n == 4 for n in got)
        assert len(got) == s.batches_per_epoch(epoch)
        # 5 shards over 2 workers: 30 + 20 samples -> 7 + 5 = 12 batches
        assert len(got) == 12


def test_resume_skips_exactly_the_consumed_batches(five_shards):
    """Batches consumed before an interruption plus those after resume = one whole epoch."""
    paths = wds_data.expand_shard_patterns([str(five_shards)])
    s = _stream(paths, batch_size=3, workers=2, buffer=8)
    s.set_epoch(1)
    full = {w: [[x["__key__"] for x in b] for _, b, _ in s.raw_batches(w)] for w in range(2)}
    s.set_epoch(1, skip=[2, 4])
    resumed = {
        w: [[x["__key__"] for x in b] for i, b, _ in s.raw_batches(w) if i >= s.skip[w]]
        for w in range(2)
    }
    assert resumed[0] == full[0][2:] and resumed[1] == full[1][4:]
    # Through the DataLoader in worker processes: the batches carry their position.
    s.set_epoch(1, skip=[2, 4])
    loader = wds_data.make_loader(s, num_workers=2)
    got = collections.defaultdict(list)
    for b in loader:
        got[b["worker"]].append((b["index"], b["keys"]))
    for w in range(2):
        assert [i for i, _ in got[w]] == list(range(s.skip[w], len(full[w])))
        assert [k for _, k in got[w]] == full[w][s.skip[w] :]


def test_decoded_batches_are_deterministic_and_normalizable(five_shards):
    paths = wds_data.expand_shard_patterns([str(five_shards)])
    s = _stream(paths, batch_size=4, workers=1)
    s.set_epoch(0)
    a = next(iter(s))
    s.set_epoch(0)
    b = next(iter(s))
    assert a["images"].dtype == torch.uint8 and tuple(a["images"].shape) == (4, 3, 16, 16)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    assert a["keys"] == b["keys"] and (a["worker"], a["index"], a["skipped"]) == (0, 0, 0)
    x = wds_data.normalize(a["images"])
    expected = (a["images"][0, 0, 0, 0].item() / 255 - wds_data.CLIP_MEAN[0]) / wds_data.CLIP_STD[0]
    assert float(x[0, 0, 0, 0]) == pytest.approx(expected, rel=1e-6)


def test_captions_are_drawn_among_several_and_txt_is_the_fallback(tmp_path):
    caps = [["one a", "one b", "one c"], ["two"]]
    _write(tmp_path, 0, ["k1", "k2"], captions=caps)
    sample = next(wds_data.iter_tar(str(tmp_path / "00000.tar")))
    assert wds_data.sample_captions(sample) == ["one a", "one b", "one c"]
    assert wds_data.sample_captions({"txt": b" plain "}) == ["plain"]
    assert wds_data.sample_captions({"json": b'{"captions": []}', "txt": b"t"}) == ["t"]
    assert wds_data.sample_captions({"json": b"not json", "txt": b""}) == []
    # Over many epochs every caption of k1 is drawn; "first" always takes the first.
    drawn = collections.Counter()
    for epoch in range(30):
        tok = _Tok()
        s = _stream([str(tmp_path / "00000.tar")], batch_size=2, tok=tok)
        s.set_epoch(epoch)
        next(iter(s))
        drawn.update(c for c in tok.seen if c.startswith("one"))
    assert set(drawn) == {"one a", "one b", "one c"}
    tok = _Tok()
    s = _stream([str(tmp_path / "00000.tar")], batch_size=2, tok=tok)
    s.caption_choice = "first"
    next(iter(s))
    assert sorted(tok.seen) == ["one a", "two"]


def test_samples_without_image_or_with_a_corrupt_one_are_skipped_and_counted(tmp_path):
    good = [shards.Sample(f"g{i}", _jpeg((i, i, i)), "ok", {"captions": ["ok"]}) for i in range(4)]
    bad = [
        shards.Sample("nocap", _jpeg((1, 2, 3)), "", {"captions": []}),
        shards.Sample("corrupt", b"\xff\xd8 not a jpeg", "broken", {"captions": ["broken"]}),
    ]
    shards.write_shard(str(tmp_path), 0, good[:2] + bad + good[2:], pa.table({"k": list(range(6))}))
    s = _stream([str(tmp_path / "00000.tar")], batch_size=5, buffer=0)
    batches = list(iter(s))
    assert len(batches) == 1  # 5 usable raw samples: g0 g1 corrupt g2 g3
    assert batches[0]["keys"] == ["g0", "g1", "g2", "g3"]
    assert batches[0]["skipped"] == 2  # no caption, then the corrupt image at decode time


# ---------------------------------------------------------------------------------------------
# Crops


def test_random_resized_crop_box_follows_torchvision():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = wds_data.random_resized_crop_box(96, 64, rng, (0.9, 1.0))
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 96 and 0 <= top < bottom <= 64
        assert 0.9 * 96 * 64 * 0.97 <= w * h <= 96 * 64
    # An extreme aspect ratio falls back to the central crop within the ratio bounds.
    assert wds_data.random_resized_crop_box(400, 10, random.Random(0), (0.99, 1.0)) == (
        193,
        0,
        206,
        10,
    )


def test_draft_decoding_matches_full_decoding(tmp_path):
    """JPEG draft mode (scaled DCT) gives the same crop as decoding at full size, closely."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((512, 384), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    fast = wds_data.decode_crop(data, 64, random.Random(3))
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = wds_data.random_resized_crop_box(512, 384, random.Random(3))
    slow = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC, box=box)).transpose(2, 0, 1)
    assert fast.shape == slow.shape == (3, 64, 64)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4.0
    # PNGs (no draft mode) and palette images decode too.
    buf = io.BytesIO()
    Image.fromarray(base).convert("P").save(buf, format="PNG")
    assert wds_data.decode_crop(buf.getvalue(), 16, random.Random(0)).shape == (3, 16, 16)


def test_iter_tar_groups_members_by_key(tmp_path):
    _write(tmp_path, 0, ["a", "b"])
    got = list(wds_data.iter_tar(str(tmp_path / "00000.tar")))
    assert [g["__key__"] for g in got] == ["a", "b"]
    assert set(got[0]) == {"__key__", "__url__", "jpg", "txt", "json"}
    assert json.loads(got[1]["json"])["key"] == "b"
