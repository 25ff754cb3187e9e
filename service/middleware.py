"""The one middleware every request passes: request id, body-size limit, metrics, last-resort errors.

Pure ASGI (no `BaseHTTPMiddleware`, which costs a task and a memory stream per request):

- `X-Request-ID`: taken from the request when it is a sane token, else generated; stored in
  `request.state.request_id` and echoed on every response.
- Body limit: a declared `Content-Length` over the limit is answered 413 before any byte is read;
  otherwise bytes are counted as they stream in and the read that crosses the limit raises
  `OodguardError` `body_too_large` (turned into JSON by the error handler). `/admin` uses the larger upload limit.
  A client silent for `body_timeout_s` in the middle of its body gets 408 (slow-body clients).
- `oodguard_requests_total{endpoint,status}` and `oodguard_request_duration_seconds{endpoint}`,
  `endpoint` being the route template (`/v2/models/{name}/infer`), never the raw path.
- A client that disconnects before its body is complete (`ClientDisconnect`) is counted with
  status 499 and logged on one line: nothing is sent, nothing failed.
- Any exception that escapes the app is logged once with the request id and answered as a JSON 500
  (if nothing was sent yet) instead of an HTML page or a dropped connection.
- Lifespan: a startup failure is reported to the server as the short error message only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from random import getrandbits

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import OodguardError, render

log = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_JSON_HEADERS = [(b"content-type", b"application/json")]
CLIENT_CLOSED = 499  # the status label of a request whose client disconnected before the answer


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics,
        max_body_bytes: int,
        max_upload_bytes: int,
        body_timeout_s: float = 15.0,
        upload_prefix: str = "/admin",
    ):
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _short_lifespan_errors(scope, send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        request_id = None
        content_length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                if _REQUEST_ID_RE.match(value):
                    request_id = value.decode("ascii")
            elif key == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
        if request_id is None:
            # An id for correlating logs, not a secret: os.urandom costs a syscall per request.
            request_id = "%032x" % getrandbits(128)
        scope.setdefault("state", {})["request_id"] = request_id
        rid_header = (b"x-request-id", request_id.encode("ascii"))
        limit = self.max_upload_bytes if scope["path"].startswith(self.upload_prefix) else self.max_body_bytes
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        received = 0
        body_done = False
        body_timeout = self.body_timeout_s

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:  # later reads only wait for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(body_timeout):
                    message = await receive()
            except TimeoutError:
                raise OodguardError("client_timeout", "body_timeout", f"no request body data for {body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise OodguardError("too_large", "body_too_large", f"request body exceeds {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        path = scope["path"]
        try:
            if content_length is not None and content_length > limit:
                too_large = OodguardError("too_large", "body_too_large", f"request body of {content_length} bytes exceeds {limit} bytes")
                await _send_error(send_with_id, too_large, path)
            else:
                await self.app(scope, receive_limited, send_with_id)
        except ClientDisconnect:
            # The client went away before its body was complete: nobody to answer, nothing broken.
            # Counted as 499 (nginx's "client closed request"), logged without a traceback.
            log.info("%s %s (request %s): client disconnected", scope.get("method"), path, request_id)
            if not started:
                status = CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), path, request_id)
            if not started:
                await _send_error(send_with_id, OodguardError("internal", "internal_error", f"internal error; request id {request_id}"), path)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when graceful_shutdown_s is over. Answer a clean
            # JSON 503 (retry elsewhere) instead of its plain-text 500 and a logged traceback; the
            # task ends here either way.
            log.warning("%s %s (request %s) cancelled at shutdown", scope.get("method"), path, request_id)
            if not started:
                stopping = OodguardError("unavailable", "shutting_down", "the service is shutting down; retry on another instance")
                await _send_error(send_with_id, stopping, path)
            else:
                raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)


async def _send_error(send: Send, exc: OodguardError, path: str) -> None:
    status, extra, content = render(exc, path)
    body = json.dumps(content).encode()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _short_lifespan_errors(scope: Scope, send: Send) -> Send:
    """Replace the traceback Starlette puts in `lifespan.startup.failed` by the error's own message."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            state = scope.get("app").state if scope.get("app") is not None else None
            short = getattr(state, "startup_error", None)
            if short:
                message = {**message, "message": short}
        await send(message)

    return wrapped
