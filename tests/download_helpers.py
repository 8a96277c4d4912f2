"""Helpers shared by the download tests: candidate files, pipeline runs, output snapshots."""

from __future__ import annotations

import json
import pathlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import schemas, shards, urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.stages.download import transforms as download

OPTIONS = ["--runner=FnApiRunner"]


def pair(url: str, caption: str, query_ids=(0,), **extra) -> dict:
    norm = urls.normalize_url(url) or url
    return {
        "uid": urls.pair_uid(norm, caption),
        "url": url,
        "caption": caption,
        "query_ids": list(query_ids),
        "source": "test",
        "page_url": None,
        "language": "en",
        "language_score": 0.9,
        **extra,
    }


def write_candidates(directory: pathlib.Path, rows: list[dict], parts: int = 2) -> str:
    cand = directory / "candidates"
    cand.mkdir(parents=True, exist_ok=True)
    for i in range(parts):
        chunk = rows[i::parts]
        table = pa.Table.from_pylist(chunk, schema=schemas.CANDIDATE_SCHEMA)
        pq.write_table(table, cand / f"part-{i:05d}.parquet")
    return str(directory)


def run_download(
    input_dir: str, output_dir: str, config: DownloadConfig, resolver=None, blocklist=None
):
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(OPTIONS)) as p:
        _ = (
            p
            | download.ReadCandidates(files=download.candidate_files(input_dir))
            | download.DownloadImages(
                output_dir=output_dir, config=config, resolver=resolver, blocklist=blocklist
            )
        )
    return json.loads((pathlib.Path(output_dir) / "stats.json").read_text())


def read_outputs(output_dir: str) -> tuple[pa.Table, pa.Table, dict[str, dict]]:
    out = pathlib.Path(output_dir)
    kept = shards.read_table(str(out / "shards"))
    rejected = pa.concat_tables(
        [pq.read_table(f) for f in sorted((out / "rejected").glob("*.parquet"))]
    )
    samples = {}
    for tar in shards.list_shards(str(out / "shards")):
        for s in shards.iter_samples(tar):
            samples[s["__key__"]] = s
    return kept, rejected, samples


def snapshot(out: pathlib.Path) -> dict[str, object]:
    snap: dict[str, object] = {"stats": json.loads((out / "stats.json").read_text())}
    for sub in ("shards", "rejected"):
        for p in sorted((out / sub).iterdir()):
            snap[f"{sub}/{p.name}"] = (
                pq.read_table(p).to_pylist() if p.suffix == ".parquet" else p.read_bytes()
            )
    return snap
