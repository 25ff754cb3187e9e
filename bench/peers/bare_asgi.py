"""The HTTP floor of the serving benchmark: a bare ASGI app under uvicorn, no framework, no model.

`POST /v1/predict` with a multipart `file` field: read the body, parse the multipart form
(python-multipart's streaming parser, the one Starlette/FastAPI use underneath), decode the JPEG with
Pillow to a float32 CHW array in [0, 1] (what any image model needs first) and answer a small JSON.
Nothing else: no routing table, no validation models, no thread hop, no metrics. Whatever a real
service adds on top of this is its overhead; the benchmark's limit composes this floor with the model
ceiling (see bench/serve.py).

    python bench/peers/bare_asgi.py --port 8001
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_BODY_BYTES = 16 << 20  # the same default limit as `oodguard serve`
IMAGE_SIZE = (32, 32)  # CIFAR-size model input (width, height)


class MultipartError(ValueError):
    """The body is not a multipart form with the expected file field."""


def parse_multipart_file(body: bytes, content_type: bytes, field: str = "file") -> bytes:
    """The bytes of the form field `field` in a complete multipart/form-data body."""
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise MultipartError("expected multipart/form-data with a boundary")
    wanted = field.encode()
    parts: list[tuple[bytes | None, list[bytes]]] = []
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    chunks: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(header_field).lower()] = b"".join(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        parts.append((disposition.get(b"name"), list(chunks)))

    callbacks = {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own MultipartParseError
        raise MultipartError(f"malformed multipart body: {exc}") from None
    for name, data in parts:
        if name == wanted:
            return b"".join(data)
    raise MultipartError(f"no {field!r} field in the form")


def decode_to_array(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> float32 (3, H, W) in [0, 1]: the minimum an image model needs."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    if rgb.size != IMAGE_SIZE:
        rgb = rgb.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:
    """The whole ASGI application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"] in ("/healthz", "/readyz"):
        await _send_json(send, 200, {"status": "ok"})
        return
    if scope["method"] != "POST" or scope["path"] != "/v1/predict":
        await _send_json(send, 404, {"error": "not found"})
        return
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_BODY_BYTES:
            await _send_json(send, 413, {"error": "body too large"})
            return
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    try:
        pixels = decode_to_array(parse_multipart_file(bytes(body), content_type))
    except MultipartError as exc:
        await _send_json(send, 422, {"error": str(exc)})
        return
    except Exception as exc:  # Pillow: not an image, truncated, ...
        await _send_json(send, 415, {"error": f"cannot decode image: {exc}"})
        return
    await _send_json(send, 200, {"shape": list(pixels.shape), "mean": round(float(pixels.mean()), 6)})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Bare ASGI HTTP floor (multipart + JPEG decode, no model).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, http="httptools", lifespan="on", log_level="warning",
                access_log=False, server_header=False)


if __name__ == "__main__":
    main()
