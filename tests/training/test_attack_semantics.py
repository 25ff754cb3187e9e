"""What each method attacks, and which way: checked on the batches the training loop really perturbs.

A spy wraps the trainer's `pgd_linf` and records every call: the objective, the clean batch and the
perturbed one. ALOE must attack inliers (raising their cross-entropy) and outliers (raising their OE
loss, i.e. pushing them toward confident predictions); AOE and ADV only inliers; MSP and OE nothing.
A sign flip or a dropped outlier attack (ALOE silently becoming AOE) fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from oodguard.training import trainer as trainer_mod
from oodguard.training.losses import ce_per_sample, oe_loss_per_sample
from oodguard.training.trainer import train

EXPECTED = {"msp": [], "oe": [], "adv": ["in"], "aoe": ["in"], "aloe": ["in", "out"]}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_method_attacks_the_right_batches_the_right_way(method, tiny_config, monkeypatch):
    """Measured with the true losses, independently of the objective the trainer hands to PGD."""
    calls, models, labels = [], [], {}
    real_pgd, real_create, real_next = trainer_mod.pgd_linf, trainer_mod.create_model, trainer_mod.BatchStream.next

    def create(*a, **k):
        models.append(real_create(*a, **k))
        return models[-1]

    def next_batch(self):
        x, y = real_next(self)
        labels[len(x)] = y  # the inlier batch's labels, keyed by batch size
        return x, y

    def spy(objective, x, **kw):
        x_adv = real_pgd(objective, x, **kw)
        model = copy.deepcopy(models[0])  # same weights and mode, no side effect on the run's BN statistics
        with torch.no_grad():
            if len(x) == cfg.batch_size:
                true = lambda z: ce_per_sample(model(z), labels[len(x)]).mean().item()  # noqa: E731
            else:
                true = lambda z: oe_loss_per_sample(model(z)).mean().item()  # noqa: E731
            calls.append((len(x), true(x), true(x_adv), (x_adv - x).abs().max().item(), kw["eps"]))
        return x_adv

    monkeypatch.setattr(trainer_mod, "pgd_linf", spy)
    monkeypatch.setattr(trainer_mod, "create_model", create)
    monkeypatch.setattr(trainer_mod.BatchStream, "next", next_batch)
    cfg = tiny_config(method=method, max_steps=3, eval_test=False, eps=4 / 255, step_size=2 / 255)
    train(cfg)
    per_step = len(EXPECTED[method])
    assert len(calls) == 3 * per_step
    sizes = {"in": cfg.batch_size, "out": cfg.outlier_batch_size}
    for i, (n, before, after, moved, eps) in enumerate(calls):
        side = EXPECTED[method][i % per_step]
        assert n == sizes[side], (method, i)  # inliers and outliers are told apart by batch size (32 vs 64)
        # inliers: CE to their label goes up; outliers: the OE loss goes up (pushed toward confident)
        assert after > before, (method, side, before, after)
        assert 0 < moved <= eps + 1e-6


def test_lambda_weights_the_oe_term(tiny_config, monkeypatch):
    """loss = CE + λ·OE: the logged loss is the CE plus λ times the logged OE, for two values of λ."""
    for lam in (0.5, 2.0):
        result = train(tiny_config(method="oe", max_steps=2, eval_test=False, lambda_oe=lam, out=str(
            tiny_config().out) + f"-{lam}"))
        import json
        from pathlib import Path

        lines = [json.loads(x) for x in (Path(result.run_dir) / "log.jsonl").read_text().splitlines()]
        rec = next(r for r in lines if "event" not in r)
        assert rec["loss"] == pytest.approx(rec["ce"] + lam * rec["oe"], rel=1e-6)
