"""uvicorn's httptools protocol with the guards it lacks: head size and deadline, pipelining, writes.

uvicorn enforces a head size limit only with its h11 parser (`h11_max_incomplete_event_size`);
with httptools (the fast default when installed) a client may send megabytes of headers, and no
parser has a deadline for receiving a head, so a client dribbling one header byte every few
seconds (slowloris) holds a connection forever. uvicorn also queues every pipelined request it
parses (one socket read may hold hundreds) and waits forever for a client that never reads its
responses. This subclass:

- answers 431 and closes once a request head exceeds `max_head_bytes` - per request, not per
  socket read: each head's request line and headers are counted as the parser delivers them, so a
  second, pipelined request in the same read is held to the limit too;
- answers 408 and closes when a head (including a fresh connection's first one) is not complete
  within `head_timeout_s` of its first byte / of the connection opening;
- queues at most one pipelined request behind the one in progress: a third request arriving
  before the first is answered stops the parsing; the two are answered and the connection closed
  (HTTP/1.1 lets a server close after any response; clients that pipeline must retry);
- aborts a connection whose responses the client has not read for `write_timeout_s` (the
  transport's buffer stayed above its high-water mark), so unread responses cannot pile up;
- answers a JSON 503 (Retry-After) to a connection beyond `max_connections` on its first bytes and
  closes it, instead of uvicorn's `limit_concurrency` plain-text 503.

The body is guarded in the ASGI middleware (size limit, per-read timeout). Used by `oodguard serve`
via `guarded_httptools_protocol(...)`; with `--http h11` uvicorn's own h11 limit applies instead.

This is a subclass of uvicorn's internal `HttpToolsProtocol`, not a supported extension point: it
relies on the methods, callbacks and attributes listed in `UVICORN_HOOKS`, and re-implements
`data_received` (whose upstream source hashes to `UVICORN_DATA_RECEIVED_SHA256`). pyproject.toml
pins uvicorn and httptools to `TESTED_VERSIONS`, the versions these guards were tested with, and
tests/service/test_uvicorn.py fails loudly when the pin, a hook or that source changes: upgrade by
re-reading uvicorn's httptools_impl.py, re-running tests/service/test_slow_clients.py and
test_hostile.py, then updating the three constants together.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import OodguardError, render

log = logging.getLogger(__name__)

TESTED_VERSIONS = {"uvicorn": "0.54.0", "httptools": "0.9.0"}
# What the subclass below uses of HttpToolsProtocol: methods it calls or overrides, instance attributes.
UVICORN_HOOKS = {
    "methods": (
        "connection_made", "connection_lost", "data_received", "on_message_begin", "on_url", "on_header",
        "on_headers_complete", "on_response_complete", "pause_writing", "resume_writing",
        "_unset_keepalive_if_required", "send_400_response", "_should_upgrade", "handle_websocket_upgrade",
        "_unsupported_upgrade_warning",
    ),
    "attributes": ("connections", "cycle", "pipeline", "flow", "parser", "transport", "loop", "client", "logger"),
    "cycle_attributes": ("keep_alive", "response_complete"),  # of RequestResponseCycle
}
UVICORN_DATA_RECEIVED_SHA256 = "010a7ae59a5d3b1a5e7326ce246878568629d126a076d8af5ba10cab040fae43"



class _StopParsing(Exception):
    """Raised in a parser callback to stop parsing the rest of the current read."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes: int = 16 * 1024
    head_timeout_s: float = 15.0
    write_timeout_s: float = 15.0
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._parsed_head = 0  # request line + headers of the message being parsed, as delivered
        self._stopped = False  # parsing stopped for good (refused, or too deep a pipeline)
        self._write_timer: asyncio.TimerHandle | None = None
        self._tail = b""  # last bytes of the previous read: a terminator may straddle two reads
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        # Over the limit: answered 503 on its first bytes (closing before reading them would make
        # the kernel reset the connection and the client could lose the answer).
        self._over_limit = self.max_connections is not None and len(self.connections) > self.max_connections
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing() or self._stopped:
            return
        if self._over_limit:
            too_many = f"more than {self.max_connections} open connections; retry shortly"
            self._refuse(OodguardError("unavailable", "too_many_connections", too_many))
            return
        if self._in_head:
            allowed = self.max_head_bytes - self._head_bytes
            # One read may hold the end of the head and the start of the body: the head is too
            # large only if its blank-line terminator is not within the allowance.
            if len(data) > allowed and b"\r\n\r\n" not in self._tail + data[: max(allowed, 0) + 4]:
                self._refuse(self._head_too_large())
                return
            self._head_bytes += len(data)
            self._tail = data[-3:]
        # uvicorn's data_received, except that a stop we asked for (a callback raising _StopParsing,
        # which httptools re-raises wrapped in HttpParserCallbackError) is not answered as a 400.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._stopped:
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    # -- parser callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._parsed_head = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete and self.pipeline:
            # A request in progress and one already queued: do not queue a third. Answer the two,
            # then close (the last queued one says `connection: close`); the rest is not read.
            log.warning("%s: more than one pipelined request queued; closing after the queued one", self._peer())
            self.pipeline[0][0].keep_alive = False
            self.flow.pause_reading()
            self._stopped = True
            raise _StopParsing
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests the keep-alive timer owns the connection; the next head re-arms ours.
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None and self.write_timeout_s > 0:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    # -- guards -------------------------------------------------------------------------------------
    def _count_head(self, n: int) -> None:
        self._parsed_head += n
        if self._parsed_head > self.max_head_bytes:
            self._refuse(self._head_too_large())
            raise _StopParsing

    def _cancel_write_timer(self) -> None:
        if getattr(self, "_write_timer", None) is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            log.warning("%s: responses not read for %g s; aborting the connection", self._peer(), self.write_timeout_s)
            self.transport.abort()  # drop the unread buffer; connection_lost releases the waiting send

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "client"

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
            late = f"request head not received within {self.head_timeout_s:g} s"
            self._refuse(OodguardError("client_timeout", "request_timeout", late))

    def _head_too_large(self) -> OodguardError:
        return OodguardError("head_too_large", "header_too_large", f"request head larger than {self.max_head_bytes} bytes")

    def _refuse(self, error: OodguardError) -> None:
        self._stopped = True
        log.warning("%s: %s; closing the connection", self._peer(), error.message)
        self._cancel_head_timer()
        if self.cycle is None or self.cycle.response_complete:  # never interleave with a response
            status, headers, content = render(error)
            body = orjson.dumps(content)
            extra = b"".join(b"%s: %s\r\n" % (k.lower().encode(), v.encode()) for k, v in headers.items())
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
                % (status, HTTPStatus(status).phrase.encode(), len(body), extra)
                + body
            )
        self.transport.close()


def guarded_httptools_protocol(
    max_head_bytes: int, head_timeout_s: float, max_connections: int | None = None, write_timeout_s: float | None = None
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_head_bytes": int(max_head_bytes),
            "head_timeout_s": float(head_timeout_s),
            "write_timeout_s": float(head_timeout_s if write_timeout_s is None else write_timeout_s),
            "max_connections": None if max_connections is None else int(max_connections),
        },
    )
