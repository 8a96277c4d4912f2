"""Shared fixtures: real data from ../shared/data, and the network jail for every test."""

from __future__ import annotations

import os
import pathlib

import pytest

import netjail

ROOT = pathlib.Path(__file__).resolve().parent.parent

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The test machine has 2 shared cores: busy-waiting OpenMP threads lose badly under contention
# (measured: training throughput fell ~4x next to one busy process; passive costs ~5% idle).
# Set before any test module imports torch, and inherited by subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Subprocesses (img2dataset workers, Beam worker processes, the CLI) are jailed too.
os.environ["WIT_TEST_NET_JAIL"] = "1"
_site = str(ROOT / "tests" / "jail_site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_site, str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)
netjail.install()


def shared_data_dir() -> pathlib.Path | None:
    path = pathlib.Path(os.environ.get("WIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``../shared/data`` (or ``$WIT_SHARED_DATA``); skips when absent, fails in CI."""
    path = shared_data_dir()
    if path is None:
        msg = (
            "real data folder not found: set WIT_SHARED_DATA or place it at ../shared/data "
            "(see DEVELOPERS.md)"
        )
        if os.environ.get("WIT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def web(shared_data):
    """The planted web of real photos that ``wit build`` tests build (tests/build_fixture.py),
    served on 127.0.0.1 for the module."""
    import build_fixture

    w = build_fixture.Web(shared_data).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def inputs(web, tmp_path_factory):
    """``web``'s WARC and query list: ``(warc, queries)``."""
    return web.write(tmp_path_factory.mktemp("web"))


@pytest.fixture(autouse=True)
def _no_jail_violations():
    """Fail any test during which code tried to leave loopback, even if it caught the error."""
    start = len(netjail.violations)
    yield
    new = netjail.violations[start:]
    assert not new, f"code under test tried to reach the network: {new}"
