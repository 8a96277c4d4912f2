"""Batched pHash (wit_pipeline.stages.dedup.phash) vs imagehash.phash, on real Flickr8k photos.

    python benchmarks/bench_phash.py            # 7,000 photos (all of Flickr8k)
    python benchmarks/bench_phash.py --quick    # 1,000 photos
    python benchmarks/bench_phash.py --resize 256x192   # photos upscaled to the download size
    python benchmarks/bench_phash.py --mixed-aspect 256  # many sizes, as keep_ratio downloads

Both sides hash the same images and must give identical hashes (the script fails otherwise).
Two measurements: from decoded PIL images (what ``imagehash.phash`` takes), and from JPEG bytes
(decoding included, what the dedup stage does). A third row decodes with
``dedup.phash_decode = draft`` (libjpeg's grayscale output and DCT scaling): its hashes are
not imagehash's, so the script reports how far they are from the exact ones, and what they do
to near-duplicate groups: each photo gets a planted near-duplicate (JPEG quality 30, resized
to 75% or 125%, cropped by 3%, brightened by 10%) and a mirrored copy (not a near duplicate for
pHash), and the pairs within ``dedup.max_distance`` found with draft hashes are compared with
those found with exact ones (precision and recall) and with the planted pairs. BLAS runs single-threaded so that both sides use
one core (imagehash's scipy FFT does). The two sides alternate, round after round, and the table
shows the median time of each and the median of the per-round ratios, so that a load change on
a shared machine hits both sides alike. Prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import io
import pathlib
import platform
import random
import statistics
import sys
import time

import imagehash
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wit_pipeline.config import DedupConfig  # noqa: E402
from wit_pipeline.stages.dedup import lsh  # noqa: E402
from wit_pipeline.stages.dedup.phash import PHasher, to_hex  # noqa: E402


def alternate(ref, ours, rounds):
    """Run both ``rounds`` times, alternating; (median ref, median ours, median ratio, outputs)."""
    t_ref, t_ours, ratios = [], [], []
    out_ref = out_ours = None
    for _ in range(rounds):
        t = time.perf_counter()
        out_ref = ref()
        a = time.perf_counter() - t
        t = time.perf_counter()
        out_ours = ours()
        b = time.perf_counter() - t
        t_ref.append(a)
        t_ours.append(b)
        ratios.append(a / b)
    return (
        statistics.median(t_ref),
        statistics.median(t_ours),
        statistics.median(ratios),
        (
            out_ref,
            out_ours,
        ),
    )


def encode(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def planted_variants(blobs: list[bytes]) -> tuple[list[bytes], set[tuple[int, int]]]:
    """The photos, then one near-duplicate variant and one mirrored copy of each: ``(blobs,
    planted pairs)`` (indices of a photo and its variant)."""
    n = len(blobs)
    variants, mirrored = [], []
    for i, b in enumerate(blobs):
        im = Image.open(io.BytesIO(b)).convert("RGB")
        w, h = im.size
        kind = i % 5
        if kind == 0:
            v = encode(im, 30)
        elif kind in (1, 2):
            f = 0.75 if kind == 1 else 1.25
            v = encode(im.resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC))
        elif kind == 3:
            dx, dy = round(w * 0.03), round(h * 0.03)
            v = encode(im.crop((dx, dy, w - dx, h - dy)))
        else:
            v = encode(im.point(lambda x: min(255, round(x * 1.1))))
        variants.append(v)
        mirrored.append(encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return blobs + variants + mirrored, {(i, n + i) for i in range(n)}


def grouping(blobs: list[bytes], k: int) -> list[str]:
    """Near-duplicate pairs (``lsh.near_duplicate_pairs`` at distance ``k``) of the planted set
    with exact and with draft hashes: counts, precision and recall of draft against exact, and
    recall of the planted pairs."""
    all_blobs, planted = planted_variants(blobs)
    pairs = {}
    dist = []
    exact = PHasher("exact").hash_bytes(all_blobs)[0]
    draft = PHasher("draft").hash_bytes(all_blobs)[0]
    for name, hashes in (("exact", exact), ("draft", draft)):
        pairs[name] = lsh.near_duplicate_pairs(hashes, k)
    dist = [bin(int(a) ^ int(b)).count("1") for a, b in zip(exact, draft, strict=True)]
    both = pairs["exact"] & pairs["draft"]
    precision = len(both) / len(pairs["draft"]) if pairs["draft"] else 1.0
    recall = len(both) / len(pairs["exact"]) if pairs["exact"] else 1.0
    return [
        f"{len(all_blobs):,} images ({len(blobs):,} photos, one planted near duplicate and one "
        f"mirrored copy each), k = {k}",
        f"exact: {len(pairs['exact']):,} pairs, {len(pairs['exact'] & planted):,} of "
        f"{len(planted):,} planted",
        f"draft: {len(pairs['draft']):,} pairs, {len(pairs['draft'] & planted):,} of "
        f"{len(planted):,} planted",
        f"draft against exact: precision {precision:.4f}, recall {recall:.4f} "
        f"({len(pairs['draft'] - pairs['exact'])} pairs only with draft, "
        f"{len(pairs['exact'] - pairs['draft'])} only with exact)",
        f"hash distance draft vs exact over all images: mean {statistics.mean(dist):.3f} bits, "
        f"max {max(dist)}, identical {sum(d == 0 for d in dist) / len(dist):.1%}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 photos")
    ap.add_argument("--n", type=int, default=7000, help="number of photos (default 7,000)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument(
        "--group-photos", type=int, default=2000, help="photos in the grouping check (2,000)"
    )
    ap.add_argument(
        "--resize",
        metavar="WxH",
        help="resize the photos (bicubic, JPEG quality 90) first, e.g. 256x192: the size of "
        "images from the download stage (image_size 256)",
    )
    ap.add_argument(
        "--mixed-aspect",
        type=int,
        metavar="SIDE",
        help="resize each photo so that its short side is SIDE and its aspect ratio is drawn "
        "(seed 0) log-uniformly from 1 to 2, either orientation: many distinct sizes, as "
        "img2dataset's keep_ratio gives for web images (the shared photos are all square)",
    )
    ap.add_argument(
        "--data",
        default=os.environ.get("WIT_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
        help="shared data folder (with flickr8k/images)",
    )
    args = ap.parse_args()
    n = 1000 if args.quick else args.n
    files = sorted((pathlib.Path(args.data) / "flickr8k" / "images").glob("*.jpg"))[:n]
    if not files:
        print(f"no photos in {args.data}/flickr8k/images", file=sys.stderr)
        return 2
    blobs = [f.read_bytes() for f in files]
    if args.resize or args.mixed_aspect:
        rng = random.Random(0)
        out = []
        for b in blobs:
            if args.resize:
                w, h = (int(v) for v in args.resize.lower().split("x"))
            else:
                w = h = args.mixed_aspect
                long_side = round(args.mixed_aspect * 2 ** rng.random())
                w, h = (w, long_side) if rng.random() < 0.5 else (long_side, h)
            buf = io.BytesIO()
            Image.open(io.BytesIO(b)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90
            )
            out.append(buf.getvalue())
        blobs = out
    images = [Image.open(io.BytesIO(b)) for b in blobs]
    for im in images:
        im.load()
    hasher = PHasher()
    hasher.hash_images(images[:16])  # warm-up: resampling matrices for this size

    results = []

    def ref_images():
        return [str(imagehash.phash(im)) for im in images]

    def ours_images():
        return [to_hex(h) for h in hasher.hash_images(images)]

    def ref_bytes():
        return [str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in blobs]

    def ours_bytes():
        return [to_hex(h) for h in hasher.hash_bytes(blobs)[0]]

    drafter = PHasher("draft")
    drafter.hash_bytes(blobs[:16])

    def draft_bytes():
        return [to_hex(h) for h in drafter.hash_bytes(blobs)[0]]

    for name, ref, ours in (
        ("decoded PIL images", ref_images, ours_images),
        ("JPEG bytes (decode included)", ref_bytes, ours_bytes),
    ):
        t_ref, t_ours, ratio, (out_ref, out_ours) = alternate(ref, ours, args.rounds)
        if out_ours != out_ref:
            bad = sum(a != b for a, b in zip(out_ours, out_ref, strict=True))
            print(f"MISMATCH ({name}): {bad} of {n} hashes differ", file=sys.stderr)
            return 1
        results.append((name, t_ref, t_ours, ratio, f"{n}/{n}"))
    t_ref, t_ours, ratio, (out_ref, out_draft) = alternate(ref_bytes, draft_bytes, args.rounds)
    same = sum(a == b for a, b in zip(out_ref, out_draft, strict=True))
    results.append(("JPEG bytes, `phash_decode = draft`", t_ref, t_ours, ratio, f"{same}/{n}"))
    groups = grouping(blobs[: args.group_photos], DedupConfig().max_distance)

    sizes = {im.size for im in images}
    if len(sizes) == 1:
        (w, h) = next(iter(sizes))
        shape = f"{w}x{h} JPEG{', resized' if args.resize else ''}"
    else:
        shape = f"JPEG, {len(sizes)} distinct sizes, short side {args.mixed_aspect}"
    print(
        f"pHash of {len(images)} Flickr8k photos ({shape}), median of "
        f"{args.rounds} alternating rounds, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", load average (1 min) {os.getloadavg()[0]:.1f}\n"
    )
    print("| input | imagehash.phash (baseline) | batched PHasher | speed-up | identical |")
    print("|---|---|---|---|---|")
    for name, tr, to, ratio, same in results:
        print(
            f"| {name} | {tr / n * 1e6:.0f} us/image | {to / n * 1e6:.0f} us/image | "
            f"{ratio:.1f}x | {same} |"
        )
    print("\nNear-duplicate pairs, draft against exact decoding:\n")
    for line in groups:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
