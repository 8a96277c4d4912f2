"""`wit eval suite`: suite files and --set, exact metrics on a fake CLIP whose answers are known
(tests/caption_fixtures.py), the JSON, Markdown table and plot, and a real tiny checkpoint."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from caption_fixtures import (
    EXPECTED,
    FakeClip,
    fake_tokenizer,
    png,
    write_coco,
    write_images,
    write_karpathy,
)

from wit_pipeline import cli
from wit_pipeline.errors import WitError
from wit_pipeline.train import evaluate, suite

torch.set_num_threads(2)


def _class_folders(root, members):
    """Class folders ``photo_G_caption_1`` holding the images of the given indices."""
    for g, indices in members.items():
        folder = root / f"photo_{g}_caption_1"
        folder.mkdir(parents=True)
        for n, i in enumerate(indices):
            (folder / f"{n}.png").write_bytes(png(i))
    return str(root)


@pytest.fixture
def files(tmp_path):
    """Two zero-shot sets and two retrieval sets whose metrics are known by hand, and a suite
    file naming them."""
    images = write_images(tmp_path / "images", range(18))
    coco = write_coco(tmp_path / "captions_val2017.json")
    karpathy = write_karpathy(tmp_path / "dataset_coco.json", filepath="")
    # Class g's text is "photo g caption 1": image i is predicted class i (0.05 against 0).
    # Folders: class 0 holds images 0 and 1, class 3 images 3 and 0: 4 of 6 right, per class
    # 1/2, 1, 1, 1/2 (mean 3/4).
    folders = _class_folders(tmp_path / "shapes", {0: [0, 1], 1: [1], 2: [2], 3: [3, 0]})
    # Parquet: image 2 labelled class 0 is the one miss: 4 of 5, per class 1/2, 1, 1, 1.
    labels = [f"photo_{g}_caption_1" for g in (0, 1, 2, 3, 0)]
    pq.write_table(
        pa.table({"image": [png(i) for i in (0, 1, 2, 3, 2)], "label": labels}),
        tmp_path / "squares.parquet",
    )
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n")
    config = tmp_path / "evals.yaml"
    config.write_text(
        f"sets:\n"
        f"  shapes:\n    kind: zeroshot\n    path: {folders}\n    templates: {templates}\n"
        f"  squares:\n    kind: zeroshot\n    path: {tmp_path / 'squares.parquet'}\n"
        f"    templates: {templates}\n"
        f"  coco:\n    kind: retrieval\n    captions: {coco}\n    images: {images}\n"
    )
    return {
        "images": images,
        "coco": coco,
        "karpathy": karpathy,
        "folders": folders,
        "config": str(config),
        "templates": str(templates),
    }


# The metrics of the fixture's sets, by hand (see the fixture and caption_fixtures.py).
HAND = {
    "shapes/top1": 4 / 6,
    "shapes/top5": 1.0,
    "shapes/mean_per_class_top1": 3 / 4,
    "squares/top1": 4 / 5,
    "squares/top5": 1.0,
    "squares/mean_per_class_top1": 7 / 8,
    **{f"coco/{k}": v for k, v in EXPECTED.items() if "R@" in k},
    # Karpathy val: images 12 and 13 (caption 0 of 13 puts 12 first).
    "val/image_to_text_R@1": 1 / 2,
    "val/image_to_text_R@5": 1.0,
    "val/image_to_text_R@10": 1.0,
    "val/text_to_image_R@1": 9 / 10,
    "val/text_to_image_R@5": 1.0,
    "val/text_to_image_R@10": 1.0,
    "zeroshot_mean/top1": (4 / 6 + 4 / 5) / 2,
}

TABLE = """\
| set | kind | samples | top-1 | top-5 | mean per class | I→T R@1 | I→T R@5 | I→T R@10 | T→I R@1 | T→I R@5 | T→I R@10 |
|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| shapes | zeroshot | 6 | 66.67 | 100.00 | 75.00 |  |  |  |  |  |  |
| squares | zeroshot | 5 | 80.00 | 100.00 | 87.50 |  |  |  |  |  |  |
| coco | retrieval | 12 img / 60 txt |  |  |  | 8.33 | 41.67 | 83.33 | 81.67 | 88.33 | 96.67 |
| val | retrieval | 2 img / 10 txt |  |  |  | 50.00 | 100.00 | 100.00 | 90.00 | 100.00 | 100.00 |
| **mean zero-shot top-1** |  |  | **73.33** |  |  |  |  |  |  |  |  |
"""


def test_a_suite_on_a_model_with_known_answers(files, tmp_path):
    s = suite.Suite.from_file(
        files["config"], [f"val=retrieval:{files['karpathy']},images={files['images']},split=val"]
    )
    assert [x.spec.name for x in s.sets] == ["shapes", "squares", "coco", "val"]
    model = FakeClip()
    doc = s.run(model, evaluate.eval_transform(model), fake_tokenizer, device="cpu")
    assert doc["metrics"] == {k: pytest.approx(v, abs=1e-6) for k, v in HAND.items()}
    assert list(doc["metrics"]) == list(HAND)
    coco = doc["sets"]["coco"]
    assert (coco["kind"], coco["source"], coco["result"]["format"]) == (
        "retrieval",
        files["coco"],
        "coco",
    )
    assert doc["sets"]["squares"]["result"]["per_class_top1"] == {
        "photo 0 caption 1": 0.5,
        "photo 1 caption 1": 1.0,
        "photo 2 caption 1": 1.0,
        "photo 3 caption 1": 1.0,
    }
    assert suite.markdown(doc) == TABLE
    paths = suite.write_outputs(doc, str(tmp_path / "out"))
    assert paths == [str(tmp_path / "out" / f) for f in ("suite.json", "suite.md", "suite.png")]
    assert json.loads((tmp_path / "out" / "suite.json").read_text()) == json.loads(json.dumps(doc))
    assert (tmp_path / "out" / "suite.md").read_text() == TABLE
    assert (tmp_path / "out" / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A suite of retrieval sets only has no mean row and a plot of the two recall families.
    only = suite.Suite(
        [suite.parse_set(f"coco=retrieval:{files['coco']},images={files['images']}")]
    )
    doc = only.run(model, evaluate.eval_transform(model), fake_tokenizer, device="cpu")
    assert "zeroshot_mean/top1" not in doc["metrics"]
    assert "mean zero-shot" not in suite.markdown(doc)
    assert len(suite.figure(doc).axes) == 2


def test_set_flags_and_suite_files_are_checked(files, tmp_path):
    spec = suite.parse_set("coco=retrieval:/d/a,b.json,images=/i,split=test,max_images=5")
    assert (spec.name, spec.kind, dict(spec.options)) == (
        "coco",
        "retrieval",
        {"captions": "/d/a,b.json", "images": "/i", "split": "test", "max_images": 5},
    )
    assert suite.parse_set("c10=zeroshot:c/test.parquet").options == {"path": "c/test.parquet"}

    def error(fn, *args):
        with pytest.raises(WitError) as e:
            fn(*args)
        return str(e.value)

    assert error(suite.parse_set, "coco") == "--set 'coco': expected NAME=KIND:PATH[,key=value...]"
    assert error(suite.parse_set, "x=detection:a") == (
        "--set 'x=detection:a': kind must be zeroshot or retrieval, got 'detection'"
    )
    # Commas split only before a known option of the kind: the rest is the path.
    assert suite.parse_set("x=zeroshot:a,images=b").options == {"path": "a,images=b"}
    assert error(suite.parse_set, "a b=zeroshot:p") == (
        "--set: set name 'a b' must be letters, digits and . _ + -"
    )
    assert error(suite.parse_set, "zeroshot_mean=zeroshot:p") == (
        "--set: 'zeroshot_mean' is the name of the mean; name the set otherwise"
    )
    assert error(suite.read_suite, "", []) == (
        "the suite has no sets: give --config FILE or --set NAME=KIND:PATH"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("sets:\n  c:\n    kind: retrieval\n    caption: x\n")
    assert error(suite.read_suite, str(bad)) == (
        f"{bad}: set 'c': unknown option 'caption' (known: captions, images, split, format, "
        "image_column, caption_column, split_column, max_images)"
    )
    bad.write_text("sets:\n  c:\n    kind: retrieval\n    images: x\n")
    assert error(suite.read_suite, str(bad)) == f"{bad}: set 'c': 'captions' is required"
    bad.write_text("set:\n  c: {}\n")
    assert (
        error(suite.read_suite, str(bad)) == f"{bad}: unknown key 'set' (known: max_samples, sets)"
    )
    bad.write_text("sets:\n  c:\n    kind: zeroshot\n    path: p\n    max_samples: many\n")
    assert error(suite.read_suite, str(bad)) == f"{bad}: set 'c': max_samples must be an integer"
    # --set replaces the file's set of the same name; the file's cap applies to every set.
    capped = tmp_path / "capped.yaml"
    with open(files["config"]) as f:
        capped.write_text(f.read() + "max_samples: 3\n")
    specs, cap = suite.read_suite(str(capped), [f"coco=retrieval:{files['karpathy']}"])
    assert [(s.name, s.kind) for s in specs] == [
        ("shapes", "zeroshot"),
        ("squares", "zeroshot"),
        ("coco", "retrieval"),
    ]
    assert specs[2].options == {"captions": files["karpathy"]} and cap == 3
    # A set's split error names the suite's option.
    with pytest.raises(WitError) as e:
        suite.Suite.from_file(
            "", [f"k=retrieval:{files['karpathy']},images={files['images']},split=dev"]
        )
    assert (
        str(e.value) == f"{files['karpathy']}: no split 'dev' (splits: restval, test, train, val)"
    )
    two = write_karpathy(tmp_path / "two.json", splits={"train": (0,), "val": (1,)})
    with pytest.raises(WitError) as e:
        suite.Suite.from_file("", [f"k=retrieval:{two},images={files['images']}"])
    assert str(e.value) == f"{two}: several splits (train, val); choose one with 'split' (set 'k')"


def test_wit_eval_suite_on_a_tiny_checkpoint(files, tmp_path, capsys):
    import open_clip

    from wit_pipeline import models

    models.register_model_configs()
    torch.manual_seed(0)
    ckpt = tmp_path / "nano.pt"
    torch.save({"state_dict": open_clip.create_model("wit-nano").state_dict()}, ckpt)
    out = tmp_path / "suite-out"
    argv = [
        "eval", "suite", "--checkpoint", str(ckpt), "--model", "wit-nano",
        "--config", files["config"], "--output", str(out),
        "--set", f"shapes=zeroshot:{files['folders']},templates=simple",
        "--set", f"val=retrieval:{files['karpathy']},images={files['images']},split=val",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    stdout, stderr = capsys.readouterr()
    doc = json.loads((out / "suite.json").read_text())
    assert stdout == (out / "suite.md").read_text()
    assert stderr == f"wrote {out / 'suite.json'}, {out / 'suite.md'}, {out / 'suite.png'}\n"
    assert (out / "suite.png").stat().st_size > 1000
    assert (doc["checkpoint"], doc["model"]) == (str(ckpt), "wit-nano")
    assert sorted(doc["sets"]) == ["coco", "shapes", "squares", "val"]  # JSON keys are sorted
    assert set(doc["metrics"]) == set(HAND)
    assert doc["metrics"]["zeroshot_mean/top1"] == pytest.approx(
        (doc["metrics"]["shapes/top1"] + doc["metrics"]["squares/top1"]) / 2
    )
    # Each set's metrics are those of `wit eval` on the same set and weights.
    loaded = models.load_model("wit-nano", str(ckpt), device="cpu")
    ds = evaluate.load_labelled_set(files["folders"])
    zs = evaluate.run_zeroshot(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        ds,
        templates=evaluate.resolve_templates("simple"),
        device="cpu",
    )
    assert doc["sets"]["shapes"]["result"] == json.loads(json.dumps(zs))
    assert doc["sets"]["shapes"]["result"]["num_templates"] == 1
    assert doc["sets"]["coco"]["result"]["num_texts"] == 60
    rc = cli.main(["eval", "suite", "--checkpoint", str(ckpt), "--model", "wit-nano"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "wit: error: the suite has no sets: give --config FILE or --set NAME=KIND:PATH\n"
    )
