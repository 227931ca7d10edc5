"""uvicorn's HTTP/1.1 protocol with a deadline for a request's head.

uvicorn times out idle keep-alive connections, but not a client that sends a request's line and
headers a byte at a time (slowloris): every such connection is held forever. Here a connection
that is not inside a request gets ``HISTOLITE_HEAD_TIMEOUT`` seconds (``--head-timeout``) to
deliver a complete request head, from its first byte (or from connecting), else it is closed.
Bodies are bounded by the app (``middleware.BodyLimit``: size, and time between chunks).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from histolite.serve.settings import ENV_PREFIX

HEAD_TIMEOUT_S = 10.0
HEAD_TIMEOUT_ENV = f"{ENV_PREFIX}HEAD_TIMEOUT"
# uvicorn is given the class by import path: with --workers N it pickles its config for the
# worker processes, and each worker imports the class (and reads the timeout) itself
PROTOCOL_PATH = "histolite.serve.protocol:BoundedH11Protocol"


def head_timeout_from_env() -> float:
    """``HISTOLITE_HEAD_TIMEOUT`` (as ``ServeSettings.to_env`` writes it), else the default."""
    try:
        value = float(os.environ.get(HEAD_TIMEOUT_ENV) or HEAD_TIMEOUT_S)
    except ValueError:
        return HEAD_TIMEOUT_S
    return value if value > 0 else HEAD_TIMEOUT_S


class BoundedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections slow to send a request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_from_env()
        self._head_deadline: asyncio.TimerHandle | None = None

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._in_request():
            self._arm()  # a new request's head is arriving: it has until the deadline
        super().data_received(data)
        if self._in_request():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
