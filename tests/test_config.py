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
