"""Image-caption sets in the Flickr8k/Flickr30k ``captions.tsv`` layout, and shards built from them.

A caption set is a folder of images plus a TSV with a header and the columns ``image`` (file name
in the folder), ``split`` (train/dev/test/...), ``caption_index`` and ``caption``: several rows per
image. Retrieval evaluation reads it (and COCO, Karpathy and other table formats) through
``retrieval_sets``; :func:`write_caption_shards` turns one split into
final-format webdataset shards (``docs/data-format.md``: one sample per image with every caption
in ``KEY.json``'s ``captions``), so that a training run can use a human-captioned set.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence

import pyarrow as pa

from wit_pipeline import fileio, shards
from wit_pipeline.errors import WitError

REQUIRED_COLUMNS = ("image", "split", "caption_index", "caption")


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    image: str  # file name inside the images folder
    captions: tuple[str, ...]  # ordered by caption_index


def read_captions_tsv(path: str, *, split: str | None = None) -> list[CaptionedImage]:
    """Images of ``split`` (all rows when None) with their captions, in first-appearance order."""
    try:
        f = fileio.open_file(path, "r")
    except FileNotFoundError:
        raise WitError(f"captions file not found: {path}") from None
    groups: dict[str, list[tuple[int, str]]] = {}
    with f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise WitError(
                f"{path}: missing column(s) {', '.join(missing)} "
                f"(expected a header with {', '.join(REQUIRED_COLUMNS)})"
            )
        for row in reader:
            if split is not None and row["split"] != split:
                continue
            caption = (row["caption"] or "").strip()
            if not caption:
                continue
            try:
                index = int(row["caption_index"])
            except (TypeError, ValueError):
                raise WitError(f"{path}: bad caption_index {row['caption_index']!r}") from None
            groups.setdefault(row["image"], []).append((index, caption))
    if not groups:
        where = f" for split {split!r}" if split is not None else ""
        raise WitError(f"{path}: no captions{where}")
    return [
        CaptionedImage(image, tuple(c for _, c in sorted(caps))) for image, caps in groups.items()
    ]


def sample_key(image_name: str) -> str:
    """A webdataset key for an image file name: its stem with dots replaced."""
    stem = os.path.splitext(os.path.basename(image_name))[0]
    return stem.replace(".", "_") or hashlib.sha1(image_name.encode()).hexdigest()


def write_caption_shards(
    images_dir: str,
    captions_tsv: str,
    output_dir: str,
    *,
    split: str | None = "train",
    samples_per_shard: int = 1000,
    limit: int | None = None,
    source: str = "",
) -> dict:
    """Write a caption set's ``split`` as final-format shards plus ``manifest.json``.

    Samples are written in TSV order (the trainer shuffles); ``limit`` keeps the first images.
    Returns the manifest.
    """
    if samples_per_shard <= 0:
        raise WitError("samples_per_shard must be positive")
    items = read_captions_tsv(captions_tsv, split=split)
    if limit is not None:
        items = items[:limit]
    prefix = source or os.path.basename(os.path.normpath(images_dir))
    infos = []
    for shard_id, start in enumerate(range(0, len(items), samples_per_shard)):
        chunk = items[start : start + samples_per_shard]
        samples, rows = [], []
        for item in chunk:
            path = os.path.join(images_dir, item.image)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise WitError(f"image listed in {captions_tsv} not found: {path}") from None
            key = sample_key(item.image)
            meta = {
                "key": key,
                "url": f"{prefix}/{item.image}",
                "caption": item.captions[0],
                "captions": list(item.captions),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            ext = os.path.splitext(item.image)[1].lstrip(".").lower() or "jpg"
            ext = "jpg" if ext == "jpeg" else ext
            samples.append(shards.Sample(key, data, item.captions[0], meta, image_ext=ext))
            rows.append(meta)
        table = pa.Table.from_pylist(rows)
        infos.append(shards.write_shard(output_dir, shard_id, samples, table))
    return shards.write_manifest(
        output_dir,
        infos,
        extra={"source": {"images": images_dir, "captions": captions_tsv, "split": split}},
    )


def image_paths(images_dir: str, items: Sequence[CaptionedImage]) -> list[str]:
    return [os.path.join(images_dir, item.image) for item in items]
