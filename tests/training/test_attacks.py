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
