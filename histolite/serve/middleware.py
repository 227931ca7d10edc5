"""ASGI middleware of the service: body size limit and per-route request metrics.

Both are pure ASGI (no ``BaseHTTPMiddleware``), so they add microseconds, not a task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Callable, Sequence

import anyio.to_thread
from fastapi.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histolite.data.images import ImageTooLarge, UnsupportedImage
from histolite.serve.audit import Entry
from histolite.serve.metrics import Metrics


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyLimit:
    """ASGI middleware: 413 when a request body exceeds the limit (declared or streamed), 408
    when a body stalls for ``read_timeout`` seconds between chunks or is still arriving
    ``total_timeout`` seconds after its first chunk was asked for.

    Both clocks are needed: without the first a client that stops sending holds the request
    forever, without the second so does one that sends a byte every ``read_timeout - 1`` s.
    """

    def __init__(
        self, app: ASGIApp, limit: int, read_timeout: float = 30.0, total_timeout: float = 120.0
    ) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        received, complete = 0, False
        deadline: float | None = None  # set when the app first asks for the body

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:  # after the body: only the disconnect, which may take any time
                return await receive()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.total_timeout
            left = deadline - now
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), min(self.read_timeout, left))
            except (TimeoutError, asyncio.TimeoutError):
                if left < self.read_timeout:  # the overall deadline, not a stall, ran out
                    raise ClientError(
                        408,
                        f"the request body took more than {self.total_timeout:g} s in all "
                        f"({received} bytes received)",
                    ) from None
                raise ClientError(
                    408, f"the request body stalled for more than {self.read_timeout:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:
                    raise ClientError(413, f"request body exceeds {self.limit} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except ClientError as exc:
            await JSONResponse({"detail": str(exc)}, status_code=exc.status)(scope, receive, send)


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str | None:
    """The path template of the route a request was, or would have been, routed to.

    A request refused before routing (a 413 from its Content-Length, a 401) has no route in
    its scope yet; matched here against ``routes`` (the app's, flattened: FastAPI's included
    routers carry no path), it is counted and audited under its real route, not as an unknown
    path. None for paths no route serves: their raw text never becomes a label.
    """
    route = scope.get("route")
    if route is None:
        partial = None  # the path matches but not the method: a 405, as the router picks
        for candidate in routes:
            match = candidate.matches(scope)[0]
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


class RequestMetrics:
    """Pure ASGI middleware recording status and latency per route (no BaseHTTPMiddleware cost)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = route_template(scope, self.routes) or "unmatched"
            self.metrics.observe_request(
                scope["method"], path, status, time.perf_counter() - started
            )


def _too_large(limit: int) -> Response:
    return JSONResponse({"detail": f"request body exceeds {limit} bytes"}, status_code=413)


def client_status(exc: Exception) -> int:
    """HTTP status for an image the client sent that cannot be used."""
    if isinstance(exc, ImageTooLarge):
        return 413
    if isinstance(exc, UnsupportedImage):
        return 415
    return 422


# The upload page uses its own script and styles only; images may come from the user's URLs.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: "
    "https: http:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
# Swagger UI (only with --docs) loads its script and styles from a CDN.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
    "frame-ancestors 'none'"
)


class SecurityHeaders:
    """Headers every response carries: no sniffing, no framing, no referrer, a CSP."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope.get("path", "").startswith("/docs") else PAGE_POLICY

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", policy.encode()),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, add_headers)


class RequireKey:
    """With an API key set, every path but ``open_paths`` (health, the page) needs it.

    The key comes as ``X-API-Key`` or ``Authorization: Bearer``; it is compared in constant
    time.
    """

    def __init__(self, app: ASGIApp, key: str, open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.key = key.encode()
        self.open_paths = open_paths

    def _open(self, path: str) -> bool:
        # "/static/" opens a folder; "/" is the page alone, not every path
        return any(
            path == p or (len(p) > 1 and p.endswith("/") and path.startswith(p))
            for p in self.open_paths
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        supplied = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not supplied and auth.lower().startswith(b"bearer "):
            supplied = auth[7:]
        if hmac.compare_digest(supplied, self.key):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "missing or wrong API key (X-API-Key header)"}, status_code=401
        )
        await response(scope, receive, send)


AUDITED = "histolite.audited"  # set in the ASGI scope by code that wrote its own audit row


class AuditRejections:
    """Audit what the routes do not: bodies refused by :class:`BodyLimit` (413), unexpected
    errors (500), and every other refusal on an API route (``/v1/...``: an unknown model, a
    refused slide job, a malformed body), except 401s (unauthenticated noise).

    A response whose handler already wrote an audit row (the prediction path marks the scope
    with ``AUDITED``) is not audited twice; 404s on paths with no route are not audited at all
    (random scanning would only grow the log).
    """

    def __init__(
        self, app: ASGIApp, write: Callable[[Entry], None], routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.write = write
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception:
            await self._audit(scope, 500, "unexpected server error")
            raise
        route = route_template(scope, self.routes) or ""
        if scope.get(AUDITED):
            return
        refused = status >= 400 and status != 401  # unauthenticated noise is not audited
        if status in (413, 500) or (refused and route.startswith("/v1/")):
            await self._audit(scope, status, f"{scope['method']} {route or 'unmatched'}")

    async def _audit(self, scope: Scope, status: int, detail: str) -> None:
        client = scope.get("client")
        entry = Entry(
            kind="request",
            outcome=f"rejected {status}" if status < 500 else f"error {status}",
            client=client[0] if client else None,
            detail=detail[:200],
        )
        with contextlib.suppress(Exception):  # the client has its answer; /readyz shows the log
            await anyio.to_thread.run_sync(self.write, entry)
