"""Peak memory per request, worst case per endpoint, on a real `oodguard serve` (loopback; for SECURITY.md).

Starts `oodguard serve --bundle models/default --threads 1 --decode-threads 1` and sends, one at a
time, the most expensive request each endpoint accepts within the default limits (and the hostile
ones it refuses). For each: the peak resident memory of the server's process tree (the server, its
heavy-decode worker: large images are decoded there) while it handled the request minus its
resident memory just before (per process VmHWM after - VmRSS before, the high-water marks reset
through /proc/<pid>/clear_refs, summed), the status, and the seconds. Each case runs --repeat times; the largest
peak is reported. Needs Linux /proc and permission to write the server's clear_refs (same user).

    python bench/memory_per_endpoint.py                # ~30 s; prints a Markdown table
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.load import make_jpeg  # noqa: E402
from bench.serve_process import clean_env, descendants, proc_vm_kb, start_oodguard, stop as stop_server, tree_peak_mib  # noqa: E402

MIB = 1 << 20
V2 = "/v2/models/default/infer"


def _png(img) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _multipart(files: list[bytes]) -> tuple[bytes, dict]:
    boundary = "oodguardmemoryboundary"
    parts = b"".join(
        b"--%s\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%d.png\"\r\nContent-Type: image/png\r\n\r\n%s\r\n"
        % (boundary.encode(), i, data) for i, data in enumerate(files)
    )
    return parts + b"--%s--\r\n" % boundary.encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def cases() -> list[tuple[str, str, bytes, dict]]:
    """(name, path, body, headers) - the worst request per endpoint within the default limits."""
    wide = (np.arange(4096 * 4096, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4096, 4096)
    png16 = _png(wide)  # ~100 KB, 4096^2 16-bit grey: the costliest image the limits admit
    png8 = _png(Image.new("RGB", (4096, 4096), (200, 10, 10)))
    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    big_png = _png(noise)  # ~12 MB of incompressible pixels: the largest single image that fits the body limit
    rng = np.random.default_rng(1)
    tensor = rng.random((64, 3, 32, 32), dtype=np.float32)
    v2_json = json.dumps({"inputs": [{"name": "image", "shape": [64, 3, 32, 32], "datatype": "FP32",
                                      "data": tensor.ravel().tolist()}]}).encode()
    raw = tensor.astype("<f4").tobytes()
    v2_head = json.dumps({"inputs": [{"name": "image", "shape": [64, 3, 32, 32], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(raw)}}]}).encode()
    numbers = b'{"inputs": [{"name": "image", "shape": [64, 3, 32, 32], "datatype": "FP32", "data": ['
    numbers += b"0," * ((16 * MIB - 2048 - len(numbers)) // 2) + b"0]}]}"
    json_b64 = json.dumps({"images": [base64.b64encode(big_png).decode()]}).encode()
    four, four_headers = _multipart([png16] * 4)  # at max_request_pixels
    many, many_headers = _multipart([png16] * 64)
    return [
        ("/v1/predict: 1 CIFAR-size JPEG (typical)", "/v1/predict", make_jpeg(seed=1), {"content-type": "image/jpeg"}),
        ("/v1/predict: 4096^2 8-bit PNG", "/v1/predict", png8, {"content-type": "image/png"}),
        ("/v1/predict: 4096^2 16-bit PNG", "/v1/predict", png16, {"content-type": "image/png"}),
        ("/v1/predict: 4 x 4096^2 16-bit PNG, multipart (max_request_pixels)", "/v1/predict", four, four_headers),
        ("/v1/predict: 64 x 4096^2 16-bit PNG, multipart (refused)", "/v1/predict", many, many_headers),
        ("/v1/predict: 12 MB PNG as base64 JSON (16 MiB body)", "/v1/predict", json_b64, {"content-type": "application/json"}),
        ("/v1/predict: 12 MB PNG raw body", "/v1/predict", big_png, {"content-type": "image/png"}),
        ("/v2 infer: [64,3,32,32] as JSON data (largest valid)", V2, v2_json, {}),
        ("/v2 infer: [64,3,32,32] binary", V2, v2_head + raw, {"Inference-Header-Content-Length": str(len(v2_head))}),
        ("/v2 infer: 16 MiB JSON of numbers (refused)", V2, numbers, {}),
        ("/v1/predict: 16 MiB JSON of numbers (refused)", "/v1/predict",
         b'{"images": [], "x": [' + b"0," * ((16 * MIB - 2048) // 2) + b"0]}", {"content-type": "application/json"}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2, help="requests per case (the largest peak is kept)")
    args = p.parse_args(argv)
    log = Path("/tmp") / f"oodguard-memory-{int(time.time())}.log"
    serve_args = ["--bundle", str(REPO / "models" / "default"), "--threads", "1", "--decode-threads", "1"]
    proc, base = start_oodguard(serve_args, make_jpeg(seed=1), log, env={**clean_env(), "OMP_NUM_THREADS": "1"})
    rows = []
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            # the heavy-decode worker is started once, by the first large image: not part of any request's cost
            client.post("/v1/predict", content=_png(Image.new("RGB", (4096, 4096), (200, 10, 10))),
                        headers={"content-type": "image/png"})
            for name, path, body, headers in cases():
                worst, status, seconds = 0.0, None, 0.0
                for _ in range(args.repeat):
                    t0 = time.monotonic()
                    peak, r = tree_peak_mib(proc.pid, lambda: client.post(path, content=body, headers=headers))
                    seconds = max(seconds, time.monotonic() - t0)
                    worst = max(worst, peak)
                    status = r.status_code
                rows.append((name, len(body), status, worst, seconds))
            rss = sum(proc_vm_kb(p, "VmRSS") for p in [proc.pid, *descendants(proc.pid)]) / 1024
    finally:
        code = stop_server(proc)
    print(f"server: {' '.join(serve_args)}; RSS after the run {rss:.0f} MiB; exit {code}")
    print("| request | body | status | peak RSS above the level before it | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, size, status, peak, seconds in rows:
        print(f"| {name} | {size / MIB:.2f} MiB | {status} | +{peak:.0f} MiB | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
