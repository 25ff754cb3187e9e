"""OE loss and CE against hand-computed values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oodguard.training.losses import ce_per_sample, oe_loss, oe_loss_per_sample


def test_oe_loss_is_log_k_at_uniform_logits():
    for k in (2, 10, 100):
        for value in (0.0, 3.5, -7.0):  # any constant logit vector is uniform after softmax
            z = torch.full((4, k), value)
            torch.testing.assert_close(oe_loss_per_sample(z), torch.full((4,), math.log(k)))
            torch.testing.assert_close(oe_loss(z), torch.tensor(math.log(k)))


def test_oe_loss_hand_computed():
    # z = [0, ln 3]: softmax = [1/4, 3/4]; CE(uniform, p) = -(ln(1/4) + ln(3/4)) / 2 = ln 4 - ln(3)/2
    z = torch.tensor([[0.0, math.log(3.0)]])
    expected = math.log(4.0) - math.log(3.0) / 2
    torch.testing.assert_close(oe_loss_per_sample(z), torch.tensor([expected]))
    # = logsumexp(z) - mean(z) = ln 4 - ln(3)/2
    # a batch mean of two samples: uniform (ln 2) and the one above
    zb = torch.tensor([[1.0, 1.0], [0.0, math.log(3.0)]])
    torch.testing.assert_close(oe_loss(zb), torch.tensor((math.log(2.0) + expected) / 2))


def test_oe_loss_grows_with_confidence_and_is_at_least_log_k():
    k = 10
    losses = [oe_loss(torch.tensor([[s] + [0.0] * (k - 1)])).item() for s in (0.0, 1.0, 5.0, 20.0)]
    assert losses == sorted(losses) and abs(losses[0] - math.log(k)) < 1e-6
    # for a one-hot-ish prediction the loss approaches (s - 0) * (1 - 1/k) ~ s·0.9 for large s
    assert abs(losses[-1] - 20.0 * 0.9) < 1e-3
    rand = torch.randn(64, k) * 3
    assert torch.all(oe_loss_per_sample(rand) >= math.log(k) - 1e-6)


def test_oe_loss_equals_cross_entropy_to_uniform():
    z = torch.randn(8, 5)
    uniform = torch.full((8, 5), 1 / 5)
    torch.testing.assert_close(oe_loss_per_sample(z), -(uniform * F.log_softmax(z, 1)).sum(1))


def test_ce_hand_computed():
    # logits [0, ln 3] -> p(class 1) = 3/4 -> CE = -ln(3/4); p(class 0) = 1/4 -> CE = ln 4
    z = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    y = torch.tensor([1, 0])
    torch.testing.assert_close(ce_per_sample(z, y), torch.tensor([-math.log(0.75), math.log(4.0)]))


def test_losses_are_float32_under_half_inputs():
    z = torch.randn(4, 10).to(torch.bfloat16)
    assert oe_loss_per_sample(z).dtype == torch.float32
