"""The trainer: loss and temperature, schedule, options, checkpoints, resume, and learning."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from clip_helpers import (
    SEED_MODEL,
    flickr_paths,
    read_jsonl,
    seed_run_dir,
    trained_seed,
    write_flickr_shards,
)

from wit_pipeline import models
from wit_pipeline.errors import WitError
from wit_pipeline.train import checkpoint, evaluate, loop, recipe, retrieval_sets
from wit_pipeline.train.checkpoint import TrainState
from wit_pipeline.train.config import TrainConfig, parse_config, validate

__all__ = ["trained_seed"]  # the session fixture, imported for pytest

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# Loss and temperature


def test_clip_loss_matches_hand_computed_value():
    from open_clip import ClipLoss

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(10.0)
    # logits_per_image = 10 * img @ txt.T = [[6, 0], [8, 10]]; logits_per_text is its transpose.
    expected = (
        math.log(1 + math.exp(-6))  # image 0: label 0 among (6, 0)
        + math.log(1 + math.exp(-2))  # image 1: label 1 among (8, 10)
        + math.log(1 + math.exp(2))  # text 0: label 0 among (6, 8)
        + math.log(1 + math.exp(-10))  # text 1: label 1 among (0, 10)
    ) / 4
    got = ClipLoss()(img, txt, scale)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_temperature_initialized_to_007_and_clamped_at_100():
    cfg = TrainConfig(train_data=("x",), model=SEED_MODEL)
    model = recipe.build_model(cfg, "cpu")
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
    recipe.clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0), abs=1e-7)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    recipe.clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == 0.0  # scale never below 1


def test_custom_temperature_init():
    cfg = TrainConfig(train_data=("x",), model=SEED_MODEL, temperature_init=0.05)
    model = recipe.build_model(cfg, "cpu")
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(20.0), abs=1e-6)


def test_lr_schedule_warmup_then_cosine():
    lr = [recipe.lr_at(s, base_lr=1.0, warmup=4, total=14, min_lr=0.1) for s in range(15)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == pytest.approx(1.0)
    assert lr[9] == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)  # 0.55
    assert lr[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lr[4:]))


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    cfg = TrainConfig(train_data=("x",), model=SEED_MODEL)
    model = recipe.build_model(cfg, "cpu")
    groups = recipe.param_groups(model, 0.2)
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = {by_id[id(p)] for p in groups[0]["params"]}
    decay = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.2
    assert "logit_scale" in no_decay
    assert "visual.class_embedding" in no_decay
    assert "visual.transformer.resblocks.0.ln_1.weight" in no_decay
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in no_decay
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decay
    assert "token_embedding.weight" in decay
    assert "text_projection" in decay
    assert no_decay.isdisjoint(decay)
    assert no_decay | decay == set(by_id.values())


def test_gradient_accumulation_equals_one_big_batch():
    """Cached-feature accumulation gives the gradients of the whole contrastive batch."""
    from open_clip import ClipLoss

    cfg = TrainConfig(train_data=("x",), model=SEED_MODEL)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    t = torch.randint(1, 1000, (8, 32))
    grads = []
    for parts in (1, 2, 4):
        model = recipe.build_model(cfg, "cpu")
        model.zero_grad()
        loss = recipe.forward_backward(
            model,
            ClipLoss(),
            list(x.chunk(parts)),
            list(t.chunk(parts)),
            contextlib.nullcontext(),
            None,
        )
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    full_loss, full = grads[0]
    for loss, g in grads[1:]:
        assert loss == pytest.approx(full_loss, rel=1e-5)
        for name, value in full.items():
            torch.testing.assert_close(g[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_grad_clip_bounds_the_gradient_norm():
    """With SGD at lr 1 the update is the gradient: its norm is the clip value, not the raw norm."""
    from open_clip import ClipLoss

    cfg = TrainConfig(train_data=("x",), model=SEED_MODEL)
    torch.manual_seed(2)
    x = torch.randn(8, 3, 32, 32)
    t = torch.randint(1, 1000, (8, 32))
    for clip in (0.05, 0.0):
        model = recipe.build_model(cfg, "cpu")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        recipe.forward_backward(model, ClipLoss(), [x], [t], contextlib.nullcontext(), None)
        raw = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        norm = recipe.optimizer_step(model, optimizer, None, clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        step = float((before - after).norm())
        if clip:
            assert norm == pytest.approx(raw, rel=1e-4) and raw > 10 * clip
            assert step == pytest.approx(clip, rel=1e-3)
        else:  # 0 disables clipping: the whole gradient is applied
            assert norm == 0.0
            assert step == pytest.approx(raw, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Options


def test_flags_are_generated_from_the_dataclass(tmp_path):
    cfg = parse_config(
        [
            "--train-data",
            "a/{00000..00002}.tar",
            "b/",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--no-progress",
            "--eval-zeroshot",
            "cifar10=x.parquet",
        ]
    )
    assert cfg.train_data == ("a/{00000..00002}.tar", "b/")
    assert cfg.batch_size == 32 and cfg.lr == 1e-3 and cfg.progress is False
    assert cfg.eval_zeroshot == ("cifar10=x.parquet",)
    assert cfg.model == "wit-tiny"  # default
    (tmp_path / "c.yaml").write_text("epochs: 7\nbatch_size: 16\ntrain_data: [s/]\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--batch-size", "8"])
    assert (cfg.epochs, cfg.batch_size, cfg.train_data) == (7, 8, ("s/",))
    (tmp_path / "bad.yaml").write_text("epoch: 7\n")
    with pytest.raises(WitError, match="unknown option epoch"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag", "1"])
    with pytest.raises(WitError, match="batch_size must be an integer"):
        parse_config(["--batch-size", "many"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_data": ()}, "--train-data is required"),
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"precision": "fp8"}, "--precision"),
        (
            {"eval_retrieval_images": "imgs"},
            "--eval-retrieval-images needs --eval-retrieval-captions",
        ),
        ({"eval_retrieval_format": "xml"}, "--eval-retrieval-format must be one of auto, coco,"),
        ({"eval_suite_every": 5}, "--eval-suite-every needs --eval-suite"),
        ({"eval_suite": "s.yaml", "eval_suite_every": -1}, "--eval-suite-every must not be"),
        ({"min_lr": 1.0}, "--min-lr"),
    ],
)
def test_invalid_options_are_one_line_errors(kwargs, message):
    base = {"train_data": ("x",)}
    base.update(kwargs)
    with pytest.raises(WitError, match=message):
        validate(TrainConfig(**base))


# ---------------------------------------------------------------------------------------------
# Short runs: checkpoints, resume


@pytest.fixture(scope="module")
def small_shards(shared_data, tmp_path_factory):
    """256 Flickr8k training images in 4 shards of 64."""
    out = tmp_path_factory.mktemp("small-shards")
    return write_flickr_shards(shared_data, out, samples_per_shard=64, limit=256)


def _small_cfg(shards_dir, output, **kw):
    args = dict(
        train_data=(shards_dir,),
        output=str(output),
        model=SEED_MODEL,
        epochs=2,
        batch_size=32,
        workers=1,
        warmup=2,
        lr=1e-3,
        log_every=2,
        progress=False,
        plots=False,
        shuffle_buffer=50,
    )
    args.update(kw)
    return TrainConfig(**args)


def test_resume_state_maps_the_data_position(caplog):
    """Same layout: each worker continues after its own batches; another layout: the epoch's
    average fraction, with a warning; no position: the epoch's start."""
    ckpt = {
        "step": 11,
        "data_position": {
            "epoch": 1,
            "consumed": [[3, 5], [4, 4]],
            "samples_seen": 352,
            "workers": 2,
            "world_size": 2,
            "batch_size": 32,
        },
    }
    layout = dict(workers=2, world_size=2, batch_size=32)
    assert checkpoint.resume_state(ckpt, rank=1, **layout) == TrainState(11, 1, 352, [4, 4])
    assert checkpoint.resume_state(ckpt, rank=0, **layout) == TrainState(11, 1, 352, [3, 5])
    assert not caplog.records
    # One rank of 3 workers: 16 batches over 3 readers -> 5 each.
    got = checkpoint.resume_state(ckpt, workers=3, world_size=1, rank=0, batch_size=32)
    assert got == TrainState(11, 1, 352, [5, 5, 5])
    assert [r.getMessage() for r in caplog.records] == [
        "resume with a different workers/world size/batch size: data position is approximate"
    ]
    bare = checkpoint.resume_state({"step": 4}, workers=2, world_size=1, rank=0, batch_size=8)
    assert bare == TrainState(4, 0, 0, [0, 0])


def _weights(path):
    return models.read_checkpoint(path)["state_dict"]


def test_checkpoint_round_trip(small_shards, tmp_path):
    import open_clip

    summary = loop.train(_small_cfg(small_shards, tmp_path / "run", epochs=1, plots=True))
    assert summary["step"] == summary["total_steps"] == 8  # 256 samples / 32
    ckpt_path = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == models.CHECKPOINT_FORMAT
    assert ckpt["model_name"] == SEED_MODEL and ckpt["step"] == 8
    assert ckpt["data_position"] == {
        "epoch": 1,
        "consumed": [[0]],
        "samples_seen": 256,
        "workers": 1,
        "world_size": 1,
        "batch_size": 32,
    }
    assert ckpt["config"]["train_data"] == [small_shards]
    assert "optimizer" in ckpt and ckpt["optimizer"]["state"]

    # open_clip loads it directly (our configs registered), and so does wit_pipeline.models.
    models.register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms(SEED_MODEL, pretrained=str(ckpt_path))
    loaded = models.load_model(None, str(ckpt_path), device="cpu")
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[name], value), name
        assert torch.equal(loaded.model.state_dict()[name], value), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), loaded.model.encode_image(x))

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r["step"] for r in rows if r["type"] == "train"]
    assert steps == [2, 4, 6, 8]
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 for r in rows if r["type"] == "train")

    # A second run into the same output is refused unless it resumes.
    with pytest.raises(WitError, match="--resume latest"):
        loop.train(_small_cfg(small_shards, tmp_path / "run", epochs=1))
    # Resuming a finished run does nothing and keeps the weights.
    again = loop.train(_small_cfg(small_shards, tmp_path / "run", epochs=1, resume="latest"))
    assert again["step"] == 8
    after = _weights(ckpt_path)
    assert all(torch.equal(after[k], v) for k, v in ckpt["state_dict"].items())


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(small_shards, tmp_path):
    full = loop.train(_small_cfg(small_shards, tmp_path / "full"))
    assert full["step"] == 16
    # Same run, stopped after 11 steps (in the second epoch), then resumed.
    part = loop.train(_small_cfg(small_shards, tmp_path / "split", stop_after_steps=11))
    assert part["step"] == 11 and part["stopped_early"]
    ckpt = models.read_checkpoint(str(tmp_path / "split" / "checkpoints" / "latest.pt"))
    assert ckpt["step"] == 11
    assert ckpt["data_position"]["epoch"] == 1 and ckpt["data_position"]["consumed"] == [[3]]
    rest = loop.train(_small_cfg(small_shards, tmp_path / "split", resume="latest"))
    assert rest["step"] == 16 and rest["samples_seen"] == 16 * 32
    a = _weights(str(tmp_path / "full" / "checkpoints" / "latest.pt"))
    b = _weights(str(tmp_path / "split" / "checkpoints" / "latest.pt"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    rows = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    steps = [r["step"] for r in rows if r["type"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]


def test_resume_with_gradient_accumulation_reproduces_the_uninterrupted_run(small_shards, tmp_path):
    """--accum-freq 2: the data position counts micro-batches; stop then resume is bitwise equal."""
    kw = dict(batch_size=16, accum_freq=2)
    full = loop.train(_small_cfg(small_shards, tmp_path / "full", **kw))
    assert full["step"] == 16 and full["samples_seen"] == 16 * 32
    part = loop.train(_small_cfg(small_shards, tmp_path / "split", stop_after_steps=11, **kw))
    assert part["step"] == 11 and part["stopped_early"]
    ckpt = models.read_checkpoint(str(tmp_path / "split" / "checkpoints" / "latest.pt"))
    # 8 steps (16 micro-batches) per epoch: step 11 is 3 steps, 6 micro-batches, into epoch 1.
    assert ckpt["data_position"]["epoch"] == 1 and ckpt["data_position"]["consumed"] == [[6]]
    rest = loop.train(_small_cfg(small_shards, tmp_path / "split", resume="latest", **kw))
    assert rest["step"] == 16 and rest["samples_seen"] == 16 * 32
    a = _weights(str(tmp_path / "full" / "checkpoints" / "latest.pt"))
    b = _weights(str(tmp_path / "split" / "checkpoints" / "latest.pt"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def _colour_classes(root, per_class: int):
    """Class folders ``red`` and ``dark_blue`` of ``per_class`` plain images each."""
    from PIL import Image

    for name, rgb in (("red", (200, 20, 20)), ("dark_blue", (10, 10, 120))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), tuple(c + 10 * i for c in rgb)).save(
                root / name / f"{i}.jpg"
            )
    return root


def test_epoch_evaluation_writes_eval_rows_and_eval_png(small_shards, shared_data, tmp_path):
    """Zero-shot and retrieval after each epoch: `type: eval` rows (0-based epoch) and eval.png."""

    classes = _colour_classes(tmp_path / "colours", 3)
    images, captions = flickr_paths(shared_data)
    cfg = _small_cfg(
        small_shards,
        tmp_path / "run",
        batch_size=64,
        plots=True,
        eval_zeroshot=(f"colours={classes}",),
        eval_zeroshot_templates="simple",
        eval_retrieval_captions=captions,
        eval_retrieval_images=images,
        eval_retrieval_split="dev",
        eval_max_samples=20,
    )
    summary = loop.train(cfg)
    assert summary["step"] == 8  # 2 epochs of 256 / 64
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in rows if r["type"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 4), (1, 8)]
    # Train rows use the same 0-based epoch: the eval row follows the epoch's last train row.
    assert [(r["epoch"], r["step"]) for r in rows if r["type"] == "train"] == [
        (0, 2),
        (0, 4),
        (1, 6),
        (1, 8),
    ]
    keys = {
        "colours/top1",
        "colours/top5",
        "colours/mean_per_class_top1",
        *(f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
    }
    for r in evals:
        assert set(r["metrics"]) == keys
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
        assert r["metrics"]["colours/top5"] == 1.0  # 2 classes: always in the top 5
    assert summary["eval"] == evals[-1]["metrics"]
    assert (tmp_path / "run" / "eval.png").stat().st_size > 1000
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").exists()


def test_eval_suite_every_n_steps_writes_rows_and_the_final_table(
    small_shards, shared_data, tmp_path
):
    """`--eval-suite` every 3 steps: `eval_suite` rows at steps 3 and 6, the final weights' run
    at step 8, written as eval_suite/suite.{json,md,png}; a run ending on a suite step reuses it."""

    classes = _colour_classes(tmp_path / "colours", 2)
    images, captions = flickr_paths(shared_data)
    evals = tmp_path / "evals.yaml"
    evals.write_text(
        f"sets:\n"
        f"  colours: {{kind: zeroshot, path: {classes}, templates: simple}}\n"
        f"  flickr: {{kind: retrieval, captions: {captions}, images: {images}, split: dev,"
        f" max_images: 12}}\n"
    )
    cfg = _small_cfg(
        small_shards,
        tmp_path / "run",
        batch_size=64,
        plots=True,
        eval_suite=str(evals),
        eval_suite_every=3,
    )
    summary = loop.train(cfg)
    assert summary["step"] == 8
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval_suite"]
    assert [(r["step"], r["epoch"]) for r in rows] == [(3, 0), (6, 1), (8, 1)]
    keys = {
        "colours/top1",
        "colours/top5",
        "colours/mean_per_class_top1",
        "zeroshot_mean/top1",
        *(f"flickr/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
    }
    assert all(set(r["metrics"]) == keys for r in rows)
    assert rows[-1]["metrics"]["zeroshot_mean/top1"] == rows[-1]["metrics"]["colours/top1"]
    out = tmp_path / "run" / "eval_suite"
    doc = json.loads((out / "suite.json").read_text())
    assert doc["metrics"] == rows[-1]["metrics"] == summary["eval_suite"]
    assert (doc["step"], doc["model"]) == (8, SEED_MODEL)
    assert doc["sets"]["flickr"]["result"]["num_images"] == 12
    assert (out / "suite.md").read_text().startswith("| set | kind | samples | top-1 |")
    assert (out / "suite.png").stat().st_size > 1000
    assert (tmp_path / "run" / "eval_suite.png").stat().st_size > 1000
    # The last step is a suite step: one run there, not two.
    again = loop.train(
        _small_cfg(
            small_shards,
            tmp_path / "again",
            batch_size=64,
            epochs=1,
            eval_suite=str(evals),
            eval_suite_every=4,
        )
    )
    rows = [
        r for r in read_jsonl(tmp_path / "again" / "metrics.jsonl") if r["type"] == "eval_suite"
    ]
    assert [(r["step"], r["epoch"]) for r in rows] == [(4, 0)]
    assert again["eval_suite"] == rows[0]["metrics"]


def test_bf16_autocast_runs_on_cpu(small_shards, tmp_path):
    summary = loop.train(
        _small_cfg(small_shards, tmp_path / "bf16", precision="bf16", max_steps=2, log_every=1)
    )
    assert summary["step"] == 2
    rows = read_jsonl(tmp_path / "bf16" / "metrics.jsonl")
    assert rows[0]["type"] == "config" and rows[0]["precision"] == "bf16"
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    after = _weights(str(tmp_path / "bf16" / "checkpoints" / "latest.pt"))
    before = recipe.build_model(_small_cfg(small_shards, tmp_path / "x"), "cpu").state_dict()
    # Weights stay fp32 (autocast only lowers the matmuls), finite, and they moved.
    assert all(v.dtype == before[k].dtype and torch.isfinite(v).all() for k, v in after.items())
    assert not torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])


def _synthetic_shards(directory, shard_sizes, corrupt=()):
    """Shards of distinct solid-colour JPEGs with distinct captions; keys in ``corrupt`` get bytes
    that are not an image."""
    import io

    import pyarrow as pa
    from PIL import Image

    from wit_pipeline import shards

    infos = []
    for shard_id, n in enumerate(shard_sizes):
        samples = []
        for i in range(n):
            key = f"s{shard_id}i{i:03d}"
            buf = io.BytesIO()
            Image.new("RGB", (40, 36), (37 * i % 256, 91 * shard_id % 256, 5 * i % 256)).save(
                buf, format="JPEG"
            )
            image = b"\xff\xd8 not a jpeg" if key in corrupt else buf.getvalue()
            caption = f"picture {i} of shard {shard_id}"
            samples.append(shards.Sample(key, image, caption, {"captions": [caption]}))
        infos.append(
            shards.write_shard(str(directory), shard_id, samples, pa.table({"key": [0] * n}))
        )
    shards.write_manifest(str(directory), infos)
    return str(directory)


def test_a_batch_without_any_decodable_image_makes_no_update(tmp_path):
    corrupt = {f"s0i{i:03d}" for i in range(4)}
    data = _synthetic_shards(tmp_path / "shards", [8], corrupt=corrupt)
    summary = loop.train(
        _small_cfg(
            data, tmp_path / "run", batch_size=4, epochs=1, workers=0, shuffle_buffer=0,
            log_every=1,
        )
    )  # fmt: skip
    assert summary["step"] == 2 and summary["samples_seen"] == 4
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert [(r["loss"] is None, r["samples_skipped"], r["samples_seen"]) for r in rows] == [
        (True, 4, 0),
        (False, 0, 4),
    ]


def test_resume_errors(small_shards, tmp_path):
    with pytest.raises(WitError, match="checkpoint to resume not found"):
        loop.train(_small_cfg(small_shards, tmp_path / "r", resume="latest"))
    with pytest.raises(WitError, match="unknown model"):
        loop.train(_small_cfg(small_shards, tmp_path / "m", model="no-such-model"))
    with pytest.raises(WitError, match="training shard not found"):
        loop.train(_small_cfg(str(tmp_path / "missing.tar"), tmp_path / "d"))


def test_command_line_entry_point(small_shards, tmp_path, capsys):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-m", "wit_pipeline.train", "--train-data", small_shards,
         "--model", SEED_MODEL, "--batch-size", "64", "--max-steps", "2", "--workers", "0",
         "--output", str(tmp_path / "cli"), "--no-progress", "--no-plots"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["step"] == 2 and summary["total_steps"] == 2
    # User errors: one line on stderr, exit status 2 (checked in-process: same main()).
    assert loop.main(["--train-data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wit train: error: training shard not found: {tmp_path / 'nope'}"]


def _torchrun(shards_dir, output, *args):
    """``wit_pipeline.train`` on two CPU ranks (gloo) under torchrun; returns the process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "wit_pipeline.train", "--train-data", shards_dir, "--model", SEED_MODEL,
         "--epochs", "1", "--device", "cpu", "--output", str(output), "--no-progress",
         "--no-plots", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def test_ddp_under_torchrun_on_cpu(small_shards, tmp_path):
    """Two ranks (gloo): each reads its own shards, features are gathered, one checkpoint.

    Run twice: 8 steps of one micro-batch of 16, and 8 steps of two micro-batches of 8 per rank
    (``--accum-freq 2``: backward under ``no_sync`` but for the last micro-batch). Both see the
    same samples in the same contrastive batches, so they end with the same weights.
    """
    runs = {}
    for accum, batch in ((1, 16), (2, 8)):
        out = _torchrun(
            small_shards, tmp_path / f"ddp{accum}", "--batch-size", str(batch), "--accum-freq",
            str(accum), "--workers", "1", "--log-every", "2", "--lr", "1e-3", "--warmup", "2",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        ckpt = models.read_checkpoint(str(tmp_path / f"ddp{accum}" / "checkpoints" / "latest.pt"))
        # 4 shards of 64 over 2 ranks x 1 worker: 128 samples per rank, 8 steps of 16 per rank.
        assert ckpt["step"] == 8
        assert ckpt["data_position"]["world_size"] == 2
        assert ckpt["data_position"]["samples_seen"] == 8 * 16 * 2
        assert not any(k.startswith("module.") for k in ckpt["state_dict"])
        rows = read_jsonl(tmp_path / f"ddp{accum}" / "metrics.jsonl")
        assert [r["step"] for r in rows if r["type"] == "train"] == [2, 4, 6, 8]
        runs[accum] = ckpt["state_dict"]
    # The temperature is learned under accumulation too (its gradient reaches DDP's reduction).
    assert float(runs[2]["logit_scale"]) != pytest.approx(math.log(1 / 0.07), abs=1e-4)
    for name, value in runs[1].items():
        torch.testing.assert_close(runs[2][name], value, rtol=1e-4, atol=5e-5, msg=name)


def test_ddp_with_an_undecodable_image_keeps_ranks_in_step(tmp_path):
    """One corrupt JPEG: its rank's batch is one short, the other rank trims to match."""
    data = _synthetic_shards(tmp_path / "shards", [32, 32], corrupt={"s0i007"})
    out = _torchrun(
        data, tmp_path / "run", "--batch-size", "16", "--workers", "1", "--log-every", "1"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = models.read_checkpoint(str(tmp_path / "run" / "checkpoints" / "latest.pt"))
    assert ckpt["step"] == 2
    assert ckpt["data_position"]["samples_seen"] == (16 + 15) * 2
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert sorted((r["samples_skipped"], r["samples_trimmed"]) for r in rows) == [(0, 0), (1, 1)]
    assert rows[-1]["samples_seen"] == 62


# ---------------------------------------------------------------------------------------------
# It learns (real data)


def test_training_on_flickr8k_measurably_learns(trained_seed, shared_data):
    """Dev-split retrieval after 279 steps of wit-nano, against the untrained model and chance."""
    images, captions = flickr_paths(shared_data)
    run = seed_run_dir(trained_seed)
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert losses[-1] < losses[0] - 0.4  # 4.16 (= ln 64) at the start

    def recall(pretrained):
        loaded = models.load_model(SEED_MODEL, pretrained, device="cpu")
        return evaluate.run_retrieval(
            loaded.model, loaded.preprocess, loaded.tokenizer, dev, device="cpu"
        )

    dev = retrieval_sets.load_retrieval_set(
        captions, images=images, options=retrieval_sets.CaptionOptions(split="dev")
    )

    trained = recall(trained_seed)
    untrained = recall(None)
    assert trained["num_images"] == 1000 and trained["num_texts"] == 5000
    # Chance: R@10 = 10/1000 = 1% for text-to-image.
    assert trained["text_to_image_R@10"] >= 0.03
    assert trained["image_to_text_R@10"] >= 0.025
    assert trained["text_to_image_R@10"] >= 2.5 * max(untrained["text_to_image_R@10"], 0.01)
    assert (
        trained["text_to_image_R@1"]
        <= trained["text_to_image_R@5"]
        <= trained["text_to_image_R@10"]
    )
    assert os.path.getsize(os.path.join(run, "loss.png")) > 1000
