"""Fetch an image by URL without becoming an SSRF proxy or a thread sink.

What is checked, at every hop (the first request and each redirect):

- the URL parses, its scheme is http(s), its port is a port and httpx can request it (no
  control characters, no lone surrogates); anything malformed, a redirect's Location included,
  is a 422 that names the problem, refused before any name is resolved;
- the host resolves, and every address it resolves to is public: private, loopback,
  link-local (cloud metadata at 169.254.169.254 included), multicast, reserved and unspecified
  addresses are refused (403), as are IPv4-mapped forms of them;
- the connection goes to the very address that was checked (the host name is kept in the Host
  header and as the TLS server name), so a resolver that answers differently a moment later
  (DNS rebinding) cannot redirect it.

Limits: one overall deadline per fetch (not per read: a server sending a byte a second is cut
off at the deadline), a byte cap, a redirect limit, and a bound on concurrent fetches (429 when
reached). Fetching is async, so a slow server holds no worker thread; health checks, metrics and
uploads stay responsive. Upstream status codes are not echoed to the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urljoin, urlsplit

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
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlFetchError(f"cannot resolve host {host!r} ({exc})", 422) from exc
    # the system's preference order (RFC 6724), without duplicates: connect tries them in turn
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated (RFC 3879) but still routed locally


def is_public_address(address: str) -> bool:
    """Whether an address is a public unicast one, seen through every IPv6 form that embeds an
    IPv4 address: mapped (``::ffff:a.b.c.d``), 6to4 (``2002:AABB:CCDD::``) and Teredo (whose
    server and client addresses both must be public), so ``2002:a9fe:a9fe::1`` is the metadata
    address 169.254.169.254 it encodes; site-local ``fec0::/10`` counts as private."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in SITE_LOCAL:
            return False
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(v4 is not None and not is_public_address(str(v4)) for v4 in embedded):
            return False
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


@dataclass(frozen=True)
class Target:
    """A checked hop: where to connect (every checked address, in order) and whom to ask for
    (the host)."""

    url: str
    parts: SplitResult
    host: str
    port: int
    addresses: tuple[str, ...]

    def pinned_url(self, address: str) -> str:
        """The URL with its host replaced by one of the checked addresses."""
        literal = f"[{address}]" if ":" in address else address
        return self.parts._replace(netloc=f"{literal}:{self.port}").geturl()

    @property
    def host_header(self) -> str:
        default = 443 if self.parts.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def parse_url(url: str) -> tuple[SplitResult, str, int]:
    """(parts, host, port) of an http(s) URL, or a 422/400 naming what is wrong with it."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise UrlFetchError("the URL must be a string of at most 4096 characters", 422)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:  # bad port, unbalanced brackets
        raise UrlFetchError(f"malformed URL {url[:200]!r}: {exc}", 422) from exc
    if parts.scheme not in ("http", "https"):
        raise UrlFetchError(f"only http and https URLs are accepted, got {parts.scheme!r}://")
    if not host:
        raise UrlFetchError(f"URL {url[:200]!r} has no host", 422)
    if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
        raise UrlFetchError(f"malformed URL: host name {host[:80]!r}... is too long", 422)
    try:  # the ASCII (punycode) name is what DNS, the Host header and TLS's SNI carry
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UrlFetchError(f"malformed URL: host {host[:80]!r} is not a valid name", 422) from exc
    try:  # what httpx will be asked to request: control characters, lone surrogates
        httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise UrlFetchError(
            f"malformed URL {url[:200]!r}: {exc}; expected printable characters, "
            "percent-encoded where needed",
            422,
        ) from exc
    return parts, host, port or (443 if parts.scheme == "https" else 80)


@dataclass
class UrlFetcher:
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False  # tests and trusted intranets only
    resolver: Resolver = system_resolver
    max_concurrent: int = 8
    _active: int = field(default=0, init=False, repr=False)

    def check(self, url: str) -> Target:
        """Parse, resolve and vet one hop; returns the address to connect to."""
        parts, host, port = parse_url(url)
        addresses = self.resolver(host, port)
        if not addresses:
            raise UrlFetchError(f"host {host!r} resolves to no address", 422)
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise UrlFetchError(
                    f"refused: {host!r} resolves to a non-public address "
                    f"({', '.join(refused)}); only public hosts may be fetched",
                    403,
                )
        return Target(url, parts, host, port, tuple(addresses))

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (following checked redirects), within one overall deadline."""
        if self._active >= self.max_concurrent:
            raise UrlFetchError(
                f"{self._active} URL fetches are in progress; try again shortly", 429
            )
        self._active += 1
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise UrlFetchError(
                f"fetching {url[:200]!r} took longer than {self.timeout:.0f} s", 504
            ) from None
        finally:
            self._active -= 1

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self.max_redirects + 1):
            target = await asyncio.to_thread(self.check, url)
            location, body = await self._get(target)
            if location is None:
                return body
            try:  # the next hop's check() vets the result like a client's URL
                url = urljoin(url, location)
            except ValueError as exc:  # unbalanced brackets in the Location
                raise UrlFetchError(
                    f"redirect from {url[:200]!r} to a malformed URL {location[:200]!r} ({exc})",
                    422,
                ) from exc
        raise UrlFetchError(f"more than {self.max_redirects} redirects", 422)

    async def _get(self, target: Target) -> tuple[str | None, bytes]:
        """GET one hop from the first checked address that accepts a connection (a dual-stack
        host may publish IPv6 first to a pod without IPv6): (a redirect's Location, b"") or
        (None, the body)."""
        url = target.url
        extensions = {"sni_hostname": target.host} if target.parts.scheme == "https" else {}
        headers = {
            "Host": target.host_header,
            "Accept": "image/*",
            "Accept-Encoding": "identity",  # raw bytes are the image's bytes
        }
        for index, address in enumerate(target.addresses):
            try:
                async with (
                    httpx.AsyncClient(
                        timeout=httpx.Timeout(self.timeout), follow_redirects=False, trust_env=False
                    ) as client,
                    client.stream(
                        "GET", target.pinned_url(address), headers=headers, extensions=extensions
                    ) as response,
                ):
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise UrlFetchError(f"redirect from {url!r} without a Location", 422)
                        return location, b""
                    if response.status_code != 200:
                        raise UrlFetchError(
                            f"{url[:200]!r} did not return an image (the server refused)", 422
                        )
                    return None, await self._read(response, url)
            except httpx.ConnectError as exc:
                if index + 1 < len(target.addresses):
                    continue  # the next checked address; never a fresh resolution
                raise UrlFetchError(
                    f"fetching {url[:200]!r} failed (cannot connect to any of its "
                    f"{len(target.addresses)} address(es))",
                    422,
                ) from exc
            except httpx.TimeoutException as exc:
                raise UrlFetchError(f"fetching {url[:200]!r} timed out", 504) from exc
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
                # check() refuses what httpx cannot request; this keeps any other case a 422
                raise UrlFetchError(
                    f"fetching {url[:200]!r} failed ({type(exc).__name__})", 422
                ) from exc
        raise UrlFetchError(f"host of {url[:200]!r} has no address", 422)

    async def _read(self, response: httpx.Response, url: str) -> bytes:
        declared = response.headers.get("content-length") or "0"
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise UrlFetchError(f"{url!r} is {declared} bytes; the limit is {self.max_bytes}", 413)
        chunks, total = [], 0
        async for chunk in response.aiter_raw():  # as bytes arrive: the deadline applies
            total += len(chunk)
            if total > self.max_bytes:
                raise UrlFetchError(
                    f"{url!r} is larger than the limit of {self.max_bytes} bytes", 413
                )
            chunks.append(chunk)
        return b"".join(chunks)
