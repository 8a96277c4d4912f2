"""``wit queries build-default``: the shipped list, rebuilt from sources available offline.

``build_default`` rebuilds ``queries/wit-queries-en.txt.gz`` and its manifest from WordNet
(Debian's ``wordnet-base``), wordfreq and pywordfreq (Wikipedia word counts), the Wikipedia
dump excerpt in the gensim wheel plus WordNet's glosses (bigrams, counted in this process by
``corpus_bigrams``: no Beam) and the vital-articles title list of the shared data folder. The
build is deterministic: the tests rebuild it and compare the bytes (docs/queries.md).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from wit_pipeline import fileio
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError
from wit_pipeline.queries.merge import SourceResult, assemble
from wit_pipeline.queries.ngrams import (
    WIKIPEDIA_WORDS,
    WIKIPEDIA_WORDS_SOURCE,
    bigram_source,
    count_ngrams,
    parse_count_table,
    score_bigrams,
    unigram_source,
    warn_unreachable_pmi,
    wordfreq_counts,
    wordfreq_info,
)
from wit_pipeline.queries.reading import input_info, read_lines
from wit_pipeline.queries.text import count_text, text_format
from wit_pipeline.queries.titles import title_list_source
from wit_pipeline.queries.wikipedia import count_pages, iter_pages
from wit_pipeline.queries.wordnet import (
    DEFAULT_WORDNET_DIR,
    Synset,
    read_wordnet,
    wordnet_files,
    wordnet_source,
)

DEFAULT_LIST_NAME = "wit-queries-en.txt.gz"
GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
VITAL_ARTICLES = "wikipedia/vital_article_links.txt"


def default_list_config() -> QueriesConfig:
    """The shipped list's thresholds: the builder's defaults, except for the bigram minimum
    count, which a 2-million-token corpus cannot meet at 100 (see docs/queries.md)."""
    from wit_pipeline.config import BigramConfig

    return QueriesConfig(bigrams=BigramConfig(min_count=5, min_pmi=8.0, max_entries=100_000))


def gensim_dump_path() -> str:
    """The English Wikipedia dump excerpt shipped in the gensim wheel (206 pages)."""
    try:
        import gensim
    except ImportError:
        raise WitError("gensim is not installed: pip install 'gensim>=4.3'") from None
    path = fileio.join(os.path.dirname(gensim.__file__), GENSIM_DUMP)
    if not fileio.exists(path):
        raise WitError(f"gensim's Wikipedia dump excerpt not found at {path}")
    return path


def pywordfreq_counts_path() -> str:
    """``word_frequencies.gz`` of PyPI ``pywordfreq``: English Wikipedia word counts."""
    import importlib.util

    spec = importlib.util.find_spec("pywordfreq")
    if spec is None or not spec.submodule_search_locations:
        raise WitError("pywordfreq is not installed: pip install 'pywordfreq==0.4.2'")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "word_frequencies.gz")
    if not os.path.exists(path):
        raise WitError(f"pywordfreq's word_frequencies.gz not found at {path}")
    return path


def package_relative(path: str) -> str:
    """``.../site-packages/gensim/x`` -> ``gensim==4.4.0:gensim/x`` (portable in a manifest)."""
    import importlib.metadata

    marker = f"{os.sep}site-packages{os.sep}"
    if marker not in path:
        return path
    rel = path.split(marker, 1)[1]
    dist = rel.split(os.sep, 1)[0]
    try:
        return f"{dist}=={importlib.metadata.version(dist)}:{rel}"
    except importlib.metadata.PackageNotFoundError:
        return rel


def corpus_bigrams(
    *,
    dump: str,
    wordnet_dir: str,
    cfg: QueriesConfig,
    synsets: Sequence[Synset] | None = None,
    texts: Sequence[str] = (),
    log=print,
) -> SourceResult:
    """Bigram PMI over real text available offline: a Wikipedia dump excerpt, the glosses
    and example sentences of WordNet and any ``texts`` (counted locally: a few M tokens)."""
    unigrams: collections.Counter = collections.Counter()
    bigrams: collections.Counter = collections.Counter()
    pages: collections.Counter = collections.Counter()
    count_pages(iter_pages(dump), unigrams, bigrams, pages)
    dump_tokens = pages.pop("tokens", 0)
    glosses = [s.gloss for s in (synsets or read_wordnet(wordnet_dir))]
    gloss_tokens = count_ngrams(glosses, unigrams, bigrams)
    text_inputs = []
    for path in texts:
        text_counter: collections.Counter = collections.Counter()
        count_text(path, unigrams, bigrams, text_counter)
        text_inputs.append(
            input_info(path, "text", format=text_format(path), **dict(sorted(text_counter.items())))
        )
    n_tokens = sum(unigrams.values())
    counter: collections.Counter = collections.Counter()
    rows = score_bigrams(
        bigrams,
        unigrams,
        n_tokens,
        min_count=cfg.bigrams.min_count,
        min_pmi=cfg.bigrams.min_pmi,
        counter=counter,
    )
    warn_unreachable_pmi(n_tokens, cfg, log)
    inputs = [
        input_info(
            dump,
            "wikipedia-dump",
            name=package_relative(dump),
            pages=dict(sorted(pages.items())),
            tokens=dump_tokens,
        ),
        {
            "kind": "wordnet-glosses",
            "files": [p.rsplit("/", 1)[-1] for p in wordnet_files(wordnet_dir)],
            "glosses": len(glosses),
            "tokens": gloss_tokens,
        },
        *text_inputs,
    ]
    return bigram_source(rows, inputs=inputs, n_tokens=n_tokens, counter=counter, cfg=cfg)


def build_default(
    *,
    output_dir: str,
    wordnet_dir: str = DEFAULT_WORDNET_DIR,
    titles: str,
    dump: str | None = None,
    texts: Sequence[str] = (),
    wikipedia_words: int = WIKIPEDIA_WORDS,
    command: str = "",
    titles_name: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Rebuild the shipped default list from offline sources (see docs/queries.md)."""
    import importlib.metadata

    cfg = default_list_config()
    dump = dump or gensim_dump_path()
    wordfreq_path = pywordfreq_counts_path()
    synsets = read_wordnet(wordnet_dir)
    sources = [wordnet_source(wordnet_dir, cfg, synsets=synsets)]
    wf = wordfreq_info(wikipedia_words)
    wf["scale_source"] = WIKIPEDIA_WORDS_SOURCE
    pw = input_info(
        wordfreq_path,
        "count-table",
        name=package_relative(wordfreq_path),
        package=f"pywordfreq {importlib.metadata.version('pywordfreq')}",
        description="English Wikipedia word counts (lower-cased, count >= 20)",
    )
    tables = [
        (wf, wordfreq_counts(wikipedia_words)),
        (pw, parse_count_table(read_lines(wordfreq_path), source=wordfreq_path)),
    ]
    sources.append(unigram_source(tables, cfg))
    sources.append(
        corpus_bigrams(
            dump=dump, wordnet_dir=wordnet_dir, cfg=cfg, synsets=synsets, texts=texts, log=log
        )
    )
    sources.append(title_list_source([titles], cfg, names=[titles_name or titles]))
    output = fileio.join(output_dir, DEFAULT_LIST_NAME)
    return assemble(sources, cfg=cfg, output=output, command=command)
