"""check_url and is_url on any text: only InputImageError comes out, and nothing is sent anywhere.

The resolver is faked throughout, so no DNS query leaves the machine; socket creation is refused too.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.guard.images import ImageLimits, InputImageError, check_url, is_url, pinned_request

IN_HOUSE = ImageLimits(allow_private_urls=True)
STRICT = ImageLimits()
CLEAN_NAME = re.compile(r"[A-Za-z0-9._:-]+")  # what may reach the resolver: ASCII labels or an IP literal


class FakeResolver:
    """Answers every name with loopback (or fails it, when told to) and records the names it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.fail = False

    def __call__(self, host: object, port: object, *args: object, **kwargs: object) -> list:
        self.asked.append(host)  # type: ignore[arg-type]
        if self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]


def no_sockets(*args: object, **kwargs: object) -> None:
    raise AssertionError("check_url opened a socket")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResolver]:
    fake = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(socket, "socket", no_sockets)
    yield fake


def only_input_image_errors(check: Callable[[], list[str]]) -> list[str] | None:
    try:
        addresses = check()
    except InputImageError as exc:
        assert str(exc).startswith("input_image: ")
        return None
    assert addresses and all(isinstance(a, str) for a in addresses)
    return addresses


def assert_safe(url: str, resolver: FakeResolver) -> None:
    """The property: whatever the text, only InputImageError; only clean names reach the resolver; an
    accepted URL also makes a request whose Host header is plain ASCII (what HTTP/1.1 can carry)."""
    assert isinstance(is_url(url), bool)
    resolver.asked.clear()
    addresses = only_input_image_errors(lambda: check_url(url, IN_HOUSE))
    assert all(isinstance(name, str) and CLEAN_NAME.fullmatch(name) for name in resolver.asked), resolver.asked
    if addresses is not None:
        target, headers, extensions = pinned_request(url, addresses[0])
        assert target.host == addresses[0]
        assert headers["Host"].isascii() and headers["Host"].isprintable()
        assert CLEAN_NAME.fullmatch(extensions["sni_hostname"])
    only_input_image_errors(lambda: check_url(url, STRICT))


# Each of these raised something other than InputImageError, or reached the resolver unchecked, before.
MALFORMED = [
    "http://[::1/",  # ValueError: Invalid IPv6 URL
    "https://[::ffff:127.0.0.1:80/",
    "http://" + "a" * 64 + ".example/",  # UnicodeError: label too long
    "http://" + "a." * 130 + "example/",  # name too long
    "http://",
    "http:///x.png",
    "http://:80/x.png",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:0/",
    "http://127.0.0.1:-1/",
    "http://127.0.0.1:http/",
    "http://ex\x00ample.com/",
    "http://example.com\x00/",
    "http://\ud800.example/",  # a lone surrogate
    "http://\u2603.example/",  # not valid IDNA 2008
    "http://a\u200bb.example/",  # zero-width space
    "http://xn--zz-\ufffd.example/",
    "http://a..b/",
    "http://./",
    "http://%31%32%37.0.0.1/",  # percent-encoded host
    "http://a b.example/",
    "http://[fe80::1%25eth0]/",  # zone id
    "http://[v1.fe80::a]/",
    "http://[]/",
    "http://[::1]]/",
    "http:example.com",
    "http:/example.com/x.png",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_refused_with_input_image_error(url: str, resolver: FakeResolver) -> None:
    with pytest.raises(InputImageError, match=r"^input_image: "):
        check_url(url, IN_HOUSE)
    assert resolver.asked == []  # refused on its shape, before any lookup
    assert_safe(url, resolver)


@pytest.mark.parametrize(
    ("url", "asked"),
    [
        ("http://b\u00fccher.example/x.png", "xn--bcher-kva.example"),
        ("http://B\u00dcCHER.example/x.png", "xn--bcher-kva.example"),
        ("http://\u00df.example/", "xn--zca.example"),
        ("http://xn--zca.example/", "xn--zca.example"),
        ("HTTPS://Example.COM./x.png", "example.com."),
        ("http://[::1]:8080/x.png", "::1"),
        ("http://127.1/", "127.1"),  # the resolver's own shorthand for 127.0.0.1: judged by its answer
    ],
)
def test_unusual_but_valid_urls_reach_the_resolver_as_ascii(url: str, asked: str, resolver: FakeResolver) -> None:
    assert check_url(url, IN_HOUSE) == ["127.0.0.1"]
    assert resolver.asked == [asked]
    assert_safe(url, resolver)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://user:secret@example.com/x.png", "a URL may not carry a user name or password"),
        ("http://example.com@127.0.0.1/x.png", "a URL may not carry a user name or password"),
        ("https://:@example.com/x.png", "a URL may not carry a user name or password"),
        ("http://[::1]@example.com/", "a URL may not carry a user name or password"),
        ("http://127.0.0.1\\@example.com/x.png", "a URL may not contain a backslash"),
        ("http://example.com\\x.png", "a URL may not contain a backslash"),
        ("https:\\\\example.com/x.png", "a URL may not contain a backslash"),
        ("http://example.com/a\\b.png", "a URL may not contain a backslash"),
    ],
)
def test_userinfo_and_backslashes_are_refused_at_check_time(url: str, reason: str, resolver: FakeResolver) -> None:
    with pytest.raises(InputImageError) as caught:
        check_url(url, IN_HOUSE)
    assert str(caught.value) == f"input_image: {reason}"
    assert resolver.asked == []


SPECIALS = [*"[]:@%./\\?#-_ \x00\t\n\ud800\u3002\uff0e", "xn--", "::", "%25"]  # with a surrogate and odd dots
URL_PIECES = st.characters() | st.sampled_from(SPECIALS)


def url_text(max_size: int) -> st.SearchStrategy[str]:
    return st.lists(URL_PIECES, max_size=max_size).map("".join)


@st.composite
def url_shaped(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "hTtPs", "ftp", "file", ""]))
    separator = draw(st.sampled_from(["://", ":/", ":", ":///", ":\\\\", "://["]))
    userinfo = draw(st.sampled_from(["", "user@", "user:pass@", ":@", "@"]))
    host = draw(
        st.one_of(
            url_text(40),
            st.from_regex(r"[a-z0-9-]{1,70}(\.[a-z0-9-]{0,70}){0,4}\.?", fullmatch=True),
            st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
            st.ip_addresses(v=6).map(str),  # without brackets
            st.text(st.characters(categories=["L", "N", "M", "S"]), min_size=1, max_size=20),
        )
    )
    ports = ["", ":", ":0", ":80", ":65535", ":65536", ":99999", ":-1", ":8a"]
    port = draw(st.sampled_from(ports) | st.text(max_size=6))
    path = draw(st.sampled_from(["", "/", "/x.png", "/a?b=c#d", "?", "#@evil"]) | url_text(20))
    return f"{scheme}{separator}{userinfo}{host}{port}{path}"


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=st.text(max_size=120), fail=st.booleans())
def test_any_text_gives_input_image_error_or_addresses(text: str, fail: bool, resolver: FakeResolver) -> None:
    resolver.fail = fail
    assert_safe(text, resolver)
    assert_safe("http://" + text, resolver)


@SETTINGS
@given(url=url_shaped(), fail=st.booleans())
def test_url_shaped_text_gives_input_image_error_or_addresses(url: str, fail: bool, resolver: FakeResolver) -> None:
    resolver.fail = fail
    assert_safe(url, resolver)
