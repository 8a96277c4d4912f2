"""``wit queries build``: count the inputs on Beam (once), then merge the sources.

``build`` expands the inputs, runs the counting pipeline (``pipeline.run_counting_pipeline``)
unless ``work_dir`` already holds counts for the same inputs and thresholds (its
``stats.json`` carries their fingerprint), turns the candidate files into sources (unigrams,
bigrams, titles, plus WordNet, count tables and wordfreq, read on the driver) and writes the
list and its manifest (``merge.assemble``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError
from wit_pipeline.queries.merge import SourceResult, assemble, manifest_path
from wit_pipeline.queries.ngrams import (
    bigram_source,
    parse_count_table,
    unigram_source,
    warn_unreachable_pmi,
    wordfreq_counts,
    wordfreq_info,
)
from wit_pipeline.queries.pipeline import (
    BIGRAMS,
    CORPUS,
    PAGES,
    PAGEVIEW_LINES,
    TEXT,
    TITLES,
    UNIGRAMS,
    read_candidates,
    run_counting_pipeline,
)
from wit_pipeline.queries.reading import file_size, input_info, read_lines
from wit_pipeline.queries.text import text_format
from wit_pipeline.queries.titles import title_list_source, title_source
from wit_pipeline.queries.wordnet import wordnet_source


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """Where each source's data comes from; a source without input is skipped."""

    dumps: tuple[str, ...] = ()  # Wikipedia XML dumps: unigrams and bigrams
    unigram_counts: tuple[str, ...] = ()  # word<TAB>count tables
    wordfreq_tokens: int = 0  # > 0: wordfreq's list scaled to a corpus of this many tokens
    pageviews: tuple[str, ...] = ()  # hourly pageview files: titles with views
    titles: tuple[str, ...] = ()  # plain title lists, used when no pageviews are given
    wordnet: str | None = None  # directory with data.noun, data.verb, data.adj, data.adv
    texts: tuple[str, ...] = ()  # plain-text corpora (also dictd .dict.dz): more bigram text


def _fingerprint(inputs: BuildInputs, cfg: QueriesConfig, files: Mapping[str, list[str]]) -> str:
    """What the counting pipeline's outputs depend on: input files and the thresholds."""
    doc = {
        "files": {k: [(p, file_size(p)) for p in v] for k, v in files.items()},
        "unigrams": dataclasses.asdict(cfg.unigrams),
        "bigrams": {"min_count": cfg.bigrams.min_count, "min_pmi": cfg.bigrams.min_pmi},
        "bigrams_enabled": cfg.bigrams.enabled,
        "titles": {"min_views": cfg.titles.min_views, "projects": list(cfg.titles.projects)},
        "titles_enabled": cfg.titles.enabled,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _counts_current(work_dir: str, fingerprint: str) -> bool:
    """True when ``work_dir`` holds a completed run for the same inputs and thresholds."""
    stats_path = fileio.join(work_dir, "stats.json")
    if not fileio.exists(stats_path):
        return False
    doc = fileio.read_json(stats_path)
    return doc.get("fingerprint") == fingerprint and all(
        fileio.exists(fileio.join(work_dir, f"{name}.tsv.gz")) for name in doc.get("rows", {})
    )


def build(
    inputs: BuildInputs,
    cfg: QueriesConfig,
    *,
    output: str,
    work_dir: str | None = None,
    beam_args: Sequence[str] = (),
    command: str = "",
    force: bool = False,
    log=print,
) -> dict[str, Any]:
    """``wit queries build``: every source that has an input, merged into ``output``."""
    dump_files = fileio.expand_inputs(inputs.dumps) if inputs.dumps else []
    pageview_files = fileio.expand_inputs(inputs.pageviews) if inputs.pageviews else []
    text_files = fileio.expand_inputs(inputs.texts) if inputs.texts else []
    if inputs.pageviews and inputs.titles:
        raise WitError("give either --pageviews or --titles, not both")
    if text_files and not cfg.bigrams.enabled:
        raise WitError("--text feeds only the bigrams, and queries.bigrams.enabled is false")
    work_dir = work_dir or manifest_path(output)[: -len(".json")] + ".work"
    files = {"dumps": dump_files, "pageviews": pageview_files}
    if text_files:  # absent otherwise: earlier work directories stay current
        files["text"] = text_files
    stats: dict[str, Any] = {"counters": {}}
    if dump_files or pageview_files or text_files:
        fp = _fingerprint(inputs, cfg, files)
        stats_path = fileio.join(work_dir, "stats.json")
        if not force and _counts_current(work_dir, fp):
            log(f"counts up to date in {work_dir} (same inputs and thresholds): not recounting")
            stats = fileio.read_json(stats_path)
        else:
            stats = run_counting_pipeline(
                dump_files=dump_files,
                pageview_files=pageview_files,
                text_files=text_files,
                cfg=cfg,
                work_dir=work_dir,
                beam_args=beam_args,
                fingerprint=fp,
            )
    parts = counters_lib.split_scopes(stats["counters"])
    if dump_files and not parts.get(PAGES, {}).get(counters_lib.INPUT):
        raise WitError(f"no <page> element in the dump files: {', '.join(dump_files)}")
    for name, c in parts.items():
        if counters_lib.INPUT in c:
            counters_lib.check_balanced(c, stage=name)
    n_tokens = parts.get(CORPUS, {}).get("tokens", 0)
    dump_info = [input_info(p, "wikipedia-dump", checksum=False) for p in dump_files]

    sources: list[SourceResult] = []
    if cfg.wordnet.enabled and inputs.wordnet:
        sources.append(wordnet_source(inputs.wordnet, cfg))
    if cfg.unigrams.enabled:
        tables: list[tuple[dict[str, Any], Mapping[str, int]]] = []
        if dump_files:
            rows = read_candidates(fileio.join(work_dir, "unigrams.tsv.gz"))
            info = {
                "kind": "wikipedia-dumps",
                "files": dump_info,
                "pages": parts.get(PAGES, {}),
                "corpus_tokens": n_tokens,
                "counters": parts.get(UNIGRAMS, {}),
            }
            tables.append((info, {w: int(c) for w, c in rows}))
        for path in inputs.unigram_counts:
            table = parse_count_table(read_lines(path), source=path)
            tables.append((input_info(path, "count-table"), table))
        if inputs.wordfreq_tokens > 0:
            tables.append(
                (wordfreq_info(inputs.wordfreq_tokens), wordfreq_counts(inputs.wordfreq_tokens))
            )
        if tables:
            sources.append(unigram_source(tables, cfg))
    if cfg.bigrams.enabled and (dump_files or text_files):
        rows3 = [
            (b, float(s), int(c))
            for b, s, c in read_candidates(fileio.join(work_dir, "bigrams.tsv.gz"))
        ]
        bigram_inputs = list(dump_info)
        text_counts = parts.get(TEXT, {})
        if text_files:
            bigram_inputs.append(
                {
                    "kind": "text",
                    "files": [
                        input_info(p, "text", checksum=False, format=text_format(p))
                        for p in text_files
                    ],
                    **text_counts,
                }
            )
        bigram_tokens = n_tokens + text_counts.get("tokens", 0)
        sources.append(
            bigram_source(
                rows3,
                inputs=bigram_inputs,
                n_tokens=bigram_tokens,
                counter=parts.get(BIGRAMS, {}),
                cfg=cfg,
            )
        )
        warn_unreachable_pmi(bigram_tokens, cfg, log)
    if cfg.titles.enabled and pageview_files:
        rows2 = [(t, int(v)) for t, v in read_candidates(fileio.join(work_dir, "titles.tsv.gz"))]
        sources.append(
            title_source(
                rows2,
                inputs=[input_info(p, "pageviews", checksum=False) for p in pageview_files],
                counters={scope: parts.get(scope, {}) for scope in (PAGEVIEW_LINES, TITLES)},
                cfg=cfg,
            )
        )
    elif cfg.titles.enabled and inputs.titles:
        sources.append(title_list_source(inputs.titles, cfg))
    return assemble(sources, cfg=cfg, output=output, command=command)
