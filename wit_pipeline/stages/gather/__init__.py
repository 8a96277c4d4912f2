"""The gather stage: crawl data in, query-matched image/caption candidates out.

- ``readers/``: input files (WARC, WAT, Parquet, CSV, TSV, JSONL) -> raw (URL, caption,
  page URL) batches; ``readers/html.py`` extracts ``<img>`` pairs from HTML.
- ``captions.py``: caption cleaning, length bounds, language detection.
- ``match.py``: query matching with MetaCLIP's substring semantics (Aho-Corasick).
- ``pairs.py``: the pure core: URL checks, ``PairFilter`` (clean, filter, match one batch),
  ``dedup_candidates``, output buckets, ``gather_loop`` (the stage without Beam).

The ``gather`` config section (``captions`` and ``match`` included) checks itself when it is
made (``config.GatherConfig``).
- ``transforms.py``: the Beam side: ``GatherPairs``, ``WriteGather``, ``ReadPairs``,
  ``run_gather`` (``wit gather``; the step's graph is ``pipeline.gather``).
"""
