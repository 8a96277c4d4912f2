"""Generate the demo web: pages, images, robots.txt, a WARC crawl of the pages and a URL table.

The web is what a crawl of the real one looks like in miniature: most images are good
(synthetic scenes with alt texts that describe them), and the rest is the usual mess, each kind
planted so that a stage has something to catch:

| planted (``kind`` in ``web.json``) | caught by (stage: ``dropped:<reason>``) |
|---|---|
| ``exact_copy``, ``reencode``, ``resized_copy``: the same scene under a second URL | dedup: ``near_duplicate`` (its captions move to the survivor) |
| ``same_url_second_caption``: one URL on two pages with two alt texts | download fetches it once; one sample with both captions |
| ``foreign_caption``: German, French, Spanish alt texts | gather: ``language`` |
| ``junk_caption``: file names, "thumbnail", a missing alt, "click here", "image" | gather: ``no_match`` (``IMG_2041.JPG``, ``DSC00012``; language ID is too unsure of them to drop them as foreign), ``no_caption`` (no alt); "thumbnail", "click here" and "image" contain the queries ``thumbnail``, ``click``, ``here``, ``image`` and are *kept*, as CLIP's query matching would keep them (CLIP-score filtering, ``--seed-model``, is what removes such pairs) |
| ``data_uri``, ``javascript_uri``: ``data:`` and ``javascript:`` sources | gather: ``unsupported_scheme`` |
| ``truncated_image``, ``html_as_image``, ``empty_body``, ``http_404`` | download: ``decode_error``, ``not_image``, ``empty_body``, ``http_404`` |
| ``decompression_bomb``: a 20,000 x 20,000 px PNG of a few kB | download: ``too_large`` (read from the header; never decoded) |
| ``robots_disallowed``: images under ``/private/``, disallowed by robots.txt | download: ``robots`` |
| ``x_robots_tag_noai``: images served with ``X-Robots-Tag: noai`` | download: ``opt_out`` |
| ``redirect_to_private``: redirects to 10.0.0.1 and 169.254.169.254 | download: ``blocked_address`` (SSRF guard) |
| ``eval_copy``: held-out zero-shot renders (exact and re-encoded) put on pages | dedup: ``eval_contamination`` (with ``--eval-set`` the eval file) |

Pre-balancing draws among every matched pair before the download, so a planted pair could be
dropped there before it reaches the stage of its row. The items for the download stage and the
held-out copies have captions that name a thing no scene caption names ("two red circles painted
on a lighthouse"): that query matches a handful of pairs, so its keep probability
``min(1, factor * t / c)`` is 1 and they always reach their stage; only copies and second
captions of ordinary scenes (``exact_copy``, ..., ``same_url_second_caption``) can be dropped
earlier. ``web.json`` lists every planted item
(``planted_items``: kind, url, caption, and ``of``: the original of a copy), and
``wit_pipeline.demo.audit`` traces each through a build; ``tests/test_demo.py`` checks this
table against a real build.

Everything is deterministic for a given seed and port (``WebConfig.port``); the port appears in
every URL, and so in every pair's uid, which pre-balancing and balancing draw from.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import zlib
from collections.abc import Mapping
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from wit_pipeline import fileio
from wit_pipeline.demo import scenes

FOREIGN_CAPTIONS = (
    "zwei rote Kreise auf einem grauen Hintergrund",
    "drei blaue Quadrate auf weißem Hintergrund",
    "trois carrés bleus sur un fond blanc",
    "un cercle rouge sur un fond gris",
    "dos triángulos verdes sobre un fondo negro",
    "una estrella amarilla sobre fondo blanco",
)
JUNK_CAPTIONS = ("IMG_2041.JPG", "click here", "", "image", "DSC00012", "thumbnail")


@dataclasses.dataclass(frozen=True)
class WebConfig:
    n_images: int = 3000  # scene images in the crawl (before planted copies and mess)
    images_per_page: int = 12
    table_fraction: float = 0.2  # share of scenes listed in the URL/caption table, not on pages
    image_size: int = 96
    eval_per_class: int = 20  # held-out zero-shot renders per colour x shape class
    eval_copies: int = 4  # held-out renders also put on the pages (decontamination catches them)
    seed: int = 0
    # The port the web is served on, and so part of every URL and pair uid: a fixed one makes
    # runs repeat pair for pair. 0, or a taken port, lets the OS choose a free one.
    port: int = 28561


@dataclasses.dataclass(frozen=True)
class Route:
    """How the demo server answers one path."""

    file: str | None = None  # relative to the site dir
    status: int = 200
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    redirect: str | None = None


def _bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels that compresses to a few kilobytes."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@dataclasses.dataclass
class _Site:
    root: str
    base_url: str
    routes: dict[str, Route] = dataclasses.field(default_factory=dict)

    def put(self, path: str, data: bytes, **route_kw) -> str:
        full = os.path.join(self.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        if route_kw:
            self.routes[path] = Route(file=path.lstrip("/"), **route_kw)
        return self.base_url + path


def generate_web(out_dir: str, *, base_url: str, cfg: WebConfig = WebConfig()) -> dict:
    """Write the demo web under ``out_dir``; return its manifest (also ``out_dir/web.json``).

    ``out_dir/site/`` holds the files the server serves, ``routes.json`` the special answers,
    ``crawl.warc.gz`` the crawl of every page, ``pairs.parquet`` the URL/caption table, and
    ``eval/zeroshot.parquet`` the held-out renders (``image`` bytes, ``label``).
    """
    rng = random.Random(cfg.seed)
    site = _Site(os.path.join(out_dir, "site"), base_url.rstrip("/"))
    os.makedirs(site.root, exist_ok=True)
    planted: dict[str, int] = {}
    planted_items: list[dict[str, str]] = []
    items: list[tuple[str, str]] = []  # (src as written in the page, alt)

    def plant(kind: str, src: str, caption: str, of: str = "") -> None:
        """Put one planted (src, alt) on the pages and record it for ``audit``."""
        items.append((src, caption))
        planted[kind] = planted.get(kind, 0) + 1
        planted_items.append({"kind": kind, "url": src, "caption": caption, "of": of})

    # --- Held-out zero-shot renders (written below; a few are copied onto the pages) ----------
    held = scenes.eval_scenes(cfg.eval_per_class, seed=10_000_000 + cfg.seed)
    held_jpegs = [scenes.jpeg_bytes(scenes.render(s, cfg.image_size)) for s in held]

    # --- Good scenes -----------------------------------------------------------------------
    table_rows: list[tuple[str, str]] = []
    for i in range(cfg.n_images):
        scene = scenes.random_scene(rng, seed=cfg.seed * 1_000_003 + i)
        img = scenes.render(scene, cfg.image_size)
        url = site.put(
            f"/img/{i:05d}.jpg", scenes.jpeg_bytes(img, quality=rng.choice((80, 88, 95)))
        )
        caption = scene.caption()
        if rng.random() < cfg.table_fraction:
            table_rows.append((url, caption))
            continue
        # Mix absolute, root-relative and page-relative sources, and lazy-loading attributes.
        src = rng.choice((url, f"/img/{i:05d}.jpg", f"../img/{i:05d}.jpg"))
        items.append((src, caption))
        r = rng.random()
        if r < 0.03:  # exact copy under a second URL, another caption
            copy = site.put(f"/mirror/{i:05d}.jpg", scenes.jpeg_bytes(img, quality=88))
            plant("exact_copy", copy, scene.caption(0), of=url)
        elif r < 0.06:  # re-encode at low quality
            copy = site.put(f"/reencoded/{i:05d}.jpg", scenes.jpeg_bytes(img, quality=35))
            plant("reencode", copy, scene.caption(2), of=url)
        elif r < 0.08:  # resized copy
            small = img.resize((cfg.image_size * 2 // 3,) * 2, Image.BICUBIC)
            copy = site.put(f"/thumbs/{i:05d}.jpg", scenes.jpeg_bytes(small, quality=90))
            plant("resized_copy", copy, scene.caption(5), of=url)
        elif r < 0.10:  # same URL again on another page with another alt text
            other = next(c for c in map(scene.caption, (1, 3, 4)) if c != caption)
            plant("same_url_second_caption", url, other, of=url)

    # --- The mess ----------------------------------------------------------------------------
    mess_img = scenes.render(scenes.Scene("red", "circle", 2, "grey", 424242), cfg.image_size)
    good = scenes.jpeg_bytes(mess_img)
    for k, text in enumerate(FOREIGN_CAPTIONS):
        plant("foreign_caption", site.put(f"/img/foreign_{k}.jpg", good), text)
    for k, text in enumerate(JUNK_CAPTIONS):
        plant("junk_caption", site.put(f"/img/junk_{k}.jpg", good), text)
    plant("data_uri", "data:image/gif;base64,R0lGODlhAQABAAAAACw=", "a red circle spacer")
    plant("javascript_uri", "javascript:void(0)", "two blue squares")
    # Each item below is caught at the download or dedup stage, after pre-balancing, so its
    # caption names a thing no scene caption names ("lighthouse"): that query matches a handful
    # of pairs, its pre-balance probability min(1, factor * t / c) is 1, and the item always
    # reaches its stage, whatever the uniform draw of its uid.
    for k, thing in enumerate(("lighthouse", "windmill", "canoe")):
        truncated = site.put(f"/broken/truncated_{k}.jpg", good[: len(good) // 3])
        plant("truncated_image", truncated, f"two red circles painted on a {thing}")
    html = b"<html><body>not an image</body></html>"
    page_as_jpg = site.put("/broken/page.jpg", html, headers={"Content-Type": "image/jpeg"})
    plant("html_as_image", page_as_jpg, "one red circle painted on a violin")
    plant("empty_body", site.put("/broken/empty.jpg", b""), "three red circles painted on a kite")
    for k, thing in enumerate(("teapot", "bicycle", "wheelbarrow")):
        site.routes[f"/missing/{k}.jpg"] = Route(status=404)
        plant(
            "http_404", f"{site.base_url}/missing/{k}.jpg", f"a green square painted on a {thing}"
        )
    bomb = site.put("/huge/bomb.png", _bomb_png())
    plant("decompression_bomb", bomb, "a black square on a white chessboard")
    for k, thing in enumerate(
        ("an umbrella", "a suitcase", "a doormat", "a birdhouse", "a mailbox")
    ):
        private = site.put(f"/private/{k}.jpg", good)
        plant("robots_disallowed", private, f"two red circles painted on {thing}")
    for k, thing in enumerate(("sailboat", "lantern", "trumpet", "skateboard", "hammock")):
        optout = site.put(f"/optout/{k}.jpg", good, headers={"X-Robots-Tag": "noai"})
        plant("x_robots_tag_noai", optout, f"two red circles painted on a {thing}")
    for k, (target, thing) in enumerate(
        (
            ("http://10.0.0.1/admin.jpg", "tractor"),
            ("http://169.254.169.254/latest/meta-data/", "saxophone"),
        )
    ):
        site.routes[f"/redirect/{k}.jpg"] = Route(status=302, redirect=target)
        plant(
            "redirect_to_private",
            f"{site.base_url}/redirect/{k}.jpg",
            f"three yellow stars painted on a {thing}",
        )
    # Held-out renders found on the web: two byte-identical copies and two re-encodes.
    for k in range(min(cfg.eval_copies, len(held))):
        j = (k * 7919) % len(held)
        data = held_jpegs[j]
        if k % 2:
            with Image.open(io.BytesIO(data)) as im:
                data = scenes.jpeg_bytes(im.convert("RGB"), quality=60)
        url = site.put(f"/img/heldout_{k}.jpg", data)
        plant(
            "eval_copy",
            url,
            f"{held[j].caption().rstrip('.')}, printed on a postcard",
            of=f"eval:{j}",
        )
    site.put("/robots.txt", b"User-agent: *\nDisallow: /private/\n")

    # --- Pages and the WARC crawl ----------------------------------------------------------------
    rng.shuffle(items)
    pages = []
    per = cfg.images_per_page
    for p in range(0, len(items), per):
        chunk = items[p : p + per]
        n = p // per
        imgs = []
        for j, (src, alt) in enumerate(chunk):
            attr = "data-src" if j % 7 == 3 else "src"
            alt_html = "" if alt == "" and j % 2 else f' alt="{_escape(alt)}"'
            imgs.append(f'<figure><img {attr}="{_escape(src)}"{alt_html} loading="lazy"></figure>')
        html = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Shapes gallery {n}</title></head><body><h1>Gallery {n}</h1>\n"
            + "\n".join(imgs)
            + "\n</body></html>\n"
        )
        pages.append((site.put(f"/pages/{n:04d}.html", html.encode()), html.encode()))
    warc_path = os.path.join(out_dir, "crawl.warc.gz")
    write_warc(warc_path, pages)
    table_path = os.path.join(out_dir, "pairs.parquet")
    pq.write_table(
        pa.table({"url": [u for u, _ in table_rows], "caption": [c for _, c in table_rows]}),
        table_path,
    )

    # --- Held-out zero-shot renders ------------------------------------------------------------
    eval_dir = os.path.join(out_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    pq.write_table(
        pa.table({"image": held_jpegs, "label": [s.label for s in held]}),
        os.path.join(eval_dir, "zeroshot.parquet"),
    )
    with open(os.path.join(eval_dir, "classnames.txt"), "w") as f:
        f.write("\n".join(scenes.class_names()) + "\n")

    with open(os.path.join(out_dir, "routes.json"), "w") as f:
        json.dump({k: dataclasses.asdict(v) for k, v in sorted(site.routes.items())}, f, indent=1)
    manifest = {
        "base_url": site.base_url,
        "warc": warc_path,
        "table": table_path,
        "eval": os.path.join(eval_dir, "zeroshot.parquet"),
        "pages": len(pages),
        "page_images": len(items),
        "table_images": len(table_rows),
        "planted": dict(sorted(planted.items())),
        "planted_items": planted_items,
        "config": dataclasses.asdict(cfg),
    }
    # web.json marks a finished web (`wit demo` reuses a folder that has one): written last,
    # atomically, so that a web killed while being written is never taken for a finished one.
    with fileio.atomic_write(os.path.join(out_dir, "web.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def write_warc(path: str, pages: list[tuple[str, bytes]]) -> None:
    """Write HTML pages as a gzipped WARC/1.0 file of ``response`` records (one gzip member each)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    date = datetime(2026, 1, 1, tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True, warc_version="WARC/1.0")
        writer.write_record(
            writer.create_warcinfo_record(
                os.path.basename(path),
                {"software": "wit-pipeline demo", "format": "WARC File Format 1.0"},
            )
        )
        for url, body in pages:
            http_headers = StatusAndHeaders(
                "200 OK",
                [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                protocol="HTTP/1.1",
            )
            record = writer.create_warc_record(
                url,
                "response",
                payload=io.BytesIO(body),
                http_headers=http_headers,
                warc_headers_dict={"WARC-Date": date},
            )
            writer.write_record(record)
