"""The generated demo web: deterministic, served on loopback, with every planted case present."""

import gzip
import io
import json
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from wit_pipeline.demo import scenes, web
from wit_pipeline.loopback import ImageServer


def _get(url):
    # A plain opener that does not follow redirects, so that the test never leaves loopback.
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    with ImageServer(str(out / "site"), mount="/") as srv:
        manifest = web.generate_web(
            str(out), base_url=srv.base_url, cfg=web.WebConfig(n_images=120)
        )
        srv.load_routes(str(out / "routes.json"))
        yield out, srv, manifest


def test_captions_describe_scenes():
    s = scenes.Scene("orange", "circle", 1, "grey", 3)
    assert [s.caption(i) for i in range(3)] == [
        "one orange circle on a grey background",
        "A drawing of an orange circle.",
        "One orange circle",
    ]
    assert scenes.Scene("red", "star", 3, "white", 1).caption(5) == "photo of three red stars"
    assert len(scenes.class_names()) == len(scenes.COLOURS) * len(scenes.SHAPES)


def test_render_is_deterministic():
    s = scenes.Scene("blue", "triangle", 2, "black", 11)
    assert scenes.render(s).tobytes() == scenes.render(s).tobytes()
    assert (
        scenes.render(s).tobytes()
        != scenes.render(scenes.Scene("blue", "triangle", 2, "black", 12)).tobytes()
    )


def test_manifest_lists_every_planted_case(demo):
    _, _, manifest = demo
    for kind in [
        "exact_copy",
        "foreign_caption",
        "junk_caption",
        "truncated_image",
        "html_as_image",
        "empty_body",
        "http_404",
        "decompression_bomb",
        "robots_disallowed",
        "x_robots_tag_noai",
        "redirect_to_private",
        "data_uri",
    ]:
        assert manifest["planted"].get(kind, 0) >= 1, kind
    assert manifest["pages"] >= 5


def test_planted_items_after_prebalancing_name_a_word_no_scene_caption_has(demo):
    """Their pre-balance keep probability is then 1 (docs/demo.md): each caption has a word that
    no caption of any scene has, and that word is in no more than 5 planted captions."""
    words = {
        w
        for colour in scenes.COLOURS
        for shape in scenes.SHAPES
        for count in scenes.COUNT_WORDS
        for bg in scenes.BACKGROUNDS
        for i in range(len(scenes.TEMPLATES))
        for w in scenes.Scene(colour, shape, count, bg, 0).caption(i).lower().strip(".").split()
    }
    late = {
        "truncated_image",
        "html_as_image",
        "empty_body",
        "http_404",
        "decompression_bomb",
        "robots_disallowed",
        "x_robots_tag_noai",
        "redirect_to_private",
        "eval_copy",
    }
    _, _, manifest = demo
    captions = [i["caption"] for i in manifest["planted_items"] if i["kind"] in late]
    assert len(captions) == 3 + 1 + 1 + 3 + 1 + 5 + 5 + 2 + 4

    def uses(word: str) -> int:
        return sum(word in c.lower().replace(",", "").split() for c in captions)

    rarest = {
        c: min(uses(w) for w in set(c.lower().replace(",", "").split()) - words) for c in captions
    }
    assert max(rarest.values()) == 4  # "postcard", on the four held-out copies


def test_server_answers_each_case(demo):
    _out, srv, _manifest = demo
    base = srv.base_url
    status, headers, body = _get(f"{base}/img/00000.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (96, 96)
    assert _get(f"{base}/missing/0.jpg")[0] == 404
    status, headers, _ = _get(f"{base}/redirect/1.jpg")
    assert status == 302 and headers["Location"] == "http://169.254.169.254/latest/meta-data/"
    assert _get(f"{base}/optout/0.jpg")[1]["X-Robots-Tag"] == "noai"
    assert b"Disallow: /private/" in _get(f"{base}/robots.txt")[2]
    assert _get(f"{base}/../../etc/passwd")[0] == 404
    bomb = _get(f"{base}/huge/bomb.png")[2]
    assert len(bomb) < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))


def test_warc_holds_every_page(demo):
    _out, srv, manifest = demo
    from warcio.archiveiterator import ArchiveIterator

    with open(manifest["warc"], "rb") as f:
        records = [
            (r.rec_type, r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
            for r in ArchiveIterator(f)
        ]
    responses = [r for r in records if r[0] == "response"]
    assert records[0][0] == "warcinfo"
    assert len(responses) == manifest["pages"]
    assert all(uri.startswith(srv.base_url + "/pages/") for _, uri, _ in responses)
    assert b"<img" in responses[0][2]
    # One gzip member per record, as Common Crawl writes them.
    with open(manifest["warc"], "rb") as f:
        raw = f.read()
    assert raw.count(b"\x1f\x8b\x08") >= len(records)
    assert gzip.decompress(raw).startswith(b"WARC/1.0")


def test_table_and_eval_set(demo):
    out, srv, manifest = demo
    table = pq.read_table(manifest["table"]).to_pylist()
    assert table and all(r["url"].startswith(srv.base_url) for r in table)
    ev = pq.read_table(manifest["eval"])
    assert ev.column_names == ["image", "label"]
    assert sorted(set(ev.column("label").to_pylist())) == sorted(scenes.class_names())
    assert json.loads((out / "web.json").read_text())["base_url"] == srv.base_url


def test_generation_is_deterministic(tmp_path):
    a = web.generate_web(
        str(tmp_path / "a"), base_url="http://127.0.0.1:1", cfg=web.WebConfig(n_images=30)
    )
    b = web.generate_web(
        str(tmp_path / "b"), base_url="http://127.0.0.1:1", cfg=web.WebConfig(n_images=30)
    )
    assert a["planted"] == b["planted"]
    for name in ["pairs.parquet", "routes.json", "site/pages/0000.html", "site/img/00007.jpg"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
