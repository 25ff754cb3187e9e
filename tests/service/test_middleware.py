"""The request middleware at the ASGI level: body limits and deadlines, request ids, last-resort 500."""

from __future__ import annotations

import asyncio
import json

from oodguard.service.errors import OodguardError
from oodguard.service.metrics import ServiceMetrics
from oodguard.service.middleware import ServiceMiddleware


async def _reading_app(scope, receive, send):
    body = b""
    try:
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    except OodguardError as exc:  # what the app's error handler would turn into JSON
        payload = json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode()
        await send({"type": "http.response.start", "status": exc.http_status, "headers": []})
        await send({"type": "http.response.body", "body": payload})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _call(app, messages, headers=(), path="/v1/predict"):
    sent = []
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a client that stops sending

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def _middleware(app=_reading_app, **kw):
    return ServiceMiddleware(app, metrics=ServiceMetrics(), max_body_bytes=kw.pop("max_body_bytes", 100),
                             max_upload_bytes=kw.pop("max_upload_bytes", 1000), **kw)


def test_counts_streamed_bytes_and_uses_the_upload_limit_for_admin():
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}, {"type": "http.request", "body": b"x" * 60}]
    status, _, body = _call(_middleware(), chunks)
    assert status == 413 and b"body_too_large" in body
    status, _, body = _call(_middleware(), chunks, path="/admin/models")
    assert status == 200 and body == b"120"


def test_declared_content_length_is_refused_before_reading():
    status, headers, body = _call(_middleware(), [], headers=[(b"content-length", b"5000")])
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert headers[b"content-type"] == b"application/json" and b"x-request-id" in headers


def test_a_client_silent_mid_body_gets_408():
    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]
    status, _, body = _call(_middleware(body_timeout_s=0.2), chunks)
    assert status == 408 and b"body_timeout" in body


def test_request_id_passthrough_and_generation():
    ok = [{"type": "http.request", "body": b""}]
    _, headers, _ = _call(_middleware(), ok, headers=[(b"x-request-id", b"trace-42")])
    assert headers[b"x-request-id"] == b"trace-42"
    _, headers, _ = _call(_middleware(), ok, headers=[(b"x-request-id", b"\xff bad")])
    assert len(headers[b"x-request-id"]) == 32


def test_an_escaping_exception_becomes_a_json_500():
    async def broken(scope, receive, send):
        raise RuntimeError("internal detail")

    status, headers, body = _call(_middleware(broken), [{"type": "http.request", "body": b""}])
    error = json.loads(body)["error"]
    assert status == 500 and error["code"] == "internal_error" and "internal detail" not in error["message"]
    assert headers[b"x-request-id"].decode() in error["message"]
