"""What a fixed CPU budget buys: train on Flickr8k train for ~10 minutes, then evaluate.

1. Calibrate: a short run measures this machine's steady samples/s for the model and batch.
2. Train with ``--max-steps`` = what fits in ``--budget-minutes`` at that rate (a fixed step
   count, so the cosine schedule ends where the budget does), on all 6,000 training images.
3. Evaluate the final checkpoint: Flickr8k dev retrieval (1,000 images, 5,000 captions:
   R@1/5/10 both ways) and CIFAR-10 zero-shot top-1/top-5 (10,000 test images, CLIP's 18
   CIFAR templates); the same for the untrained model (same architecture and seed) as the
   baseline measured in the same run, and chance.

One command (run it once, on a quiet machine; ``--quick`` is a 1-minute smoke version):

    python benchmarks/bench_train_budget.py
    python benchmarks/bench_train_budget.py --device cuda --model ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

import common
from bench_train import base_parser, build_shards, read_jsonl, run_wit_train


def train(args, shards: str, out: str, steps: int) -> float:
    """``steps`` training steps into ``out``; the process's wall seconds."""
    return run_wit_train(
        args,
        shards,
        out,
        epochs=1000,
        max_steps=steps,
        warmup=min(args.warmup, max(1, steps // 10)),
        wd=args.wd,
        crop_scale_min=args.crop_scale_min,
        log_every=5,
        seed=0,
    )


def evaluate_checkpoint(args, checkpoint: str | None) -> dict:
    import torch

    from wit_pipeline import models
    from wit_pipeline.train import evaluate, retrieval_sets

    torch.manual_seed(0)
    loaded = models.load_model(args.model, checkpoint, device=args.device)
    if checkpoint is None:  # the untrained baseline starts from the trainer's initialization
        import math

        with torch.no_grad():
            loaded.model.logit_scale.fill_(math.log(1 / 0.07))
    flickr = os.path.join(args.shared_data, "flickr8k")
    dev = retrieval_sets.load_retrieval_set(
        os.path.join(flickr, "captions.tsv"),
        images=os.path.join(flickr, "images"),
        options=retrieval_sets.CaptionOptions(split="dev"),
    )
    ret = evaluate.run_retrieval(
        loaded.model, loaded.preprocess, loaded.tokenizer, dev, device=loaded.device
    )
    ds = evaluate.load_labelled_set(
        os.path.join(args.shared_data, "cifar10", "test.parquet"), max_samples=args.cifar_samples
    )
    zs = evaluate.run_zeroshot(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        ds,
        templates=evaluate.resolve_templates("auto", ds.name),
        device=loaded.device,
    )
    return {
        **ret,
        "cifar10_top1": zs["top1"],
        "cifar10_top5": zs["top5"],
        "cifar10_n": zs["num_samples"],
    }


def main() -> None:
    parser = base_parser(__doc__, workers=1, lr=1e-3, warmup=100)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--wd", type=float, default=0.2)
    parser.add_argument("--crop-scale-min", type=float, default=0.6)
    parser.add_argument("--calibration-steps", type=int, default=25)
    parser.add_argument("--cifar-samples", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--quick", action="store_true", help="1-minute budget, 2,000 CIFAR images")
    parser.add_argument("--run-dir", default="", help="re-evaluate a finished run of this script")
    args = parser.parse_args()
    args.shared_data = args.shared_data or str(common.shared_data())
    if args.quick:
        args.budget_minutes, args.cifar_samples, args.calibration_steps = 1.0, 2000, 12

    if args.run_dir:  # evaluate a finished run of this script again (no training)
        out = args.run_dir
        with open(os.path.join(out, "bench_budget.json")) as f:
            saved = json.load(f)
        rate, steps, wall = saved["rate"], saved["steps"], saved["wall"]
    else:
        work = tempfile.mkdtemp(prefix="bench-budget-")
        shards = build_shards(args.shared_data, os.path.join(work, "shards"), 1000)

        # 1. Calibrate (median per-step rate after the first logged interval).
        train(args, shards, os.path.join(work, "calibrate"), args.calibration_steps)
        rows = read_jsonl(os.path.join(work, "calibrate", "metrics.jsonl"))
        rates = [r["samples_per_s"] for r in rows if r.get("type") == "train"]
        rate = statistics.median(rates[1:] or rates)
        steps = max(1, int(args.budget_minutes * 60 * rate / args.batch_size))

        # 2. Train.
        out = os.path.join(work, "run")
        wall = train(args, shards, out, steps)
        with open(os.path.join(out, "bench_budget.json"), "w") as f:
            json.dump({"rate": rate, "steps": steps, "wall": wall}, f)
    ckpt = os.path.join(out, "checkpoints", "latest.pt")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    train_rows = [r for r in rows if r.get("type") == "train"]
    config_row = next(r for r in rows if r.get("type") == "config")
    if "time" in config_row:
        train_s = train_rows[-1]["time"] - config_row["time"]
    else:  # runs from before the trainer logged it: first interval from its own rate
        first = train_rows[0]
        train_s = (
            train_rows[-1]["time"]
            - first["time"]
            + first["step"] * args.batch_size / first["samples_per_s"]
        )

    # 3. Evaluate, with the untrained model as the same-run baseline.
    trained = evaluate_checkpoint(args, ckpt)
    untrained = evaluate_checkpoint(args, None)
    n_img, n_txt = trained["num_images"], trained["num_texts"]
    per = n_txt // n_img  # captions per image (5)

    def any_of_own_captions(k: int) -> float:  # random ranking: P(one of `per` in the top k)
        p_none = 1.0
        for i in range(k):
            p_none *= (n_txt - per - i) / (n_txt - i)
        return 1.0 - p_none

    chance = {f"text_to_image_R@{k}": k / n_img for k in (1, 5, 10)}
    chance.update({f"image_to_text_R@{k}": any_of_own_captions(k) for k in (1, 5, 10)})
    chance.update(cifar10_top1=0.1, cifar10_top5=0.5)

    samples = steps * args.batch_size
    wall_text = f"{wall:.0f} s" if wall else "not recorded"
    print(
        f"\n### {args.budget_minutes:g}-minute training budget ({args.model}, batch {args.batch_size}, "
        f"{args.device})\n"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; date {time.strftime('%Y-%m-%d')}; "
        f"command: `python benchmarks/bench_train_budget.py {' '.join(sys.argv[1:])}`. "
        f"Calibrated {rate:.0f} samples/s -> {steps} steps, {samples} samples "
        f"({samples / 6000:.1f} epochs of Flickr8k train); training loop {train_s:.0f} s, "
        f"process {wall_text}; final loss {train_rows[-1]['loss']:.3f}.\n"
    )
    print("| metric | trained | untrained (baseline) | chance | trained / untrained |")
    print("|---|---:|---:|---:|---:|")
    keys = [
        "text_to_image_R@1",
        "text_to_image_R@5",
        "text_to_image_R@10",
        "image_to_text_R@1",
        "image_to_text_R@5",
        "image_to_text_R@10",
        "cifar10_top1",
        "cifar10_top5",
    ]
    for k in keys:
        c = chance.get(k)
        ratio = trained[k] / untrained[k] if untrained[k] else float("inf")
        print(
            f"| {k} | {trained[k]:.4f} | {untrained[k]:.4f} | {'' if c is None else f'{c:.4f}'} | "
            f"{ratio:.1f}x |"
        )
    print(
        f"\n(Flickr8k dev: {trained['num_images']} images, {trained['num_texts']} captions; "
        f"CIFAR-10: {trained['cifar10_n']} test images.)"
    )


if __name__ == "__main__":
    main()
