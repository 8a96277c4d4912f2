"""Input readers: crawl files and tables -> batches of raw image/caption pairs.

Every reader is a pure parser of one input file, in file order: the crawl readers (``warc``,
``wat``) turn an open stream into ``(url, caption, page_url, opt-out signal, page date)``
tuples (``iter_page_images(f, cfg=..., counter=...)``; the signal is the page's own opt-out,
``page_opt_out``), the table reader into ``RawBatch`` objects
(``tables.iter_batches``). :func:`iter_file_batches` opens any input and returns ``RawBatch``
objects: columns of raw URLs, raw captions and page URLs. Nothing is filtered here except what
is not a pair at all (non-HTML responses, broken records); URL and caption checks, with their
drop reasons, happen in ``gather.pairs``. Reader-level events (records read, broken records
skipped, charset fallbacks) are counted in the counter under ``<format>:<event>`` names; the
gather stage reports them under the ``read/`` scope (``read_counters`` in its ``stats.json``).

``wit_pipeline.stages.gather.transforms.ReadPairs`` is the Beam transform over these parsers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from wit_pipeline import fileio, optout
from wit_pipeline.config import GatherConfig
from wit_pipeline.errors import WitError

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


@dataclass
class RawBatch:
    """Raw pairs from one input file: parallel columns, one entry per extracted image.

    ``opt_outs`` holds, per pair, the opt-out signal of the page it was found on (None: none;
    ``optout.page_signal``) and ``page_dates`` when that page was crawled (its WARC-Date); both
    are empty for inputs without pages (tables), meaning no signal.
    """

    source: str
    urls: list[str | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    page_urls: list[str | None] = field(default_factory=list)
    opt_outs: list[str | None] = field(default_factory=list)
    page_dates: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.urls)


# What the crawl readers yield per image: (url, caption, page_url, opt-out signal, page date).
PageImage = tuple[str | None, str | None, str | None, str | None, str | None]


def batched_pairs(
    pairs: Iterable[PageImage], *, source: str, batch_size: int
) -> Iterator[RawBatch]:
    """Group the crawl readers' :data:`PageImage` tuples into ``RawBatch``es of ``batch_size``."""
    batch = RawBatch(source)
    for url, caption, page_url, signal, date in pairs:
        batch.urls.append(url)
        batch.captions.append(caption)
        batch.page_urls.append(page_url)
        batch.opt_outs.append(signal)
        batch.page_dates.append(date)
        if len(batch.urls) >= batch_size:
            yield batch
            batch = RawBatch(source)
    if batch.urls:
        yield batch


def page_opt_out(
    cfg: GatherConfig, headers: Mapping[str, Sequence[str]], metas: Sequence[tuple[str, str]]
) -> str | None:
    """A crawled page's opt-out signal under ``cfg`` (``opt_out_directives``,
    ``opt_out_agents``, ``respect_tdm_reservation``), or None; see ``optout.page_signal``."""
    return optout.page_signal(
        headers,
        metas,
        agents=frozenset(a.lower() for a in cfg.opt_out_agents),
        directives=frozenset(d.lower() for d in cfg.opt_out_directives),
        tdm=cfg.respect_tdm_reservation,
    )


def detect_format(path: str, input_format: str = "auto") -> str:
    """The reader for ``path``: by ``input_format`` (``gather.input_format``, one of
    ``config.INPUT_FORMATS``), or by its name (compression suffix ignored) when it is "auto"."""
    if input_format != "auto":
        return input_format
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(".wat") or name.endswith(".wat.warc"):
        return "wat"
    if name.endswith((".warc", ".arc")):
        return "warc"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise WitError(
        f"cannot tell the format of {path} from its name; expected .warc[.gz], .wat[.gz], "
        ".parquet, .csv, .tsv, .jsonl (optionally compressed), or set --input-format"
    )


def iter_file_batches(
    path: str,
    *,
    cfg: GatherConfig | None = None,
    counter: collections.Counter | None = None,
    batch_size: int | None = None,
) -> Iterator[RawBatch]:
    """Read ``path`` with its reader (see ``detect_format``) into ``RawBatch`` objects."""
    from wit_pipeline.stages.gather.readers import tables, warc, wat

    cfg = cfg or GatherConfig()
    counter = counter if counter is not None else collections.Counter()
    fmt = detect_format(path, cfg.input_format)
    size = batch_size or cfg.batch_size
    if fmt == "warc":
        return _crawl_batches(path, warc.iter_page_images, cfg=cfg, counter=counter, size=size)
    if fmt == "wat":
        return _crawl_batches(path, wat.iter_page_images, cfg=cfg, counter=counter, size=size)
    return tables.iter_batches(path, cfg=cfg, counter=counter, batch_size=size, fmt=fmt)


def _crawl_batches(
    path: str,
    page_images: Callable[..., Iterable[PageImage]],
    *,
    cfg: GatherConfig,
    counter: collections.Counter,
    size: int,
) -> Iterator[RawBatch]:
    """One crawl file (WARC or WAT) into batches of raw pairs (``source`` = ``path``)."""
    with fileio.open_file(path, "rb") as f:
        yield from batched_pairs(
            page_images(f, cfg=cfg, counter=counter), source=path, batch_size=size
        )
