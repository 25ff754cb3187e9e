"""uvicorn's httptools protocol with the two guards it lacks: a request-head size limit and deadline.

uvicorn enforces a head size limit only with its h11 parser (`h11_max_incomplete_event_size`);
with httptools (the fast default when installed) a client may send megabytes of headers, and no
parser has a deadline for receiving a head, so a client dribbling one header byte every few
seconds (slowloris) holds a connection forever. This subclass:

- answers 431 and closes once a request head exceeds `max_head_bytes`;
- answers 408 and closes when a head (including a fresh connection's first one) is not complete
  within `head_timeout_s` of its first byte / of the connection opening;
- answers a JSON 503 (Retry-After) to a connection beyond `max_connections` on its first bytes and
  closes it, instead of uvicorn's `limit_concurrency` plain-text 503.

The body is guarded in the ASGI middleware (size limit, per-read timeout). Used by `oodguard serve`
via `guarded_httptools_protocol(...)`; with `--http h11` uvicorn's own h11 limit applies instead.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
_CODES = {408: "request_timeout", 431: "header_too_large", 503: "too_many_connections"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes: int = 16 * 1024
    head_timeout_s: float = 15.0
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._tail = b""  # last bytes of the previous read: a terminator may straddle two reads
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        # Over the limit: answered 503 on its first bytes (closing before reading them would make
        # the kernel reset the connection and the client could lose the answer).
        self._over_limit = self.max_connections is not None and len(self.connections) > self.max_connections
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._over_limit:
            self._refuse(503, f"more than {self.max_connections} open connections; retry shortly")
            return
        if self._in_head:
            allowed = self.max_head_bytes - self._head_bytes
            # One read may hold the end of the head and the start of the body: the head is too
            # large only if its blank-line terminator is not within the allowance.
            if len(data) > allowed and b"\r\n\r\n" not in self._tail + data[: max(allowed, 0) + 4]:
                self._refuse(431, f"request head larger than {self.max_head_bytes} bytes")
                return
            self._head_bytes += len(data)
            self._tail = data[-3:]
        super().data_received(data)

    # -- parser callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests the keep-alive timer owns the connection; the next head re-arms ours.
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    # -- guards -------------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self.head_timeout_s > 0:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        client = "%s:%d" % self.client if self.client else "client"
        log.warning("%s: %s; closing the connection", client, message)
        self._cancel_head_timer()
        if self.cycle is None or self.cycle.response_complete:  # never interleave with a response
            body = ('{"error":{"code":"%s","message":"%s"}}' % (_CODES[status], message)).encode()
            retry = b"retry-after: 1\r\n" if status == 503 else b""
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
                % (status, _REASONS[status], len(body), retry)
                + body
            )
        self.transport.close()


def guarded_httptools_protocol(
    max_head_bytes: int, head_timeout_s: float, max_connections: int | None = None
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_head_bytes": int(max_head_bytes),
            "head_timeout_s": float(head_timeout_s),
            "max_connections": None if max_connections is None else int(max_connections),
        },
    )
