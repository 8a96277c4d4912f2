"""An evaluation suite: any number of zero-shot and retrieval sets, one table (``wit eval suite``).

CLIP models are compared on many sets at once (CLIP's 27 datasets, DataComp's 38 tasks). A suite
file names the sets and how to read each; :class:`Suite` loads them all first (so a bad path
fails before any model work), runs a model on each, and reports one document: every set's full
result, the flat metrics (``NAME/top1``, ``NAME/image_to_text_R@5``, ...) and the mean zero-shot
top-1 over the zero-shot sets (``zeroshot_mean/top1``). :func:`write_outputs` writes it as
``suite.json``, ``suite.md`` (one Markdown table, a row per set) and ``suite.png`` (a bar chart
per metric family). The trainer runs the same suite every ``--eval-suite-every`` steps.

The file (YAML or TOML; relative paths are relative to the working directory)::

    max_samples: 0            # optional: cap every set at N evenly spaced samples/images
    sets:
      cifar10:
        kind: zeroshot        # a Parquet file or class folders (wit eval zeroshot)
        path: ../shared/data/cifar10/test.parquet
        templates: auto       # optional: templates, classnames, image_column, label_column,
                              #           max_samples
      coco-5k:
        kind: retrieval       # any caption format (wit eval retrieval)
        captions: coco/dataset_coco.json
        images: coco          # optional: images, split, format, image_column, caption_column,
        split: test           #           split_column, max_images

and on the command line ``--set NAME=KIND:PATH[,key=value...]`` (``PATH`` is ``path`` for
zero-shot and ``captions`` for retrieval), which adds a set or replaces the file's set of that name.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline import fileio
from wit_pipeline.errors import WitError
from wit_pipeline.train import evaluate, retrieval_sets

KINDS = ("zeroshot", "retrieval")
# Each kind's options: the one that --set's PATH fills first.
OPTIONS = {
    "zeroshot": (
        "path", "templates", "classnames", "image_column", "label_column", "max_samples",
    ),
    "retrieval": (
        "captions", "images", "split", "format", "image_column", "caption_column",
        "split_column", "max_images",
    ),
}  # fmt: skip
INT_OPTIONS = ("max_samples", "max_images")
MEAN_NAME = "zeroshot_mean"
ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_top1")
RECALL_METRICS = tuple(
    f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in evaluate.RECALL_KS
)
SUITE_FILES = ("suite.json", "suite.md", "suite.png")


@dataclasses.dataclass(frozen=True)
class SetSpec:
    """One set of a suite, as the file (or ``--set``) gives it."""

    name: str
    kind: str
    options: Mapping[str, Any]


def _check_spec(name: str, kind: Any, options: Mapping[str, Any], where: str) -> SetSpec:
    if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name or ""):
        raise WitError(f"{where}: set name {name!r} must be letters, digits and . _ + -")
    if name == MEAN_NAME:
        raise WitError(f"{where}: {MEAN_NAME!r} is the name of the mean; name the set otherwise")
    if kind not in KINDS:
        raise WitError(f"{where}: set {name!r}: kind must be zeroshot or retrieval, got {kind!r}")
    known = OPTIONS[kind]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise WitError(
            f"{where}: set {name!r}: unknown option {unknown[0]!r} (known: {', '.join(known)})"
        )
    required = known[0]
    if not options.get(required):
        raise WitError(f"{where}: set {name!r}: {required!r} is required")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise WitError(f"{where}: set {name!r}: {key} must be an integer")
            try:
                value = int(value)
            except ValueError:
                raise WitError(f"{where}: set {name!r}: {key} must be an integer") from None
        elif key == "classnames" and isinstance(value, list):
            value = [str(v) for v in value]
        elif not isinstance(value, str):
            raise WitError(f"{where}: set {name!r}: {key} must be a string")
        out[key] = value
    return SetSpec(name, kind, out)


def parse_set(text: str) -> SetSpec:
    """``NAME=KIND:PATH[,key=value...]`` (``--set``) as a set."""
    name, sep, rest = text.partition("=")
    kind, sep2, tail = rest.partition(":")
    if not sep or not sep2 or not tail:
        raise WitError(f"--set {text!r}: expected NAME=KIND:PATH[,key=value...]")
    if kind not in KINDS:
        raise WitError(f"--set {text!r}: kind must be zeroshot or retrieval, got {kind!r}")
    # Split only at commas that start a known option, so paths may hold commas.
    keys = "|".join(OPTIONS[kind][1:])
    path, *pairs = re.split(rf",(?=(?:{keys})=)", tail)
    options: dict[str, Any] = {OPTIONS[kind][0]: path}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = value
    return _check_spec(name.strip(), kind, options, "--set")


def read_suite(path: str = "", sets: Sequence[str] = ()) -> tuple[list[SetSpec], int]:
    """The sets of a suite file and ``--set`` values (which replace the file's set of the same
    name), and the file's ``max_samples``."""
    specs: dict[str, SetSpec] = {}
    max_samples = 0
    if path:
        doc = config_lib.read_config_file(path)
        unknown = sorted(set(doc) - {"sets", "max_samples"})
        if unknown:
            raise WitError(f"{path}: unknown key {unknown[0]!r} (known: max_samples, sets)")
        raw_sets = doc.get("sets") or {}
        if not isinstance(raw_sets, Mapping):
            raise WitError(f"{path}: 'sets' must map set names to their options")
        for name, options in raw_sets.items():
            if not isinstance(options, Mapping):
                raise WitError(f"{path}: set {name!r} must be a table of options")
            options = dict(options)
            kind = options.pop("kind", None)
            specs[str(name)] = _check_spec(str(name), kind, options, path)
        max_samples = doc.get("max_samples") or 0
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
            raise WitError(f"{path}: max_samples must be a non-negative integer")
    for text in sets:
        spec = parse_set(text)
        specs[spec.name] = spec
    if not specs:
        raise WitError("the suite has no sets: give --config FILE or --set NAME=KIND:PATH")
    return list(specs.values()), max_samples


def _suite_option(name: str):
    return lambda field: f"'{field}' (set {name!r})"


@dataclasses.dataclass
class LoadedSet:
    spec: SetSpec
    data: Any  # evaluate.LabelledSet or retrieval_sets.RetrievalSet
    templates: list[str]  # zero-shot only


class Suite:
    """A suite's sets, loaded once; :meth:`run` evaluates a model on all of them."""

    def __init__(self, specs: Sequence[SetSpec], *, max_samples: int = 0):
        self.sets: list[LoadedSet] = []
        for spec in specs:
            o = spec.options
            if spec.kind == "zeroshot":
                classnames = o.get("classnames")
                if isinstance(classnames, str):
                    classnames = evaluate.read_classnames(classnames)
                ds = evaluate.load_labelled_set(
                    o["path"],
                    image_column=o.get("image_column") or "image",
                    label_column=o.get("label_column") or "label",
                    classnames=classnames,
                    max_samples=o.get("max_samples", max_samples),
                )
                templates = evaluate.resolve_templates(o.get("templates") or "auto", ds.name)
                self.sets.append(LoadedSet(spec, ds, templates))
            else:
                rs = retrieval_sets.load_retrieval_set(
                    o["captions"],
                    images=o.get("images", ""),
                    options=retrieval_sets.CaptionOptions.from_values(o),
                    max_images=o.get("max_images", max_samples),
                    name=spec.name,
                    option=_suite_option(spec.name),
                )
                self.sets.append(LoadedSet(spec, rs, []))

    @classmethod
    def from_file(cls, path: str = "", sets: Sequence[str] = (), *, max_samples: int = 0) -> Suite:
        """Load a suite file and ``--set`` values; ``max_samples`` (when not 0) replaces the
        file's cap."""
        specs, file_cap = read_suite(path, sets)
        return cls(specs, max_samples=max_samples or file_cap)

    def run(
        self, model: Any, preprocess: Any, tokenizer: Any, *, device: str, batch_size: int = 256
    ) -> dict[str, Any]:
        """Every set's result and the flat metrics (see :func:`flat_metrics`)."""
        results: dict[str, Any] = {}
        for s in self.sets:
            t0 = time.time()
            if s.spec.kind == "zeroshot":
                res = evaluate.run_zeroshot(
                    model,
                    preprocess,
                    tokenizer,
                    s.data,
                    templates=s.templates,
                    device=device,
                    batch_size=batch_size,
                )
                source = s.spec.options["path"]
            else:
                res = evaluate.run_retrieval(
                    model, preprocess, tokenizer, s.data, device=device, batch_size=batch_size
                )
                source = s.spec.options["captions"]
            results[s.spec.name] = {
                "kind": s.spec.kind,
                "source": source,
                "result": res,
                "seconds": round(time.time() - t0, 3),
            }
        return {"sets": results, "metrics": flat_metrics(results)}


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``NAME/top1``, ``NAME/top5``, ``NAME/mean_per_class_top1`` per zero-shot set,
    ``NAME/{image_to_text,text_to_image}_R@{1,5,10}`` per retrieval set, and
    ``zeroshot_mean/top1``: the mean of the zero-shot sets' top-1 (when there are any)."""
    out: dict[str, float] = {}
    top1 = []
    for name, entry in results.items():
        res = entry["result"]
        keys = ZEROSHOT_METRICS if entry["kind"] == "zeroshot" else RECALL_METRICS
        for k in keys:
            out[f"{name}/{k}"] = float(res[k])
        if entry["kind"] == "zeroshot":
            top1.append(float(res["top1"]))
    if top1:
        out[f"{MEAN_NAME}/top1"] = sum(top1) / len(top1)
    return out


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown(doc: Mapping[str, Any]) -> str:
    """One table: a row per set, every metric in percent, and the mean zero-shot top-1."""
    from wit_pipeline.report import markdown_table

    headers = [
        "set", "kind", "samples", "top-1", "top-5", "mean per class",
        "I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10",
    ]  # fmt: skip
    rows = []
    for name, entry in doc["sets"].items():
        res = entry["result"]
        if entry["kind"] == "zeroshot":
            size = f"{res['num_samples']:,}"
            cells = [res[k] for k in ZEROSHOT_METRICS] + [None] * len(RECALL_METRICS)
        else:
            size = f"{res['num_images']:,} img / {res['num_texts']:,} txt"
            cells = [None] * len(ZEROSHOT_METRICS) + [res[k] for k in RECALL_METRICS]
        rows.append([name, entry["kind"], size, *(_pct(c) for c in cells)])
    mean = doc["metrics"].get(f"{MEAN_NAME}/top1")
    if mean is not None:
        rows.append(["**mean zero-shot top-1**", "", "", f"**{_pct(mean)}**", *[""] * 8])
    return markdown_table(headers, rows, align="lll" + "r" * 9) + "\n"


def figure(doc: Mapping[str, Any]) -> Any:
    """A bar chart per metric family: zero-shot accuracy, image->text and text->image recall."""
    import numpy as np

    from wit_pipeline.report import _figure

    families = []
    zs = [n for n, e in doc["sets"].items() if e["kind"] == "zeroshot"]
    rt = [n for n, e in doc["sets"].items() if e["kind"] == "retrieval"]
    if zs:
        families.append(("zero-shot accuracy (%)", zs, ZEROSHOT_METRICS))
    for direction, title in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        if rt:
            keys = tuple(f"{direction}_R@{k}" for k in evaluate.RECALL_KS)
            families.append((f"{title} recall (%)", rt, keys))
    fig = _figure(4.2 * len(families), 3.6)
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, (title, names, keys) in zip(axes, families, strict=True):
        x = np.arange(len(names))
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            values = [100 * doc["sets"][n]["result"][key] for n in names]
            label = key.rsplit("_", 1)[-1] if "R@" in key else key.replace("_", " ")
            bars = ax.bar(x + (j - (len(keys) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        mean = doc["metrics"].get(f"{MEAN_NAME}/top1")
        if keys == ZEROSHOT_METRICS and mean is not None:
            ax.axhline(100 * mean, color="0.3", ls="--", lw=1, label=f"mean top1 {100 * mean:.1f}")
        ax.set_xticks(x, names, rotation=20 if len(names) > 3 else 0, fontsize=8)
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    return fig


def write_outputs(doc: Mapping[str, Any], directory: str) -> list[str]:
    """``suite.json``, ``suite.md`` and ``suite.png`` in ``directory``; returns their paths."""
    from wit_pipeline.report import _save

    fileio.makedirs(directory)
    paths = [fileio.join(directory, f) for f in SUITE_FILES]
    fileio.write_json(paths[0], dict(doc))
    with fileio.atomic_write(paths[1], "w") as f:
        f.write(markdown(doc))
    _save(figure(doc), paths[2])
    return paths
