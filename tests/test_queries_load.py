import gzip
import os
import subprocess
import sys

import pytest

from wit_pipeline import queries
from wit_pipeline.errors import WitError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_plain_and_gzip(tmp_path):
    text = "dog\n\nhot dog\n  ice cream  \n"
    (tmp_path / "q.txt").write_text(text)
    (tmp_path / "q.txt.gz").write_bytes(gzip.compress(text.encode()))
    want = ["dog", "hot dog", "ice cream"]
    assert queries.load_queries(str(tmp_path / "q.txt")) == want
    assert queries.load_queries(str(tmp_path / "q.txt.gz")) == want
    assert queries.queries_sha256(str(tmp_path / "q.txt")) == queries.queries_sha256(
        str(tmp_path / "q.txt.gz")
    )


def test_errors_are_one_line(tmp_path):
    with pytest.raises(WitError, match="query file not found"):
        queries.load_queries(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(WitError, match="query list is empty"):
        queries.load_queries(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.txt.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(WitError, match="not a valid gzip"):
        queries.load_queries(str(tmp_path / "bad.txt.gz"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(WitError, match="not UTF-8"):
        queries.load_queries(str(tmp_path / "latin1.txt"))


def test_loading_and_the_offline_build_do_not_import_beam():
    # Every stage loads lists without Beam; build-default counts in-process, also without it.
    code = (
        "import sys\n"
        "import wit_pipeline.queries, wit_pipeline.queries.default\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"
