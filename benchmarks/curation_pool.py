"""A noisy crawl of Flickr8k photos with known truth, for the curation benchmarks.

``make_pool`` splits the Flickr8k train photos (seeded) into a *trusted* set (every photo with
its five human captions, as a URL/caption table: the input of ``wit seed``) and a *pool* that
looks like a crawl: every pool photo at its own URL with one alt text, and the usual mess:

| planted (``kind`` in ``truth.parquet``) | share | describes its photo |
|---|---|---|
| ``true``: one of the photo's own captions | the rest | yes |
| ``mismatch``: the caption of another pool photo | ``mismatch`` of the alt texts (default 40%) | no |
| ``junk``: file names, "click here", watermarks, stock-site boilerplate | ``junk`` | no |
| ``foreign``: a real non-English LAION alt text | ``foreign`` | no |

and ``rehost`` of the photos (default 25%) are also re-hosted at another URL, re-encoded (JPEG
quality 40) or resized (80 px), with an alt text of their own drawn the same way (a true one is
another of the photo's captions): dedup merges them into one sample with several captions,
some of them wrong. Half the pool's pairs are listed in a URL/caption table (``pool.parquet``),
half are ``<img alt>`` tags on gallery pages in a WARC (``pool.warc.gz``), as ``wit build``
reads crawls.

The truth is per pair: ``truth.parquet`` has the pair's ``uid`` as the pipeline computes it
(``urls.pair_uid`` of the normalized URL and the cleaned caption), its ``kind`` and whether it
is ``true``. :func:`measure` turns finished shards into precision (share of the shards' pairs
that describe their image) and recall (share of the pool's true pairs the shards hold), exactly,
from the ``uid`` of every pair in ``KEY.json``.

URLs name the server's port, so the pool is generated after the server binds
(:func:`served_pool`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from wit_pipeline import shards, urls
from wit_pipeline.stages.gather.captions import clean_caption

KINDS = ("true", "mismatch", "junk", "foreign")
PER_PAGE = 20
JUNK_TEMPLATES = (
    "IMG_{n:04d}.JPG",
    "DSC{n:05d}.jpg",
    "click here",
    "Click to enlarge",
    "image",
    "thumbnail",
    "photo {n}",
    "Stock Photo - Royalty Free Image ID {n}",
    "© Shutterstock {n}",
    "watermark sample image {n}",
    "Image may contain: outdoor",
    "download image",
)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """How the trusted set and the noisy pool are drawn from Flickr8k train (6,000 photos)."""

    trusted: int = 2000  # photos in the trusted set (all five captions each)
    pool: int = 4000  # photos in the pool (not in the trusted set)
    mismatch: float = 0.4  # share of pool alt texts that belong to another photo
    junk: float = 0.05  # share of junk alt texts
    foreign: float = 0.03  # share of non-English alt texts (real LAION ones)
    rehost: float = 0.25  # share of pool photos also re-hosted at a second URL
    table_fraction: float = 0.5  # share of pool pairs in the URL/caption table (rest: WARC)
    seed: int = 0

    def __post_init__(self):
        if self.mismatch + self.junk + self.foreign >= 1:
            raise ValueError("mismatch + junk + foreign must leave room for true alt texts")
        if self.trusted + self.pool > 6000 or min(self.trusted, self.pool) < 2:
            raise ValueError("trusted + pool must fit in Flickr8k's 6,000 train photos")


def flickr_train(shared: str) -> dict[str, list[str]]:
    """Flickr8k train photos and their captions (cleaned as the pipeline cleans alt texts)."""
    import csv

    out: dict[str, list[str]] = {}
    with open(os.path.join(shared, "flickr8k", "captions.tsv"), newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == "train":
                out.setdefault(row["image"], []).append(clean_caption(row["caption"]))
    return out


def foreign_captions(shared: str, n: int, seed: int) -> list[str]:
    """``n`` real non-English LAION alt texts (fastText sure of a language other than English)."""
    from wit_pipeline.stages.gather.captions import FastTextLanguageDetector

    table = pq.read_table(
        os.path.join(shared, "laion-sample", "laion_10000.parquet"), columns=["TEXT"]
    )
    detector = FastTextLanguageDetector()
    found = []
    for text in table.column("TEXT").to_pylist():
        text = clean_caption(text or "")
        if not 15 <= len(text) <= 120:
            continue
        lang, score = detector.detect(text)
        if lang != "en" and score >= 0.9:
            found.append(text)
    random.Random(f"foreign:{seed}").shuffle(found)
    if len(found) < n:
        found = (found * (n // max(1, len(found)) + 1))[:n]
    return found[:n]


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def pair_uid(url: str, caption: str) -> str:
    """The pipeline's id of a (URL, alt text) pair."""
    return urls.pair_uid(urls.normalize_url(url) or url, clean_caption(caption))


def make_pool(directory: str, base_url: str, cfg: PoolConfig, shared: str) -> dict[str, Any]:
    """Write the trusted table, the pool (table + WARC + images) and the truth under
    ``directory`` (served at ``base_url``); returns the manifest (also ``pool.json``)."""
    from wit_pipeline.demo.web import write_warc

    rng = random.Random(f"pool:{cfg.seed}")
    photos = flickr_train(shared)
    names = sorted(photos)
    rng.shuffle(names)
    trusted, pool = names[: cfg.trusted], names[cfg.trusted : cfg.trusted + cfg.pool]
    images = os.path.join(shared, "flickr8k", "images")
    site = os.path.join(directory, "site")
    for sub in ("trusted", "pool", "mirror", "pages"):
        os.makedirs(os.path.join(site, sub), exist_ok=True)

    def put(rel: str, data: bytes) -> str:
        with open(os.path.join(site, rel), "wb") as f:
            f.write(data)
        return f"{base_url}/{rel}"

    def read(name: str) -> bytes:
        with open(os.path.join(images, name), "rb") as f:
            return f.read()

    # The trusted set: a URL/caption table, five rows per photo.
    rows = {"url": [], "caption": []}
    for name in trusted:
        url = put(f"trusted/{name}", read(name))
        for caption in photos[name]:
            rows["url"].append(url)
            rows["caption"].append(caption)
    pq.write_table(pa.table(rows), os.path.join(directory, "trusted.parquet"))

    n_alts = int(len(pool) * (1 + cfg.rehost))
    foreign = foreign_captions(shared, max(1, int(cfg.foreign * n_alts) + 5), cfg.seed)
    truth: dict[str, list[Any]] = {k: [] for k in ("uid", "url", "caption", "kind", "photo")}

    def alt_text(photo: str, avoid: int | None) -> tuple[str, str, int | None]:
        """(caption, kind, caption index of a true one)."""
        u = rng.random()
        if u < cfg.mismatch:
            caption = photos[photo][0]
            while caption in photos[photo]:  # another photo's caption, never one of its own
                caption = rng.choice(photos[rng.choice(pool)])
            return caption, "mismatch", None
        if u < cfg.mismatch + cfg.junk:
            return rng.choice(JUNK_TEMPLATES).format(n=rng.randrange(10**6)), "junk", None
        if u < cfg.mismatch + cfg.junk + cfg.foreign:
            return foreign.pop() if foreign else "Ein Bild", "foreign", None
        choices = [i for i in range(len(photos[photo])) if i != avoid]
        i = rng.choice(choices)
        return photos[photo][i], "true", i

    pairs: list[tuple[str, str]] = []
    for name in pool:
        data = read(name)
        url = put(f"pool/{name}", data)
        caption, kind, index = alt_text(name, None)
        pairs.append((url, caption))
        for k, v in zip(truth, (pair_uid(url, caption), url, caption, kind, name), strict=True):
            truth[k].append(v)
        if rng.random() < cfg.rehost:
            img = Image.open(io.BytesIO(data))
            if rng.random() < 0.5:
                copy = _encode(img, 40)
            else:
                copy = _encode(img.resize((80, 80), Image.Resampling.BICUBIC), 90)
            stem = os.path.splitext(name)[0]
            url2 = put(f"mirror/{stem}-copy.jpg", copy)
            caption2, kind2, _ = alt_text(name, index)
            pairs.append((url2, caption2))
            values = (pair_uid(url2, caption2), url2, caption2, kind2, name)
            for k, v in zip(truth, values, strict=True):
                truth[k].append(v)
    truth["true"] = [k == "true" for k in truth["kind"]]
    pq.write_table(pa.table(truth), os.path.join(directory, "truth.parquet"))

    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_table = round(cfg.table_fraction * len(pairs))
    table_idx, page_idx = sorted(order[:n_table]), sorted(order[n_table:])
    pq.write_table(
        pa.table(
            {"url": [pairs[i][0] for i in table_idx], "caption": [pairs[i][1] for i in table_idx]}
        ),
        os.path.join(directory, "pool.parquet"),
    )
    pages = []
    for p in range(0, len(page_idx), PER_PAGE):
        tags = [
            f'<img src="{_escape(pairs[i][0])}" alt="{_escape(pairs[i][1])}">'
            for i in page_idx[p : p + PER_PAGE]
        ]
        html = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>gallery {p // PER_PAGE}</title></head><body>\n"
            + "\n".join(tags)
            + "\n</body></html>"
        )
        page_url = put(f"pages/{p // PER_PAGE:04d}.html", html.encode())
        pages.append((page_url, html.encode()))
    write_warc(os.path.join(directory, "pool.warc.gz"), pages)
    counts = {k: truth["kind"].count(k) for k in KINDS}
    manifest = {
        "config": dataclasses.asdict(cfg),
        "base_url": base_url,
        "trusted_photos": len(trusted),
        "trusted_pairs": len(rows["url"]),
        "pool_photos": len(pool),
        "pool_pairs": len(pairs),
        "pool_kinds": counts,
        "table_pairs": len(table_idx),
        "page_pairs": len(page_idx),
        "trusted": os.path.join(directory, "trusted.parquet"),
        "pool_inputs": [
            os.path.join(directory, "pool.parquet"),
            os.path.join(directory, "pool.warc.gz"),
        ],
        "truth": os.path.join(directory, "truth.parquet"),
    }
    with open(os.path.join(directory, "pool.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


@contextlib.contextmanager
def served_pool(directory: str, cfg: PoolConfig, shared: str) -> Iterator[dict[str, Any]]:
    """Serve the pool under ``directory`` on 127.0.0.1, generating it first (or again, when
    its config differs); a pool made earlier is served on the port its URLs name. Yields the
    manifest."""
    from wit_pipeline.loopback import ImageServer

    path = os.path.join(directory, "pool.json")
    manifest = None
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("config") != dataclasses.asdict(cfg):
            manifest = None
    port = int(manifest["base_url"].rsplit(":", 1)[1]) if manifest else 0
    try:
        server = ImageServer(os.path.join(directory, "site"), mount="/", port=port)
    except OSError:
        # Every URL and pair uid names the port: a pool made again on another port would not
        # match the builds made from this one.
        raise SystemExit(
            f"port {port} of the pool in {directory} is taken (another run serving it?): "
            f"wait for it, or use another --work-dir"
        ) from None
    with server:
        if manifest is None:
            import shutil

            for sub in ("site",):
                shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
            os.makedirs(os.path.join(directory, "site"), exist_ok=True)
            manifest = make_pool(directory, server.base_url, cfg, shared)
        yield manifest


# ---------------------------------------------------------------------------------------------
# Truth and measurement


def load_truth(path: str) -> dict[str, bool]:
    """``{uid: describes its photo}`` for every pool pair."""
    t = pq.read_table(path, columns=["uid", "true"])
    return dict(zip(t.column("uid").to_pylist(), t.column("true").to_pylist(), strict=True))


def shard_pairs(paths: Sequence[str]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``(KEY.json, its pairs)`` of every sample of shard tars (pairs: ``uid``, ``caption``)."""
    for path in paths:
        for raw in shards.iter_samples(path):
            meta = json.loads(raw["json"])
            yield meta, list(meta.get("pairs") or [])


def measure(shards_dir: str, truth: dict[str, bool]) -> dict[str, Any]:
    """Precision and recall of the pairs in ``shards_dir``'s finished shards against ``truth``.

    A pair is one entry of a sample's ``pairs``: precision is the share of them that describe
    their image, recall the share of the pool's true pairs among them. A pair whose uid the truth
    does not know is an error (the shards are not of this pool).
    """
    samples = kept = true_kept = 0
    unknown = []
    for _, pairs in shard_pairs(shards.list_shards(shards_dir)):
        samples += 1
        for p in pairs:
            if p["uid"] not in truth:
                unknown.append(p["uid"])
                continue
            kept += 1
            true_kept += truth[p["uid"]]
    if unknown:
        raise ValueError(f"{len(unknown)} pair(s) in {shards_dir} are not in the pool's truth")
    true_total = sum(truth.values())
    return {
        "samples": samples,
        "pairs": kept,
        "true_pairs": true_kept,
        "precision": true_kept / kept if kept else None,
        "recall": true_kept / true_total if true_total else None,
        "pool_true_pairs": true_total,
    }


def rewrite_pairs(shards_dir: str, out_dir: str, keep: Callable[[str], bool]) -> dict[str, Any]:
    """The samples of ``shards_dir`` with only the pairs ``keep(uid)`` accepts (``captions``,
    ``pairs`` and ``KEY.txt`` follow), samples left without a pair dropped, written to
    ``out_dir`` as final-format shards; returns its manifest."""
    from wit_pipeline import seed

    out = []
    for s in seed.read_samples(shards.list_shards(shards_dir)):
        pairs = [p for p in s.meta.get("pairs") or [] if keep(p["uid"])]
        if pairs:
            kept = seed.with_captions(s, [p["caption"] for p in pairs])
            out.append(dataclasses.replace(kept, meta={**kept.meta, "pairs": pairs}))
    return seed.write_sample_shards(out_dir, out)


def labelled_pairs(shards_dir: str, truth: dict[str, bool]) -> tuple[Any, np.ndarray]:
    """Every pair of ``shards_dir`` as a ``separation.PairSet`` (captions from ``pairs``) and
    its truth, in pair order."""
    from wit_pipeline import seed
    from wit_pipeline.train import separation

    keys, images, captions, labels = [], [], [], []
    for s in sorted(seed.read_samples(shards.list_shards(shards_dir)), key=lambda s: s.key):
        pairs = s.meta.get("pairs") or []
        if not pairs:
            continue
        keys.append(s.key)
        images.append(s.image)
        captions.append([p["caption"] for p in pairs])
        labels.extend(bool(truth[p["uid"]]) for p in pairs)
    return separation.PairSet(keys, images, captions), np.asarray(labels, dtype=bool)
