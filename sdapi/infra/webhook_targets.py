"""Where a webhook may be sent: http(s) URLs whose addresses are public.

Checked twice: when a request names the URL (`check_target`, web) and when
`jobs` connects (`CheckedResolver`): the resolver hands aiohttp only the
addresses it checked, so a name that resolves elsewhere the second time (DNS
rebinding) reaches no private address, and TLS still verifies the hostname.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from sdapi.contract.webhooks import URL_MAX

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services (AWS, GCP, Azure, ECS task metadata, AWS's IPv6
# one, Alibaba): refused by name so the reason is clear, though the address
# checks below catch them too.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
    )
)
# NAT64 (RFC 6052): the IPv4 address sits in the last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetRefused(ValueError):
    """A webhook URL or address we do not send to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A webhook URL's parts that the checks need."""

    host: str
    port: int
    literal: Address | None  # the host, when it is an IP address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64...), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if 1 < int(address) <= 0xFFFFFFFF:  # IPv4-compatible (::a.b.c.d), deprecated
        return ipaddress.IPv4Address(int(address))
    return None


def address_refusal(address: Address) -> str | None:
    """Why a webhook may not connect to `address`; None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = address_refusal(inner)
            return None if reason is None else f"{reason} (as IPv6 {address})"
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    for what, flag in (
        ("the unspecified address", address.is_unspecified),
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", not address.is_global),
    ):
        if flag:
            return f"{address} is {what}"
    return None


def parse_target(url: str) -> Target:
    """The parts of an http(s) URL; TargetRefused for anything else."""
    if len(url) > URL_MAX:
        raise TargetRefused(f"The URL is longer than {URL_MAX} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"Not a valid URL: {exc}.") from None
    if parts.scheme not in {"http", "https"}:
        raise TargetRefused("Only http:// and https:// URLs are accepted.")
    host = parts.hostname
    if not host:
        raise TargetRefused("The URL has no host.")
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    return Target(
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
        literal=literal,
    )


async def resolve(
    host: str, port: int, family: socket.AddressFamily, timeout_s: float
) -> list[tuple[socket.AddressFamily, Address]]:
    """The addresses of `host` (getaddrinfo in a thread, within `timeout_s`).

    TargetRefused when the name does not resolve; TimeoutError past the deadline.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(
                host, port, family=family, type=socket.SOCK_STREAM
            )
    except socket.gaierror as exc:
        raise TargetRefused(f"{host} does not resolve ({exc.strerror}).") from None
    found: list[tuple[socket.AddressFamily, Address]] = []
    for info_family, _, _, _, sockaddr in infos:
        if info_family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if (info_family, address) not in found:
            found.append((info_family, address))
    if not found:
        raise TargetRefused(f"{host} has no IPv4 or IPv6 address.")
    return found


async def check_target(url: str, *, allow_private: bool, timeout_s: float) -> None:
    """Refuse (TargetRefused) a URL that is not http(s) or reaches a non-public
    address; any one such address refuses it. TimeoutError: DNS was too slow."""
    target = parse_target(url)
    if allow_private:
        return
    if target.literal is not None:
        addresses = [target.literal]
    else:
        found = await resolve(target.host, target.port, socket.AF_UNSPEC, timeout_s)
        addresses = [address for _, address in found]
    for address in addresses:
        reason = address_refusal(address)
        if reason is not None:
            raise TargetRefused(f"{target.host} is not a public address: {reason}.")


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver for webhooks: only the public addresses of a name.

    An IP address in the URL never reaches a resolver (aiohttp connects to it
    as it is): the sender checks those with `parse_target` first.
    """

    def __init__(self, *, allow_private: bool, timeout_s: float) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await resolve(host, port, family, self.timeout_s)
        allowed: list[ResolveResult] = []
        refusals: list[str] = []
        for info_family, address in found:
            reason = None if self.allow_private else address_refusal(address)
            if reason is not None:
                refusals.append(reason)
                continue
            allowed.append(
                ResolveResult(
                    hostname=host,
                    host=str(address),
                    port=port,
                    family=info_family,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not allowed:
            raise TargetRefused(
                f"{host} is not a public address: {'; '.join(refusals)}."
            )
        return allowed

    async def close(self) -> None:
        return None
