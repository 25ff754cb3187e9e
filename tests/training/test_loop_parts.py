"""The pieces of the training loop that are not the loop: the cosine schedule and its refit, BN during the attack."""

from __future__ import annotations

import pytest
import torch

from oodguard.training.architectures import create_model
from oodguard.training.attacks import pgd_linf
from oodguard.training.loop_parts import CosineSchedule, attack_bn
from oodguard.training.losses import oe_loss_per_sample


def test_cosine_schedule():
    s = CosineSchedule(lr=0.1, min_lr=1e-6, total_steps=100)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(50) == pytest.approx(0.05 + 5e-7)
    assert s.lr_at(100) == pytest.approx(1e-6) and s.lr_at(1000) == pytest.approx(1e-6)
    w = CosineSchedule(lr=0.1, min_lr=0.0, total_steps=110, warmup_steps=10)
    assert w.lr_at(0) == pytest.approx(0.01) and w.lr_at(9) == pytest.approx(0.1) and w.lr_at(60) == pytest.approx(0.05)


def test_schedule_refit_keeps_the_lr_continuous_and_ends_at_min_lr():
    plain = CosineSchedule(lr=0.1, min_lr=0.0, total_steps=100)
    same = CosineSchedule(lr=0.1, min_lr=0.0, total_steps=100)
    same.refit(40, 100)  # a refit to the same end changes nothing
    assert all(abs(same.lr_at(i) - plain.lr_at(i)) < 1e-12 for i in range(101))
    longer = CosineSchedule(lr=0.1, min_lr=0.0, total_steps=100)
    longer.refit(40, 200)  # the machine got faster: stretch the rest
    assert longer.lr_at(40) == pytest.approx(plain.lr_at(40))
    assert plain.lr_at(41) < longer.lr_at(41) < longer.lr_at(40)
    assert longer.lr_at(200) == pytest.approx(0.0, abs=1e-12) and longer.lr_at(150) > 0
    state = longer.state_dict()
    restored = CosineSchedule(lr=0.1, min_lr=0.0, total_steps=100)
    restored.load_state_dict(state)
    assert [restored.lr_at(i) for i in range(40, 201)] == [longer.lr_at(i) for i in range(40, 201)]


@pytest.mark.parametrize("mode", ["frozen", "eval"])
def test_attack_bn_modes_do_not_touch_running_stats(mode):
    model = create_model("small_cnn", widths=(8, 16, 16), stem=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    with attack_bn(model, mode):
        pgd_linf(lambda z: oe_loss_per_sample(model(z)), torch.rand(8, 3, 32, 32), eps=1 / 255, steps=2, step_size=1 / 255)
    assert model.training
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    with attack_bn(model, "train"):  # the reference behaviour: running stats move
        model(torch.rand(8, 3, 32, 32))
    assert not torch.equal(model.state_dict()["trunk.1.running_mean"], before["trunk.1.running_mean"])
