"""``wit download`` as users run it: a real kill mid-run and a resume, in worker processes.

The CLI runs in subprocesses (jailed like the test process, see tests/jail_site); the image
server runs in the test process on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from download_helpers import pair, run_download, snapshot, write_candidates
from download_server import encode, photo, redirect, send

from wit_pipeline import urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.loopback import ImageServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
N_IMAGES = 40
PER_SHARD = 5


def wit(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the kill takes its workers too
        **kw,
    )


class Gate:
    """Serve the first ``allow`` image requests, then hold the rest until ``open()``."""

    def __init__(self, allow: int):
        self.allow = allow
        self.count = 0
        self.waiting = 0
        self.lock = threading.Lock()
        self.event = threading.Event()

    def handler(self, body: bytes):
        def h(req):
            with self.lock:
                self.count += 1
                held = self.count > self.allow
                self.waiting += held
            if held:
                self.event.wait(60)
            send(req, 200, body)

        return h

    def open(self):
        self.event.set()


def test_kill_and_resume(tmp_path, capsys):
    gate = Gate(allow=12)
    with ImageServer() as server:
        rows = []
        for i in range(N_IMAGES):
            server.route(f"/g/{i}.jpg", gate.handler(encode(photo(seed=i), "JPEG", quality=90)))
            rows.append(pair(server.url(f"/g/{i}.jpg"), f"photo number {i}", query_ids=(i % 4,)))
        # The downloads run in two Beam worker processes: the guard must be active there (the
        # jail in those processes would turn a miss into connection_error, not blocked_address).
        server.route("/to-metadata", lambda req: redirect(req, "http://169.254.169.254/latest/"))
        server.route("/to-private", lambda req: redirect(req, "http://[fd00::1]/x.jpg"))
        rows += [pair(server.url("/to-metadata"), "m"), pair(server.url("/to-private"), "p")]
        input_dir = write_candidates(tmp_path / "in", rows)
        out = tmp_path / "out"
        args = [
            "download",
            "--input",
            input_dir,
            "--output",
            str(out),
            "--allow-loopback",
            "--set",
            f"download.samples_per_shard={PER_SHARD}",
            "--set",
            "download.threads=4",
            "--set",
            "download.timeout=60",
            "--set",
            "download.processes=2",
        ]
        proc = wit(*args)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                finished = sorted((out / "shards").glob("*.parquet"))
                if finished and gate.waiting >= 1:
                    break
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            else:
                pytest.fail("the first run never finished a shard")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        finished = sorted(p.stem for p in (out / "shards").glob("*.parquet"))
        num_shards = -(-(N_IMAGES + 2) // PER_SHARD)
        assert 1 <= len(finished) < num_shards
        assert not (out / "stats.json").exists()
        done_urls = {
            u for name in finished for u in pq.read_table(out / "shards" / f"{name}.parquet")["url"]
        }
        done_urls = {u.as_py() for u in done_urls}

        gate.open()
        server.requests.clear()
        proc = wit(*args)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"{N_IMAGES}/{N_IMAGES + 2} images" in stderr
        assert f"download: resuming ({len(finished)} shard(s) already finished)" in stderr
        again = {urls.normalize_url(server.url(p)) for _, p in server.requests}
        assert again and not (again & done_urls)  # finished shards were not downloaded again

        reference = tmp_path / "reference"
        cfg = DownloadConfig(
            allow_loopback=True, samples_per_shard=PER_SHARD, threads=4, timeout=60
        )
        run_download(input_dir, str(reference), cfg)
    assert snapshot(out) == snapshot(reference)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["url_counters"] == {
        "dropped:blocked_address": 2,
        "input": N_IMAGES + 2,
        "kept": N_IMAGES,
    }
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert sorted(r["caption"] for r in rejected if r["reason"] == "blocked_address") == ["m", "p"]

    # A rerun with other settings is refused with one line, before any work.
    from wit_pipeline import cli

    capsys.readouterr()
    assert cli.main([*args, "--set", "download.image_size=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wit: error: ") and "image_size" in err[0]
