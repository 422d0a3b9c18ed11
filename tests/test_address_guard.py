"""Callback URL checks: literal addresses in every form a resolver accepts, local names, credentials, and the
addresses a name resolves to (resolution stubbed: these tests open no socket)."""
from __future__ import annotations

import pytest

from processors.address_guard import (
    UnsafeCallbackUrl,
    check_resolved,
    check_url_at_intake,
    literal_address,
)

PUBLIC = ["https://example.com/cb", "http://hooks.example.org:8080/x?y=1", "http://93.184.215.14/", "http://8.8.8.8",
          "http://[2606:4700::1111]/cb", "https://example.com./trailing-dot", "http://[::ffff:8.8.8.8]/"]


@pytest.mark.parametrize("url", PUBLIC)
def test_public_hosts_pass_at_intake(url: str) -> None:
    check_url_at_intake(url)  # raises nothing


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 around 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 around 169.254.169.254
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd00::1]/", "private"),
    ("http://100.64.0.1/", "non-public"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://localhost/", "local name"),
    ("http://LOCALHOST:8000/", "local name"),
    ("http://api.localhost/", "local name"),
    ("http://printer.local/", "local name"),
    ("http://metadata.google.internal/", "local name"),
    ("http://nas.lan/", "local name"),
    ("http://router.home.arpa/", "local name"),
    ("http://intranet/", "single-label"),
    ("https://user:pass@example.com/", "credentials"),
    ("https://user@example.com/", "credentials"),
    ("ftp://example.com/", "http(s)"),
    ("file:///etc/passwd", "http(s)"),
    ("javascript:alert(1)", "http(s)"),
    ("http:///path-only", "http(s)"),
    ("http://[::1", "does not parse"),
    ("http://example.com:99999/", "does not parse"),
    ("http://example.com:port/", "does not parse"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/\r\nHost: x", "whitespace"),
])
def test_non_public_or_malformed_urls_are_refused_with_the_reason(url: str, words: str) -> None:
    with pytest.raises(UnsafeCallbackUrl, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_url_at_intake(url)


def test_refusals_are_value_errors() -> None:
    assert issubclass(UnsafeCallbackUrl, ValueError)
    with pytest.raises(UnsafeCallbackUrl, match="must be a string"):
        check_url_at_intake(None)


@pytest.mark.parametrize("host, expected", [
    ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("10.1.0x100", "10.1.1.0"), ("8.8.8.8", "8.8.8.8"), ("::1", "::1"),
    ("example.com", None), ("1.2.3.4.5", None), ("256.1.1.1", None), ("08.0.0.1", None), ("4294967296", None),
])
def test_literal_addresses_are_read_as_inet_aton_reads_them(host: str, expected: str | None) -> None:
    address = literal_address(host)
    assert (None if address is None else str(address)) == expected


def test_the_allow_list_admits_named_hosts_and_addresses_inside_its_blocks() -> None:
    allow = ("hooks.internal", "10.0.0.0/8", "::1", "  Printer.Local.  ")
    for url in ("http://hooks.internal/cb", "http://HOOKS.internal:81/", "http://10.2.3.4/", "http://0x0a.1/",
                "http://[::1]:9000/", "http://printer.local/"):
        check_url_at_intake(url, allow)
    for url in ("http://other.internal/", "http://192.168.0.1/", "http://127.0.0.1/", "http://user:pw@hooks.internal/"):
        with pytest.raises(UnsafeCallbackUrl):
            check_url_at_intake(url, allow)


def stub(answers: dict[str, list[str]], calls: list | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in answers:
            raise OSError(f"no such host {host}")
        return answers[host]
    return resolve


def test_a_name_resolving_only_to_public_addresses_passes_and_gives_them() -> None:
    calls: list = []
    resolve = stub({"hooks.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}, calls)
    assert check_resolved("https://hooks.example.com/cb", resolve) == (
        "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert check_resolved("http://hooks.example.com:8080/cb", resolve)
    assert calls == [("hooks.example.com", 443), ("hooks.example.com", 8080)]


@pytest.mark.parametrize("answer, words", [
    (["93.184.215.14", "127.0.0.1"], "loopback"),
    (["169.254.169.254"], "link-local"),
    (["::ffff:10.0.0.1"], "private"),
    (["fe80::1%eth0"], "link-local"),
    ([], "no address"),
    (["not-an-address"], "not an address"),
])
def test_a_name_resolving_to_any_non_public_address_is_refused(answer: list[str], words: str) -> None:
    with pytest.raises(UnsafeCallbackUrl, match=words):
        check_resolved("https://rebind.example.com/cb", stub({"rebind.example.com": answer}))


def test_resolution_checks_the_url_itself_first_and_lets_lookup_errors_through() -> None:
    calls: list = []
    with pytest.raises(UnsafeCallbackUrl, match="local name"):
        check_resolved("http://localhost/", stub({}, calls))
    assert calls == []  # refused before any lookup
    with pytest.raises(OSError, match="no such host"):
        check_resolved("https://gone.example.com/", stub({}))
    assert check_resolved("http://8.8.8.8/", stub({}, calls)) == ("8.8.8.8",) and calls == []


def test_resolved_private_addresses_inside_the_allow_list_pass() -> None:
    resolve = stub({"hooks.example.com": ["10.9.8.7"]})
    with pytest.raises(UnsafeCallbackUrl):
        check_resolved("https://hooks.example.com/", resolve)
    assert check_resolved("https://hooks.example.com/", resolve, ("10.0.0.0/8",)) == ("10.9.8.7",)
