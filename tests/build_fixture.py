"""A small web of real Flickr8k photos for the ``wit build`` tests, and its expected outcome.

``Web`` serves Flickr8k photos on 127.0.0.1 (``loopback.ImageServer``) behind gallery pages
written into a WARC (as ``wit_pipeline/demo/web.py`` does), with planted cases, each with the
fate the pipeline must give it:

| planted | fate |
|---|---|
| an exact copy, a JPEG re-encode (quality 30) and a 64 px resize of three photos | dedup: `near_duplicate`; the survivor keeps both captions |
| one image URL on two pages with two alt texts | one download, one sample with two captions |
| one (URL, alt) pair on two pages | gather: `duplicate` |
| German, French, Spanish alt texts | gather: `language` |
| an alt text matching no query, an `<img>` without alt, a `data:` source | gather: `no_match`, `no_caption`, `unsupported_scheme` |
| a path disallowed by robots.txt, a redirect to 169.254.169.254, a 404 | download: `robots`, `blocked_address`, `http_404` |
| two Flickr8k *dev* photos (the eval set) | dedup: `eval_contamination` |

Planted captions carry rare queries (count at most ``t``), so balancing never removes them; the
base photos carry common queries, so both balancing phases cut the head. The draws depend on
the URLs, hence on the server's port: ``Web.seed`` is the first ``balance.seed`` for which both
phases drop something and the near-duplicate groups reach dedup whole, so that every run
exercises every case.

:func:`expected` computes the outcome independently of the pipeline: the reference matcher is
MetaCLIP's loop (``match.naive_match``), the draws are ``balance.uniform`` (the seeded hash the
spec defines), and balancing, URL grouping and near-duplicate survivors are recomputed here
from their definitions (docs/balance.md, docs/dedup.md).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import pathlib
import threading

import imagehash
from PIL import Image

from wit_pipeline import urls
from wit_pipeline.demo.web import write_warc
from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages import balance
from wit_pipeline.stages.gather.match import naive_match

COMMON = [
    "dog",
    "dogs",
    "man",
    "woman",
    "boy",
    "girl",
    "people",
    "water",
    "grass",
    "snow",
    "ball",
    "red",
    "black",
    "white",
    "blue",
]
RARE = ["lighthouse", "windmill", "violin", "kayak"]
QUERIES = COMMON + RARE
T = 3
FACTOR = 1.5
N_BASE = 36
PER_PAGE = 8
MIN_DISTANCE = 12  # between any two photos of the web and the dev set (pHash bits)

FOREIGN = (
    "Ein schwarzer Hund rennt durch den Schnee",
    "Un chien noir court dans la neige",
    "Un perro negro corre por la nieve",
)


def clean(text: str) -> str:
    return " ".join(text.split())


def encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclasses.dataclass
class Item:
    """One ``<img>`` of a page: its source as written, alt text (None: no attribute), fate."""

    src: str
    alt: str | None
    gather: str | None = None  # gather drop reason, or None
    download: str | None = None  # download drop reason for its URL, or None
    image: str = ""  # the photo file (for expected sizes and groups)
    size: tuple[int, int] = (96, 96)
    group: str = ""  # near-duplicate group name ("" = its own)
    eval_hit: bool = False


class Gate:
    """Holds image requests beyond ``allow`` until ``open()`` (for killing a run mid-download)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.event.set()
        self.allow = 0
        self.count = 0
        self.waiting = 0

    def close(self, allow: int) -> None:
        with self.lock:
            self.allow, self.count, self.waiting = allow, 0, 0
            self.event.clear()

    def open(self) -> None:
        self.event.set()

    def wait(self) -> None:
        if self.event.is_set():
            return
        with self.lock:
            self.count += 1
            held = self.count > self.allow
            self.waiting += held
        if held:
            self.event.wait(120)


def _flickr(shared: pathlib.Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}}
    with open(shared / "flickr8k" / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            by_split[row["split"]].setdefault(row["image"], []).append(clean(row["caption"]))
    return by_split["train"], by_split["dev"]


def _phash(path: pathlib.Path) -> imagehash.ImageHash:
    with Image.open(path) as im:
        return imagehash.phash(im)


class Web:
    """The served web: call ``start()``, then ``write(dir)`` for the WARC and query list."""

    def __init__(self, shared: pathlib.Path):
        from wit_pipeline.config import CaptionConfig
        from wit_pipeline.stages.gather import captions

        self.images_dir = shared / "flickr8k" / "images"
        train, dev = _flickr(shared)
        detector = self.detector = captions.make_detector(CaptionConfig())
        dev_names = sorted(dev)
        dev_hashes = [_phash(self.images_dir / n) for n in dev_names]
        chosen: list[tuple[str, str]] = []
        hashes: list[imagehash.ImageHash] = []
        # Photos whose first caption is clearly English, matches a common query and no rare one,
        # and that are far (pHash) from every other photo used and from every dev photo.
        for name in sorted(train):
            cap = train[name][0]
            if not naive_match(cap, COMMON) or naive_match(cap, RARE):
                continue
            lang, score = detector.detect(cap)
            if lang != "en" or score < 0.5:
                continue
            h = _phash(self.images_dir / name)
            if any(h - o < MIN_DISTANCE for o in hashes) or any(
                h - o < MIN_DISTANCE for o in dev_hashes
            ):
                continue
            chosen.append((name, cap))
            hashes.append(h)
            if len(chosen) == N_BASE + 4:  # + 4 photos for the foreign and robots cases
                break
        self.base = chosen[:N_BASE]
        self.extra = chosen[N_BASE:]
        dev_far = []
        for name, h in zip(dev_names, dev_hashes, strict=True):
            if all(h - o >= MIN_DISTANCE for o in hashes) and all(
                h - o >= MIN_DISTANCE for o in dev_hashes if o is not h
            ):
                dev_far.append(name)
            if len(dev_far) == 2:
                break
        self.dev = dev_far
        self.gate = Gate()
        self.server = ImageServer(str(self.images_dir))
        self.items: list[Item] = []

    # -- serving ---------------------------------------------------------------------------------

    def start(self) -> Web:
        self.server.start()
        self._routes()
        return self

    def stop(self) -> None:
        self.gate.open()
        self.server.stop()

    def url(self, path: str) -> str:
        return self.server.url(path)

    def _bytes_route(self, path: str, body: bytes, status: int = 200) -> None:
        def handler(req, body=body, status=status):
            self.gate.wait()
            req.close_connection = True
            req.send_plain(status, body, "image/jpeg")

        self.server.route(path, handler)

    def _file_route(self, name: str) -> str:
        path = f"/img/{name}"
        self._bytes_route(path, (self.images_dir / name).read_bytes())
        return self.url(path)

    def _routes(self) -> None:
        srv = self.server
        srv.route(
            "/robots.txt",
            lambda req: req.send_plain(200, b"User-agent: *\nDisallow: /private/\n"),
        )
        srv.route(
            "/redirect/meta.jpg",
            lambda req: req.send_plain(
                302, b"", Location="http://169.254.169.254/latest/meta-data/"
            ),
        )
        items: list[Item] = []
        for name, cap in self.base:
            items.append(Item(self._file_route(name), cap, image=name, group=name))
        (a, cap_a), (b, _), (c, _), (d, _), (e, cap_e) = self.base[:5]
        img_a = (self.images_dir / a).read_bytes()
        self._bytes_route("/mirror/a.jpg", img_a)
        items.append(
            Item(self.url("/mirror/a.jpg"), f"{cap_a} seen from the lighthouse", image=a, group=a)
        )
        with Image.open(self.images_dir / b) as im:
            self._bytes_route("/reencoded/b.jpg", encode(im, 30))
            items.append(
                Item(
                    self.url("/reencoded/b.jpg"),
                    "a lighthouse keeper took this photo",
                    image=b,
                    group=b,
                )
            )
        with Image.open(self.images_dir / c) as im:
            small = im.convert("RGB").resize((64, 64), Image.BICUBIC)
            self._bytes_route("/thumbs/c.jpg", encode(small, 90))
            items.append(
                Item(
                    self.url("/thumbs/c.jpg"),
                    "a small lighthouse postcard version",
                    image=c,
                    size=(64, 64),
                    group=c,
                )
            )
        # the same URL again with another alt text: one image, two pairs
        items.append(Item(self.url(f"/img/{d}"), "we paddled a kayak near here", image=d, group=d))
        # the same pair again on another page
        items.append(Item(self.url(f"/img/{e}"), cap_e, gather="duplicate", image=e, group=e))
        for text, (name, _) in zip(FOREIGN, self.extra, strict=False):
            items.append(Item(self._file_route(name), text, gather="language", image=name))
        items.append(
            Item(self.url("/img/nothing.jpg"), "Abstract shapes on a canvas", gather="no_match")
        )
        items.append(Item(self.url("/img/noalt.jpg"), None, gather="no_caption"))
        items.append(
            Item(
                "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
                "a white dog on the snow",
                gather="unsupported_scheme",
            )
        )
        name = self.extra[3][0]
        self._bytes_route("/private/p.jpg", (self.images_dir / name).read_bytes())
        items.append(Item(self.url("/private/p.jpg"), "a violin on a chair", download="robots"))
        items.append(
            Item(self.url("/redirect/meta.jpg"), "a violin case", download="blocked_address")
        )
        items.append(
            Item(self.url("/missing/x.jpg"), "a broken violin string", download="http_404")
        )
        for name in self.dev:
            items.append(
                Item(
                    self._file_route(name), "a windmill in the distance", image=name, eval_hit=True
                )
            )
        # The planted English alt texts must be detected as English (else they would be
        # dropped as `language`, not where they are planted to be dropped).
        for it in items:
            if it.alt and it.gather not in ("language", "no_caption", "unsupported_scheme"):
                lang, _ = self.detector.detect(it.alt)
                assert lang == "en", (it.alt, lang)
        self.items = items
        self.seed = next(s for s in range(100) if self._exercises_everything(s))

    def _exercises_everything(self, seed: int) -> bool:
        """Both balancing phases cut something, and every planted near-duplicate group survives
        pre-balancing whole (so that dedup has all three groups to collapse)."""
        e = expected(self, seed=seed)
        return bool(e.prebalanced_out and e.balanced_out and e.near_duplicate == 3)

    # -- files -----------------------------------------------------------------------------------

    def write(self, directory: pathlib.Path) -> tuple[str, str]:
        """Write ``crawl.warc.gz`` (pages of the items, in a fixed order) and ``queries.txt``."""
        directory.mkdir(parents=True, exist_ok=True)
        pages = []
        for p in range(0, len(self.items), PER_PAGE):
            imgs = []
            for it in self.items[p : p + PER_PAGE]:
                alt = "" if it.alt is None else f' alt="{_escape(it.alt)}"'
                imgs.append(f'<img src="{_escape(it.src)}"{alt}>')
            html = (
                '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f"<title>gallery {p}</title></head><body>\n" + "\n".join(imgs) + "\n</body></html>"
            )
            pages.append((self.url(f"/pages/{p // PER_PAGE:03d}.html"), html.encode()))
        warc = directory / "crawl.warc.gz"
        write_warc(str(warc), pages)
        queries = directory / "queries.txt"
        queries.write_text("\n".join(QUERIES) + "\n")
        return str(warc), str(queries)


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------
# The expected outcome, from the definitions


def _keep(probs: dict[int, float], qids, seed: int, phase: str, rid: str) -> bool:
    p = 1.0 - math.prod(1.0 - probs[q] for q in qids) if qids else 0.0
    return balance.uniform(seed, phase, rid) < p


@dataclasses.dataclass
class Expected:
    counters: dict[str, int]
    image_counters: dict[str, int]
    samples: dict[str, dict]  # final samples by key: {"captions": [...], "query_ids": [...]}
    balanced_out: int
    prebalanced_out: int
    near_duplicate: int
    download_urls: list[str]  # the distinct URLs handed to the download (any fate)
    # the samples after dedup (what the score stage reads): key -> [(uid, caption)] by uid
    deduplicated: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    low_score_samples: list[str] = dataclasses.field(default_factory=list)  # dropped by score
    low_score_pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # partial


def expected(
    web: Web,
    *,
    t: int = T,
    factor: float | None = FACTOR,
    seed: int | None = None,
    score=None,
    threshold: float | None = None,
) -> Expected:
    """Counters and final samples of ``wit build`` over ``web`` (see the module docstring).

    ``factor=None``: no pre-balancing (``balance.prebalance_factor = 0``). ``score(key,
    caption)``: a seed's pair scores; the pairs below ``threshold`` (None: none) then leave
    their sample after dedup, before balancing, and a sample with none left is dropped
    (docs/score.md); final samples gain ``clip_scores`` (by caption), ``clip_score`` and
    ``caption`` (the best).
    """
    seed = web.seed if seed is None else seed
    c: collections.Counter[str] = collections.Counter()
    ic: collections.Counter[str] = collections.Counter()
    # gather: every <img> is a pair
    pairs = []  # (uid, url, caption, qids, item)
    seen = set()
    for it in web.items:
        c["input"] += 1
        if it.gather and it.gather != "duplicate":
            c[f"dropped:{it.gather}"] += 1
            continue
        url = urls.normalize_url(it.src)
        uid = urls.pair_uid(url, it.alt)
        if uid in seen:
            c["dropped:duplicate"] += 1
            continue
        seen.add(uid)
        pairs.append((uid, url, it.alt, naive_match(it.alt, QUERIES), it))
    # pre-balance over pairs
    counts = collections.Counter(q for p in pairs for q in p[3])
    if factor is None:
        kept_pairs = list(pairs)
    else:
        probs = {q: min(1.0, factor * t / n) for q, n in counts.items()}
        kept_pairs = [p for p in pairs if _keep(probs, p[3], seed, "prebalance", p[0])]
    prebalanced_out = len(pairs) - len(kept_pairs)
    c["dropped:prebalanced_out"] += prebalanced_out
    # download: one request per URL; its fate is its pairs' fate
    by_url: dict[str, list] = collections.defaultdict(list)
    for p in kept_pairs:
        by_url[p[1]].append(p)
    images = []
    for url, ps in sorted(by_url.items()):
        ic["input"] += 1
        reason = ps[0][4].download
        if reason:
            c[f"dropped:{reason}"] += len(ps)
            ic[f"dropped:{reason}"] += 1
            continue
        it = ps[0][4]
        images.append(
            {
                "key": urls.url_uid(url),
                "pairs": ps,
                "size": it.size,
                "group": it.group,
                "eval": it.eval_hit,
            }
        )
    # dedup: eval contamination, then near-duplicate groups (planted groups only: the photos
    # are chosen far apart) collapse into the one with most pixels, then the smallest key
    clean_images = []
    for im in images:
        if im["eval"]:
            c["dropped:eval_contamination"] += len(im["pairs"])
            ic["dropped:eval_contamination"] += 1
        else:
            clean_images.append(im)
    groups: dict[str, list] = collections.defaultdict(list)
    for im in clean_images:
        groups[im["group"] or im["key"]].append(im)
    samples = []
    near = 0
    for members in groups.values():
        members.sort(key=lambda m: (-m["size"][0] * m["size"][1], m["key"]))
        survivor = dict(members[0])
        survivor["pairs"] = sorted((p for m in members for p in m["pairs"]), key=lambda p: p[0])
        near += len(members) - 1
        samples.append(survivor)
    ic["dropped:near_duplicate"] += near
    deduplicated = {s["key"]: [(p[0], p[2]) for p in s["pairs"]] for s in samples}
    # score: every pair, before balancing
    low_samples, low_pairs = [], []
    if score is not None:
        scored = []
        for s in samples:
            s["scores"] = {p[0]: score(s["key"], p[2]) for p in s["pairs"]}
            keep = [p for p in s["pairs"] if threshold is None or s["scores"][p[0]] >= threshold]
            lost = [p for p in s["pairs"] if p not in keep]
            c["dropped:low_clip_score"] += len(lost)
            if not keep:
                ic["dropped:low_clip_score"] += 1
                low_samples.append(s["key"])
                continue
            low_pairs += [(s["key"], p[0]) for p in lost]
            s["pairs"] = keep
            scored.append(s)
        samples = scored
    # balance over samples: E = union of the pairs' queries
    for s in samples:
        s["qids"] = sorted({q for p in s["pairs"] for q in p[3]})
    counts = collections.Counter(q for s in samples for q in s["qids"])
    probs = {q: min(1.0, t / n) for q, n in counts.items()}
    final = {}
    balanced_out = 0
    for s in samples:
        if _keep(probs, s["qids"], seed, "balance", s["key"]):
            final[s["key"]] = {
                "captions": [p[2] for p in s["pairs"]],
                "query_ids": s["qids"],
            }
            if score is not None:
                best = min(s["pairs"], key=lambda p: (-s["scores"][p[0]], p[0]))
                final[s["key"]].update(
                    clip_scores={p[2]: s["scores"][p[0]] for p in s["pairs"]},
                    clip_score=s["scores"][best[0]],
                    caption=best[2],
                )
        else:
            balanced_out += 1
            c["dropped:balanced_out"] += len(s["pairs"])
    ic["dropped:balanced_out"] += balanced_out
    c["kept"] = sum(len(s["captions"]) for s in final.values())
    ic["kept"] = len(final)
    return Expected(
        counters={k: v for k, v in sorted(c.items()) if v or k in ("input", "kept")},
        image_counters={k: v for k, v in sorted(ic.items()) if v or k in ("input", "kept")},
        samples=final,
        balanced_out=balanced_out,
        prebalanced_out=prebalanced_out,
        near_duplicate=near,
        download_urls=sorted(by_url),
        deduplicated=deduplicated,
        low_score_samples=sorted(low_samples),
        low_score_pairs=sorted(low_pairs),
    )


DEV_SET = "flickr8k-dev={root}/flickr8k/captions.tsv?split=dev"


def build_args(web: Web, inputs: tuple[str, str], out, shared_data, *extra: str) -> list[str]:
    """``wit build`` over the web's WARC, with the settings its expected outcome assumes."""
    warc, queries = inputs
    return [
        "build",
        "--input",
        warc,
        "--queries",
        queries,
        "--output",
        str(out),
        "--allow-loopback",
        "--eval-set",
        DEV_SET.format(root=shared_data),
        "--set",
        f"balance.t={T}",
        "--set",
        f"balance.prebalance_factor={FACTOR}",
        "--set",
        f"balance.seed={web.seed}",
        "--set",
        "download.samples_per_shard=10",
        "--set",
        "download.timeout=60",  # requests held by the gate must outlive a kill
        "--set",
        "shards.samples_per_shard=8",
        *extra,
    ]


def write_seed_checkpoint(directory) -> str:
    """A random wit-nano CLIP (seeded) saved as a plain open_clip state dict: a seed model for
    the scoring steps that needs no training."""
    import open_clip
    import torch

    from wit_pipeline import models

    models.register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("wit-nano")
    path = pathlib.Path(directory) / "seed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)
