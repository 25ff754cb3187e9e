"""PGD: stays in the ε-ball and [0, 1], raises its objective, leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

from oodguard.training.attacks import TRAIN_PAPER, AttackConfig, pgd_linf, pgd_with
from oodguard.training.losses import ce_per_sample, oe_loss_per_sample
from oodguard.training.architectures import create_model



@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("small_cnn", widths=(8, 16, 16), stem=8)


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # on the 1/255 grid, including exact 0 and 1 pixels so the [0, 1] clamp matters
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    return x


@pytest.mark.parametrize("eps,steps,step_size,random_start", [(1 / 255, 2, 1 / 255, False), (8 / 255, 10, 2 / 255, True)])
def test_pgd_stays_in_ball_and_box_and_raises_objective(model, eps, steps, step_size, random_start):
    model.eval()
    x = _images()
    y = torch.arange(16) % 10
    objective = lambda z: ce_per_sample(model(z), y)  # noqa: E731
    x_adv = pgd_linf(objective, x, eps=eps, steps=steps, step_size=step_size, random_start=random_start,
                     generator=torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    with torch.no_grad():
        assert objective(x_adv).sum() > objective(x).sum()
    assert (x_adv != x).any()


def test_paper_attack_keeps_delta_on_the_pixel_grid(model):
    model.train()
    x = _images()
    x_adv = pgd_with(TRAIN_PAPER, lambda z: oe_loss_per_sample(model(z)), x)
    delta = (x_adv - x) * 255
    assert torch.allclose(delta, delta.round(), atol=1e-4)
    assert set(delta.round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_pgd_leaves_model_mode_and_parameter_grads_alone(model):
    for training in (True, False):
        model.train(training)
        pgd_linf(lambda z: oe_loss_per_sample(model(z)), _images(4), eps=2 / 255, steps=3, step_size=1 / 255)
        assert model.training is training
        assert all(p.grad is None for p in model.parameters())


def test_pgd_maximises_a_simple_objective_exactly():
    # objective = sum of pixels: the optimum in the ε-ball is x + eps, clamped at 1
    x = torch.tensor([[[[0.0, 0.5, 0.999, 1.0]]]])
    x_adv = pgd_linf(lambda z: z.flatten(1).sum(1), x, eps=0.01, steps=3, step_size=0.004)
    torch.testing.assert_close(x_adv, torch.tensor([[[[0.01, 0.51, 1.0, 1.0]]]]))


def test_zero_steps_or_eps_returns_a_copy():
    x = torch.rand(2, 3, 4, 4)
    for kw in ({"eps": 0.0, "steps": 3}, {"eps": 0.1, "steps": 0}):
        out = pgd_linf(lambda z: z.flatten(1).sum(1), x, step_size=0.1, **kw)
        assert torch.equal(out, x) and out is not x


def test_random_start_is_reproducible_with_a_generator(model):
    model.eval()
    x = _images(4)
    run = lambda: pgd_linf(lambda z: oe_loss_per_sample(model(z)), x, eps=4 / 255, steps=1, step_size=1 / 255,  # noqa: E731
                           random_start=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(run(), run())


def test_objective_must_be_per_sample():
    with pytest.raises(ValueError, match="per-sample"):
        pgd_linf(lambda z: z.sum(), torch.rand(2, 3, 4, 4), eps=0.1, steps=1, step_size=0.1)


def test_attack_config_validates():
    assert TRAIN_PAPER == AttackConfig(1 / 255, 2, 1 / 255, False)
    with pytest.raises(ValueError):
        AttackConfig(eps=-1.0, steps=1, step_size=0.1)


def test_attack_config_bounds():
    AttackConfig(eps=0.0, steps=0, step_size=0.0, restarts=1)  # zero everything is a valid (no-op) attack
    for bad in ({"eps": -1e-9}, {"steps": -1}, {"step_size": -1e-9}, {"restarts": 0}):
        kwargs = {"eps": 0.0, "steps": 0, "step_size": 0.0, "restarts": 1, **bad}
        with pytest.raises(ValueError, match=r"^attack eps, steps and step_size must be >= 0 and restarts >= 1, got AttackConfig\("):
            AttackConfig(**kwargs)


# -- exact behaviour of the random start and the budget checks (mutation testing, issue 17) ------------------

def _zero_gradient(z):
    """A per-sample objective whose gradient is 0 everywhere: sign steps do not move the image."""
    return z.flatten(1).sum(1) * 0


def test_no_budget_never_calls_the_objective_and_ignores_the_random_start():
    def objective(z):
        raise AssertionError("the objective must not be evaluated without a budget")

    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    for kw in ({"eps": 0.0, "steps": 3}, {"eps": 0.1, "steps": 0}):
        out = pgd_linf(objective, x, step_size=0.1, random_start=True, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(out, x)


def test_random_start_is_a_uniform_draw_in_the_ball_in_the_input_precision():
    """The start is x + (2u - 1) ε, u ~ U[0, 1) from the generator in x's dtype, clipped to [0, 1]; pixels with
    a zero gradient stay there."""
    x = _images(3).double()
    eps = 6 / 255
    out = pgd_linf(_zero_gradient, x, eps=eps, steps=2, step_size=1 / 255, random_start=True,
                   generator=torch.Generator().manual_seed(11))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = torch.minimum(torch.maximum(x + (2 * u - 1) * eps, (x - eps).clamp(min=0)), (x + eps).clamp(max=1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.dtype == torch.float64


def test_random_start_without_a_generator_uses_the_global_one():
    x = _images(2)
    torch.manual_seed(3)
    a = pgd_linf(_zero_gradient, x, eps=4 / 255, steps=1, step_size=1 / 255, random_start=True)
    torch.manual_seed(3)
    b = pgd_linf(_zero_gradient, x, eps=4 / 255, steps=1, step_size=1 / 255, random_start=True)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert (a - x).abs().max() <= 4 / 255 + 1e-6


def test_pgd_with_passes_random_start_and_the_generator():
    x = _images(2).double()
    config = AttackConfig(eps=5 / 255, steps=1, step_size=1 / 255, random_start=True)
    got = pgd_with(config, _zero_gradient, x, generator=torch.Generator().manual_seed(4))
    want = pgd_linf(_zero_gradient, x, eps=5 / 255, steps=1, step_size=1 / 255, random_start=True,
                    generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want) and not torch.equal(got, x)


def test_objective_shape_error_names_the_batch_size():
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(2,\), got \(\)$"):
        pgd_linf(lambda z: z.sum(), torch.rand(2, 3, 4, 4), eps=0.1, steps=1, step_size=0.1)
