"""What a user writes by hand to serve a PyTorch classifier: one FastAPI endpoint, one forward per request.

Same endpoint as fastapi_onnx.py, but the model is the eager PyTorch module loaded from the training
run's checkpoint (`oodguard.training.run_dir.load_model_from_run`), run under
`torch.inference_mode()`. Normalisation is the model's first layer, so the input is [0, 1] pixels as
for the ONNX graph. Torch's default thread settings unless `--threads N` is given.

    python bench/peers/fastapi_torch.py --run runs/default/aloe --port 8003
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, UploadFile
from PIL import Image

from oodguard.training.run_dir import load_model_from_run


def create_app(run_dir: Path, size: tuple[int, int] = (32, 32)) -> FastAPI:
    model, config = load_model_from_run(run_dir)
    classes = config.get("classes") or []
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ok", "torch_threads": torch.get_num_threads()}

    @app.post("/v1/predict")
    async def predict(file: UploadFile) -> dict:
        data = await file.read()
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(size)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0]
        index = int(probs.argmax())
        return {"label": classes[index] if classes else str(index), "class_index": index, "confidence": float(probs[index])}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Hand-written FastAPI + PyTorch endpoint (benchmark peer).")
    p.add_argument("--run", required=True, type=Path, help="Training run directory (config.json + checkpoints/last.pt).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8003)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.run)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
