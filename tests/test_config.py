import functools

import pytest
import yaml

from wit_pipeline import config
from wit_pipeline.errors import WitError


def test_defaults_round_trip_through_dict():
    cfg = config.BuildConfig()
    assert config.from_dict(config.BuildConfig, config.to_dict(cfg)) == cfg


def test_yaml_and_toml_give_the_same_tree(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "download:\n  image_size: 128\n  allow_loopback: true\n"
        "gather:\n  captions:\n    languages: [en, de]\nbalance:\n  t: 50\n"
    )
    (tmp_path / "c.toml").write_text(
        "[download]\nimage_size = 128\nallow_loopback = true\n"
        "[gather.captions]\nlanguages = ['en', 'de']\n[balance]\nt = 50\n"
    )
    a = config.load_config(str(tmp_path / "c.yaml"))
    b = config.load_config(str(tmp_path / "c.toml"))
    assert a == b
    assert a.download.image_size == 128
    assert a.download.allow_loopback is True
    assert a.gather.captions.languages == ("en", "de")
    assert a.balance.t == 50
    assert a.dedup == config.DedupConfig()


def test_unknown_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("download:\n  imge_size: 128\n")
    with pytest.raises(WitError, match=r"unknown option download\.imge_size"):
        config.load_config(str(tmp_path / "c.yaml"))


def test_overrides_coerce_types():
    cfg = config.apply_overrides(
        config.BuildConfig(),
        [
            "download.image_size=64",
            "balance.t=1_000",
            "gather.captions.languages=en,fr",
            "score.threshold=0.28",
            "download.respect_robots=false",
        ],
    )
    assert cfg.download.image_size == 64
    assert cfg.balance.t == 1000
    assert cfg.gather.captions.languages == ("en", "fr")
    assert cfg.score.threshold == pytest.approx(0.28)
    assert cfg.download.respect_robots is False
    with pytest.raises(WitError, match="must be an integer"):
        config.override(cfg, "download.image_size", "big")
    with pytest.raises(WitError, match="unknown option"):
        config.override(cfg, "download.nope", 1)


def test_config_is_frozen():
    cfg = config.BuildConfig()
    with pytest.raises(AttributeError):
        cfg.balance.t = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("balance.t", 0, r"balance\.t must be > 0, got 0"),
        ("balance.prebalance_factor", -1, r"balance\.prebalance_factor must be >= 0"),
        ("balance.unit", "caption", r"balance\.unit must be one of image, pair, got 'caption'"),
        ("shards.samples_per_shard", 0, r"shards\.samples_per_shard must be >= 1, got 0"),
        ("dedup.max_distance", 33, r"dedup\.max_distance must be between 0 and 32 bits, got 33"),
        ("dedup.eval_max_distance", -1, r"dedup\.eval_max_distance must be between 0 and 32"),
        ("dedup.partitions", 0, r"dedup\.partitions must be >= 1, got 0"),
        ("dedup.batch_size", 0, r"dedup\.batch_size must be >= 1, got 0"),
        ("dedup.label_rounds", -2, r"dedup\.label_rounds must be >= 0 \(or -1"),
        ("score.keep_fraction", 1.5, r"score\.keep_fraction \(--keep-fraction\) must be between"),
        ("score.threshold", 2, r"score\.threshold \(--threshold\) is a cosine similarity"),
        ("score.batch_size", 0, r"score\.batch_size must be > 0, got 0"),
        (
            "gather.input_format",
            "xml",
            r"gather\.input_format \(--input-format\) must be one of auto, warc, wat, parquet, "
            r"csv, tsv, jsonl, got 'xml'",
        ),
        ("gather.batch_size", 0, r"gather\.batch_size must be > 0, got 0"),
        (
            "gather.num_output_shards",
            -1,
            r"gather\.num_output_shards \(--num-shards\) must be within 0\.\.65536 "
            r"\(0 = automatic\), got -1",
        ),
        ("gather.num_output_shards", 65537, r"gather\.num_output_shards .* within 0\.\.65536"),
        (
            "gather.captions.language_detector",
            "cld3",
            r"gather\.captions\.language_detector \(--language-detector\) must be one of "
            r"fasttext, langdetect, none, got 'cld3'",
        ),
        (
            "gather.captions.unicode_form",
            "NFX",
            r"gather\.captions\.unicode_form must be one of NFC, NFKC, NFD, NFKD, none, got 'NFX'",
        ),
        (
            "gather.captions.min_foreign_language_score",
            1.5,
            r"gather\.captions\.min_foreign_language_score must be between 0 and 1, got 1\.5",
        ),
        ("gather.captions.min_chars", -1, r"gather\.captions\.min_chars must be >= 0, got -1"),
        ("gather.captions.min_words", -1, r"gather\.captions\.min_words must be >= 0, got -1"),
        (
            "gather.captions.max_chars",
            3,
            r"gather\.captions\.max_chars must be >= min_chars \(5; 0 = no limit\), got 3",
        ),
        (
            "gather.captions.languages",
            ("en", "English"),
            r"gather\.captions\.languages \(--languages\) must hold ISO 639 codes such as 'en', "
            r"got 'English'",
        ),
        (
            "download.resize_mode",
            "stretch",
            r"download\.resize_mode must be one of no, border, keep_ratio, keep_ratio_largest, "
            r"center_crop, got 'stretch'",
        ),
        ("download.image_size", 0, r"download\.image_size must be > 0, got 0"),
        ("download.encode_quality", 101, r"download\.encode_quality must be within 0\.\.100"),
        ("download.timeout", 0, r"download\.timeout must be > 0, got 0"),
        ("download.connect_timeout", -1, r"download\.connect_timeout must be > 0, got -1"),
        ("download.retries", -1, r"download\.retries must be >= 0, got -1"),
        ("download.max_redirects", -1, r"download\.max_redirects must be >= 0, got -1"),
        ("download.samples_per_shard", 0, r"download\.samples_per_shard must be > 0, got 0"),
        ("download.num_shards", -1, r"download\.num_shards must be >= 0, got -1"),
        ("download.threads", 0, r"download\.threads must be > 0, got 0"),
        ("download.processes", 0, r"download\.processes must be > 0, got 0"),
        ("download.max_crawl_delay", -1, r"download\.max_crawl_delay must be >= 0, got -1"),
        ("download.per_host_rate", -1, r"download\.per_host_rate must be >= 0, got -1"),
        ("download.per_host_concurrency", -1, r"download\.per_host_concurrency must be >= 0"),
        ("download.max_aspect_ratio", 0.5, r"download\.max_aspect_ratio must be >= 1, got 0\.5"),
        (
            "queries.priority",
            ("wordnet", "books"),
            r"queries\.priority \(--priority\) names unknown sources: books "
            r"\(known: wordnet, unigrams, bigrams, titles\)",
        ),
        ("queries.case", "upper", r"queries\.case \(--case\) must be one of keep, lower"),
        ("queries.max_queries", 0, r"queries\.max_queries must be > 0, got 0"),
        ("queries.split_bytes", 0, r"queries\.split_bytes must be > 0, got 0"),
        ("queries.batch_pages", 0, r"queries\.batch_pages must be > 0, got 0"),
        (
            "queries.wordnet.lemmas",
            "second",
            r"queries\.wordnet\.lemmas must be one of all, first, got 'second'",
        ),
        (
            "score.threshold",
            "high",
            r"score\.threshold \(--threshold\) is a cosine similarity: "
            r"between -1 and 1, or auto; got 'high'",
        ),
        ("score.target_precision", 1.5, r"score\.target_precision must be in \(0, 1\], got 1\.5"),
        ("score.null_samples", 1, r"score\.null_samples must be >= 2 \(a null pairs images"),
    ],
)
def test_each_option_is_validated_where_its_section_is_defined(tmp_path, option, value, message):
    *sections, name = option.split(".")
    # a --set override, a config file and a section made in code fail alike, with one line
    with pytest.raises(WitError, match=f"^config: {message}"):
        config.override(config.BuildConfig(), option, value)
    doc = {name: list(value) if isinstance(value, tuple) else value}
    for section in reversed(sections):
        doc = {section: doc}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(WitError, match=f"^config: {message}"):
        config.load_config(str(tmp_path / "c.yaml"))
    cls = type(functools.reduce(getattr, sections, config.BuildConfig()))
    with pytest.raises(WitError, match=f"^config: {message}"):
        cls(**{name: value})
    # so no stage transform ever receives the value: none checks it again


def test_score_filter_takes_a_threshold_or_a_fraction():
    assert config.ScoreConfig(threshold=0.28).keep_fraction is None
    with pytest.raises(WitError, match="not both"):
        config.apply_overrides(
            config.BuildConfig(), ["score.threshold=0.2", "score.keep_fraction=0.3"]
        )
    # auto: calibrated on the data (docs/score.md); a number string is a number
    auto = config.apply_overrides(config.BuildConfig(), ["score.threshold=auto"]).score
    assert (auto.threshold, auto.mode) == ("auto", "auto")
    assert config.override(config.BuildConfig(), "score.threshold", "0.3").score.threshold == 0.3
    assert [config.ScoreConfig(**kw).mode for kw in ({"threshold": 0.2}, {"keep_fraction": 0.3}, {})] == [
        "fixed", "keep_fraction", "none"]  # fmt: skip
    with pytest.raises(WitError, match="not both"):
        config.ScoreConfig(threshold="auto", keep_fraction=0.3)
    # a threshold without a seed model is a valid section; `wit build` refuses it (build.validate)
    assert config.ScoreConfig(keep_fraction=0.0).keep_fraction == 0.0
    assert config.BalanceConfig(prebalance_factor=0).prebalance is False


def test_dedup_phash_decode_is_validated():
    from wit_pipeline.config import DedupConfig

    assert DedupConfig().phash_decode == "draft"
    assert DedupConfig(phash_decode="exact").phash_decode == "exact"
    with pytest.raises(WitError, match=r"dedup\.phash_decode must be exact or draft"):
        DedupConfig(phash_decode="fast")
