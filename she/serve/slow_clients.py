"""A deadline for request headers: uvicorn's HTTP protocol, closing slow-loris connections.

uvicorn limits open connections (``limit_concurrency``: beyond it every new request gets
503) but gives a client unlimited time to send its request line and headers: its
keep-alive timer is disarmed by every byte received, and no timer runs on a fresh
connection. A client that opens the allowed number of connections and sends a header
byte now and then (slow loris) therefore locks every other client out, indefinitely.

:func:`header_timeout_protocol` wraps uvicorn's protocol class: from the moment a
connection opens, and again after each response, the client has ``seconds`` to complete
the next request's headers, however it trickles them; otherwise the connection is
closed. The body has its own limits (:func:`she.serve.service._spool_body`: a read timeout
between chunks and a deadline for the whole body).
"""

from __future__ import annotations

import asyncio
from typing import Any

#: Seconds a client has to send a request line and headers.
HEADER_TIMEOUT = 10.0


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT,
                            base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``, default the one uvicorn picks itself) with
    a deadline of ``seconds`` for every request's headers; pass it as ``http=`` to
    ``uvicorn.run`` or ``uvicorn.Config``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request begun
            if waiting and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = \
        f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol
