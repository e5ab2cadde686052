"""Which webhook URLs and addresses are refused (SSRF), and the resolver that
hands aiohttp only checked addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from sdapi.infra.webhook_targets import (
    CheckedResolver,
    TargetRefused,
    address_refusal,
    check_target,
)

REFUSED_URLS = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.8.9.10:8080/hook", "loopback"),
    ("http://10.0.0.5/hook", "private"),
    ("http://172.16.3.4/hook", "private"),
    ("https://192.168.1.1/hook", "private"),
    ("http://100.64.0.1/hook", "reserved"),
    ("http://169.254.10.20/hook", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::]/hook", "unspecified"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[fc00::5]/hook", "private"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[::ffff:10.1.2.3]/hook", "private"),
    ("http://[::ffff:169.254.169.254]/hook", "cloud metadata"),
    ("http://[::ffff:a9fe:a9fe]/hook", "cloud metadata"),
    ("http://[::127.0.0.1]/hook", "loopback"),
    ("http://[2002:7f00:1::]/hook", "loopback"),
    ("http://[64:ff9b::10.0.0.1]/hook", "private"),
    ("http://localhost:8080/hook", "loopback"),
    ("http://2130706433/hook", "loopback"),
    ("http://127.1/hook", "loopback"),
    ("http://0x7f.0.0.1/hook", "loopback"),
    ("ftp://93.184.216.34/hook", "http:// and https://"),
    ("file:///etc/passwd", "http:// and https://"),
    ("javascript:alert(1)", "http:// and https://"),
    ("gopher://93.184.216.34:70/", "http:// and https://"),
    ("http:///no-host", "no host"),
    ("http://93.184.216.34:99999/", "Not a valid URL"),
    ("https://" + "a" * 2000 + ".example/", "longer than"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED_URLS)
async def test_non_public_and_non_http_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        await check_target(url, allow_private=False, timeout_s=5)


async def test_public_addresses_are_accepted() -> None:
    for url in (
        "https://93.184.216.34/hook",
        "http://[2606:4700:4700::1111]:8443/hook",
        "http://[::ffff:93.184.216.34]/hook",
    ):
        await check_target(url, allow_private=False, timeout_s=5)


async def test_allowing_private_addresses_still_wants_http() -> None:
    await check_target("http://127.0.0.1:9/hook", allow_private=True, timeout_s=5)
    await check_target("http://localhost/hook", allow_private=True, timeout_s=5)
    with pytest.raises(TargetRefused, match="http"):
        await check_target("file:///etc/passwd", allow_private=True, timeout_s=5)


async def test_resolving_has_a_deadline() -> None:
    with pytest.raises(TimeoutError):
        await check_target(
            "http://localhost/hook", allow_private=False, timeout_s=0.000001
        )


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(TargetRefused, match="does not resolve"):
        await check_target(
            "http://no-such-host.invalid/hook", allow_private=False, timeout_s=5
        )


async def test_the_resolver_returns_only_checked_addresses() -> None:
    refusing = CheckedResolver(allow_private=False, timeout_s=5)
    with pytest.raises(TargetRefused, match="localhost is not a public address"):
        await refusing.resolve("localhost", 8080, socket.AF_UNSPEC)
    allowing = CheckedResolver(allow_private=True, timeout_s=5)
    found = await allowing.resolve("localhost", 8080, socket.AF_INET)
    assert found
    for result in found:
        # A numeric address to connect to; the name stays for TLS.
        assert ipaddress.ip_address(result["host"]).is_loopback
        assert result["hostname"] == "localhost"
        assert result["port"] == 8080
    await allowing.close()


def test_every_metadata_form_is_named() -> None:
    for text in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        reason = address_refusal(ipaddress.ip_address(text))
        assert reason is not None
        assert "cloud metadata" in reason
    assert address_refusal(ipaddress.ip_address("93.184.216.34")) is None
