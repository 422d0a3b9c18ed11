"""Which callback URLs the pipeline may call: public http(s) hosts only, unless an allow-list names them.

Two checks. At intake, `check_url_at_intake` refuses what the URL itself shows: another scheme, credentials, a
literal address that is not public (in any form a resolver accepts: dotted, one number, octal, hex, IPv6, an
IPv4 address inside IPv6), or a local name. At call time, `check_resolved` does the same for every address the
host name resolves to; resolution is injected, so this module opens no socket.

An allow-list entry is a host name (matched exactly, case-insensitive) or an address or CIDR block
(`10.0.0.0/8`, `fd00::/8`) that admits a literal or resolved address inside it.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import SplitResult, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str, int], list[str]]

SCHEMES = {"http": 80, "https": 443}
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa", ".localdomain")
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


class UnsafeCallbackUrl(ValueError):
    """A callback URL the pipeline will not call; the message says why."""


def check_url_at_intake(url: object, allowlist: Iterable[str] = ()) -> None:
    """Raises UnsafeCallbackUrl unless `url` is an http(s) URL without credentials whose host is a public
    literal address or a non-local name, or is admitted by the allow-list."""
    _, host = _split(url)
    names, networks = _parse_allowlist(allowlist)
    if host in names:
        return
    address = literal_address(host)
    if address is not None:
        problem = _address_problem(address)
        if problem and not _inside(address, networks):
            raise UnsafeCallbackUrl(f"callback_url host {host!r} is {problem}")
        return
    if host in LOCAL_NAMES or host.endswith(LOCAL_SUFFIXES):
        raise UnsafeCallbackUrl(f"callback_url host {host!r} is a local name")
    if "." not in host:
        raise UnsafeCallbackUrl(f"callback_url host {host!r} is a single-label (local) name")


def check_resolved(url: object, resolve: Resolve, allowlist: Iterable[str] = ()) -> tuple[str, ...]:
    """The intake check, then every address `resolve(host, port)` gives must be public or allow-listed.

    Returns the checked addresses: connect to one of them, not to a second resolution of the name, which may
    answer differently. Raises UnsafeCallbackUrl; whatever `resolve` raises (OSError for a failed lookup)
    propagates untouched."""
    check_url_at_intake(url, allowlist)
    parts, host = _split(url)
    names, networks = _parse_allowlist(allowlist)
    literal = literal_address(host)
    if host in names:
        return (str(literal),) if literal else tuple(resolve(host, _port(parts)))
    if literal is not None:
        return (str(literal),)
    resolved = tuple(resolve(host, _port(parts)))
    if not resolved:
        raise UnsafeCallbackUrl(f"callback_url host {host!r} resolves to no address")
    for text in resolved:
        try:
            address = ipaddress.ip_address(str(text).split("%", 1)[0])
        except ValueError:
            raise UnsafeCallbackUrl(f"callback_url host {host!r} resolves to {str(text)[:60]!r}, not an "
                                    "address") from None
        problem = _address_problem(address)
        if problem and not _inside(address, networks):
            raise UnsafeCallbackUrl(f"callback_url host {host!r} resolves to {address}, which is {problem}")
    return resolved


def literal_address(host: str) -> Address | None:
    """The address a resolver reads `host` as without asking DNS, or None for a name.

    Besides the usual forms, inet_aton's: one to four parts, each decimal, octal (leading 0) or hex (0x),
    the last part filling the remaining bytes (2130706433, 0x7f.1, 0177.0.0.1 are all 127.0.0.1)."""
    host = host.rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        number = _inet_aton_number(part)
        if number is None:
            return None
        numbers.append(number)
    *leading, last = numbers
    if any(n > 0xFF for n in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _inet_aton_number(part: str) -> int | None:
    text = part.lower()
    try:
        if text.startswith("0x"):
            return int(text[2:] or "0", 16)
        if len(text) > 1 and text.startswith("0"):
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def _address_problem(address: Address) -> str | None:
    """Why the pipeline must not call this address, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = _address_problem(embedded)
            return f"{problem} (inside the IPv6 address {address})" if problem else None
    for kind, flag in (("a loopback", address.is_loopback), ("an unspecified", address.is_unspecified),
                       ("a link-local", address.is_link_local), ("a multicast", address.is_multicast),
                       ("a reserved", address.is_reserved), ("a private", address.is_private)):
        if flag:
            return f"{kind} address"
    return None if address.is_global else "a non-public address"


def _split(url: object) -> tuple[SplitResult, str]:
    if not isinstance(url, str):
        raise UnsafeCallbackUrl(f"callback_url must be a string, got {type(url).__name__}")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise UnsafeCallbackUrl("callback_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise UnsafeCallbackUrl(f"callback_url {url[:200]!r} does not parse: {exc}") from None
    if parts.scheme not in SCHEMES or not host:
        raise UnsafeCallbackUrl(f"callback_url {url[:200]!r}: must be an http(s) URL with a host")
    if "@" in parts.netloc:
        raise UnsafeCallbackUrl("callback_url carries credentials (user:password@host); they are not accepted")
    return parts, host.rstrip(".")


def _port(parts: SplitResult) -> int:
    return parts.port or SCHEMES[parts.scheme]


def _parse_allowlist(entries: Iterable[str]) -> tuple[frozenset[str], tuple[Network, ...]]:
    names, networks = set(), []
    for entry in entries:
        text = str(entry).strip().lower().rstrip(".")
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            if text:
                names.add(text.strip("[]"))
    return frozenset(names), tuple(networks)


def _inside(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == network.version and address in network for network in networks)
