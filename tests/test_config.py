import pytest

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
    ],
)
def test_each_option_is_validated_where_its_section_is_defined(tmp_path, option, value, message):
    section, name = option.split(".")
    # a --set override, a config file and a section made in code fail alike, with one line
    with pytest.raises(WitError, match=f"^config: {message}"):
        config.override(config.BuildConfig(), option, value)
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {value!r}\n".replace("'", ""))
    with pytest.raises(WitError, match=message):
        config.load_config(str(tmp_path / "c.yaml"))
    cls = type(getattr(config.BuildConfig(), section))
    with pytest.raises(WitError, match=message):
        cls(**{name: value})


def test_score_filter_takes_a_threshold_or_a_fraction():
    assert config.ScoreConfig(threshold=0.28).keep_fraction is None
    with pytest.raises(WitError, match="not both"):
        config.apply_overrides(
            config.BuildConfig(), ["score.threshold=0.2", "score.keep_fraction=0.3"]
        )
    # a threshold without a seed model is a valid section; `wit build` refuses it (build.validate)
    assert config.ScoreConfig(keep_fraction=0.0).keep_fraction == 0.0
    assert config.BalanceConfig(prebalance_factor=0).prebalance is False


def test_dedup_phash_decode_is_validated():
    from wit_pipeline.config import DedupConfig

    assert DedupConfig().phash_decode == "draft"
    assert DedupConfig(phash_decode="exact").phash_decode == "exact"
    with pytest.raises(WitError, match=r"dedup\.phash_decode must be exact or draft"):
        DedupConfig(phash_decode="fast")
