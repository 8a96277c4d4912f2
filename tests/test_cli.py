"""The ``wit`` command line: help, one-line errors (no traceback), and ``wit gather`` itself."""

import gzip
import json
import os
import subprocess
import sys

import crawl_fixtures as cf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import beam_utils, cli, queries


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
    assert not any("Traceback" in line for line in err)
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
    assert "language_detector must be one of" in msg
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
