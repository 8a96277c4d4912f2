import pytest

from wit_pipeline import urls


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("HTTP://Example.COM:80/a/./b/../c.jpg#frag", "http://example.com/a/c.jpg"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://example.com/%7euser/a%2fb.jpg", "http://example.com/~user/a%2Fb.jpg"),
        ("http://example.com/a b.jpg?q=1 2", "http://example.com/a%20b.jpg?q=1%202"),
        ("http://bücher.de/x.png", "http://xn--bcher-kva.de/x.png"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://example.com./x?b=2&a=1", "http://example.com/x?b=2&a=1"),
        ("  http://example.com/x  ", "http://example.com/x"),
    ],
)
def test_normalize_url(raw, want):
    assert urls.normalize_url(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        "data:image/png;base64,AAAA",
        "javascript:void(0)",
        "ftp://example.com/x.jpg",
        "/relative/x.jpg",
        "http://",
        "http://[bad/x",
        "blob:https://example.com/1",
    ],
)
def test_normalize_url_rejects_non_http(raw):
    assert urls.normalize_url(raw) is None


def test_normalize_is_idempotent():
    for raw in ["http://EX.com/a/../b%41?x=%7e", "https://a.b/c d/é"]:
        once = urls.normalize_url(raw)
        assert urls.normalize_url(once) == once


def test_uids_are_stable_and_distinct():
    a = urls.pair_uid("http://example.com/", "a dog")
    assert a == urls.pair_uid("http://example.com/", "a dog")
    assert a != urls.pair_uid("http://example.com/", "a cat")
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert urls.stable_hash("ab", "c") != urls.stable_hash("a", "bc")
    assert len(a) == 32
    # Pinned: a change of hash function would silently re-key every existing dataset.
    assert a == "f8bd2af0788dd924a203d943c3e0803d"
