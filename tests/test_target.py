"""Request targets: origin-form forwarding, absolute-form cut to its path, and every spelling of
a path that a backend may route to (for VESPA_BLOCKED_PATHS)."""

from __future__ import annotations

import fnmatch
import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given, strategies as st

from vespa.http.target import normal_path, origin_form, path_of, spellings


@pytest.mark.parametrize("target", ["/", "/echo", "/../../etc/passwd", "//evil.example/echo",
                                    "/echo?next=http://evil.example/", "/echo/%2e%2e/x",
                                    "/echo#fragment", "/echo/\\..\\x"])
def test_origin_form_is_kept_byte_for_byte(target):
    assert origin_form(target) is target


@pytest.mark.parametrize("target,expected", [
    ("http://evil.example/echo", "/echo"),
    ("https://evil.example:8443/echo?x=1", "/echo?x=1"),
    ("http://user:pass@evil.example/echo", "/echo"),
    ("HTTP://EVIL.EXAMPLE/echo", "/echo"),
    ("http://evil.example", "/"),
    ("http://evil.example?x=1", "/?x=1"),
    ("http://evil.example#top", "/"),
    ("http://127.0.0.1:1//admin/../x", "//admin/../x"),
])
def test_absolute_form_becomes_its_path_and_query(target, expected):
    assert origin_form(target) == expected


@pytest.mark.parametrize("target", ["*", "evil.example:443", "echo", "", "%2fecho",
                                    "ftp://evil.example/x", "http:/x", "http:evil"])
def test_targets_without_a_path_are_none(target):
    assert origin_form(target) is None


@pytest.mark.parametrize("target,path", [
    ("/a/b?c=d", "/a/b"), ("/a#f?x", "/a"), ("/a?x#f", "/a"), ("/", "/"), ("/a%3Fb", "/a%3Fb")])
def test_path_of_drops_query_and_fragment(target, path):
    assert path_of(target) == path


@pytest.mark.parametrize("path,normal", [
    ("/", "/"),
    ("/admin/reset", "/admin/reset"),
    ("/admin/../admin/reset", "/admin/reset"),
    ("/echo/../admin/reset", "/admin/reset"),
    ("/echo/%2e%2e/admin/reset", "/admin/reset"),
    ("/echo/%2E%2E/admin/reset", "/admin/reset"),
    ("/./admin/reset", "/admin/reset"),
    ("//admin/reset", "/admin/reset"),
    ("/admin//reset", "/admin/reset"),
    ("/admin/./reset", "/admin/reset"),
    ("/%61dmin/reset", "/admin/reset"),
    ("/admin%2freset", "/admin/reset"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/b/", "/a/b/"),
    ("/a/b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/..", "/"),
    ("/a/%252e%252e/b", "/a/%2e%2e/b"),  # decoded once, as a backend does
])
def test_normal_path(path, normal):
    assert normal_path(path) == normal


def test_spellings_are_as_sent_and_normal():
    assert spellings("/echo?x=1") == ("/echo",)
    assert spellings("/admin/x/../reset?q") == ("/admin/x/../reset", "/admin/reset")
    assert spellings("//admin/reset") == ("//admin/reset", "/admin/reset")


BLOCKED = "/admin/*"
BYPASSES = ["/admin/../admin/reset", "/echo/../admin/reset", "/echo/%2e%2e/admin/reset",
            "/./admin/reset", "//admin/reset", "/admin//reset", "/admin/./reset",
            "/%61dmin/reset", "/admin%2freset", "/echo/%2E%2E/admin/reset",
            "/admin/%2e%2e/admin/reset?x=1", "/admin/reset#frag"]


@pytest.mark.parametrize("target", BYPASSES)
def test_every_spelling_of_a_blocked_path_is_caught(target):
    assert any(fnmatch.fnmatchcase(p, BLOCKED) for p in spellings(target))


@pytest.mark.parametrize("target", ["/echo", "/administrator", "/echo/admin/reset",
                                    "/admin", "/echo?next=/admin/reset"])
def test_other_paths_are_not_caught(target):
    assert not any(fnmatch.fnmatchcase(p, BLOCKED) for p in spellings(target))


SEGMENT = st.sampled_from(["a", "b", "admin", ".", "..", "", "%2e", "%2E%2e", "%61", "x%2fy"])


@given(st.lists(SEGMENT, max_size=8))
def test_normal_form_is_what_posix_normalisation_of_the_decoded_path_gives(segments):
    """Same answer as an independent normaliser: no dot segments, no empty segments, stable."""
    path = "/" + "/".join(segments)
    normal = normal_path(path)
    expected = posixpath.normpath("/" + unquote(path).lstrip("/"))
    assert normal.rstrip("/") == expected.rstrip("/")
    assert "//" not in normal
    assert all(part not in (".", "..") for part in normal.split("/"))
    assert normal_path(normal) == normal or "%" in unquote(path)
