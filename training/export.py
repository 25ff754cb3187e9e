"""`oodguard export`: the model plus its OOD scores as one ONNX graph, gated by a parity check.

Graph contract (what the service reads, see service/manifest.py):
    input  `image`   float32 (N, 3, 32, 32) in [0, 1], dynamic batch; normalisation is inside the graph
    output `logits`  (N, K);  `probs` softmax (N, K);  one (N,) output per exported score, named after it
           (`msp`, `energy`, `mahalanobis`, `detector` for a composed model), higher = more in-distribution.

The scores are computed by `ScoringModule`, which calls the very functions of `scores.py` that
evaluation and the attacks use. ODIN is not exportable: its input pre-processing needs a gradient.

Exported with the TorchScript-based exporter (`dynamo=False`, opset 17): on torch 2.14 it is quick,
quiet and gives a plain static graph; the dynamo exporter also works but takes seconds per model and
rewrites opsets through onnxscript. Parity gate: onnxruntime vs torch on >= 256 real images; if any
output differs by more than 1e-4 the export fails and nothing is written (temp file + rename).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oodguard.service.bundle import make_session, sha256_file

from . import data
from .evaluate import EVAL_DIR, MAHALANOBIS_NPZ, fit_mahalanobis_for_run, git_commit, load_eval
from .ood_sets import subsample
from .run_dir import RunData, write_json_atomic
from .scores import (
    SCORES,
    MahalanobisParams,
    ScoreContext,
    check_model_scores,
    check_score_names,
    forward_outputs,
    has_detector,
)

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"
OPSET = 17
PARITY_ATOL = 1e-4
DEFAULT_EXPORT_SCORES = ("msp", "energy", "mahalanobis")
BASE_OUTPUTS = ("logits", "probs")


class ExportError(RuntimeError):
    """Export refused or failed (e.g. the parity gate); nothing was written."""


class ScoringModule(nn.Module):
    """model -> (logits, probs, *scores): the exported graph. Scores come from scores.SCORES."""

    def __init__(self, model: nn.Module, scores: list[str], ctx: ScoreContext):
        super().__init__()
        self.model = model
        self.score_names = check_score_names(list(scores), exportable_only=True)
        try:
            check_model_scores(model, self.score_names)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        self.temperature = float(ctx.temperature)
        if "mahalanobis" in self.score_names:
            if ctx.mahalanobis is None:
                raise ExportError("the mahalanobis output needs fitted Mahalanobis parameters")
            # buffers, so they travel with the module (device moves) and become graph initialisers
            self.register_buffer("maha_means", ctx.mahalanobis.means.detach().clone().float())
            self.register_buffer("maha_precision", ctx.mahalanobis.precision.detach().clone().float())

    @property
    def output_names(self) -> list[str]:
        return [*BASE_OUTPUTS, *self.score_names]

    def _context(self) -> ScoreContext:
        maha = MahalanobisParams(self.maha_means, self.maha_precision) if hasattr(self, "maha_means") else None
        return ScoreContext(temperature=self.temperature, mahalanobis=maha)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = forward_outputs(self.model, image, self.score_names)
        ctx = self._context()
        outputs = [out.logits, torch.softmax(out.logits, dim=1)]
        outputs += [SCORES[name].from_outputs(out, ctx) for name in self.score_names]
        return tuple(outputs)


def export_onnx(module: ScoringModule, path: str | Path, input_size: int = 32, opset: int = OPSET) -> None:
    """Trace `module` to ONNX at `path` (input `image`, dynamic batch) and check the graph."""
    import onnx

    module = module.eval()
    example = torch.rand(2, 3, input_size, input_size)
    names = module.output_names
    dynamic = {"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer warnings
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {"oodguard.scores": json.dumps(module.score_names), "oodguard.temperature": str(module.temperature)}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def run_torch(module: nn.Module, images: torch.Tensor, batch_size: int = 256) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunks.append([o.numpy() for o in module(images[start:start + batch_size])])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def run_onnx(
    session, images: np.ndarray, batch_size: int = 256, output_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """All (or the named) outputs of an onnxruntime session on float32 NCHW images, batched."""
    names = output_names or [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)
        chunks.append(session.run(names, {"image": batch}))
    return {n: np.concatenate(parts) for n, parts in zip(names, zip(*chunks))}


def parity(module: ScoringModule, onnx_path: str | Path, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Max |onnxruntime - torch| per output on `images`."""
    session = make_session(onnx_path, intra_op_threads=0, providers=["CPUExecutionProvider"])
    expected = run_torch(module, images, batch_size)
    got = run_onnx(session, images.numpy(), batch_size, module.output_names)
    return {
        n: float(np.max(np.abs(got[n].astype(np.float64) - e.astype(np.float64))))
        for n, e in zip(module.output_names, expected)
    }


@dataclass
class ExportResult:
    onnx_path: Path
    outputs: list[str]
    scores: list[str]
    parity_max_abs_diff: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


def parity_images(run: RunData, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n real images for the parity gate: the in-distribution test split, topped up from the held-out
    calibration split when the test split is missing or smaller than n."""
    parts, sources = [], []
    try:
        test = subsample(run.test_set(), n, seed)
        parts.append(test.images)
        sources.append(f"{len(test)} from the test split ({test.source})")
    except data.DataError as exc:
        log.warning("test split unavailable (%s); using the calibration split for the parity check", exc)
    have = sum(len(p) for p in parts)
    if have < n:
        cal = subsample(run.calibration_set(), n - have, seed)
        parts.append(cal.images)
        sources.append(f"{len(cal)} from the calibration split")
    images = np.concatenate(parts)
    if len(images) < n:
        raise ExportError(f"the parity gate needs {n} real images but the run's data has only {len(images)}")
    return images, "; ".join(sources)


def load_or_fit_mahalanobis(
    model: nn.Module, run: RunData, fit_samples: int = 5000, seed: int = 0
) -> tuple[MahalanobisParams, str]:
    """The evaluation's fit when present (so exported and evaluated scores agree), else a fresh fit."""
    saved = run.run_dir / EVAL_DIR / MAHALANOBIS_NPZ
    evaluation = load_eval(run)  # None when missing or made from another checkpoint
    if saved.is_file() and evaluation and "mahalanobis" in evaluation[0].get("results", {}):
        return MahalanobisParams.load_npz(saved), str(saved)
    return fit_mahalanobis_for_run(model, run, fit_samples, seed), "fitted at export (train split minus calibration)"


def export_run(run_dir: str | Path, scores: list[str] | None = None, out: str | Path | None = None, *,
               data_dir: str | None = None, parity_samples: int = 256, fit_samples: int = 5000,
               atol: float = PARITY_ATOL, seed: int = 0) -> ExportResult:
    """Export a run's model + scores to ONNX at `out` (default RUN_DIR/export/model.onnx), with the parity gate."""
    if parity_samples < 256:
        raise ValueError(f"the parity gate needs at least 256 images, got {parity_samples}")
    run = RunData.open(run_dir, data_dir=data_dir)
    model, _ = run.load_model()
    # a composed model (classifier + detector) exports its detector's score too unless told otherwise
    defaults = [*DEFAULT_EXPORT_SCORES, "detector"] if has_detector(model) else list(DEFAULT_EXPORT_SCORES)
    scores = check_score_names(list(scores or defaults), exportable_only=True)
    maha, maha_source = (None, None)
    if "mahalanobis" in scores:
        maha, maha_source = load_or_fit_mahalanobis(model, run, fit_samples, seed)
    module = ScoringModule(model, scores, ScoreContext(mahalanobis=maha)).eval()
    images_u8, images_source = parity_images(run, parity_samples, seed)
    images = data.to_tensor(images_u8)

    input_size = int(getattr(model, "input_size", 32))
    out = Path(out) if out is not None else run.run_dir / EXPORT_DIR / ONNX_FILE
    if out.suffix != ".onnx":
        raise ValueError(f"--out must name an .onnx file, got {out}")
    created_dir = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(module, tmp, input_size=input_size)
        diffs = parity(module, tmp, images)
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        if bad:
            raise ExportError("parity check failed (onnxruntime vs torch on "
                              f"{len(images)} images): " + ", ".join(f"{k} max abs diff {v:.3g}" for k, v in bad.items())
                              + f" > {atol}; nothing written")
        info = {
            "created_at": datetime.now(timezone.utc).isoformat(),
            "onnx": out.name,
            "onnx_sha256": sha256_file(tmp),
            "opset": OPSET,
            "exporter": "torch.onnx.export(dynamo=False)",
            "input": {"name": "image", "shape": ["batch", 3, input_size, input_size], "dtype": "float32",
                      "range": [0.0, 1.0], "mean": list(getattr(model, "mean", ())), "std": list(getattr(model, "std", ()))},
            "outputs": module.output_names,
            "scores": scores,
            "score_params": {n: SCORES[n].params(ScoreContext()) for n in scores},
            "not_exported": {"odin": "input pre-processing needs gradients; not expressible as a forward graph"},
            "mahalanobis": {"source": maha_source, "fit_samples": maha.num_fit_samples} if maha else None,
            "parity": {"images": int(len(images)), "source": images_source, "atol": atol, "max_abs_diff": diffs},
            "model": dict(getattr(model, "model_config", {})),
            "checkpoint_sha256": run.checkpoint_sha256(),
            "code_version": git_commit(),
            "versions": {"torch": torch.__version__},
        }
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created_dir:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise
    write_json_atomic(out.parent / EXPORT_JSON, info)
    log.info("exported %s (outputs %s); parity max abs diff %s", out, module.output_names, diffs)
    return ExportResult(out, module.output_names, scores, diffs, info)


def read_export_info(onnx_path: str | Path) -> dict[str, Any] | None:
    """export.json next to an exported model, when it describes that file."""
    onnx_path = Path(onnx_path)
    path = onnx_path.parent / EXPORT_JSON
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    return info if info.get("onnx") == onnx_path.name else None
