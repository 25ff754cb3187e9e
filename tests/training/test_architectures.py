"""One parametrized test per registered architecture: shapes, features/head contract, rebuild, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.training.architectures import (
    CIFAR10_MEAN, CIFAR10_STD, OODNet, create_model, list_architectures, register_architecture,
)


def test_the_documented_architectures_are_registered():
    assert {"small_cnn", "resnet18", "wrn40_2", "densenet100"} <= set(list_architectures())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid models: .*small_cnn"):
        create_model("vgg99")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("small_cnn")(lambda num_classes: None)


@pytest.mark.parametrize("name", list_architectures())
def test_model_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    assert isinstance(model, OODNet) and model.input_size == 32
    assert model.mean == CIFAR10_MEAN and model.std == CIFAR10_STD
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (3, 7)
    assert feats.ndim == 2 and feats.shape[0] == 3 and feats.shape[1] == model.head.in_features
    torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)
    # normalisation is inside the model: features of x equal the body applied to (x - mean) / std
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.body((x - mean) / std), feats)
    # model_config rebuilds the same architecture: the state dict loads strictly, outputs match
    rebuilt = create_model(**model.model_config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter announces its retirement
@pytest.mark.parametrize("name", list_architectures())
def test_model_exports_to_onnx_and_matches(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, opset_version=17)
    x = torch.rand(5, 3, 32, 32)  # a different batch size than at export: the batch axis is dynamic
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.max(np.abs(got - want)) < 1e-4


def test_small_cnn_kwargs_are_recorded():
    model = create_model("small_cnn", num_classes=3, widths=(8, 16, 16), stem=8)
    assert model.model_config == {"name": "small_cnn", "num_classes": 3, "widths": (8, 16, 16), "stem": 8}
    assert model.head.in_features == 16


def _correlated_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images: neighbouring pixels and channels correlated, as in photographs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=32, mode="bilinear")
    return (0.7 * base + 0.3 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def test_airbench_whitening_stem_decorrelates_2x2_patches():
    model = create_model("airbench", widths=(8, 8, 8)).eval()
    x = _correlated_images(200, seed=0)
    model.data_init(x)
    w = model.whiten.weight
    assert not w.requires_grad
    torch.testing.assert_close(w[12:], -w[:12])  # each filter and its negative (GELU keeps both signs)
    with torch.no_grad():
        z = torch.nn.functional.conv2d(model.normalize(x), w[:12])  # the stem without its bias
    flat = z.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    # whitened: unit variance, no correlation, on the components that carry variance (>> eps 5e-4)
    strong = torch.linalg.eigvalsh(torch.cov(
        model.normalize(x).unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double().T))
    assert strong.max() > 1.0  # the raw patches are far from white ...
    big = torch.diagonal(cov) > 0.5
    assert int(big.sum()) >= 6
    torch.testing.assert_close(cov[big][:, big], torch.eye(int(big.sum()), dtype=torch.float64), atol=0.05, rtol=0)


def test_airbench_init_dirac_and_unscaled_batchnorm():
    model = create_model("airbench", widths=(8, 16, 16))
    convs = [m for m in model.trunk if isinstance(m, torch.nn.Conv2d)][1:]  # after the stem
    for conv in convs:
        cin = conv.in_channels
        identity = torch.zeros_like(conv.weight[:cin])
        torch.nn.init.dirac_(identity)
        torch.testing.assert_close(conv.weight[:cin], identity)  # the first cin outputs copy the input
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in bns)
    with pytest.raises(ValueError, match="whiten_width"):
        create_model("airbench", whiten_width=30)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["airbench", "small_cnn"])
def test_flip_average_serves_the_mean_of_both_views_and_exports(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name, flip_average=True)
    assert model.model_config["flip_average"] is True  # rebuilt models (export, evaluate, serve) keep it
    plain = create_model(name)
    plain.load_state_dict(model.state_dict())  # no extra weights: a trained run can be served either way
    x = torch.rand(4, 3, 32, 32)
    model.eval(), plain.eval()
    with torch.no_grad():
        both = (plain(x) + plain(x.flip(3))) / 2
        torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), both, atol=1e-4)  # the mirror view does change the answer
        model.train(), plain.train()
        torch.testing.assert_close(model(x), plain(x))  # training (and its attack) sees one view
    model.eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, opset_version=17)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.max(np.abs(got - model(x).numpy())) < 1e-4
