"""TorchServe handler for the serving benchmark: the run's eager PyTorch model behind TorchServe 0.12.

Packed by bench/serve.py with torch-model-archiver: the serialized file is the run's checkpoint
(`checkpoints/last.pt`, a dict of tensors read with `weights_only=True`), and `handler_config.json`
(extra file) says how many torch threads a worker uses. The model is rebuilt with
`oodguard.training.architectures.create_model` from the checkpoint's `model_config`, so TorchServe serves
exactly the network the hand-written torch endpoint serves.

A request is one image (multipart field `file`, or the raw body); TorchServe hands the handler a
list of requests (one, or up to batchSize with batching on) and expects one answer per request.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = (32, 32)


class ImageClassifierHandler:
    """initialize once per worker; handle(list of requests) -> list of JSON-able answers."""

    def __init__(self) -> None:
        self.initialized = False
        self.model = None
        self.classes: list[str] = []

    def initialize(self, context) -> None:
        from oodguard.training.architectures import create_model

        model_dir = context.system_properties["model_dir"]
        config_path = os.path.join(model_dir, "handler_config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        self.classes = list(config.get("classes", []))
        serialized = context.manifest["model"]["serializedFile"]
        state = torch.load(os.path.join(model_dir, serialized), map_location="cpu", weights_only=True)
        model = create_model(**dict(state["model_config"]))
        model.load_state_dict(state["model"])
        self.model = model.eval()
        self.initialized = True

    @staticmethod
    def _image_bytes(row: dict) -> bytes:
        for key in ("file", "data", "body"):
            if row.get(key) is not None:
                return bytes(row[key])
        return bytes(next(v for v in row.values() if isinstance(v, (bytes, bytearray))))

    def handle(self, data: list[dict], context) -> list[dict]:
        arrays = []
        for row in data:
            image = Image.open(io.BytesIO(self._image_bytes(row))).convert("RGB").resize(IMAGE_SIZE)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            probs = torch.softmax(self.model(x), dim=1)
        confidence, index = probs.max(dim=1)
        out = []
        for c, i in zip(confidence.tolist(), index.tolist()):
            label = self.classes[i] if i < len(self.classes) else str(i)
            out.append({"label": label, "class_index": i, "confidence": c})
        return out


_service = ImageClassifierHandler()


def handle(data, context):
    """TorchServe's entry point: called once with data=None to initialise, then per (batched) request."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
