"""What a user writes by hand to serve an ONNX classifier: one FastAPI endpoint, one onnxruntime call per request.

The FastAPI documentation's upload pattern (`async def` + `UploadFile` + `await file.read()`), Pillow
decode, one `session.run` per request, softmax, JSON. No batching, no thread pool, no limits or
metrics: the serving benchmark's "hand-written FastAPI + onnxruntime" peer. The session uses
onnxruntime's default thread settings unless `--threads N` is given (what the benchmark records).

    python bench/peers/fastapi_onnx.py --bundle models/default --port 8002
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, UploadFile
from PIL import Image


def create_app(model_path: Path, classes: list[str], size: tuple[int, int], threads: int = 0) -> FastAPI:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ok", "intra_op_threads": threads or "onnxruntime default (one per physical core)"}

    @app.post("/v1/predict")
    async def predict(file: UploadFile) -> dict:
        data = await file.read()
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(size)
        x = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
        logits = session.run(["logits"], {input_name: x})[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        index = int(probs.argmax())
        return {"label": classes[index], "class_index": index, "confidence": float(probs[index])}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Hand-written FastAPI + onnxruntime endpoint (benchmark peer).")
    p.add_argument("--bundle", required=True, type=Path, help="Bundle directory (model.onnx + manifest.json).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default).")
    args = p.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    size = (manifest["input"]["width"], manifest["input"]["height"])
    app = create_app(args.bundle / "model.onnx", manifest["classes"], size, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
