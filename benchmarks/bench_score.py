"""Scoring throughput: pairs/s of the CLIP-score stage against a plain loop with the same model.

Three measurements in one run, on Flickr8k images (built into shards here with their 5 captions;
every caption is a pair, as ``wit score`` scores them):

- baseline: what a plain script does: load the model, loop over in-memory records calling
  ``score.embed_samples`` in batches (decode, preprocess, tokenize, encode each image once and
  each caption once, then the pair scores; no Beam);
- ``ScoreWithClip``: the same records, read from the shards, through Beam ``RunInference``
  (FnApiRunner), scores discarded;
- ``wit score``: the whole stage, shards in and shards out (read tars, score, group by shard,
  rewrite tars and Parquet, stats, manifest), through ``ScoreShards``.

The seed is ``--pretrained`` (a checkpoint or tag) or, by default, random weights saved to a
temporary checkpoint (speed does not depend on the weights). GPU run, one command:

    python benchmarks/bench_score.py --device cuda --model ViT-B-32 --batch-size 256

Prints a Markdown table with pairs/s and the ratio against the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared-data",
        default=os.environ.get("WIT_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
    )
    parser.add_argument("--model", default="wit-tiny")
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=6000, help="Flickr8k train images to score")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="1,000 images")
    args = parser.parse_args()
    if args.quick:
        args.images = 1000

    import apache_beam as beam
    import torch

    from wit_pipeline import beam_utils, models, shards
    from wit_pipeline.config import ScoreConfig
    from wit_pipeline.stages import score
    from wit_pipeline.train import caption_sets

    work = tempfile.mkdtemp(prefix="bench-score-")
    images_dir = os.path.join(args.shared_data, "flickr8k", "images")
    captions = os.path.join(args.shared_data, "flickr8k", "captions.tsv")
    in_dir = os.path.join(work, "in")
    caption_sets.write_caption_shards(
        images_dir,
        captions,
        in_dir,
        split="train",
        samples_per_shard=args.samples_per_shard,
        limit=args.images,
    )
    pretrained = args.pretrained
    if not pretrained:
        models.register_model_configs()
        import open_clip

        pretrained = os.path.join(work, "random.pt")
        torch.save({"state_dict": open_clip.create_model(args.model).state_dict()}, pretrained)
    loaded = models.load_model(args.model, pretrained, device=args.device)
    records = [
        {"key": s["__key__"], "image": s["jpg"], "captions": json.loads(s["json"])["captions"]}
        for t in shards.list_shards(in_dir)
        for s in shards.iter_samples(t)
    ]
    n_images = len(records)
    n = sum(len(r["captions"]) for r in records)  # pairs

    def loop_batch(loaded, chunk):
        embedded = score.embed_samples(
            loaded, [r["image"] for r in chunk], [r["captions"] for r in chunk]
        )
        return [e.scores() for e in embedded]

    # Warm-up (imports, first CUDA kernels, allocator), not timed.
    loop_batch(loaded, records[:32])

    # Every path loads its model (the Beam ones once per worker), so the timed loop does too.
    t0 = time.time()
    loaded = models.load_model(args.model, pretrained, device=args.device)
    for i in range(0, n_images, args.batch_size):
        loop_batch(loaded, records[i : i + args.batch_size])
    loop_s = time.time() - t0

    t0 = time.time()
    with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
        _ = (
            p
            | beam.Create(shards.list_shards(in_dir))
            | beam.FlatMap(score.read_shard_records)
            | score.ScoreWithClip(
                config=ScoreConfig(
                    model=args.model,
                    pretrained=pretrained,
                    device=args.device,
                    batch_size=args.batch_size,
                )
            )
            | beam.Map(lambda r: r["clip_score"])
        )
    transform_s = time.time() - t0

    cfg = ScoreConfig(
        model=args.model,
        pretrained=pretrained,
        keep_fraction=0.3,
        batch_size=args.batch_size,
        device=args.device,
    )
    t0 = time.time()
    with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
        _ = p | score.ScoreShards(
            input_dir=in_dir, output_dir=os.path.join(work, "out"), config=cfg
        )
    stage_s = time.time() - t0
    counts = beam_utils.check_stats_file(os.path.join(work, "out", "stats.json"))
    assert counts["input"] == n_images, counts

    print(
        f"\n### Scoring throughput ({args.model}, batch {args.batch_size} images, {n_images} "
        f"images, {n} pairs, {args.device})\n"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; date {time.strftime('%Y-%m-%d')}; command: "
        f"`python benchmarks/bench_score.py {' '.join(sys.argv[1:])}`\n"
    )
    print("| path | pairs/s | ratio vs loop |")
    print("|---|---:|---:|")
    print(f"| plain loop over `embed_samples` (baseline) | {n / loop_s:.1f} | 1.00x |")
    print(
        f"| `ScoreWithClip` (RunInference, FnApiRunner) | {n / transform_s:.1f} | {loop_s / transform_s:.2f}x |"
    )
    print(
        f"| `wit score` stage (`ScoreShards`, shards in/out, top 30%) | {n / stage_s:.1f} | {loop_s / stage_s:.2f}x |"
    )


if __name__ == "__main__":
    main()
