"""ASGI middleware of the service: body size limit and per-route request metrics.

Both are pure ASGI (no ``BaseHTTPMiddleware``), so they add microseconds, not a task per request.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histolite.data.images import ImageTooLarge, UnsupportedImage
from histolite.serve.metrics import Metrics


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyLimit:
    """ASGI middleware: 413 when a request body exceeds the limit (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ClientError(413, f"request body exceeds {self.limit} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except ClientError as exc:
            await JSONResponse({"detail": str(exc)}, status_code=exc.status)(scope, receive, send)


class RequestMetrics:
    """Pure ASGI middleware recording status and latency per route (no BaseHTTPMiddleware cost)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
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
