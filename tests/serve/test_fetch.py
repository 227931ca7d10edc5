"""URLs that httpx cannot request are a 422 before any name is resolved (review finding E).

``UrlFetcher`` caught only httpx's connection, timeout and HTTP errors: ``httpx.InvalidURL``
(a control character in the path) and ``UnicodeEncodeError`` (a lone surrogate) escaped as 500s
once the host resolved, and a redirect to ``http://[::1/`` raised ``ValueError`` in ``urljoin``.
No test here needs the network: the resolver is a spy, the redirecting server is on loopback.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from histolite.serve.app import ServeSettings, create_app
from histolite.serve.fetch import UrlFetcher, UrlFetchError

UNREQUESTABLE = [
    "http://example.com/a\u0001.png",  # httpx.InvalidURL: non-printable
    "http://example.com/\ud800.png",  # UnicodeEncodeError in the path
    "http://example.com/x.png?q=\udcff",  # ... in the query
]


class _Resolver:
    """Answers every name with a public address, and records the names it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return ["93.184.215.14"]


@pytest.mark.parametrize("url", UNREQUESTABLE)
def test_urls_httpx_cannot_request_are_refused_before_resolving(url: str) -> None:
    resolver = _Resolver()
    fetcher = UrlFetcher(timeout=5, resolver=resolver)
    with pytest.raises(UrlFetchError, match="malformed URL") as info:
        asyncio.run(fetcher.fetch(url))
    assert info.value.status == 422 and resolver.asked == []
    json.dumps(str(info.value)).encode("utf-8")  # the message itself can be answered


class _Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        locations = {
            "/brackets": "http://[::1/x.png",  # urljoin raises ValueError
            "/port": "http://example.com:99999/x.png",
        }
        self.send_response(302)
        self.send_header("Location", locations.get(self.path, "/brackets"))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirects() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/brackets", "RemoteProtocolError"), ("/port", "malformed URL")],
)
def test_a_malformed_redirect_location_is_a_422(redirects: str, path: str, reason: str) -> None:
    """Each hop goes through the same check as the client's URL (httpx itself refuses some
    Locations while reading the response; the fetcher answers those with a 422 too)."""
    fetcher = UrlFetcher(timeout=5, allow_private=True)  # the loopback server only
    with pytest.raises(UrlFetchError) as info:
        asyncio.run(fetcher.fetch(redirects + path))
    assert info.value.status == 422 and reason in str(info.value)


def test_unrequestable_urls_through_the_api_are_audited_422s(
    repository: Path, tmp_path: Path
) -> None:
    app = create_app(ServeSettings(model_dir=repository, audit_db=tmp_path / "audit.db"))
    resolver = _Resolver()
    app.state.service.fetcher.resolver = resolver
    with TestClient(app, raise_server_exceptions=False) as client:
        for url in UNREQUESTABLE:
            response = client.post(
                "/v1/predict",
                content=json.dumps({"url": url}),  # ASCII JSON: "\ud800" escaped
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 422, (url, response.text)
            assert "malformed URL" in response.json()["detail"]
    assert resolver.asked == []
    with sqlite3.connect(tmp_path / "audit.db") as db:
        outcomes = [row[0] for row in db.execute("SELECT outcome FROM audit ORDER BY id")]
    assert outcomes == ["rejected 422"] * len(UNREQUESTABLE)


class _ServeImage(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 100, 150)).save(buffer, "PNG")
        _ServeImage.hosts.append(self.headers.get("Host"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(buffer.getvalue())))
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    def log_message(self, *args: object) -> None:
        pass


def test_an_international_host_name_is_asked_for_in_punycode() -> None:
    """The Unicode name went into the Host header and failed with UnicodeEncodeError."""
    _ServeImage.hosts.clear()  # a class attribute: a rerun in this process would see the old host
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ServeImage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    try:
        port = server.server_address[1]
        fetcher = UrlFetcher(timeout=5, allow_private=True, resolver=resolver)
        data = asyncio.run(fetcher.fetch(f"http://bücher.test:{port}/a.png"))
    finally:
        server.shutdown()
    assert data.startswith(b"\x89PNG")
    assert asked == ["xn--bcher-kva.test"] and _ServeImage.hosts == [f"xn--bcher-kva.test:{port}"]
