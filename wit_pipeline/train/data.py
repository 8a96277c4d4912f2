"""Training data: webdataset shards -> decoded, augmented, tokenized batches on worker processes.

The stream is a pure function of (shards, seed, epoch, batch size, worker count, world size):

- shard order: a permutation seeded by ``(seed, epoch)``, the same on every rank and worker;
- split: with at least as many shards as workers in total (``world_size * workers``), global
  worker ``g`` reads shards ``g, g + G, g + 2G, ...`` of that order; with fewer shards, every
  worker reads every shard and keeps samples ``g, g + G, ...`` (so no worker idles);
- a shuffle buffer seeded by ``(seed, epoch, g)`` mixes samples across a worker's shards;
- batches are cut from the raw (undecoded) stream, so batch ``i`` of worker ``g`` always holds the
  same samples; a resumed run skips the batches each worker already delivered *without decoding
  them* and continues with exactly the batches that were not yet consumed;
- caption choice, crop (and flip, ``--hflip``) are drawn from an RNG seeded by ``(seed, epoch, g, sample index)``.

Each sample is ``KEY.<jpg|jpeg|png|webp>`` plus a caption: one drawn from the ``captions`` list
of ``KEY.json`` when it has several (the final-shard format), else ``KEY.txt``. Samples without
an image or a caption are skipped and counted. Images are decoded with JPEG draft mode (the
decoder scales down by 2/4/8 when the crop allows it), cropped and resized in one PIL call,
and shipped as uint8; normalization happens on the training device.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import numpy as np
import torch
import torch.utils.data

from wit_pipeline import fileio, shards
from wit_pipeline.errors import WitError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# open_clip's defaults (OPENAI_DATASET_MEAN/STD), i.e. CLIP normalization.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Shard lists


def expand_shard_patterns(patterns: Sequence[str]) -> list[str]:
    """Expand ``--train-data`` values into a list of tar files.

    Each value may hold several sources separated by ``::`` (open_clip's convention); each source
    may use brace ranges (``shards/{00000..00041}.tar``), globs (``shards/*.tar``), a directory
    (its finished shards) or a plain file. A source that matches nothing is an error.
    """
    out: list[str] = []
    for value in patterns:
        for source in (s.strip() for s in str(value).split("::")):
            if not source:
                continue
            for path in braceexpand.braceexpand(source):
                if fileio.is_local(path) and os.path.isdir(path):
                    found = shards.list_shards(path) or fileio.expand_inputs(
                        [path], suffixes=(".tar",)
                    )
                    if not found:
                        raise WitError(f"no .tar shards in {path}")
                    out.extend(found)
                elif any(c in path for c in "*?["):
                    out.extend(f for f in fileio.expand_inputs([path]) if f.endswith(".tar"))
                else:
                    if not fileio.exists(path):
                        raise WitError(f"training shard not found: {path}")
                    out.append(path)
    if not out:
        raise WitError("no training shards given")
    return list(dict.fromkeys(out))


def _count_tar_samples(path: str) -> int:
    """Number of distinct sample keys in a tar, reading headers only where the file allows."""
    keys: set[str] = set()
    if fileio.is_local(path):
        with tarfile.open(path, mode="r:") as tar:  # seeks over member data
            for m in tar:
                if m.isfile():
                    keys.add(_split_name(m.name)[0])
    else:
        with fileio.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    keys.add(_split_name(m.name)[0])
    return len(keys)


def shard_sample_counts(paths: Sequence[str]) -> list[int]:
    """Samples per shard: from ``manifest.json`` beside the shards when present, else counted."""
    manifests: dict[str, dict[str, int]] = {}
    counts = []
    for p in paths:
        directory = os.path.dirname(p) if fileio.is_local(p) else p.rsplit("/", 1)[0]
        if directory not in manifests:
            manifests[directory] = {}
            mpath = fileio.join(directory, shards.MANIFEST)
            if fileio.exists(mpath):
                try:
                    doc = fileio.read_json(mpath)
                    manifests[directory] = {
                        str(s["tar"]): int(s["num_samples"]) for s in doc.get("shards", [])
                    }
                except (ValueError, KeyError, TypeError):
                    manifests[directory] = {}
        name = p.rsplit("/", 1)[-1]
        n = manifests[directory].get(name)
        counts.append(int(n) if n is not None else _count_tar_samples(p))
    return counts


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the extension starts at the basename's first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar(path: str) -> Iterator[dict[str, Any]]:
    """``{"__key__": key, ext: bytes, ...}`` per sample of a tar, streaming."""
    with fileio.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if current is None or current["__key__"] != key or ext in current:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": path}
            current[ext] = data
        if current is not None:
            yield current


# ---------------------------------------------------------------------------------------------
# Per-sample decoding (pure functions)


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """Every usable caption of a raw sample: the ``captions`` list of its JSON, else its txt."""
    raw = sample.get("json")
    if raw:
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
            caps = [c.strip() for c in meta["captions"] if isinstance(c, str) and c.strip()]
            if caps:
                return caps
    txt = sample.get("txt")
    if txt:
        text = txt.decode("utf-8", errors="replace").strip()
        if text:
            return [text]
    return []


def sample_image_bytes(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if data:
            return data
    return None


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters as a PIL box ``(left, top, right, bottom)``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def decode_crop(
    data: bytes,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    hflip: float = 0.0,
) -> np.ndarray:
    """Decode an image and apply a random resized crop to ``size``: uint8 array [3, size, size].

    For JPEGs the decoder's draft mode scales the image down by a power of two first whenever
    the crop still keeps at least ``size`` pixels per side, which cuts decoding time several
    fold for large images and changes nothing for small ones. With ``hflip`` > 0 the result is
    mirrored with that probability (one more draw from ``rng``, after the crop's; none at 0, so
    runs without flips draw exactly as before).
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    width, height = img.size
    box = random_resized_crop_box(width, height, rng, scale)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if img.format == "JPEG":
        want = (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h))
        img.draft("RGB", want)
        if img.size != (width, height):
            fx, fy = img.size[0] / width, img.size[1] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
    if hflip > 0 and rng.random() < hflip:
        arr = np.ascontiguousarray(arr[:, :, ::-1])
    return arr


def normalize(images_uint8: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, CLIP-normalized (on whatever device the tensor is)."""
    x = images_uint8.to(dtype or torch.float32).div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------
# The stream


def _seeded(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Which samples each global worker reads in one epoch, and how many batches that makes."""

    order: tuple[int, ...]  # shard indices in this epoch's order
    by_shard: bool  # True: split shards among workers; False: split samples
    worker_samples: tuple[int, ...]  # planned samples per global worker
    batch_size: int

    def worker_batches(self, g: int) -> int:
        return self.worker_samples[g] // self.batch_size

    def rank_batches(self, rank: int, workers: int) -> int:
        return sum(self.worker_batches(rank * workers + w) for w in range(workers))


def plan_epoch(
    counts: Sequence[int],
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    workers: int,
    world_size: int,
) -> StreamPlan:
    """The deterministic split of the shards among ``world_size * workers`` readers for an epoch."""
    total_workers = max(1, workers) * world_size
    order = list(range(len(counts)))
    _seeded("shards", seed, epoch).shuffle(order)
    by_shard = len(counts) >= total_workers
    per = [0] * total_workers
    if by_shard:
        for pos, idx in enumerate(order):
            per[pos % total_workers] += counts[idx]
    else:
        n = sum(counts)
        for g in range(total_workers):
            per[g] = n // total_workers + (1 if g < n % total_workers else 0)
    return StreamPlan(tuple(order), by_shard, tuple(per), batch_size)


class ShardStream(torch.utils.data.IterableDataset):
    """Training batches over webdataset shards, for a ``DataLoader`` with ``batch_size=None``.

    Yields dicts: ``images`` uint8 [B, 3, S, S], ``texts`` int64 [B, context], ``keys`` (list),
    ``worker`` (local worker id), ``index`` (batch index within that worker's epoch stream) and
    ``skipped`` (samples dropped since the worker's previous batch: no image, no caption or an
    undecodable image). Set :meth:`set_epoch` before creating each epoch's iterator.

    ``workers`` is the number of streams per rank: run it in a DataLoader with that many worker
    processes, or with none (the streams are then read one after the other in the main process).
    """

    def __init__(
        self,
        shard_paths: Sequence[str],
        counts: Sequence[int],
        *,
        batch_size: int,
        image_size: int,
        tokenizer_factory: Callable[[], Callable[[list[str]], Any]],
        seed: int = 0,
        shuffle_buffer: int = 1000,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        hflip: float = 0.0,
        caption_choice: str = "random",
        workers: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if len(shard_paths) != len(counts):
            raise ValueError("one count per shard")
        if caption_choice not in ("random", "first"):
            raise WitError(f"caption_choice must be 'random' or 'first', got {caption_choice!r}")
        self.shard_paths = list(shard_paths)
        self.counts = list(counts)
        self.batch_size = batch_size
        self.image_size = image_size
        self.tokenizer_factory = tokenizer_factory
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.caption_choice = caption_choice
        self.workers = max(1, workers)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip: list[int] = [0] * self.workers
        self._tokenizer: Callable[[list[str]], Any] | None = None

    def set_epoch(self, epoch: int, skip: Sequence[int] | None = None) -> None:
        """Select the epoch to stream and the batches each local worker has already delivered."""
        self.epoch = epoch
        self.skip = list(skip) if skip is not None else [0] * self.workers
        if len(self.skip) != self.workers:
            raise ValueError(f"skip needs one entry per worker ({self.workers})")

    def plan(self, epoch: int | None = None) -> StreamPlan:
        return plan_epoch(
            self.counts,
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            batch_size=self.batch_size,
            workers=self.workers,
            world_size=self.world_size,
        )

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Steps every rank can take this epoch (the minimum over ranks, for DDP)."""
        plan = self.plan(epoch)
        return min(plan.rank_batches(r, self.workers) for r in range(self.world_size))

    def raw_samples(self, worker: int) -> Iterator[dict[str, Any]]:
        """The undecoded, unshuffled samples of local ``worker`` for the current epoch."""
        plan = self.plan()
        total = self.workers * self.world_size
        g = self.rank * self.workers + worker
        if plan.by_shard:
            for idx in plan.order[g::total]:
                yield from iter_tar(self.shard_paths[idx])
        else:
            i = 0
            for idx in plan.order:
                for sample in iter_tar(self.shard_paths[idx]):
                    if i % total == g:
                        yield sample
                    i += 1

    def shuffled(self, worker: int) -> Iterator[dict[str, Any]]:
        """:meth:`raw_samples` through a seeded shuffle buffer."""
        g = self.rank * self.workers + worker
        src = self.raw_samples(worker)
        if self.shuffle_buffer <= 1:
            yield from src
            return
        rng = _seeded("buffer", self.seed, self.epoch, g)
        buf: list[dict[str, Any]] = []
        for sample in src:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            out, buf[j] = buf[j], sample
            yield out
        rng.shuffle(buf)
        yield from buf

    def raw_batches(self, worker: int) -> Iterator[tuple[int, list[dict[str, Any]], int]]:
        """``(batch index, samples, skipped)``: full batches of usable raw samples."""
        batch: list[dict[str, Any]] = []
        skipped = 0
        index = 0
        for sample in self.shuffled(worker):
            if sample_image_bytes(sample) is None or not sample_captions(sample):
                skipped += 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield index, batch, skipped
                index += 1
                batch, skipped = [], 0

    def decode_batch(self, worker: int, index: int, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if self._tokenizer is None:
            self._tokenizer = self.tokenizer_factory()
        g = self.rank * self.workers + worker
        images, texts, keys = [], [], []
        failed = 0
        for j, sample in enumerate(batch):
            rng = _seeded("sample", self.seed, self.epoch, g, index * self.batch_size + j)
            caps = sample_captions(sample)
            caption = caps[0] if self.caption_choice == "first" else rng.choice(caps)
            try:
                arr = decode_crop(
                    sample_image_bytes(sample) or b"",
                    self.image_size,
                    rng,
                    self.crop_scale,
                    self.hflip,
                )
            except Exception:  # PIL raises many types for corrupt images
                failed += 1
                continue
            images.append(arr)
            texts.append(caption)
            keys.append(sample["__key__"])
        if images:
            image_tensor = torch.from_numpy(np.stack(images))
            text_tensor = self._tokenizer(texts)
        else:
            image_tensor = torch.zeros((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
            text_tensor = torch.zeros((0, 1), dtype=torch.long)
        return {"images": image_tensor, "texts": text_tensor, "keys": keys, "failed": failed}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"ShardStream planned for {self.workers} workers but runs on {info.num_workers}"
            )
        # Without worker processes the streams are read one after the other.
        local_workers = [info.id] if info is not None else list(range(self.workers))
        for w in local_workers:
            skip = self.skip[w]
            for index, batch, skipped in self.raw_batches(w):
                if index < skip:
                    continue
                out = self.decode_batch(w, index, batch)
                out["worker"] = w
                out["index"] = index
                out["skipped"] = skipped + out.pop("failed")
                yield out


def make_loader(
    stream: ShardStream, *, num_workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` (iterate it once per epoch, after ``set_epoch``)."""
    if num_workers not in (0, stream.workers):
        raise ValueError(f"num_workers must be 0 or {stream.workers}")
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_worker_init,
    )


def _worker_init(_worker_id: int) -> None:
    # Decoding is single-threaded PIL work; torch threads in workers would only compete with
    # the training process for cores.
    torch.set_num_threads(1)
