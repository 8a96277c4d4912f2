"""Helpers shared by the trainer, evaluation and scoring tests: Flickr8k shards and a trained seed.

The seed model is trained once per test session (``trained_seed`` caches it under the session's
base temp dir, so every test module that imports the fixture reuses the same checkpoint).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from wit_pipeline.train import caption_sets

# The seed: wit-nano (32 px) for 3 epochs over the 6,000 Flickr8k training images, batch 64
# (279 steps; about a minute on 2 cores). Fixed steps, never a time budget.
SEED_MODEL = "wit-nano"
SEED_ARGS = dict(
    model=SEED_MODEL,
    epochs=3,
    batch_size=64,
    lr=2e-3,
    warmup=20,
    workers=1,
    seed=0,
    log_every=20,
    progress=False,
    plots=True,
)


def flickr_paths(shared_data: pathlib.Path) -> tuple[str, str]:
    root = shared_data / "flickr8k"
    return str(root / "images"), str(root / "captions.tsv")


def write_flickr_shards(
    shared_data: pathlib.Path,
    out: pathlib.Path,
    *,
    split: str = "train",
    samples_per_shard: int = 1000,
    limit: int | None = None,
) -> str:
    """Final-format shards of a Flickr8k split (one sample per image, its 5 captions)."""
    images, captions = flickr_paths(shared_data)
    if not (out / "manifest.json").exists():
        caption_sets.write_caption_shards(
            images,
            captions,
            str(out),
            split=split,
            samples_per_shard=samples_per_shard,
            limit=limit,
            source="flickr8k",
        )
    return str(out)


def _train_seed(shared_data: pathlib.Path, base: pathlib.Path) -> str:
    from wit_pipeline.train.config import TrainConfig
    from wit_pipeline.train.loop import train

    ckpt = base / "seed-run" / "checkpoints" / "latest.pt"
    if ckpt.exists():
        return str(ckpt)
    shards_dir = write_flickr_shards(shared_data, base / "flickr-train")
    cfg = TrainConfig(train_data=(shards_dir,), output=str(base / "seed-run"), **SEED_ARGS)
    train(cfg)
    return str(ckpt)


@pytest.fixture(scope="session")
def trained_seed(shared_data, tmp_path_factory) -> str:
    """Path of a wit-nano checkpoint trained on Flickr8k train by ``wit_pipeline.train``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_seed(shared_data, tmp_path_factory.getbasetemp() / "clip-seed")
    finally:
        torch.set_num_threads(threads)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_run_dir(checkpoint: str) -> str:
    return os.path.dirname(os.path.dirname(checkpoint))
