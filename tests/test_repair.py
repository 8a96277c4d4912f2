"""Repair runs (``--retry-failed``), ``Retry-After`` and per-host holds, and the repair journal.

A loopback web whose flaky URLs fail transiently while ``Flaky.mode`` is ``"fail"`` (HTTP 429
with ``Retry-After``, 503, a timeout, a reset connection), answer once more with 429 and an
HTTP-date ``Retry-After`` and then serve the image while ``"recover"``, and serve it straight
away while ``"healthy"``. A download made while failing, then repaired, must equal, byte for
byte, a download made from a healthy web; shards without transient failures are not even
rewritten.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import json
import os
import pathlib
import shutil
import socket
import struct
import threading
import time

import fsspec
import pyarrow.parquet as pq
import pytest
from download_helpers import pair, run_download, snapshot, write_candidates
from download_server import encode, photo

from wit_pipeline import cli, counters, fileio, shards, urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages.download import fetch, guarded_http, netguard, plan, repair

N_OK = 12
TIMEOUT = 2.0
CONFIG = DownloadConfig(
    allow_loopback=True,
    samples_per_shard=4,
    threads=4,
    retries=1,
    retry_backoff=0.1,
    timeout=TIMEOUT,
    connect_timeout=1.0,
)
CONFIG_FLAGS = [
    "--allow-loopback",
    "--set",
    "download.samples_per_shard=4",
    "--set",
    "download.threads=4",
    "--set",
    "download.retries=1",
    "--set",
    "download.retry_backoff=0.1",
    "--set",
    f"download.timeout={TIMEOUT}",
    "--set",
    "download.connect_timeout=1.0",
]
# The transient failures planted, by URL path, and the reason each gets while failing.
FLAKY = {
    "/busy.jpg": "http_429",
    "/unavailable.jpg": "http_503",
    "/slow.jpg": "timeout",
    "/reset.jpg": "connection_error",
}


def http_date(seconds_from_now: float) -> str:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return email.utils.format_datetime(when, usegmt=True)


def reset(req) -> None:
    """Close the connection with a TCP reset, before any answer."""
    req.close_connection = True
    req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    req.connection.close()


class Flaky:
    """The loopback web: ``N_OK`` good photos, the ``FLAKY`` paths and a 404 (``/gone.jpg``)."""

    def __init__(self, server: ImageServer):
        self.server = server
        self.mode = "fail"
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.images = {
            p: encode(photo(seed=100 + i), "JPEG", quality=90) for i, p in enumerate(FLAKY)
        }
        for i in range(N_OK):
            body = encode(photo(seed=i), "JPEG", quality=90)
            server.route(f"/ok/{i}.jpg", lambda req, b=body: self.image(req, b))
        for path in FLAKY:
            server.route(path, self.handler(path))
        server.route("/gone.jpg", lambda req: req.send_plain(404, b"gone"))

    @staticmethod
    def image(req, body: bytes) -> None:
        req.close_connection = True
        req.send_plain(200, body, "image/jpeg")

    def handler(self, path: str):
        def h(req):
            with self.lock:
                seen = self.times.setdefault(path, [])
                seen.append(time.monotonic())
                first_in_mode = len(seen) == 1
            if self.mode == "fail":
                req.close_connection = True
                if path == "/busy.jpg":
                    return req.send_plain(429, b"slow down", Retry_After="1")
                if path == "/unavailable.jpg":
                    return req.send_plain(503, b"busy")
                if path == "/reset.jpg":
                    return reset(req)
                time.sleep(TIMEOUT + 1.5)  # /slow.jpg: beyond the whole attempt's deadline
            elif self.mode == "recover" and path == "/busy.jpg" and first_in_mode:
                req.close_connection = True
                return req.send_plain(429, b"slow down", Retry_After=http_date(3))
            self.image(req, self.images[path])

        return h

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.times.clear()
        self.server.requests.clear()

    def rows(self) -> list[dict]:
        rows = [pair(self.server.url(f"/ok/{i}.jpg"), f"photo {i}") for i in range(N_OK)]
        rows += [pair(self.server.url(p), f"flaky {p}") for p in FLAKY]
        # more pairs on flaky URLs: a second caption, and an exact repeat (duplicate_pair)
        rows.append(pair(self.server.url("/unavailable.jpg"), "another caption"))
        rows.append(pair(self.server.url("/busy.jpg"), "flaky /busy.jpg"))
        rows.append(pair(self.server.url("/gone.jpg"), "a gone photo"))
        return rows


@pytest.fixture
def web():
    with ImageServer() as server:
        yield Flaky(server)


def files(out: pathlib.Path) -> dict[str, tuple[str, int]]:
    """Every file under ``out``: relative path -> (sha256, mtime in ns)."""
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            found[p.relative_to(out).as_posix()] = (digest, p.stat().st_mtime_ns)
    return found


def shard_of_path(web: Flaky, path: str, num_shards: int) -> int:
    return plan.shard_of(urls.url_uid(urls.normalize_url(web.server.url(path))), num_shards)


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_retryable_reasons_are_netguards_retryable_set():
    retryable = ["timeout", "connection_error", "truncated"]
    retryable += [f"http_{c}" for c in (408, 425, 429, 500, 502, 503, 504)]
    others = ["http_404", "http_501", "http_410", "robots", "opt_out", "dns_error", "http_"]
    assert [netguard.is_retryable_reason(r) for r in retryable] == [True] * len(retryable)
    assert [netguard.is_retryable_reason(r) for r in others] == [False] * len(others)
    counts = {"input": 9, "kept": 4, "dropped:http_503": 2, "dropped:http_404": 1}
    counts |= {"dropped:timeout": 1, "dropped:robots": 1}
    assert repair.transient(counts) == {"http_503": 2, "timeout": 1}
    assert (
        repair.describe(counts) == "4 of 9 images kept; transient failures: http_503 2, timeout 1"
    )


def test_retry_after_seconds_and_http_dates():
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert guarded_http.retry_after_seconds("120", now) == 120.0
    assert guarded_http.retry_after_seconds(" 0 ", now) == 0.0
    assert guarded_http.retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now) == 30.0
    assert guarded_http.retry_after_seconds("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0  # past
    for bad in (None, "", "soon", "-5", "1.5"):
        assert guarded_http.retry_after_seconds(bad, now) is None


class FakeTime:
    """A monotonic clock that only moves when slept on; records every sleep."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def test_a_host_held_by_retry_after_waits_for_every_request():
    t = FakeTime()
    limiter = guarded_http.HostLimiter(clock=t.clock, sleep=t.sleep)
    limiter.defer("a.test", 5.0, "http_429")
    limiter.defer("a.test", 2.0, "http_503")  # an earlier end does not shorten the hold
    assert limiter.deferred("a.test") == (5.0, "http_429")
    assert limiter.deferred("b.test") == (0.0, "")
    with limiter.slot("b.test"):
        pass
    with limiter.slot("a.test"):
        pass
    assert t.sleeps == [5.0]  # only the held host waited, until the end of its hold
    assert limiter.deferred("a.test") == (0.0, "")
    with limiter.slot("a.test"):
        pass
    assert t.sleeps == [5.0]


def test_the_opener_honours_retry_after_and_holds_the_host():
    answers = {"/x.jpg": [(429, "3"), (200, None)], "/y.jpg": [(503, "120"), (200, None)]}
    sent: list[str] = []

    def handler(req):
        sent.append(req.path)
        status, after = answers[req.path].pop(0)
        req.close_connection = True
        headers = {"Retry_After": after} if after else {}
        req.send_plain(status, encode(photo(), "JPEG") if status == 200 else b"wait", **headers)

    with ImageServer() as server:
        for path in answers:
            server.route(path, handler)
        server.route("/z.jpg", handler)
        cfg = DownloadConfig(allow_loopback=True, retries=2, retry_backoff=0.5, max_retry_wait=60)
        opener = guarded_http.build_opener(fetch.make_guard(cfg), fetch.fetch_options(cfg))
        t = FakeTime()
        opener.limiter = guarded_http.HostLimiter(4, clock=t.clock, sleep=t.sleep)
        # 429 with Retry-After: 3: the backoff (0.5 s) then the rest of the 3 s, then a retry.
        with opener.open(server.url("/x.jpg")) as resp:
            assert resp.status == 200
        assert t.sleeps == [0.5, 2.5] and sent == ["/x.jpg", "/x.jpg"]
        # 503 with Retry-After: 120, beyond max_retry_wait: failed now, as retryable...
        with pytest.raises(netguard.FetchError) as e:
            opener.open(server.url("/y.jpg"))
        assert (e.value.reason, e.value.retryable) == ("http_503", True)
        assert e.value.detail == (
            "HTTP 503: Service Unavailable; not retried: Retry-After 120s beyond max_retry_wait 60s"
        )
        # ...and the host is held: another URL of it fails without a request.
        with pytest.raises(netguard.FetchError) as e:
            opener.open(server.url("/z.jpg"))
        assert (e.value.reason, e.value.retryable) == ("http_503", True)
        assert e.value.detail == (
            "not requested: 127.0.0.1 asked to wait 120s more (Retry-After), beyond "
            "max_retry_wait 60s"
        )
        assert sent == ["/x.jpg", "/x.jpg", "/y.jpg"] and t.sleeps == [0.5, 2.5]


# ---------------------------------------------------------------------------------------------
# wit download --retry-failed, end to end


def download_args(input_dir: str, out: pathlib.Path, *extra: str) -> list[str]:
    return ["download", "--input", input_dir, "--output", str(out), *CONFIG_FLAGS, *extra]


def test_retry_failed_repairs_the_transient_failures_in_place(web, tmp_path, capsys):
    input_dir = write_candidates(tmp_path / "in", web.rows())
    out, ref = tmp_path / "out", tmp_path / "reference"
    n_urls = N_OK + len(FLAKY) + 1
    num_shards = plan.num_shards_for(n_urls, 4)

    stats = run_download(input_dir, str(out), CONFIG)
    assert stats["url_counters"] == {
        "input": n_urls,
        "kept": N_OK,
        "dropped:http_404": 1,
        **{counters.dropped(r): 1 for r in FLAKY.values()},
    }
    assert stats["counters"] == {
        "input": n_urls + 2,
        "kept": N_OK,
        "dropped:duplicate_pair": 1,
        "dropped:http_404": 1,
        "dropped:http_429": 1,
        "dropped:http_503": 2,
        "dropped:timeout": 1,
        "dropped:connection_error": 1,
    }
    rejected = pq.read_table(out / "rejected").to_pylist()
    busy = [r["detail"] for r in rejected if r["url"].endswith("/busy.jpg")]
    assert busy == ["same uid as another pair of this URL", "HTTP 429: Too Many Requests"]
    before = files(out)
    shutil.copytree(out, tmp_path / "before")

    web.set_mode("healthy")  # the reference: the same web, healthy from the start
    run_download(input_dir, str(ref), CONFIG)

    web.set_mode("recover")
    capsys.readouterr()
    assert cli.main(download_args(input_dir, out, "--retry-failed", "--max-retry-wait", "30")) == 0
    err = capsys.readouterr().err
    assert (
        "fetching transient failures again (12 of 17 images kept; transient failures: "
        "connection_error 1, http_429 1, http_503 1, timeout 1)" in err
    )
    assert "after the retry: 16 of 17 images kept; transient failures: none" in err
    # Only the transient failures were fetched again (the 429 once more, after its Retry-After),
    # after the origin's policies (robots.txt, TDMRep's tdmrep.json) were checked again.
    assert sorted(p for _, p in web.server.requests) == sorted(
        ["/robots.txt", "/.well-known/tdmrep.json", "/busy.jpg", *FLAKY]
    )
    first, second = web.times["/busy.jpg"]
    assert second - first >= 1.5  # Retry-After: an HTTP date 3 s ahead (1 s resolution)

    # Byte for byte what the healthy web gave, stats included; no staging left behind.
    assert snapshot(out) == snapshot(ref)
    after = files(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in files(ref).items()}
    assert not (out / "repair").exists()
    # Shards without a transient failure were not rewritten at all; the others were.
    repaired = {shard_of_path(web, p, num_shards) for p in FLAKY}
    for name, (digest, mtime) in before.items():
        stem = pathlib.Path(name).stem
        if name.startswith(("shards/", "rejected/")) and int(stem) not in repaired:
            assert after[name] == (digest, mtime), name
        elif name.startswith("shards/") and name.endswith(".tar"):
            assert after[name][0] != digest, name
    assert 0 < len(repaired) < num_shards
    # A repaired shard keeps its other samples byte for byte (tar members, Parquet rows).
    for shard_id in repaired:
        name = f"{shard_id:05d}"
        old = dict(shards.iter_members(str(tmp_path / "before" / "shards" / f"{name}.tar")))
        new = dict(shards.iter_members(str(out / "shards" / f"{name}.tar")))
        assert len(new) == len(old) + 3 * sum(
            shard_of_path(web, p, num_shards) == shard_id for p in FLAKY
        )
        assert {k: new[k] for k in old} == old
        old_rows = pq.read_table(tmp_path / "before" / "shards" / f"{name}.parquet").to_pylist()
        new_rows = pq.read_table(out / "shards" / f"{name}.parquet").to_pylist()
        assert [r for r in new_rows if r in old_rows] == old_rows

    # Nothing left to retry: a second repair run fetches nothing and rewrites nothing.
    web.set_mode("fail")
    assert cli.main(download_args(input_dir, out, "--retry-failed")) == 0
    assert web.server.requests == []
    again = files(out)
    assert again == {**after, "stats.json": again["stats.json"]}
    assert again["stats.json"][0] == after["stats.json"][0]


def test_retry_failed_is_refused_where_it_cannot_repair(web, tmp_path, capsys):
    input_dir = write_candidates(tmp_path / "in", web.rows())
    out = tmp_path / "out"

    def refused(args: list[str]) -> str:
        """The one error line (after the progress lines of the run it stopped, if any)."""
        capsys.readouterr()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert [e for e in err if not e.startswith("wit download: ")] == err[-1:], err
        assert err[-1].startswith("wit: error: "), err
        return err[-1]

    assert "holds no download to repair" in refused(download_args(input_dir, out, "--retry-failed"))
    web.set_mode("healthy")
    run_download(input_dir, str(out), CONFIG)
    before = files(out)
    msg = refused(
        download_args(input_dir, out, "--retry-failed", "--set", "download.image_size=64")
    )
    assert "other settings (image_size)" in msg
    more = write_candidates(tmp_path / "more", [*web.rows(), pair(web.server.url("/new.jpg"), "n")])
    msg = refused(download_args(more, out, "--retry-failed"))
    assert "different input or configuration" in msg and "17 URLs" in msg and "now 18 URLs" in msg
    assert files(out) == before


# ---------------------------------------------------------------------------------------------
# The repair journal: a repair killed before or after its commit


def _failed_download(web: Flaky, tmp_path: pathlib.Path) -> tuple[str, str]:
    input_dir = write_candidates(tmp_path / "in", web.rows())
    out = str(tmp_path / "out")
    run_download(input_dir, out, CONFIG)
    return input_dir, out


def _repair_records(web: Flaky, out: str, shard_id: int, outcome: plan.Outcome):
    """The URL records of a shard's transient failures and the outcomes of fetching them."""
    keys = {k for k, _ in repair.retryable_keys(shard_id, out)}
    records = []
    for path in FLAKY:
        url = urls.normalize_url(web.server.url(path))
        key = urls.url_uid(url)
        if key in keys:
            _, p = plan.key_pair(pair(web.server.url(path), f"flaky {path}"))
            records.append(plan.make_url_record(key, [p]))
    return records, {r["key"]: outcome for r in records}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_repair_killed_after_its_commit_is_completed_by_the_next_run(web, tmp_path, where):
    _, local_out = _failed_download(web, tmp_path)
    out = local_out
    if where == "memory":  # the same on an object store
        out = f"memory://repair-{os.getpid()}/out"
        fsspec.filesystem("memory").put(local_out, out.removeprefix("memory://"), recursive=True)
    shard_id = next(s for s in plan.finished_shards(out) if repair.retryable_keys(s, out))
    image = encode(photo(seed=7), "JPEG")
    records, outcomes = _repair_records(
        web, out, shard_id, plan.Outcome(image, 120, 80, 120, 80, "ab")
    )
    # The whole repair, uninterrupted, in a copy: what the journal must lead to.
    whole = f"{out}-whole"
    fs = fileio.filesystem(out)
    fs.copy(out, whole, recursive=True) if where == "memory" else shutil.copytree(out, whole)
    repair.repair_shard(whole, shard_id, records, outcomes)

    # Killed between the moves: the rejected file and the tar moved, the Parquet file did not.
    real_replace = fileio.replace
    moved: list[str] = []

    def dies_on_the_third(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed")
        moved.append(dst)
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fileio, "replace", dies_on_the_third)
        with pytest.raises(KeyboardInterrupt):
            repair.repair_shard(out, shard_id, records, outcomes)
    marker = repair.marker_path(out, shard_id)
    assert fileio.exists(marker) and len(moved) == 2
    # The next run completes it before it lists the shards.
    assert repair.list_finished(out) == plan.finished_shards(whole)
    assert not fileio.exists(marker)
    assert tree(out) == tree(whole)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_repair_killed_before_its_commit_leaves_the_shard_as_it_was(web, tmp_path, where):
    _, local_out = _failed_download(web, tmp_path)
    out = local_out
    if where == "memory":
        out = f"memory://uncommitted-{os.getpid()}/out"
        fsspec.filesystem("memory").put(local_out, out.removeprefix("memory://"), recursive=True)
    before = tree(out)
    shard_id = next(s for s in plan.finished_shards(out) if repair.retryable_keys(s, out))
    records, outcomes = _repair_records(
        web, out, shard_id, plan.Outcome(encode(photo(seed=7), "JPEG"), 120, 80, 120, 80, "ab")
    )
    real_write_json = fileio.write_json

    def dies_at_the_commit(path, obj):
        if path.endswith(repair.MARKER_SUFFIX) and "/repair/" in path:
            raise KeyboardInterrupt("killed")
        real_write_json(path, obj)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fileio, "write_json", dies_at_the_commit)
        with pytest.raises(KeyboardInterrupt):
            repair.repair_shard(out, shard_id, records, outcomes)
    staged = fileio.list_names(repair.repair_dir(out))
    assert len(staged) == 3 and not any(n.endswith(".json") for n in staged)
    # A killed writer's temporaries too (the pass before any shard writer starts).
    for sub in ("shards", "rejected"):
        with fileio.filesystem(out).open(
            fileio.temporary_path(f"{out}/{sub}/00000.tar"), "wb"
        ) as f:
            f.write(b"partial")
    assert repair.list_finished(out) == plan.finished_shards(out)
    assert tree(out) == before  # the staged files and temporaries are gone, the shard intact


def tree(root: str) -> dict[str, str]:
    """Every file under a local or remote folder: relative path -> sha256."""
    fs = fileio.filesystem(root)
    base = root.removeprefix("memory://").strip("/")
    out = {}
    for path in fs.find(root):
        with fs.open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out[path.removeprefix("memory://").strip("/").removeprefix(base).lstrip("/")] = digest
    return out


# ---------------------------------------------------------------------------------------------
# wit build --retry-failed

CAPTIONS = [
    "a red kayak on a calm lake at dawn",
    "a black dog running through the snow",
    "two children playing with a ball on the grass",
    "an old bicycle leaning against a brick wall",
    "a small boat tied to a wooden pier",
    "a lighthouse on a rocky coast at sunset",
    "a brown horse standing in a green field",
    "a bowl of fresh fruit on a kitchen table",
]
QUERIES = ["kayak", "dog", "ball", "bicycle", "boat", "lighthouse", "horse", "fruit", "grass"]


def noise_jpeg(seed: int) -> bytes:
    """Random pixels: no two pictures are near duplicates (pHash distances around 32)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=90)


class FlakyBuildWeb:
    """A page of ``CAPTIONS`` images in a WARC; ``/img/6.jpg`` answers 503 while failing."""

    FLAKY = "/img/6.jpg"

    def __init__(self, server: ImageServer, tmp: pathlib.Path):
        from wit_pipeline.demo.web import write_warc

        self.server, self.mode = server, "fail"
        for i in range(len(CAPTIONS)):
            server.route(f"/img/{i}.jpg", self.handler(f"/img/{i}.jpg", noise_jpeg(i)))
        imgs = "".join(
            f'<img src="{server.url(f"/img/{i}.jpg")}" alt="{c}">' for i, c in enumerate(CAPTIONS)
        )
        imgs += f'<img src="{server.url("/img/gone.jpg")}" alt="a horse that is gone now">'
        self.warc, self.queries = str(tmp / "crawl.warc.gz"), str(tmp / "queries.txt")
        write_warc(
            self.warc, [(server.url("/page.html"), f"<html><body>{imgs}</body></html>".encode())]
        )
        pathlib.Path(self.queries).write_text("\n".join(QUERIES) + "\n")

    def handler(self, path: str, body: bytes):
        def h(req):
            if path == self.FLAKY and self.mode == "fail":
                req.close_connection = True
                return req.send_plain(503, b"busy")
            Flaky.image(req, body)

        return h

    def args(self, out: pathlib.Path, *extra: str) -> list[str]:
        return [
            "build", "--input", self.warc, "--queries", self.queries, "--output", str(out),
            "--allow-loopback", "--set", "download.retries=0", "--set", "download.samples_per_shard=3",
            "--set", "shards.samples_per_shard=4", *extra,
        ]  # fmt: skip

    def images_requested(self) -> list[str]:
        return sorted(p for _, p in self.server.requests if p.startswith("/img/"))


def final_files(out: pathlib.Path) -> dict[str, str]:
    """The build's data files (shards, Parquet files, manifests): path -> sha256."""
    return {
        k: v[0]
        for k, v in files(out).items()
        if k.endswith((".tar", ".parquet")) or k.startswith(("shards/", "download/stats"))
    }


def test_build_retry_failed_repairs_the_download_and_redoes_finalize(tmp_path, capsys):
    from wit_pipeline import build

    with ImageServer() as server:
        web = FlakyBuildWeb(server, tmp_path)
        out, ref = tmp_path / "out", tmp_path / "ref"
        assert cli.main(web.args(out)) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["counters"]["dropped:http_503"] == 1
        assert stats["samples"] == len(CAPTIONS) - 1
        markers = {p.name: p.read_bytes() for p in (out / "done").iterdir()}

        web.mode = "healthy"
        assert cli.main(web.args(ref)) == 0
        ref_stats = json.loads((ref / "stats.json").read_text())
        assert (
            ref_stats["samples"] == len(CAPTIONS)
            and "dropped:http_503" not in ref_stats["counters"]
        )

        # A repair killed after its download was repaired, before its marker: a plain rerun
        # must redo finalize and report on the repaired download (no stale final shards).
        killed = tmp_path / "killed"
        shutil.copytree(out, killed)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(build, "finish_repair", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
            assert cli.main(web.args(killed, "--retry-failed")) == 130  # "wit: interrupted"
        assert not (killed / "done" / "download.json").exists()
        server.requests.clear()
        assert cli.main(web.args(killed)) == 0
        assert web.images_requested() == []  # the download was finished: nothing fetched
        assert final_files(killed) == final_files(ref)

        server.requests.clear()
        capsys.readouterr()
        assert cli.main(web.args(out, "--retry-failed")) == 0
        err = capsys.readouterr().err
        assert "retry-failed: the download runs again as a repair run" in err
        assert web.images_requested() == [web.FLAKY]
        assert json.loads((out / "stats.json").read_text()) == ref_stats
        assert final_files(out) == final_files(ref)
        now = {p.name: p.read_bytes() for p in (out / "done").iterdir()}
        assert {k: now[k] for k in ("gather.json", "prebalance.json")} == {
            k: markers[k] for k in ("gather.json", "prebalance.json")
        }
        retried = json.loads(now["download.json"])["retried"]
        assert retried == {
            "images_before": len(CAPTIONS) - 1,
            "images_after": len(CAPTIONS),
            "transient_before": {"http_503": 1},
            "transient_after": {},
        }

        # Nothing left to retry: the download runs, finds nothing, finalize and report stay.
        server.requests.clear()
        capsys.readouterr()
        assert cli.main(web.args(out, "--retry-failed")) == 0
        err = capsys.readouterr().err
        assert "no transient failure was recovered or changed; the build is unchanged" in err
        assert "[4/5] finalize: done (skipped)" in err and "[5/5] report: done (skipped)" in err
        assert web.images_requested() == []
        assert {
            p.name: p.read_bytes() for p in (out / "done").iterdir() if p.name != "download.json"
        } == {k: v for k, v in now.items() if k != "download.json"}

        def refused(args: list[str]) -> str:
            capsys.readouterr()
            assert cli.main(args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("wit: error: "), err
            return err[0]

        assert "holds no build to repair" in refused(web.args(tmp_path / "new", "--retry-failed"))
        other = web.args(out, "--retry-failed", "--overwrite", "--set", "download.image_size=64")
        assert "made with other settings or inputs" in refused(other)
        assert final_files(out) == final_files(ref)
