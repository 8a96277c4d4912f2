"""The ``wit`` command line: help, one-line errors (no traceback), and ``wit gather`` itself."""

import argparse
import gzip
import json
import os
import subprocess
import sys

import crawl_fixtures as cf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import beam_utils, cli, config, queries
from wit_pipeline.cli import args as cli_args


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "wit_pipeline", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "gather" in out.stdout and "usage: wit" in out.stdout


def test_gather_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["gather", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--queries", "--output", "--runner", "--config", "--no-rejected"):
        assert flag in text


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://a.example/1.jpg", "http://a.example/2.jpg"],
                "TEXT": ["A dog on the beach", "A red sofa in a room"],
            }
        ),
        path,
    )
    return path


def one_line_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    msgs = [line for line in err if line.startswith("wit: error:")]
    assert len(msgs) == 1, err
    assert not any("Traceback" in line for line in err), "\n".join(err)
    return msgs[0]


def test_missing_input(capsys, tmp_path):
    msg = one_line_error(
        capsys, ["gather", "-i", str(tmp_path / "nope.warc.gz"), "-o", str(tmp_path / "o")]
    )
    assert msg == f"wit: error: input not found: {tmp_path / 'nope.warc.gz'}"


def test_query_file_errors(capsys, tmp_path, table):
    base = ["gather", "-i", str(table), "-o", str(tmp_path / "o"), "--quiet", "-q"]
    msg = one_line_error(capsys, [*base, str(tmp_path / "missing.txt")])
    assert msg == f"wit: error: query file not found: {tmp_path / 'missing.txt'}"
    (tmp_path / "empty.txt").write_text("\n  \n")
    msg = one_line_error(capsys, [*base, str(tmp_path / "empty.txt")])
    assert msg == f"wit: error: query list is empty: {tmp_path / 'empty.txt'}"
    (tmp_path / "bad.txt.gz").write_bytes(b"\x1f\x8b\x08garbage")
    assert "not a valid gzip file" in one_line_error(capsys, [*base, str(tmp_path / "bad.txt.gz")])
    (tmp_path / "qdir").mkdir()
    assert "cannot read query file" in one_line_error(capsys, [*base, str(tmp_path / "qdir")])
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert "not UTF-8" in one_line_error(capsys, [*base, str(tmp_path / "latin1.txt")])


def test_missing_default_query_list(capsys, tmp_path, table, monkeypatch):
    monkeypatch.setattr(queries, "default_queries_path", lambda: str(tmp_path / "none.txt.gz"))
    msg = one_line_error(capsys, ["gather", "-i", str(table), "-o", str(tmp_path / "o")])
    assert msg.startswith(f"wit: error: query file not found: {tmp_path / 'none.txt.gz'}")
    assert "--queries" in msg


def test_config_and_column_errors(capsys, tmp_path, table):
    (tmp_path / "q.txt").write_text("dog\n")
    base = ["gather", "-i", str(table), "-o", str(tmp_path / "o"), "-q", str(tmp_path / "q.txt")]
    (tmp_path / "c.yaml").write_text("gather:\n  captionz: {}\n")
    msg = one_line_error(capsys, [*base, "--config", str(tmp_path / "c.yaml")])
    assert "unknown option gather.captionz" in msg
    msg = one_line_error(capsys, [*base, "--url-column", "link"])
    assert "no URL column 'link'" in msg
    msg = one_line_error(capsys, [*base, "--set", "gather.captions.language_detector=cld3"])
    assert msg == (
        "wit: error: config: gather.captions.language_detector (--language-detector) must be "
        "one of fasttext, langdetect, none, got 'cld3'"
    )
    msg = one_line_error(
        capsys, ["gather", "-i", str(tmp_path / "q.txt"), "-o", "x", "-q", str(tmp_path / "q.txt")]
    )
    assert "cannot tell the format" in msg


def test_gather_command_end_to_end(tmp_path, table):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.warc.gz").write_bytes(cf.damaged_warc_gz())
    (tmp_path / "q.txt.gz").write_bytes(gzip.compress("\n".join(cf.QUERIES).encode()))
    (tmp_path / "c.toml").write_text("[gather.captions]\nmin_chars = 4\n")
    out = tmp_path / "out"
    res = run_cli(
        "gather",
        "--input", str(tmp_path / "inputs"), str(table),
        "--queries", str(tmp_path / "q.txt.gz"),
        "--output", str(out),
        "--config", str(tmp_path / "c.toml"),
        "--num-shards", "2",
        "--runner", "FnApiRunner",
        "--direct_num_workers", "1",  # an unknown flag: passed to Beam as a pipeline option
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    # Progress lines for each file, then a summary on stdout.
    assert "[1/2]" in res.stderr and "[2/2]" in res.stderr and "done" in res.stderr
    assert res.stdout.startswith("gather: done in ")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["runner"] == "FnApiRunner"
    assert stats["config"]["captions"]["min_chars"] == 4
    c = stats["counters"]
    # min_chars=4 lets "dog" (3 chars) still fail; the table adds 1 kept (dog) + 1 no_match.
    assert c["input"] == 18 + 2
    assert c["kept"] == 5 + 1
    assert c["dropped:no_match"] == 1 + 1
    assert f"{c['input']:,} pairs in, {c['kept']:,} kept" in res.stdout
    assert sorted(os.listdir(out / "candidates")) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    # A rerun finds the output complete.
    again = run_cli(
        "gather", "-i", str(tmp_path / "inputs"), str(table), "-q", str(tmp_path / "q.txt.gz"),
        "-o", str(out), "--config", str(tmp_path / "c.toml"), "--num-shards", "2", "--quiet",
    )  # fmt: skip
    assert again.returncode == 0
    assert "already complete" in again.stdout


def test_a_flag_neither_wit_nor_beam_knows_is_refused(capsys):
    """Beam would only log "Discarding unparseable args"; a typo must not pass silently."""
    with pytest.raises(SystemExit) as e:
        cli.main(["gather", "--input", "x", "--queries", "y", "--output", "z", "--max-record", "3"])
    assert e.value.code == 2
    assert (
        "unrecognized arguments (neither wit's nor Beam's): --max-record" in capsys.readouterr().err
    )


def test_beam_flags_of_every_runner_are_accepted():
    assert beam_utils.unknown_beam_flags(
        [
            "--runner=DataflowRunner",
            "--project",
            "p",
            "--temp_location=gs://b/t",
            "--flink_master",
            "localhost:8081",
            "--spark_master_url=spark://h:7077",
            "--direct_num_workers=2",
            "--prism_location",
            "/x",
            "--experiments=use_runner_v2",
            "--not_a_beam_flag=1",
            "-q",
        ]
    ) == ["--not_a_beam_flag", "-q"]


def test_dask_flags_are_accepted_before_the_dask_runner_is_imported():
    """Beam's ``DaskOptions`` exist only once the Dask runner's module is imported; the CLI
    checks flags before any run, in a fresh process."""
    code = (
        "import sys; from wit_pipeline import beam_utils; "
        "assert 'wit_pipeline.dask_runner' not in sys.modules; "
        "print(beam_utils.unknown_beam_flags(["
        "'--dask_npartitions=8', '--dask_connection_timeout', '9', "
        "'--dask_shuffle_method=tasks', '--dask_nope=1']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['--dask_nope']"


# ---------------------------------------------------------------------------------------------
# The shared arguments and the table from flags to config fields (wit_pipeline/cli/args.py)


def command_parsers(parser, prefix=()):
    """``(("queries", "build"), parser)`` for every (sub-)command of ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from command_parsers(sub, (*prefix, name))


def overrides_of(*argv: str, cfg: config.BuildConfig | None = None) -> dict:
    parsed, _ = cli.build_parser().parse_known_args(list(argv))
    return cli_args.flag_overrides(parsed, cfg or config.BuildConfig())


# (argv, the exact overrides its flags give): each config flag of each command in some case.
OVERRIDE_CASES = [
    (["gather", "-i", "a", "-o", "o"], {}),
    (
        [
            "gather", "-i", "a", "-o", "o", "--input-format", "csv", "--url-column", "u",
            "--caption-column", "c", "--languages", "en,de", "--language-detector", "none",
            "--keep-unmatched", "--no-rejected", "--num-shards", "3", "--blocklist", "t.txt",
        ],
        {
            "gather.input_format": "csv",
            "gather.url_column": "u",
            "gather.caption_column": "c",
            "gather.captions.languages": "en,de",
            "gather.captions.language_detector": "none",
            "gather.match.keep_unmatched": True,
            "gather.write_rejected": False,
            "gather.num_output_shards": 3,
            "takedown.blocklists": ["t.txt"],
        },
    ),
    (["gather", "-i", "a", "-o", "o", "--languages", " ALL"], {"gather.captions.languages": ""}),
    (["queries", "build", "--output", "q.txt"], {}),
    (
        [
            "queries", "build", "--output", "q.txt", "--min-count", "5",
            "--bigram-min-count", "6", "--bigram-min-pmi", "7.5", "--min-views", "8",
            "--max-queries", "9", "--priority", "titles,wordnet", "--case", "lower",
        ],
        {
            "queries.unigrams.min_count": 5,
            "queries.bigrams.min_count": 6,
            "queries.bigrams.min_pmi": 7.5,
            "queries.titles.min_views": 8,
            "queries.max_queries": 9,
            "queries.priority": "titles,wordnet",
            "queries.case": "lower",
        },
    ),
    (["download", "-i", "a", "-o", "o"], {}),
    (["download", "-i", "a", "-o", "o", "--allow-loopback"], {"download.allow_loopback": True}),
    (["download", "-i", "a", "-o", "o", "--blocklist", "t"], {"takedown.blocklists": ["t"]}),
    (["download", "-i", "a", "-o", "o", "--max-retry-wait", "600"], {"download.max_retry_wait": 600.0}),
    (["dedup", "-i", "a", "-o", "o"], {}),
    (
        [
            "dedup", "-i", "a", "-o", "o", "--eval-set", "e=x.parquet", "--max-distance", "6",
            "--eval-max-distance", "2", "--no-collapse", "--eval-set", "y", "--blocklist", "t",
        ],
        {
            "dedup.eval_sets": ["e=x.parquet", "y"],
            "dedup.max_distance": 6,
            "dedup.eval_max_distance": 2,
            "dedup.collapse": False,
            "takedown.blocklists": ["t"],
        },
    ),
    (["balance", "-i", "a", "-o", "o"], {}),
    (
        [
            "balance", "-i", "a", "-o", "o", "--t", "0", "--seed", "3", "--factor", "1.5",
            "--samples-per-shard", "7",
        ],
        {
            "balance.t": 0,
            "balance.seed": 3,
            "balance.prebalance_factor": 1.5,
            "shards.samples_per_shard": 7,
        },
    ),
    (["build", "-i", "a", "-o", "o"], {}),
    (
        [
            "build", "-i", "a", "b", "-o", "o", "--allow-loopback", "--eval-set", "e",
            "--seed-model", "ckpt.pt", "--seed-arch", "wit-tiny", "--blocklist", "a.txt",
            "--blocklist", "b.txt",
            "--max-retry-wait", "5",
            "--threshold", "auto",
        ],
        {
            "download.allow_loopback": True,
            "download.max_retry_wait": 5.0,
            "dedup.eval_sets": ["e"],
            "score.pretrained": "ckpt.pt",
            "score.model": "wit-tiny",
            "takedown.blocklists": ["a.txt", "b.txt"],
            "score.keep_fraction": None,
            "score.threshold": "auto",
        },
    ),
    (
        ["build", "-i", "a", "-o", "o", "--keep-fraction", "0.3"],
        {"score.threshold": None, "score.keep_fraction": 0.3},
    ),
    (["score", "-i", "a", "-o", "o"], {}),
    (
        [
            "score", "-i", "a", "-o", "o", "--model", "m", "--pretrained", "p",
            "--threshold", "0.2", "--batch-size", "8", "--device", "cpu",
        ],
        {
            "score.model": "m",
            "score.pretrained": "p",
            "score.keep_fraction": None,
            "score.threshold": 0.2,
            "score.batch_size": 8,
            "score.device": "cpu",
        },
    ),
    (
        ["score", "-i", "a", "-o", "o", "--keep-fraction", "0.3"],
        {"score.threshold": None, "score.keep_fraction": 0.3},
    ),
    (["seed", "-i", "a", "-o", "o"], {}),
    (
        [
            "seed", "-i", "a", "-o", "o", "--allow-loopback", "--eval-set", "e",
            "--holdout", "0.2", "--epochs", "7", "--rounds", "1",
        ],
        {
            "download.allow_loopback": True,
            "dedup.eval_sets": ["e"],
            "seed.holdout": 0.2,
            "seed.epochs": 7,
            "seed.rounds": 1,
        },
    ),
]  # fmt: skip


def test_every_flag_names_a_config_field_and_the_cases_try_each_commands_flags():
    defaults = config.BuildConfig()
    for name, flag in cli_args.FLAGS.items():
        for path in (flag.path, *flag.clears):
            value = cli_args.default_of(path)  # AttributeError for a path that does not exist
            assert config.override(defaults, path, value) == defaults, (name, path)
    used = {
        words: set(parser.get_default("config_flags"))
        for words, parser in command_parsers(cli.build_parser())
        if parser.get_default("config_flags")
    }
    tried: dict[tuple[str, ...], set[str]] = {}
    for argv, _ in OVERRIDE_CASES:
        words = tuple(argv[:2]) if argv[0] == "queries" else (argv[0],)
        tried.setdefault(words, set()).update(a for a in argv if a in cli_args.FLAGS)
    assert tried == used
    assert set().union(*used.values()) == set(cli_args.FLAGS)
    assert len(used) == 8


@pytest.mark.parametrize("argv, expected", OVERRIDE_CASES)
def test_each_commands_flags_give_exactly_these_overrides(argv, expected):
    got = overrides_of(*argv)
    assert got == expected
    # The field a flag clears is reset before the flag's own is set.
    assert list(got) == list(expected)


def test_config_file_then_set_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "dedup:\n  eval_sets: [a]\n  max_distance: 3\n  partitions: 16\n"
        "score:\n  keep_fraction: 0.5\n  device: cpu\n"
    )
    base = ["--config", str(tmp_path / "c.yaml")]

    def cfg_of(*argv):
        parsed, _ = cli.build_parser().parse_known_args(list(argv))
        return cli_args.build_config(parsed)

    cfg = cfg_of("dedup", "-i", "x", "-o", "y", *base, "--set", "dedup.max_distance=5")
    assert (cfg.dedup.eval_sets, cfg.dedup.max_distance, cfg.dedup.partitions) == (("a",), 5, 16)
    cfg = cfg_of(
        "dedup", "-i", "x", "-o", "y", *base, "--set", "dedup.max_distance=5",
        "--set", "dedup.eval_sets=c,d", "--max-distance", "6", "--eval-set", "b",
    )  # fmt: skip
    assert (cfg.dedup.eval_sets, cfg.dedup.max_distance) == (("c", "d", "b"), 6)
    cfg = cfg_of("score", "-i", "x", "-o", "y", *base, "--threshold", "0.1")
    assert (cfg.score.threshold, cfg.score.keep_fraction, cfg.score.device) == (0.1, None, "cpu")
    assert cfg_of("score", "-i", "x", "-o", "y", *base).score.keep_fraction == 0.5


def test_exclusive_flags_and_flag_values_are_refused(capsys, tmp_path, table):
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "-i", "x", "-o", "y", "--threshold", "1", "--keep-fraction", "0.1"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    msg = one_line_error(capsys, ["gather", "-i", str(table), "-o", "o", "--num-shards", "0"])
    assert msg == "wit: error: --num-shards must be >= 1"
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "-i", "x", "-o", "y", "--threshold", "high"])
    assert e.value.code == 2
    assert "expected a number or auto, got 'high'" in capsys.readouterr().err


def test_help_of_every_command_shows_the_config_defaults():
    helps = {
        " ".join(words): parser.format_help()
        for words, parser in command_parsers(cli.build_parser())
    }
    assert sorted(helps) == [
        "balance", "build", "dedup", "demo", "demo run", "demo serve", "download", "eval",
        "eval retrieval", "eval suite", "eval zeroshot", "gather", "queries", "queries build",
        "queries build-default", "queries info", "remove", "report", "score", "seed", "train",
    ]  # fmt: skip
    assert "target count per query (default: 20000)" in helps["balance"]
    assert "codes to keep (default: en)" in helps["gather"]
    assert "merge order (default: wordnet,unigrams,bigrams,titles)" in helps["queries build"]
    assert "pairs per model batch (default: 256)" in helps["score"]
    assert "seed (default: 0.1)" in helps["seed"] and "(default: 40)" in helps["seed"]
    for words in (
        "gather", "build", "dedup", "balance", "download", "score", "seed", "queries build",
    ):  # fmt: skip
        assert "--set KEY=VALUE" in helps[words] and "--config FILE" in helps[words], words


def test_make_help_lists_every_target_and_test_fast_leaves_out_slow_tests():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "Makefile")) as f:
        phony = next(line for line in f if line.startswith(".PHONY:")).split()[1:]
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    listed = [line.split()[1] for line in shown.splitlines() if line.startswith("make ")]
    assert sorted(listed) == sorted(phony)
    dry = subprocess.run(
        ["make", "-s", "-n", "-o", "install", "test-fast", "PYTEST_ARGS=tests/test_cli.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert dry.strip().endswith('-m pytest -m "not slow" tests/test_cli.py')
