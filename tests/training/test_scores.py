"""OOD scores: hand-computed values, the Mahalanobis fit, ODIN's pre-processing and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodguard.training.scores import (
    ATTACK_SURROGATES,
    SCORES,
    MahalanobisParams,
    ScoreContext,
    attack_objective,
    check_score_names,
    compute_scores,
    energy,
    fit_mahalanobis,
    log_msp,
    mahalanobis,
    msp,
    odin,
    odin_preprocess,
    scored_forward,
)

from ._eval_helpers import float_images, tiny_model

torch.set_num_threads(1)


def test_msp_hand_values():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 2.0 * math.log(3.0)]])
    assert torch.allclose(msp(z), torch.tensor([0.5, 0.75, 0.9]), atol=1e-6)
    # temperature 2 halves the logits: [0, log 3] -> 0.75
    assert torch.allclose(msp(z[2:], temperature=2.0), torch.tensor([0.75]), atol=1e-6)
    assert torch.allclose(log_msp(z), torch.log(msp(z)), atol=1e-6)


def test_energy_hand_values():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert torch.allclose(energy(z), torch.tensor([math.log(2.0), math.log(math.e + math.e**2)]), atol=1e-6)
    # T * logsumexp(z / T) with T = 2
    assert torch.allclose(energy(z, 2.0), torch.tensor([2 * math.log(2.0), 2 * math.log(math.exp(0.5) + math.e)]), atol=1e-6)
    # small T -> max logit
    assert torch.allclose(energy(z, 1e-3), z.amax(1), atol=1e-2)


def _gaussian_features(n_per_class=2000, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, -3.0, 2.0]])
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + 0.5 * np.eye(3)
    feats, labels = [], []
    for c, mu in enumerate(means):
        feats.append(rng.multivariate_normal(mu, cov, size=n_per_class))
        labels.append(np.full(n_per_class, c))
    return torch.tensor(np.concatenate(feats), dtype=torch.float32), torch.tensor(np.concatenate(labels)), means, cov


def test_fit_mahalanobis_recovers_means_and_tied_covariance():
    f, y, means, cov = _gaussian_features()
    params = fit_mahalanobis(f, y, num_classes=3, shrinkage=0.0)
    emp_means = np.stack([f[y == c].double().mean(0).numpy() for c in range(3)])
    np.testing.assert_allclose(params.means.numpy(), emp_means, atol=1e-5)
    np.testing.assert_allclose(params.means.numpy(), means, atol=0.15)
    np.testing.assert_allclose(np.linalg.inv(params.precision.double().numpy()), cov, atol=0.15)
    assert params.num_fit_samples == len(f)
    # shrinkage: Sigma = (1 - a) S + a (tr S / D) I
    shrunk = fit_mahalanobis(f, y, num_classes=3, shrinkage=0.5)
    s_cov = np.linalg.inv(params.precision.double().numpy())
    expected = 0.5 * s_cov + 0.5 * np.trace(s_cov) / 3 * np.eye(3)
    np.testing.assert_allclose(np.linalg.inv(shrunk.precision.double().numpy()), expected, rtol=1e-4)


def test_mahalanobis_score_equals_brute_force():
    f, y, _, _ = _gaussian_features(200)
    params = fit_mahalanobis(f, y, 3)
    x = torch.randn(50, 3) * 3
    expected = []
    p, mu = params.precision.double().numpy(), params.means.double().numpy()
    for v in x.double().numpy():
        expected.append(-np.log1p(min(float((v - m) @ p @ (v - m)) for m in mu) / 3))  # D = 3
    np.testing.assert_allclose(mahalanobis(x, params).numpy(), expected, rtol=1e-5, atol=1e-4)
    # a point at a class mean is maximally in-distribution (score 0)
    assert torch.allclose(mahalanobis(params.means, params), torch.zeros(3), atol=1e-4)


def test_fit_mahalanobis_refuses_a_missing_class_and_constant_features():
    f = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        fit_mahalanobis(f, torch.tensor([0, 1] * 5), num_classes=3)
    with pytest.raises(ValueError, match="zero variance"):
        fit_mahalanobis(torch.ones(10, 4), torch.tensor([0, 1] * 5), num_classes=2)


def test_mahalanobis_survives_rank_deficient_features():
    # half the feature dimensions are dead (always 0), as with ReLU units that never fire
    f = torch.cat([torch.randn(400, 4), torch.zeros(400, 4)], dim=1)
    params = fit_mahalanobis(f, torch.arange(400) % 4, 4)
    assert torch.isfinite(params.precision).all()
    assert float(torch.linalg.eigvalsh(params.precision.double()).max()) < 1e4


def test_odin_preprocessing_raises_tempered_msp_and_stays_in_range():
    model = tiny_model()
    x = float_images(16)
    x_pre = odin_preprocess(model, x, temperature=1000.0, eps=0.01)
    assert x_pre.min() >= 0 and x_pre.max() <= 1
    assert torch.max(torch.abs(x_pre - x)) <= 0.01 + 1e-6
    with torch.no_grad():
        before = log_msp(model(x), 1000.0)
        after = log_msp(model(x_pre), 1000.0)
    assert (after > before).float().mean() >= 0.75
    with torch.no_grad():
        assert torch.allclose(odin(model, x, 1000.0, 0.0), msp(model(x), 1000.0))
        assert torch.allclose(odin(model, x, 1000.0, 0.01), msp(model(x_pre), 1000.0))


def test_odin_attack_objective_is_bpda_of_the_exact_score():
    model = tiny_model()
    x = float_images(8).requires_grad_(True)
    ctx = ScoreContext(odin_temperature=1000.0, odin_eps=0.0014)
    objective = attack_objective(model, x, "odin", ctx)
    # forward value: exactly the ODIN score
    assert torch.allclose(objective.detach(), odin(model, x.detach(), 1000.0, 0.0014), atol=1e-7)
    (grad,) = torch.autograd.grad(objective.sum(), x)
    assert grad.abs().sum() > 0


def test_registry_matches_the_functions_and_compute_scores_shares_one_pass():
    model = tiny_model()
    x = float_images(12)
    feats_fit = torch.randn(200, model.feature_dim)
    ctx = ScoreContext(temperature=1.0, mahalanobis=fit_mahalanobis(feats_fit, torch.arange(200) % 10, 10))
    names = [n for n in SCORES if not SCORES[n].needs_detector]  # a classifier alone (the detector: test_detector.py)
    logits, out = compute_scores(model, x, names, ctx)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(out["msp"], msp(model(x)))
        assert torch.allclose(out["energy"], energy(model(x)))
        assert torch.allclose(out["mahalanobis"], mahalanobis(model.features(x), ctx.mahalanobis))
    assert torch.allclose(out["odin"], odin(model, x))
    assert all(v.shape == (12,) for v in out.values())
    # the attack objective's forward value is the score itself (ODIN: through its BPDA form)
    for name in names:
        obj = attack_objective(model, x, name, ctx).detach()
        assert torch.allclose(obj, out[name], atol=1e-6), name
    assert not SCORES["odin"].exportable and all(SCORES[n].exportable for n in ("msp", "energy", "mahalanobis"))


def test_check_score_names():
    assert check_score_names(["msp", "energy", "msp"]) == ["msp", "energy"]
    assert check_score_names(["odin", "msp"]) == ["odin", "msp"]  # evaluation may use a score export cannot
    with pytest.raises(ValueError, match="unknown score 'bogus'; valid scores: msp, "):
        check_score_names(["bogus"])
    with pytest.raises(ValueError, match="not exportable"):
        check_score_names(["odin"], exportable_only=True)
    with pytest.raises(ValueError, match="needs fitted"):
        compute_scores(tiny_model(), float_images(2), ["mahalanobis"], ScoreContext())


def test_mahalanobis_params_round_trip_through_npz(tmp_path):
    f, y, _, _ = _gaussian_features(200)
    params = fit_mahalanobis(f, y, 3, shrinkage=0.25)
    params.save_npz(tmp_path / "maha.npz")
    back = MahalanobisParams.load_npz(tmp_path / "maha.npz")
    assert torch.equal(back.means, params.means.float()) and torch.equal(back.precision, params.precision.float())
    assert back.means.dtype == back.precision.dtype == torch.float32
    assert (back.num_fit_samples, back.shrinkage) == (params.num_fit_samples, 0.25) and back.num_fit_samples == len(f)
    assert isinstance(back.num_fit_samples, int) and isinstance(back.shrinkage, float)
    moved = back.to("meta")  # a device every build has: both tensors go there, the numbers stay
    assert moved.means.device.type == moved.precision.device.type == "meta"
    assert moved.means.shape == back.means.shape and moved.precision.shape == back.precision.shape
    assert (moved.num_fit_samples, moved.shrinkage) == (back.num_fit_samples, back.shrinkage)
    # a file written before shrinkage was recorded loads with shrinkage 0
    np.savez(tmp_path / "old.npz", means=back.means.numpy(), precision=back.precision.numpy(), num_fit_samples=np.array(7))
    old = MahalanobisParams.load_npz(tmp_path / "old.npz")
    assert (old.num_fit_samples, old.shrinkage) == (7, 0.0)


@pytest.mark.parametrize("name", [n for n in SCORES if not SCORES[n].needs_detector])  # detector: test_detector.py
def test_scored_forward_gives_the_score_and_every_surrogate_of_one_pass(name):
    """The worst-case attack's input: (score, {"score", log_msp, margin, ce_uniform}) on the same logits."""
    model = tiny_model()
    x = float_images(6)
    ctx = ScoreContext(mahalanobis=fit_mahalanobis(torch.randn(200, model.feature_dim), torch.arange(200) % 10, 10))
    score, parts = scored_forward(model, name, ctx)(x)
    with torch.no_grad():
        logits = model(x)
        _, expected = compute_scores(model, x, [name], ctx)
    assert torch.allclose(score.detach(), expected[name], atol=1e-5)
    assert set(parts) == {"score", *ATTACK_SURROGATES} and parts["score"] is score
    for key, f in ATTACK_SURROGATES.items():
        assert torch.allclose(parts[key].detach(), f(logits), atol=1e-5), key
    top = torch.topk(logits, 2, dim=1).values
    assert torch.allclose(parts["margin"].detach(), top[:, 0] - top[:, 1], atol=1e-5)
    assert torch.allclose(parts["ce_uniform"].detach(), torch.logsumexp(logits, 1) - logits.mean(1), atol=1e-5)


# -- cases the mutation run found untested (docs/testing.md): ODIN away from T = 1000, where the
# softmax is flat enough that a wrong temperature, eps or step direction stays within tolerance;
# fit_mahalanobis' argument checks; the npz file's dtypes and its refusal of pickles.


def _odin_by_hand(model, x: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    logp = torch.log_softmax(model(xg) / temperature, dim=1).amax(dim=1).sum()
    (grad,) = torch.autograd.grad(logp, xg)
    pre = (x + eps * grad.sign()).clamp(0.0, 1.0)
    with torch.no_grad():
        return torch.softmax(model(pre) / temperature, dim=1).amax(dim=1)


def test_odin_at_a_low_temperature_and_a_large_step_matches_the_definition():
    model, x = tiny_model().eval(), float_images(6)
    want = _odin_by_hand(model, x, 1.0, 0.05)
    assert torch.allclose(odin(model, x, 1.0, 0.05), want, atol=1e-6)
    assert not torch.allclose(want, msp(model(x), 1.0).detach(), atol=1e-4)  # the step matters at T = 1
    ctx = ScoreContext(odin_temperature=1.0, odin_eps=0.05)
    assert torch.allclose(attack_objective(model, x, "odin", ctx).detach(), want, atol=1e-6)
    assert torch.allclose(compute_scores(model, x, ["odin"], ctx)[1]["odin"], want, atol=1e-6)


def test_odin_preprocess_leaves_pixels_the_score_ignores():
    class FirstChannelOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            return self.inner(torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1))

    model, x = FirstChannelOnly().eval(), float_images(3)
    pre = odin_preprocess(model, x, 1.0, 0.05)
    assert torch.equal(pre[:, 1:], x[:, 1:])  # zero gradient: no step (a division by the sign would saturate them)
    assert not torch.equal(pre[:, :1], x[:, :1])


def test_fit_mahalanobis_checks_its_arguments_with_value_errors():
    f, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"^features must be \(N, D\) and labels \(N,\), got \(10, 4\) and \(9,\)$"):
        fit_mahalanobis(f, y[:9], 2)
    with pytest.raises(ValueError, match=r"^features must be \(N, D\)"):
        fit_mahalanobis(f[:, 0], y, 2)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^shrinkage must be in \[0, 1\], got {bad}$"):
            fit_mahalanobis(f, y, 2, shrinkage=bad)
    with pytest.raises(ValueError, match=r"^cannot fit Mahalanobis: the features have zero variance$"):
        fit_mahalanobis(torch.ones(10, 4), y, 2)


def test_fit_mahalanobis_full_shrinkage_and_label_dtypes():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(40, 3, generator=g), torch.arange(40) % 2
    full = fit_mahalanobis(f, y, 2, shrinkage=1.0)  # documented as valid: Sigma = (tr S / D) I
    f64 = f.double()
    centred = f64 - torch.stack([f64[y == c].mean(0) for c in range(2)])[y]
    scale = torch.trace(centred.T @ centred / 40) / 3
    assert torch.allclose(full.precision.double(), torch.eye(3, dtype=torch.float64) / scale, rtol=1e-6)
    ref = fit_mahalanobis(f, y, 2, shrinkage=0.5)
    for labels in (y.float(), y.to(torch.uint8), y.to(torch.int32)):  # any integral-valued labels, cast to long
        other = fit_mahalanobis(f, labels, 2, shrinkage=0.5)
        assert torch.equal(other.means, ref.means) and torch.equal(other.precision, ref.precision)


def test_fit_mahalanobis_precision_is_the_float64_shrunk_inverse_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(50, 5, generator=g), torch.arange(50) % 3
    got = fit_mahalanobis(f, y, 3, shrinkage=0.5)
    f64 = f.double()
    means = torch.zeros(3, 5, dtype=torch.float64).index_add_(0, y, f64) / torch.bincount(y)[:, None]
    centred = f64 - means[y]
    cov = centred.T @ centred / 50
    scale = torch.trace(cov) / 5
    want = torch.linalg.pinv(0.5 * cov + 0.5 * scale * torch.eye(5, dtype=torch.float64), hermitian=True).float()
    assert torch.equal(got.precision, want)


def test_mahalanobis_npz_is_float32_and_refuses_pickles(tmp_path):
    params = fit_mahalanobis(torch.randn(20, 4), torch.arange(20) % 2, 2)
    params.save_npz(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as d:
        assert d["means"].dtype == np.float32 and d["precision"].dtype == np.float32
    np.savez(tmp_path / "pickled.npz", means=np.array([1.0], dtype=object), precision=np.eye(1, dtype=np.float32),
             num_fit_samples=np.array(1))
    with pytest.raises(ValueError, match="pickle"):
        MahalanobisParams.load_npz(tmp_path / "pickled.npz")


def test_mahalanobis_without_params_names_what_it_needs():
    with pytest.raises(ValueError, match=r"^the mahalanobis score needs fitted MahalanobisParams \(fit_mahalanobis on the train split\)$"):
        compute_scores(tiny_model().eval(), float_images(2), ["mahalanobis"], ScoreContext())
