"""A predict request's body -> the encoded images it carries (bytes), or an OodguardError naming the problem.

Three body forms, chosen by Content-Type:
  multipart/form-data     one `file` field or repeated `files` fields (both may be mixed)
  image/* or application/octet-stream   the raw bytes of one image
  application/json        {"images": ["<base64>", ...]} (a `data:image/...;base64,` prefix is allowed)

Multipart is parsed with python-multipart's streaming parser straight into memory. Starlette's form
parser spools every file part through a `SpooledTemporaryFile` wrapped in an `UploadFile` (built for
large uploads kept on disk); for one CIFAR-size JPEG that bookkeeping cost more than decoding the image
(profiled under load). The body is already bounded by the middleware's `max_body_bytes`, and every
image is decoded in memory anyway, so nothing is lost by not spooling.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import OodguardError

IMAGE_FIELDS = (b"file", b"files")
MAX_TEXT_PART = 64 * 1024  # non-image multipart parts are never large
MAX_OTHER_PARTS = 16  # parts that are not images (ignored, but bounded)


async def read_images(
    content_type: str, stream: Callable[[], AsyncIterator[bytes]], body: Callable, max_images: int
) -> list[bytes]:
    """`stream()` yields the body's chunks, `await body()` returns it whole (Starlette Request's methods)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        blobs = await read_multipart_images(content_type, stream(), max_images)
    elif media_type == "application/json" or media_type.endswith("+json"):
        blobs = decode_json_images(await read_json_body(stream(), json_value_budget(max_images)), max_images)
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        blobs = [await body()]
    else:
        raise OodguardError(
            "unsupported_media",
            "unsupported_media_type",
            f"unsupported Content-Type {content_type or '(none)'!r}; send multipart/form-data (file/files), "
            "application/json ({\"images\": [base64...]}) or an image/* body",
        )
    if not blobs:
        raise OodguardError("invalid_input", "no_images", "the request contains no images")
    if len(blobs) > max_images:
        raise OodguardError("invalid_input", "too_many_images", f"{len(blobs)} images in one request; at most {max_images} allowed")
    return blobs


def _invalid(message: str) -> OodguardError:
    return OodguardError("invalid_input", "invalid_multipart", f"malformed multipart body: {message}")


class _ImageParts:
    """python-multipart callbacks: keep the data of `file`/`files` file parts, bound everything else."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.images: list[bytearray] = []
        self.other_parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._sink: bytearray | None = None  # where this part's data goes; None: counted, then dropped
        self._text_bytes = 0
        self._is_file = False

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._sink = None
        self._text_bytes = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise _invalid('a part has no Content-Disposition "name"')
        self._is_file = b"filename" in options
        if name in IMAGE_FIELDS:
            if not self._is_file:
                raise OodguardError("invalid_input", "invalid_multipart", f"multipart field {name.decode('latin-1')!r} must be a file upload, not text")
            if len(self.images) >= self.max_images:
                raise OodguardError("invalid_input", "too_many_images", f"more than {self.max_images} files in one request")
            self._sink = bytearray()
            self.images.append(self._sink)
        else:
            self.other_parts += 1
            if self.other_parts > MAX_OTHER_PARTS:
                raise _invalid(f"more than {MAX_OTHER_PARTS} parts besides `file`/`files`")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink += data[start:end]
        elif not self._is_file:
            self._text_bytes += end - start
            if self._text_bytes > MAX_TEXT_PART:
                raise _invalid(f"a text field is larger than {MAX_TEXT_PART // 1024} KiB")


async def read_multipart_images(content_type: str, chunks: AsyncIterator[bytes], max_images: int) -> list[bytes]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _invalid("Missing boundary in multipart.")
    parts = _ImageParts(max_images)
    callbacks = {name: getattr(parts, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished", "on_part_data",
    )}
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except (FormParserError, ValueError, UnicodeDecodeError) as exc:
        raise _invalid(str(exc) or type(exc).__name__) from None
    if not parts.images:
        raise OodguardError("invalid_input", "no_images", "multipart body has no `file` or `files` field")
    return [bytes(image) for image in parts.images]


def json_value_budget(max_images: int) -> int:
    """Separators (`,` `:`) a `/v1/predict` JSON body can need.

    {"images": ["data:image/png;base64,...", ...]}: per image a comma between items, and a data URL's
    colon and comma; a few dozen for other keys.
    """
    return 4 * max_images + 64


def _too_many_values(separators: int | None, max_separators: int) -> OodguardError:
    counted = f"{separators}" if separators is not None else f"more than {max_separators}"
    return OodguardError(
        "invalid_input", "too_many_values", f"the JSON body has {counted} separators (',' ':'); a request needs at most {max_separators}"
    )


def check_json_budget(body: bytes, max_separators: int) -> None:
    """Refuse, before parsing, a JSON body with more values than the request can legitimately hold.

    Parsing builds one Python object per value (~30 bytes for a 2-byte `0,`), so a 16 MiB body of
    numbers would cost hundreds of MB and hold the event loop for a second. Counting separators is a
    C-speed scan over the bytes that allocates nothing; separators inside strings are counted too,
    which only makes the bound stricter for bodies no legitimate client sends.
    """
    separators = _separators(body)
    if separators > max_separators:
        raise _too_many_values(separators, max_separators)


def _separators(data: bytes) -> int:
    return data.count(b",") + data.count(b":")


async def read_json_body(chunks: AsyncIterator[bytes], max_separators: int, json_length: int | None = None) -> bytes:
    """The whole body, refused (`too_many_values`) as soon as its JSON part holds more separators than allowed.

    `check_json_budget` while the body arrives: a 16 MiB body of numbers is refused after its first
    chunks instead of being read whole (the server drops the rest of a body once the response is
    sent), so hostile bodies cost neither the memory of the whole nor the CPU of reading it, which
    under such traffic set the tail latency of every valid request (bench/soak_hostile.py's tail
    attribution). With the binary tensor extension only the first `json_length` bytes are JSON.
    """
    parts: list[bytes] = []
    received = separators = 0
    async for chunk in chunks:
        json_part = chunk if json_length is None else chunk[: max(0, json_length - received)]
        if json_part:
            separators += _separators(json_part)
            if separators > max_separators:
                raise _too_many_values(None, max_separators)
        parts.append(chunk)
        received += len(chunk)
    return b"".join(parts)


def parse_json(body: bytes, max_images: int):
    """`json.loads` within the value budget; every parse failure a 422 `invalid_json`."""
    check_json_budget(body, json_value_budget(max_images))
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError, and an integer longer than Python's
        # int-to-str limit (4300 digits); RecursionError: absurd nesting.
        raise OodguardError("invalid_input", "invalid_json", f"body is not valid JSON: {type(exc).__name__}: {exc}"[:300]) from None


def decode_json_images(body: bytes, max_images: int) -> list[bytes]:
    payload = parse_json(body, max_images)
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise OodguardError("invalid_input", "invalid_json", 'JSON body must be an object {"images": ["<base64>", ...]}')
    if len(images) > max_images:
        raise OodguardError("invalid_input", "too_many_images", f"{len(images)} images in one request; at most {max_images} allowed")
    blobs = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise OodguardError("invalid_input", "invalid_base64", f"image {i}: expected a base64 string, got {type(item).__name__}")
        if item.startswith("data:"):
            _, sep, item = item.partition(",")
            if not sep:
                raise OodguardError("invalid_input", "invalid_base64", f"image {i}: malformed data: URL")
        try:
            blobs.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise OodguardError("invalid_input", "invalid_base64", f"image {i}: invalid base64 ({exc})") from None
    return blobs
