"""Fetch an image by URL without becoming an SSRF proxy.

Only http(s). Before every hop (the first request and each redirect) the host name is resolved
and every address it resolves to must be public: private, loopback, link-local (cloud metadata
at 169.254.169.254 included), multicast, reserved and unspecified addresses are refused, as are
IPv4-mapped forms of them. Redirects are followed by hand, with a hop limit, an overall deadline
and a byte cap. Residual risk: a resolver that answers differently between the check and the
connection (DNS rebinding) is not pinned; run the service behind an egress policy as well.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

Resolver = Callable[[str, int], list[str]]


class UrlFetchError(Exception):
    """The URL cannot or may not be fetched; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlFetchError(f"cannot resolve host {host!r} ({exc})", 422) from exc
    return sorted({str(info[4][0]) for info in infos})


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


@dataclass
class UrlFetcher:
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False  # tests and trusted intranets only
    resolver: Resolver = system_resolver

    def check(self, url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UrlFetchError(f"only http and https URLs are accepted, got {parts.scheme!r}://")
        if not parts.hostname:
            raise UrlFetchError(f"URL {url!r} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = self.resolver(parts.hostname, port)
        if not addresses:
            raise UrlFetchError(f"host {parts.hostname!r} resolves to no address", 422)
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise UrlFetchError(
                    f"refused: {parts.hostname!r} resolves to a non-public address "
                    f"({', '.join(refused)}); only public hosts may be fetched",
                    403,
                )
        return parts.hostname, port

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            self.check(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UrlFetchError(f"fetching {url!r} took longer than {self.timeout:.0f} s", 504)
            try:
                with (
                    httpx.Client(
                        timeout=httpx.Timeout(remaining), follow_redirects=False, trust_env=False
                    ) as client,
                    client.stream("GET", url, headers={"Accept": "image/*"}) as response,
                ):
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise UrlFetchError(f"redirect from {url!r} without a Location", 422)
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise UrlFetchError(f"{url!r} answered HTTP {response.status_code}", 422)
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > self.max_bytes:
                        raise UrlFetchError(
                            f"{url!r} is {declared} bytes; the limit is {self.max_bytes}", 413
                        )
                    chunks, total = [], 0
                    for chunk in response.iter_bytes(65536):
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise UrlFetchError(
                                f"{url!r} is larger than the limit of {self.max_bytes} bytes", 413
                            )
                        if time.monotonic() > deadline:
                            raise UrlFetchError(
                                f"fetching {url!r} took longer than {self.timeout:.0f} s", 504
                            )
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException as exc:
                raise UrlFetchError(f"fetching {url!r} timed out", 504) from exc
            except httpx.HTTPError as exc:
                raise UrlFetchError(f"fetching {url!r} failed: {exc}", 422) from exc
        raise UrlFetchError(f"more than {self.max_redirects} redirects", 422)
