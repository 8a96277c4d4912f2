"""Retrieval caption sets in every format (COCO, Karpathy, CSV, TSV, Parquet, JSONL, gzip), with
recalls known by hand (tests/caption_fixtures.py), splits, columns, and their errors, exactly."""

from __future__ import annotations

import json
import os
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from caption_fixtures import (
    EXPECTED,
    N_CAPTIONS,
    N_IMAGES,
    FakeClip,
    caption,
    fake_tokenizer,
    image_name,
    long_rows,
    png,
    write_coco,
    write_images,
    write_karpathy,
    write_table,
)

from wit_pipeline import cli
from wit_pipeline.errors import WitError
from wit_pipeline.train import evaluate
from wit_pipeline.train import retrieval_sets as rs
from wit_pipeline.train.config import TrainConfig

RECALLS = {k: v for k, v in EXPECTED.items() if "R@" in k}


def _recalls(dataset: rs.RetrievalSet) -> dict:
    model = FakeClip()
    out = evaluate.run_retrieval(
        model, evaluate.eval_transform(model), fake_tokenizer, dataset, device="cpu"
    )
    return out


def _exact(got: dict, want: dict = EXPECTED) -> None:
    # Fractions of 60 texts or 12 images: 1e-6 apart is the same fraction.
    assert {k: got[k] for k in want} == {k: pytest.approx(v, abs=1e-6) for k, v in want.items()}


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images", range(18))


def _load(path, images="", **options):
    return rs.load_retrieval_set(
        str(path), images=str(images), options=rs.CaptionOptions(**options)
    )


def _error(path, images="", **options) -> str:
    with pytest.raises(WitError) as e:
        _load(path, images, **options)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# The metric itself


def test_recall_follows_clip_and_open_clip_on_hand_made_embeddings():
    # 3 images e_0..e_2 and 4 unit texts whose similarities to them are given exactly (a 4th,
    # slack coordinate makes each text unit length). Texts 0 and 1 are image 0's captions.
    sims = [[0.9, 0.4, 0.0], [0.5, 0.6, 0.0], [0.0, 0.3, 0.8], [0.1, 0.0, 0.7]]
    texts = torch.tensor(
        [[*row, (1 - sum(x * x for x in row)) ** 0.5] for row in sims], dtype=torch.float64
    )
    images = torch.eye(4, dtype=torch.float64)[:3]
    got = evaluate.retrieval_metrics(images, texts, [0, 0, 1, 2], ks=(1, 2, 3))
    # text -> image (rows): text 0 ranks image 0 first, text 1 second (after image 1), text 2
    # second (after image 2), text 3 first: R@1 = 2/4, R@2 = R@3 = 1.
    # image -> text (columns): image 0: text 0 (its own) first; image 1: texts 1, 0 (image 0's),
    # then text 2 (its own) third; image 2: text 2 (image 1's), then text 3 (its own) second:
    # R@1 = 1/3, R@2 = 2/3, R@3 = 1.
    assert got == {
        "text_to_image_R@1": 0.5,
        "text_to_image_R@2": 1.0,
        "text_to_image_R@3": 1.0,
        "image_to_text_R@1": pytest.approx(1 / 3, abs=1e-7),
        "image_to_text_R@2": pytest.approx(2 / 3, abs=1e-7),
        "image_to_text_R@3": 1.0,
        "num_images": 3,
        "num_texts": 4,
    }


# ---------------------------------------------------------------------------------------------
# Every format gives the same set and the same recalls


def test_coco_captions_five_per_image(tmp_path, images):
    path = write_coco(tmp_path / "captions_val2017.json")
    ds = _load(path, images)
    assert (ds.name, ds.format, ds.split) == ("captions_val2017", "coco", "all")
    assert ds.images == [os.path.join(images, image_name(g)) for g in range(N_IMAGES)]
    assert ds.captions[3] == tuple(f"{caption(3, c)}." for c in range(N_CAPTIONS))
    assert ds.skipped == {"empty_captions": 1, "images_without_captions": 1}
    got = _recalls(ds)
    _exact(got)
    assert (got["format"], got["split"], got["skipped"]) == ("coco", "all", ds.skipped)
    gz = write_coco(tmp_path / "captions_val2017.json.gz", gz=True)
    assert _load(gz, images).captions == ds.captions


def test_karpathy_split_file_defaults_to_test_and_joins_filepath(tmp_path):
    images = write_images(tmp_path / "coco" / "val2014", range(18))
    path = write_karpathy(tmp_path / "dataset_coco.json")
    ds = _load(path, tmp_path / "coco")
    assert (ds.format, ds.split, len(ds.images)) == ("karpathy", "test", 12)
    assert ds.images[0] == os.path.join(str(tmp_path / "coco"), "val2014", image_name(0))
    assert ds.images[0] == os.path.join(images, image_name(0))
    assert ds.captions[0][0] == "photo 0 caption 0 ."
    _exact(_recalls(ds))
    # val: images 12 and 13; caption 0 of 13 ranks 12 first (a hard negative), and is the only
    # text above image 12's own captions in its column.
    val = _load(path, tmp_path / "coco", split="val")
    _exact(
        _recalls(val),
        {
            "text_to_image_R@1": 9 / 10,
            "image_to_text_R@1": 1 / 2,
            "text_to_image_R@5": 1.0,
            "image_to_text_R@5": 1.0,
            "num_images": 2,
            "num_texts": 10,
        },
    )
    assert len(_load(path, tmp_path / "coco", split="restval").images) == 1
    # Flickr30k's files have no filepath: names are relative to the folder.
    flickr = write_karpathy(tmp_path / "dataset_flickr30k.json", filepath="")
    _exact(_recalls(_load(flickr, images)))


def test_csv_with_named_columns_and_a_split_column(tmp_path, images):
    rows = [*long_rows(lambda g: "test"), (image_name(14), caption(14, 0), "train")]
    path = write_table(tmp_path / "pairs.csv", ["photo", "description", "part"], rows)
    ds = _load(path, images, image_column="photo", caption_column="description", split_column="part", split="test")  # fmt: skip
    assert ds.captions[0][1] == 'photo 0 caption 1, a "red" square'
    assert ds.columns == {"image": "photo", "caption": "description", "split": "part"}
    _exact(_recalls(ds))


def test_csv_and_jsonl_with_detected_columns(tmp_path, images):
    rows = long_rows(lambda g: "test" if g < N_IMAGES else "train")
    path = write_table(tmp_path / "pairs.csv", ["file_name", "text", "split"], rows)
    ds = _load(path, images)  # one split: every row
    assert (ds.columns, ds.split) == (
        {"image": "file_name", "caption": "text", "split": "split"},
        "test",
    )
    _exact(_recalls(ds))
    # JSON lines with absolute paths: no folder needed.
    lines = [json.dumps({"image": os.path.join(images, im), "caption": cap}) for im, cap, _ in rows]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("\n".join(lines) + "\n")
    ds = _load(jl)
    assert (ds.format, ds.split, ds.columns) == (
        "jsonl",
        "all",
        {"image": "image", "caption": "caption"},
    )
    _exact(_recalls(ds))


def test_the_projects_tsv_with_only_a_test_split(tmp_path, images):
    # The case: captions.tsv holding only `test` needs no --split.
    rows = [
        (image_name(g), "test", c, caption(g, c))
        for g in range(N_IMAGES)
        for c in reversed(range(N_CAPTIONS))  # caption_index orders them back
    ]
    path = write_table(tmp_path / "captions.tsv", ["image", "split", "caption_index", "caption"], rows, sep="\t")  # fmt: skip
    ds = _load(path, images)
    assert (ds.name, ds.format, ds.split) == (tmp_path.name, "tsv", "test")  # captions.tsv's folder
    assert ds.captions[0] == tuple(caption(0, c) for c in range(N_CAPTIONS))
    _exact(_recalls(ds))


def test_parquet_with_embedded_images_needs_no_folder(tmp_path):
    # Hugging Face's layout (nlphuji/flickr30k): an Image struct and a list of captions per row.
    table = pa.table(
        {
            "image": [{"bytes": png(g), "path": None} for g in range(N_IMAGES)],
            "caption": [[caption(g, c) for c in range(N_CAPTIONS)] for g in range(N_IMAGES)],
            "split": ["test"] * N_IMAGES,
            "img_id": list(range(N_IMAGES)),
        }
    )
    pq.write_table(table, tmp_path / "flickr30k.parquet")
    ds = _load(tmp_path / "flickr30k.parquet")
    assert ds.images[0] == png(0) and ds.format == "parquet"
    _exact(_recalls(ds))
    # One row per caption with the bytes repeated: rows of the same image are grouped.
    long = pa.table(
        {
            "jpg": [png(g) for g in range(N_IMAGES) for _ in range(N_CAPTIONS)],
            "txt": [caption(g, c) for g in range(N_IMAGES) for c in range(N_CAPTIONS)],
        }
    )
    pq.write_table(long, tmp_path / "long.parquet")
    ds = _load(tmp_path / "long.parquet", image_column="jpg")
    assert (len(ds.images), ds.columns) == (12, {"image": "jpg", "caption": "txt"})
    _exact(_recalls(ds))


def test_max_images_keeps_evenly_spaced_images(tmp_path, images):
    path = write_coco(tmp_path / "c.json")
    ds = rs.load_retrieval_set(str(path), images=images, max_images=4)
    assert ds.images == [os.path.join(images, image_name(g)) for g in (0, 3, 7, 11)]


# ---------------------------------------------------------------------------------------------
# Errors, exactly


def test_split_errors(tmp_path, images):
    rows = long_rows(lambda g: "test" if g < 6 else "train")
    two = write_table(tmp_path / "two.csv", ["image", "caption", "split"], rows)
    assert _error(two, images) == f"{two}: several splits (test, train); choose one with --split"
    assert _error(two, images, split="dev") == f"{two}: no split 'dev' (splits: test, train)"
    karpathy = write_karpathy(tmp_path / "k.json")
    assert _error(karpathy, images, split="dev") == (
        f"{karpathy}: no split 'dev' (splits: restval, test, train, val)"
    )
    no_test = write_karpathy(tmp_path / "k2.json", splits={"train": (0, 1), "val": (2,)})
    assert (
        _error(no_test, images)
        == f"{no_test}: several splits (train, val); choose one with --split"
    )
    coco = write_coco(tmp_path / "c.json")
    assert _error(coco, images, split="test") == (
        f"{coco}: no split 'test' (the file has no splits: leave --split out to use every image)"
    )


def test_column_errors(tmp_path, images):
    path = write_table(tmp_path / "p.csv", ["photo", "description", "part"], long_rows())
    assert _error(path, images) == (
        f"{path}: no image column among the usual names (columns: photo, description, part); "
        "name it with --image-column"
    )
    assert _error(path, images, image_column="photo") == (
        f"{path}: no caption column among the usual names (columns: photo, description, part); "
        "name it with --caption-column"
    )
    assert _error(path, images, image_column="picture") == (
        f"{path}: no image column 'picture' (columns: photo, description, part)"
    )
    assert _error(path, images, image_column="photo", caption_column="description", split_column="split") == (
        f"{path}: no split column 'split' (columns: photo, description, part)"
    )  # fmt: skip


def test_file_errors(tmp_path, images):
    coco = write_coco(tmp_path / "c.json")
    assert (
        _error(coco)
        == f"{coco} names image files (img_00.png, ...): give their folder with --images"
    )
    os.remove(os.path.join(images, image_name(5)))
    assert _error(coco, images) == (
        f"1 image(s) of {coco} missing, e.g. {os.path.join(images, image_name(5))}"
    )
    assert _error(coco, images, format="karpathy") == f"{coco}: not a Karpathy split file"
    other = tmp_path / "o.json"
    other.write_text('{"images": [], "categories": []}')
    assert _error(other) == (
        f"{other}: not a COCO caption file (images + annotations) or a Karpathy split file "
        "(images with sentences)"
    )
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))  # fmt: skip
    assert _error(inst) == (
        f"{inst}: COCO annotations without 'caption' (instances or keypoints, not captions?)"
    )
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 7, "caption": "x"}]}))  # fmt: skip
    assert _error(orphan) == f"{orphan}: annotation 5 names image_id 7, not in images"
    assert _error(tmp_path / "nope.json") == f"captions file not found: {tmp_path / 'nope.json'}"
    assert _error(coco, format="xml") == (
        "--captions-format must be one of auto, coco, karpathy, csv, tsv, parquet, jsonl"
    )


# ---------------------------------------------------------------------------------------------
# The command and the trainer read the same files


def test_wit_eval_retrieval_reads_coco_and_named_columns(tmp_path, images, monkeypatch, capsys):
    from wit_pipeline.cli import eval as eval_cli

    model = FakeClip()
    loaded = types.SimpleNamespace(
        model=model,
        preprocess=evaluate.eval_transform(model),
        tokenizer=fake_tokenizer,
        device="cpu",
        model_name="fake",
    )
    monkeypatch.setattr(eval_cli, "_load", lambda args: loaded)
    coco = write_coco(tmp_path / "captions_val2017.json")
    base = ["eval", "retrieval", "--checkpoint", "x.pt"]
    assert cli.main([*base, "--captions", coco, "--images", images]) == 0
    got = json.loads(capsys.readouterr().out)
    _exact(got)
    assert (got["format"], got["split"], got["dataset"]) == ("coco", "all", "captions_val2017")
    rows = [*long_rows(lambda g: "test"), (image_name(14), caption(14, 0), "train")]
    table = write_table(tmp_path / "pairs.txt", ["photo", "description", "part"], rows)
    argv = [
        *base, "--captions", table, "--images", images, "--captions-format", "csv",
        "--image-column", "photo", "--caption-column", "description", "--split-column", "part",
        "--split", "test",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    _exact(json.loads(capsys.readouterr().out))
    assert cli.main([*base, "--captions", coco, "--images", images, "--split", "val"]) == 2
    assert capsys.readouterr().err == (
        f"wit: error: {coco}: no split 'val' (the file has no splits: leave --split out to use "
        "every image)\n"
    )


def test_the_trainers_evaluator_reads_karpathy_and_names_its_flags(tmp_path):
    write_images(tmp_path / "coco" / "val2014", range(18))
    path = write_karpathy(tmp_path / "dataset_coco.json")
    cfg = TrainConfig(
        train_data=("x",),
        eval_retrieval_captions=path,
        eval_retrieval_images=str(tmp_path / "coco"),
    )
    evaluator = evaluate.EpochEvaluator(cfg)
    got = evaluator(FakeClip(), fake_tokenizer, "cpu")
    assert got == {f"retrieval/{k}": pytest.approx(v, abs=1e-6) for k, v in RECALLS.items()}
    two = write_table(tmp_path / "two.csv", ["image", "caption", "split"], long_rows(lambda g: "ab"[g % 2]))  # fmt: skip
    with pytest.raises(WitError) as e:
        evaluate.EpochEvaluator(TrainConfig(train_data=("x",), eval_retrieval_captions=two))
    assert str(e.value) == f"{two}: several splits (a, b); choose one with --eval-retrieval-split"
    with pytest.raises(WitError) as e:
        evaluate.EpochEvaluator(
            TrainConfig(train_data=("x",), eval_retrieval_captions=two, eval_retrieval_split="a")
        )
    assert str(e.value) == (
        f"{two} names image files (img_00.png, ...): give their folder with --eval-retrieval-images"
    )
