"""Build ``wit download`` output directories for tests (docs/data-format.md "wit download output").

Tests must generate their inputs: this writes download-format shards with ``shards.write_shard``
from real photos (Flickr8k, CIFAR-10 from ``../shared/data``), with planted exact copies,
re-encodes, resizes, same-URL multi-caption samples, eval-set images and corrupt images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import pathlib
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from PIL import Image

from wit_pipeline import shards, urls
from wit_pipeline.stages.download import plan as download_plan

QUERIES = ["dog", "man", "woman", "boy", "girl", "water", "grass", "ball", "snow", "people"]


def match(caption: str, queries: Sequence[str] = QUERIES) -> list[int]:
    """Substring matching on words, enough for fixtures (the gather stage does the real one)."""
    words = set(caption.lower().replace(".", " ").split())
    return [i for i, q in enumerate(queries) if q in words]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sample(
    url: str,
    image: bytes,
    captions: Sequence[str],
    *,
    original_size: tuple[int, int] | None = None,
    query_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """One download sample (one image, one or more pairs)."""
    url = urls.normalize_url(url)
    try:
        w, h = Image.open(io.BytesIO(image)).size
    except Exception:
        w, h = 0, 0
    ow, oh = original_size or (w, h)
    pairs = []
    for i, c in enumerate(captions):
        q = list(query_ids[i]) if query_ids is not None else match(c)
        pairs.append({"uid": urls.pair_uid(url, c), "caption": c, "query_ids": sorted(q)})
    pairs.sort(key=lambda p: p["uid"])
    return {
        "key": urls.url_uid(url),
        "url": url,
        "image": image,
        "pairs": pairs,
        "width": w,
        "height": h,
        "original_width": ow,
        "original_height": oh,
        "sha256": hashlib.sha256(image).hexdigest(),
    }


def write_download_dir(
    directory: pathlib.Path | str, samples: Sequence[dict[str, Any]], *, per_shard: int = 16
) -> list[str]:
    """Write ``directory/shards/NNNNN.{tar,parquet}`` in download format; returns the tars."""
    out = pathlib.Path(directory) / "shards"
    tars = []
    for shard_id, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start : start + per_shard]
        wds, rows = [], []
        for s in chunk:
            sizes = {k: s[k] for k in ("width", "height", "original_width", "original_height")}
            meta = {
                "key": s["key"],
                "url": s["url"],
                "captions": [p["caption"] for p in s["pairs"]],
                "pairs": s["pairs"],
                "query_ids": sorted({q for p in s["pairs"] for q in p["query_ids"]}),
                **sizes,
                "sha256": s["sha256"],
            }
            wds.append(shards.Sample(s["key"], s["image"], s["pairs"][0]["caption"], meta))
            for p in s["pairs"]:
                rows.append(
                    {
                        **p,
                        "url": s["url"],
                        "source": "fixture.parquet",
                        "page_url": None,
                        "language": "en",
                        "language_score": 0.99,
                        "key": s["key"],
                        **sizes,
                        "sha256": s["sha256"],
                    }
                )
        info = shards.write_shard(
            str(out), shard_id, wds, pa.Table.from_pylist(rows, schema=download_plan.SHARD_SCHEMA)
        )
        tars.append(info.tar)
    return tars


def flickr_images(shared_data: pathlib.Path, split: str) -> list[tuple[str, list[str]]]:
    """``(image file name, captions)`` of a Flickr8k split, in file order."""
    out: dict[str, list[str]] = {}
    with open(shared_data / "flickr8k" / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["split"] == split:
                out.setdefault(row["image"], []).append(row["caption"])
    return list(out.items())


def flickr_bytes(shared_data: pathlib.Path, name: str) -> bytes:
    return (shared_data / "flickr8k" / "images" / name).read_bytes()


def cifar_rows(shared_data: pathlib.Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(0, n)
    return table.to_pylist()


def planted_dataset(shared_data: pathlib.Path, n_base: int = 30) -> dict[str, Any]:
    """Flickr8k train photos plus planted duplicates, eval images and a corrupt image.

    Returns ``{"samples": [...], "groups": {name: [keys]}, ...}`` where the planted facts are
    named so that tests can state expected outputs literally.
    """
    train = flickr_images(shared_data, "train")[:n_base]
    dev = flickr_images(shared_data, "dev")[:2]
    samples = []
    for name, caps in train:
        samples.append(
            sample(f"http://img.test/flickr/{name}", flickr_bytes(shared_data, name), caps[:1])
        )
    base = {s["url"]: s for s in samples}

    def b(i):
        return samples[i]

    photo = [Image.open(io.BytesIO(flickr_bytes(shared_data, n))) for n, _ in train[:6]]
    planted = {
        # exact copy of image 0 under another URL and caption
        "copy": sample("http://mirror.test/copy0.jpg", b(0)["image"], ["a copied dog photo"]),
        # image 1 re-encoded at JPEG quality 30
        "reencode": sample("http://mirror.test/re1.jpg", jpeg(photo[1], 30), ["re-encoded man"]),
        # image 2 at 128x128: more original pixels than the 96x96 original -> the survivor
        "upscaled": sample(
            "http://mirror.test/big2.jpg",
            jpeg(photo[2].resize((128, 128), Image.BICUBIC)),
            ["big version with grass"],
        ),
        # image 3 at 64x64
        "downscaled": sample(
            "http://mirror.test/small3.jpg",
            jpeg(photo[3].resize((64, 64), Image.BICUBIC)),
            ["small version, boy"],
        ),
        # image 4 mirrored: the same photo to a person, far away for pHash -> not a duplicate
        "mirrored": sample(
            "http://mirror.test/flip4.jpg",
            jpeg(photo[4].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            ["mirrored water"],
        ),
    }
    # same URL, several captions: the download stage already made it one sample
    multi_name, multi_caps = flickr_images(shared_data, "train")[n_base]
    planted["multi"] = sample(
        f"http://img.test/flickr/{multi_name}",
        flickr_bytes(shared_data, multi_name),
        multi_caps[:3],
    )
    cifar = cifar_rows(shared_data, 2)
    planted["cifar"] = sample(
        "http://img.test/cifar/0.jpg", cifar[0]["image"], [f"a photo of a {cifar[0]['label']}"]
    )
    planted["flickr_dev"] = sample(
        f"http://img.test/dev/{dev[0][0]}", flickr_bytes(shared_data, dev[0][0]), dev[0][1][:1]
    )
    planted["corrupt"] = sample(
        "http://img.test/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", ["broken dog"]
    )
    all_samples = samples + list(planted.values())
    return {"samples": all_samples, "base": samples, "planted": planted, "by_url": base}
