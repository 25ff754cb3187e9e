"""ONNX export: torch vs onnxruntime parity on a tiny model, the graph contract, and the parity gate."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from oodguard.service.bundle import make_session
from oodguard.training import export as export_mod
from oodguard.training.export import ExportError, ScoringModule, export_onnx, export_run, parity, run_onnx
from oodguard.training.scores import ScoreContext, energy, fit_mahalanobis, mahalanobis, msp

from ._eval_helpers import float_images, make_run, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    feats = torch.randn(500, model.feature_dim) * 2 + 1
    ctx = ScoreContext(mahalanobis=fit_mahalanobis(feats, torch.arange(500) % 10, 10))
    module = ScoringModule(model, ["msp", "energy", "mahalanobis"], ctx).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(module, path)
    return module, ctx, path


def test_graph_contract(exported):
    _, _, path = exported
    model = onnx.load(str(path))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    session = make_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)" and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert [o.name for o in session.get_outputs()] == ["logits", "probs", "msp", "energy", "mahalanobis"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["oodguard.scores"]) == ["msp", "energy", "mahalanobis"]


def test_parity_with_torch_on_256_images_and_any_batch_size(exported):
    module, ctx, path = exported
    images = float_images(256, seed=5)
    diffs = parity(module, path, images)
    assert set(diffs) == {"logits", "probs", "msp", "energy", "mahalanobis"}
    assert max(diffs.values()) <= 1e-4, diffs
    session = make_session(path)
    for batch in (1, 7):
        out = run_onnx(session, images[:batch].numpy())
        with torch.no_grad():
            logits = module.model(images[:batch])
            feats = module.model.features(images[:batch])
        np.testing.assert_allclose(out["msp"], msp(logits).numpy(), atol=1e-5)
        np.testing.assert_allclose(out["energy"], energy(logits).numpy(), atol=1e-4)
        np.testing.assert_allclose(out["mahalanobis"], mahalanobis(feats, ctx.mahalanobis).numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-5)


def test_odin_is_not_exportable():
    with pytest.raises(ValueError, match="not exportable"):
        ScoringModule(tiny_model(), ["msp", "odin"], ScoreContext())


def test_export_run_writes_model_and_record(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    result = export_run(run, ["msp", "energy", "mahalanobis"])
    assert result.onnx_path == run / "export" / "model.onnx" and result.onnx_path.is_file()
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["parity"]["images"] == 256 and max(info["parity"]["max_abs_diff"].values()) <= 1e-4
    assert "200 from the test split" in info["parity"]["source"]  # topped up from the calibration split
    assert info["outputs"] == ["logits", "probs", "msp", "energy", "mahalanobis"]
    assert info["mahalanobis"]["fit_samples"] == 300  # 400 train images minus 100 held out
    assert info["mahalanobis"]["source"].startswith("fitted at export")
    assert "odin" in info["not_exported"]
    assert not list((run / "export").glob(".*"))  # no temp files left behind


def test_parity_gate_failure_writes_nothing(tmp_path, tiny_data_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_data_dir)
    real_export = export_mod.export_onnx

    def export_a_different_model(module, path, **kw):
        other = copy.deepcopy(module)
        with torch.no_grad():
            other.model.head.bias.add_(1e-2)  # a real mismatch between the graph and the torch model
        real_export(other, path, **kw)

    monkeypatch.setattr(export_mod, "export_onnx", export_a_different_model)
    with pytest.raises(ExportError, match=r"parity check failed.*logits max abs diff"):
        export_run(run, ["msp", "energy"])
    assert not (run / "export").exists()

    (run / "export").mkdir()  # an existing directory keeps its old contents and gains nothing
    (run / "export" / "model.onnx").write_bytes(b"old")
    with pytest.raises(ExportError):
        export_run(run, ["msp"])
    assert [p.name for p in (run / "export").iterdir()] == ["model.onnx"]
    assert (run / "export" / "model.onnx").read_bytes() == b"old"


def test_export_reuses_the_evaluations_mahalanobis_fit(tmp_path, tiny_data_dir):
    from oodguard.training.evaluate import EvalConfig, evaluate_run

    run = make_run(tmp_path / "run", tiny_data_dir)
    evaluate_run(run, EvalConfig(ood=["uniform"], attacks=["none"], scores=["mahalanobis"], max_samples=16,
                                 maha_fit_samples=50, plots=False))
    info = export_run(run, ["mahalanobis"]).info
    assert info["mahalanobis"] == {"source": str(run / "eval" / "mahalanobis.npz"), "fit_samples": 50}
    make_run(run, tiny_data_dir, seed=3)  # new weights: the evaluation's fit no longer applies
    info = export_run(run, ["mahalanobis"]).info
    assert info["mahalanobis"]["source"].startswith("fitted at export") and info["mahalanobis"]["fit_samples"] == 300
