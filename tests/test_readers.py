"""Readers: WARC (with damaged files), WAT, tables, HTML extraction; exact outputs and counters."""

import collections
import gzip
import json
import zlib

import crawl_fixtures as cf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline.config import GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather.readers import detect_format, iter_file_batches, tables, warc, wat
from wit_pipeline.stages.gather.readers.html import decode_html, extract_images, pick_image_url


def read_all(path, cfg=None):
    counter = collections.Counter()
    rows = [
        (u, c, p)
        for b in iter_file_batches(str(path), cfg=cfg, counter=counter)
        for u, c, p in zip(b.urls, b.captions, b.page_urls, strict=True)
    ]
    return rows, dict(sorted(counter.items()))


P1 = cf.PAGE1_URI
FIXTURE_PAIRS = [
    ("http://example.com/static/dog.jpg", "A dog on the beach", P1),
    ("https://cdn.example.com/cat.jpg", "A cat &amp; a dog   sleeping", P1),
    ("javascript:void(0)", "a hot dog stand", P1),
    ("blob:https://example.com/1234", "a red dog toy", P1),
    ("data:image/png;base64,iVBORw0KGgo=", "a small dog", P1),
    (None, "a dog without a source", P1),
    ("http://cdn.example.com/sunset.jpg", None, P1),
    ("http://example.com/static/empty.jpg", None, P1),
    ("http://example.com/static/tiny.jpg", "dog", P1),
    ("http://example.com/static/dog.jpg", "A dog on the beach", P1),
    ("http://[::1/bad.jpg", "a broken dog url", P1),
    ("https://example.com/fr.jpg", "Un chien qui joue sur la plage avec son maître", P1),
    ("https://example.com/nomatch.jpg", "Sunset over the mountains", P1),
    ("https://example.com/small.jpg", "A puppy playing", P1),
    ("http://example.org/a.jpg", "Собака бежит по пляжу летом", cf.PAGE2_URI),
    ("http://example.net/b.jpg", "A dog \ufffd\ufffd on the grass", cf.PAGE3_URI),
    ("http://example.net/c.jpg", "A dog in the snow", cf.PAGE4_URI),
    ("http://example.edu/img/café.jpg", "A dog sitting in a café by the beach", cf.PAGE5_URI),
]


def test_warc_gz_with_damage_reads_every_intact_record(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    path.write_bytes(cf.damaged_warc_gz())
    rows, counts = read_all(path)
    assert rows == FIXTURE_PAIRS
    assert counts == {
        "warc:charset_errors": 1,  # PAGE3: declared UTF-8, holds invalid bytes
        "warc:charset_unknown_charset": 1,  # PAGE4: charset=x-klingon
        "warc:digest_mismatches": 1,
        "warc:html_pages": 5,
        "warc:read_errors": 1,  # the corrupt gzip member
        "warc:records": 7,
        "warc:resyncs": 5,
        "warc:skipped_not_html": 1,
        "warc:skipped_status": 1,
        "warc:truncated_records": 1,  # the cut last member
    }


def test_plain_warc_with_a_lying_content_length(tmp_path):
    path = tmp_path / "crawl.warc"
    path.write_bytes(cf.damaged_plain_warc())
    rows, counts = read_all(path)
    assert rows == FIXTURE_PAIRS
    assert counts["warc:digest_mismatches"] == 2  # the lying record and the wrong digest
    assert counts["warc:truncated_records"] == 1
    assert counts["warc:html_pages"] == 5


def test_digest_check_can_be_turned_off(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    path.write_bytes(cf.damaged_warc_gz())
    rows, counts = read_all(path, GatherConfig(verify_digests=False))
    assert ("http://lost.example.com/lost.jpg", "A lost dog on the beach", None) not in rows
    assert rows[-1] == (
        "http://example.com/lost.jpg",
        "A lost dog on the beach",
        "http://example.com/wrong-digest",
    )
    assert "warc:digest_mismatches" not in counts


def test_encoded_bodies_are_decoded(tmp_path):
    path = tmp_path / "wget.warc.gz"
    path.write_bytes(cf.encoded_response_warc())
    rows, counts = read_all(path)
    assert rows == [("https://wget.example/p.jpg", "A puppy in the snow", "https://wget.example/")]
    assert counts == {"warc:html_pages": 1, "warc:records": 1}


def test_iter_records_yields_each_type_asked_for(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    path.write_bytes(b"".join(cf.gz(r) for r in cf.warc_records()))
    counter = collections.Counter()
    with open(path, "rb") as f:
        types = [
            r.record_type
            for r in warc.iter_records(
                f, record_types=("request", "metadata", "warcinfo"), counter=counter
            )
        ]
    assert types == ["warcinfo", "request", "metadata"]
    assert counter == {"warc:records": 3}


def test_real_common_crawl_warc(shared_data):
    rows, counts = read_all(shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz")
    assert counts == {"warc:html_pages": 16, "warc:records": 16}
    assert len(rows) == 153
    assert sum(1 for _, c, _ in rows if c) == 32
    assert sum(1 for u, _, _ in rows if u is None) == 4  # <img> without any src attribute
    assert all(u.startswith(("http://", "https://")) for u, _, _ in rows if u)
    # Cyrillic from a windows-1251 page and Chinese from GB2312 pages decode cleanly.
    captions = {c for _, c, _ in rows if c}
    assert "Стратегия пожарной безопасности" in captions
    assert "中山英才网" in captions
    assert (
        "http://01spb.ru/logo.png",
        "Стратегия пожарной безопасности",
        "http://01spb.ru/company/",
    ) in rows


def _members(data):
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        used = len(data) - pos - len(d.unused_data)
        out.append(data[pos : pos + used])
        pos += used
    return out


def test_real_warc_damaged_loses_only_the_damaged_page(shared_data, tmp_path):
    data = (shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz").read_bytes()
    members = _members(data)
    assert len(members) == 50  # warcinfo + 16 x (request, response, metadata) + 1
    intact, _ = read_all(shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz")
    # Member 5 is the response of the second page (01spb.ru): corrupt it. Member 44 is the
    # response of the last page with images (0900-hovenier.nl): cut the file in its middle.
    assert b"01spb.ru" in zlib.decompress(members[5], 31)[:2000]
    assert b"0900-hovenier.nl" in zlib.decompress(members[44], 31)[:2000]
    damaged = (
        b"".join(members[:5])
        + cf.corrupt_member(members[5])
        + b"".join(members[6:44])
        + members[44][: len(members[44]) // 2]
    )
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(damaged)
    rows, counts = read_all(path)
    lost = {"http://01spb.ru/company/", "http://0900-hovenier.nl/gelderland/oosterbeek/"}
    assert sum(1 for r in intact if r[2] in lost) == 8
    assert rows == [r for r in intact if r[2] not in lost]
    assert counts["warc:read_errors"] == 1
    assert counts["warc:truncated_records"] == 1
    assert counts["warc:html_pages"] == 13  # 16 - 2 damaged - 1 cut off entirely


def test_wat_reader_published_layout(tmp_path):
    path = tmp_path / "CC-MAIN-x.warc.wat.gz"
    path.write_bytes(cf.wat_gz())
    assert detect_format(str(path)) == "wat"
    rows, counts = read_all(path)
    page = cf.WAT_PAGE_URI
    assert rows == [
        ("https://static.example.com/media/dog.jpg", "A happy dog on the beach", page),
        ("http://cdn.example.com/cat.png", "A cat asleep", page),
        ("https://static.example.com/media/spacer.gif", None, page),
        ("data:image/gif;base64,R0lGOD", "a dog icon", page),
        ("https://static.example.com/media/puppy.jpg", "Welpe im Schnee", page),
    ]
    assert counts == {
        "wat:bad_json": 1,
        "wat:html_pages": 1,
        "wat:records": 6,
        "wat:skipped_not_html": 1,
        "wat:skipped_status": 1,
    }


def test_wat_caption_attributes():
    cfg = GatherConfig(caption_attributes=("title", "alt"))
    doc = cf.wat_document(cf.WAT_PAGE_URI, html=cf.WAT_HTML)
    got = wat.images_from_wat_json(doc, cfg=cfg, counter=collections.Counter())
    assert [c for _, c, _ in got] == [
        "A happy dog on the beach",
        "A cat asleep",
        None,
        "a dog icon",
        "Welpe",
    ]


def test_extract_images_lazy_load_srcset_and_base():
    html = """<html><head><base href="https://cdn.example.com/a/"></head><body>
    <img src="data:image/gif;base64,xx" data-src="/real.jpg" alt="lazy">
    <img data-lazy-src="b.jpg" alt="lazy2">
    <img srcset="  s.jpg 1x, m,w_2.jpg 2x" alt="srcset">
    <img data-srcset="https://x.example/c,d.jpg 100w" alt="data-srcset">
    <IMG SRC="UPPER.JPG" ALT="upper">
    <img src="  spaced.jpg  " alt="  spaced  ">
    <noscript><img src="ns.jpg" alt="noscript copy"></noscript>
    </body></html>"""
    got = extract_images(
        html,
        "http://page.example.com/x/y.html",
        src_attributes=GatherConfig().src_attributes,
        srcset_attributes=GatherConfig().srcset_attributes,
    )
    assert got == [
        ("https://cdn.example.com/real.jpg", "lazy"),
        ("https://cdn.example.com/a/b.jpg", "lazy2"),
        ("https://cdn.example.com/a/s.jpg", "srcset"),
        ("https://x.example/c,d.jpg", "data-srcset"),
        ("https://cdn.example.com/a/UPPER.JPG", "upper"),
        ("https://cdn.example.com/a/spaced.jpg", "  spaced  "),
        ("https://cdn.example.com/a/ns.jpg", "noscript copy"),
    ]


def test_pick_image_url_falls_back_to_first_value_for_the_reason():
    assert pick_image_url({"src": "data:x"}, "http://a/", ("src", "data-src")) == "data:x"
    assert pick_image_url({"src": " ", "data-src": ""}, "http://a/", ("src", "data-src")) is None
    assert pick_image_url({"src": "mailto:x@y"}, "http://a/", ("src",)) == "mailto:x@y"


def test_decode_html_statuses():
    assert decode_html("é".encode(), "text/html; charset=utf-8") == ("é", "ok")
    assert decode_html("é".encode("cp1252"), "text/html") == ("é", "fallback")
    assert decode_html(b"\xef\xbb\xbfabc", "text/html; charset=latin1")[1] == "ok"
    assert decode_html(b"a\x81b", "text/html; charset=utf-8") == ("a\ufffdb", "errors")
    assert decode_html(b"abc", "text/html; charset=nope") == ("abc", "unknown_charset")
    meta = b'<meta charset="shift_jis">' + "犬".encode("cp932")
    assert decode_html(meta, "text/html")[0].endswith("犬")
    assert decode_html("犬".encode("gb18030"), "text/html; charset=gb2312") == ("犬", "ok")


# ---------------------------------------------------------------------------------------------
# Tables


def test_detect_format():
    cases = {
        "a.warc.gz": "warc",
        "a.warc": "warc",
        "CC-MAIN-1.warc.wat.gz": "wat",
        "x.wat": "wat",
        "t.parquet": "parquet",
        "t.csv.gz": "csv",
        "t.tsv": "tsv",
        "t.jsonl.zst": "jsonl",
        "gs://b/t.ndjson": "jsonl",
    }
    for name, fmt in cases.items():
        assert detect_format(name) == fmt, name
    with pytest.raises(WitError, match="cannot tell the format"):
        detect_format("notes.txt")
    assert detect_format("notes.txt", "csv") == "csv"


def test_parquet_laion_columns(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://a/1.jpg", None, "x"],
                "TEXT": ["one", "two", None],
                "similarity": [0.3, 0.2, 0.1],
            }
        ),
        path,
    )
    rows, counts = read_all(path)
    assert rows == [("http://a/1.jpg", "one", None), (None, "two", None), ("x", None, None)]
    assert counts == {"table:rows": 3}


def test_parquet_batches_and_explicit_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "image": [f"http://a/{i}.jpg" for i in range(10)],
                "alt": [f"caption {i}" for i in range(10)],
                "page_url": [f"http://p/{i}" for i in range(10)],
                "caption": ["wrong"] * 10,
            }
        ),
        path,
        row_group_size=3,
    )
    cfg = GatherConfig(url_column="image", caption_column="alt", batch_size=4)
    batches = list(iter_file_batches(str(path), cfg=cfg))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[2].urls == ["http://a/8.jpg", "http://a/9.jpg"]
    assert batches[2].captions == ["caption 8", "caption 9"]
    assert batches[2].page_urls == ["http://p/8", "http://p/9"]


def test_csv_quoted_newlines_empty_fields_bad_rows_gzip(tmp_path):
    text = (
        "url,caption,extra\n"
        'http://a/1.jpg,"A dog, running\non the beach",x\n'
        "http://a/2.jpg,,y\n"
        ",no url,z\n"
        'http://a/3.jpg,"too",many,fields\n'
        "http://a/4.jpg,plain,w\n"
    )
    (tmp_path / "t.csv").write_text(text)
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(text.encode()))
    want = [
        ("http://a/1.jpg", "A dog, running\non the beach", None),
        ("http://a/2.jpg", None, None),
        (None, "no url", None),
        ("http://a/4.jpg", "plain", None),
    ]
    for name in ("t.csv", "t.csv.gz"):
        rows, counts = read_all(tmp_path / name, GatherConfig(batch_size=3))
        assert rows == want, name
        assert counts == {"table:bad_rows": 1, "table:rows": 4}


def test_tsv_keeps_quote_characters(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text('\ufeffcaption\turl\n"quoted" caption\thttp://a/1.jpg\nit\'s\thttp://a/2.jpg\n')
    rows, counts = read_all(path)
    assert counts == {"table:rows": 2}
    assert rows == [("http://a/1.jpg", '"quoted" caption', None), ("http://a/2.jpg", "it's", None)]


def test_jsonl_with_bad_lines(tmp_path):
    lines = [
        json.dumps({"url": "http://a/1.jpg", "caption": "one", "page_url": "http://p/"}),
        "{not json",
        "[1, 2]",
        "",
        json.dumps({"url": "http://a/2.jpg", "caption": 7}),
        json.dumps({"caption": "no url"}),
    ]
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    rows, counts = read_all(path)
    assert rows == [
        ("http://a/1.jpg", "one", "http://p/"),
        ("http://a/2.jpg", "7", None),
        (None, "no url", None),
    ]
    assert counts == {"table:bad_rows": 2, "table:rows": 3}


def test_missing_columns_are_one_line_errors(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"link": ["x"], "TEXT": ["y"]}), path)
    with pytest.raises(WitError, match=r"t\.parquet: no URL column url/URL/image_url"):
        tables.check_table(str(path), GatherConfig())
    with pytest.raises(WitError, match="no caption column 'desc'"):
        tables.check_table(str(path), GatherConfig(url_column="link", caption_column="desc"))
    assert tables.check_table(str(path), GatherConfig(url_column="link")).caption == "TEXT"
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("Image_URL,Caption\nhttp://a/1.jpg,x\n")
    cols = tables.check_table(str(csv_path), GatherConfig())
    assert (cols.url, cols.caption) == ("Image_URL", "Caption")
