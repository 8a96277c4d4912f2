"""Zero-shot and retrieval evaluation: exact metrics, sets, templates, and the `wit eval` command."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clip_helpers import SEED_MODEL, flickr_paths, trained_seed
from PIL import Image

from wit_pipeline import cli
from wit_pipeline.errors import WitError
from wit_pipeline.train import caption_sets, evaluate

__all__ = ["trained_seed"]

torch.set_num_threads(2)

# CIFAR-10's class names in label order.
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_retrieval_metrics_exact():
    images = torch.eye(3)
    texts = torch.stack(
        [_unit(1, 0, 0), _unit(0.2, 0.9, 0.1), _unit(0.1, 0.3, 0.95), _unit(0.5, 0.1, 0.8)]
    )
    owner = [0, 0, 1, 2]
    got = evaluate.retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert got == {
        "image_to_text_R@1": pytest.approx(1 / 3),
        "image_to_text_R@2": 1.0,
        "num_images": 3,
        "num_texts": 4,
        "text_to_image_R@1": 0.5,
        "text_to_image_R@2": 1.0,
    }


def test_zeroshot_metrics_exact():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0: top1 hit
            [0.2, 0.7, 0.1],  # label 2: miss, top2 miss
            [0.1, 0.3, 0.6],  # label 2: hit
            [0.5, 0.4, 0.1],  # label 1: miss, top2 hit
        ]
    )
    got = evaluate.zeroshot_metrics(logits, [0, 2, 2, 1], ["cat", "dog", "bird"], ks=(1, 2))
    assert got == {
        "num_samples": 4,
        "num_classes": 3,
        "top1": 0.5,
        "top2": 0.75,
        "per_class_top1": {"cat": 1.0, "dog": 0.0, "bird": 0.5},
        "mean_per_class_top1": 0.5,
    }


def test_templates():
    imagenet = evaluate.resolve_templates("imagenet")
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}."
    cifar = evaluate.resolve_templates("auto", "cifar10")
    assert (
        len(cifar) == 18
        and cifar[0] == "a photo of a {}."
        and cifar[-1] == "a photo of the big {}."
    )
    assert evaluate.resolve_templates("auto", "my-set") == imagenet
    assert evaluate.resolve_templates("simple") == ["a photo of a {}."]


def test_templates_from_a_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\nitap of a {c}.\na sketch of the {}.\n")
    assert evaluate.resolve_templates(str(f)) == ["itap of a {}.", "a sketch of the {}."]
    f.write_text("no placeholder\n")
    with pytest.raises(WitError, match="exactly one"):
        evaluate.resolve_templates(str(f))
    with pytest.raises(WitError, match="unknown templates"):
        evaluate.resolve_templates("imagenett")


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_labelled_sets_from_parquet_and_class_folders(tmp_path):
    t = pa.table(
        {"img": [_png((i, 0, 0)) for i in range(4)], "y": ["sea_lion", "cat", "cat", "sea_lion"]}
    )
    pq.write_table(t, tmp_path / "pets.parquet")
    ds = evaluate.load_labelled_set(
        str(tmp_path / "pets.parquet"), image_column="img", label_column="y"
    )
    assert (ds.name, ds.classnames, ds.labels) == ("pets", ["cat", "sea lion"], [1, 0, 0, 1])
    with pytest.raises(WitError, match="no column 'image'"):
        evaluate.load_labelled_set(str(tmp_path / "pets.parquet"))
    pq.write_table(pa.table({"image": [_png((0, 0, 0))], "label": [3]}), tmp_path / "ints.parquet")
    with pytest.raises(WitError, match="--classnames"):
        evaluate.load_labelled_set(str(tmp_path / "ints.parquet"))
    ds = evaluate.load_labelled_set(str(tmp_path / "ints.parquet"), classnames=["a", "b", "c", "d"])
    assert ds.labels == [3]
    for cls, n in (("golden_retriever", 2), ("tabby", 1)):
        (tmp_path / "folders" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "folders" / cls / f"{i}.png").write_bytes(_png((i, i, i)))
    ds = evaluate.load_labelled_set(str(tmp_path / "folders"))
    assert ds.classnames == ["golden retriever", "tabby"] and ds.labels == [0, 0, 1]
    with pytest.raises(WitError, match="evaluation set not found"):
        evaluate.load_labelled_set(str(tmp_path / "nope.parquet"))


def test_cifar10_labels_use_the_canonical_class_order(shared_data):
    ds = evaluate.load_labelled_set(str(shared_data / "cifar10" / "test.parquet"), max_samples=50)
    assert ds.name == "cifar10"
    assert ds.classnames == CIFAR10_CLASSES
    assert len(ds.images) == 50 and len(set(ds.labels)) > 5


def test_captions_tsv(tmp_path, shared_data):
    _, captions = flickr_paths(shared_data)
    dev = caption_sets.read_captions_tsv(captions, split="dev")
    assert len(dev) == 1000 and all(len(x.captions) == 5 for x in dev)
    (tmp_path / "bad.tsv").write_text("image\tcaption\na.jpg\thello\n")
    with pytest.raises(WitError, match="missing column"):
        caption_sets.read_captions_tsv(str(tmp_path / "bad.tsv"))
    with pytest.raises(WitError, match="no captions for split 'test'"):
        caption_sets.read_captions_tsv(captions, split="test")


# ---------------------------------------------------------------------------------------------
# `wit eval` end to end with a trained checkpoint


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_wit_eval_zeroshot_on_a_cifar10_subset(trained_seed, shared_data, capsys, tmp_path):
    """`wit eval zeroshot` on 2,000 evenly spaced images of the 10,000 of CIFAR-10 test.

    A subset, to keep the test short: the whole test set is evaluated by
    benchmarks/bench_train_budget.py (its default), not by the tests.
    """
    rc, out, err = _run(
        [
            "eval",
            "zeroshot",
            "--checkpoint",
            trained_seed,
            "--model",
            SEED_MODEL,
            "--dataset",
            str(shared_data / "cifar10" / "test.parquet"),
            "--max-samples",
            "2000",
            "--output",
            str(tmp_path / "z.json"),
        ],
        capsys,
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "z.json").read_text())
    assert result["num_samples"] == 2000 and result["num_classes"] == 10
    assert result["num_templates"] == 18 and result["dataset"] == "cifar10"
    assert set(result["per_class_top1"]) == set(CIFAR10_CLASSES)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["top5"] > result["top1"]
    # Mean per-class accuracy equals top-1 on this balanced set.
    assert result["mean_per_class_top1"] == pytest.approx(result["top1"], abs=1e-6)


def test_wit_eval_retrieval_prints_recalls(trained_seed, shared_data, capsys):
    images, captions = flickr_paths(shared_data)
    rc, out, err = _run(
        [
            "eval",
            "retrieval",
            "--checkpoint",
            trained_seed,
            "--images",
            images,
            "--captions",
            captions,
            "--split",
            "dev",
            "--max-images",
            "200",
        ],
        capsys,
    )
    assert rc == 0, err
    result = json.loads(out)
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert 0.0 <= result[f"{direction}_R@{k}"] <= 1.0
    assert result["num_images"] == 200 and result["num_texts"] == 1000
    assert result["model"] == SEED_MODEL  # read from the checkpoint


def test_wit_eval_errors_are_one_line(trained_seed, shared_data, capsys, tmp_path):
    images, captions = flickr_paths(shared_data)
    base = ["eval", "retrieval", "--images", images, "--captions", captions, "--split", "dev"]
    rc, _, err = _run([*base, "--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert rc == 2 and err.strip() == f"wit: error: checkpoint not found: {tmp_path / 'missing.pt'}"
    rc, _, err = _run([*base, "--checkpoint", trained_seed, "--model", "wit-tiny"], capsys)
    assert (
        rc == 2
        and "holds a wit-nano model, not wit-tiny" in err
        and len(err.strip().splitlines()) == 1
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    rc, _, err = _run(
        [*base, "--checkpoint", str(tmp_path / "junk.pt"), "--model", "wit-nano"], capsys
    )
    assert (
        rc == 2
        and err.startswith("wit: error: cannot read checkpoint")
        and len(err.strip().splitlines()) == 1
    )
    # A plain state dict of another architecture: open_clip format, wrong shapes.
    import open_clip

    from wit_pipeline import models

    models.register_model_configs()
    torch.save(
        {"state_dict": open_clip.create_model("wit-tiny").state_dict()}, tmp_path / "tiny.pt"
    )
    rc, _, err = _run(
        [*base, "--checkpoint", str(tmp_path / "tiny.pt"), "--model", "wit-nano"], capsys
    )
    assert rc == 2 and "does not fit model wit-nano" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run([*base, "--checkpoint", "openai", "--model", "wit-nano"], capsys)
    assert rc == 2 and "neither a file nor a known tag" in err
