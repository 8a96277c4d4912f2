"""Batched pHash (wit_pipeline.phash) vs imagehash.phash, on real Flickr8k photos.

    python benchmarks/bench_phash.py            # 7,000 photos (all of Flickr8k)
    python benchmarks/bench_phash.py --quick    # 1,000 photos

Both sides hash the same images and must give identical hashes (the script fails otherwise).
Two measurements: from decoded PIL images (what ``imagehash.phash`` takes), and from JPEG bytes
(decoding included, what the dedup stage does). BLAS runs single-threaded so that both sides use
one core (imagehash's scipy FFT does). Prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import io
import pathlib
import platform
import sys
import time

import imagehash
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wit_pipeline.phash import PHasher, to_hex  # noqa: E402


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 photos")
    ap.add_argument("--n", type=int, default=7000, help="number of photos (default 7,000)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
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
    images = [Image.open(io.BytesIO(b)) for b in blobs]
    for im in images:
        im.load()
    hasher = PHasher()
    hasher.hash_images(images[:16])  # warm-up: resampling matrices for 96 px

    t_ref, ref = best_of(lambda: [str(imagehash.phash(im)) for im in images], args.repeat)
    t_ours, ours = best_of(lambda: [to_hex(h) for h in hasher.hash_images(images)], args.repeat)
    if ours != ref:
        bad = sum(a != b for a, b in zip(ours, ref, strict=True))
        print(f"MISMATCH: {bad} of {len(ref)} hashes differ", file=sys.stderr)
        return 1

    def ref_bytes():
        return [str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in blobs]

    def ours_bytes():
        return [to_hex(h) for h in hasher.hash_bytes(blobs)[0]]

    t_ref_b, ref_b = best_of(ref_bytes, args.repeat)
    t_ours_b, ours_b = best_of(ours_bytes, args.repeat)
    if ours_b != ref_b:
        print("MISMATCH on the bytes path", file=sys.stderr)
        return 1

    size = images[0].size
    print(
        f"pHash of {len(images)} Flickr8k photos ({size[0]}x{size[1]} JPEG), best of "
        f"{args.repeat}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print("| input | imagehash.phash (baseline) | batched PHasher | speed-up | identical |")
    print("|---|---|---|---|---|")
    for name, tr, to in (
        ("decoded PIL images", t_ref, t_ours),
        ("JPEG bytes (decode included)", t_ref_b, t_ours_b),
    ):
        print(
            f"| {name} | {tr / n * 1e6:.0f} us/image | {to / n * 1e6:.0f} us/image | "
            f"{tr / to:.1f}x | {len(ref)}/{len(ref)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
