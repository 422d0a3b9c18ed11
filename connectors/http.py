"""HTTP POST to an address checked beforehand: the connection goes to that address, not to a second resolution
of the name (which a DNS rebinding attack answers differently), while the URL's host stays in the Host header
and in TLS (server name and certificate check)."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

RESPONSE_READ_LIMIT = 64 * 1024  # a receiver's answer is read only so far: its status is what counts


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for TCP, in the resolver's order, without duplicates (through the event
    loop's executor, so a slow DNS server blocks no other delivery)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canonical, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


class PinnedResolver(AbstractResolver):
    """Answers for one host name only, with the addresses given; any other name is an error, so a redirect or a
    proxy can never lead the connection elsewhere."""

    def __init__(self, host: str, addresses: Sequence[str]) -> None:
        self._host = host.lower().rstrip(".")
        self._addresses = tuple(addresses)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        if host.lower().rstrip(".").strip("[]") != self._host.strip("[]"):
            raise OSError(f"resolution of {host!r} refused: the connection is pinned to {self._host!r}")
        return [{"hostname": host, "host": address, "port": port,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for address in self._addresses]

    async def close(self) -> None:
        return None


async def post_pinned(url: str, addresses: Sequence[str], body: bytes, headers: Mapping[str, str], *,
                      timeout_s: float) -> int:
    """POSTs `body` to `url`, connecting only to `addresses`; returns the HTTP status. Redirects are not followed
    and proxy settings from the environment are ignored: either would send the request somewhere unchecked.
    Raises aiohttp.ClientError, OSError or asyncio.TimeoutError when no status came back."""
    host = urlsplit(url).hostname or ""
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(host, addresses), use_dns_cache=False,
                                     force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    session_args: dict[str, Any] = {"connector": connector, "timeout": timeout, "trust_env": False,
                                    "auto_decompress": False}
    async with aiohttp.ClientSession(**session_args) as session, \
            session.post(url, data=body, headers=dict(headers), allow_redirects=False) as response:
        await response.content.read(RESPONSE_READ_LIMIT)
        return response.status
