"""--ema-decay: the weight average follows every step, becomes the run's model, and survives --resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from oodguard.training.run_dir import RunData, load_checkpoint
from oodguard.training.trainer import train


def _last(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def test_the_average_is_the_runs_model_and_follows_each_step_by_the_ema_rule(tiny_config, tmp_path):
    decay = 0.75
    common = dict(method="msp", max_steps=6, eval_test=False, ema_decay=decay)
    train(tiny_config(out=str(tmp_path / "run"), stop_at_step=5, **common))
    before = _last(tmp_path / "run")
    assert before["ema_updates"] == 5
    result = train(tiny_config(out=str(tmp_path / "run"), resume=True, **common))
    after = _last(tmp_path / "run")
    assert after["ema_updates"] == 6
    trained, average = after["trained_model"], after["model"]
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    assert floats and any("running_mean" in k for k in floats)  # BN statistics are averaged too
    for k in floats:  # one step of the rule: new average = decay * old average + (1 - decay) * new weights
        expected = decay * before["model"][k] + (1 - decay) * trained[k]
        torch.testing.assert_close(average[k], expected, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(average[k], trained[k]) for k in floats)  # not the trained weights
    # every reader of the run gets the average: the returned model, and the run directory's model
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, average[k]), k
    model, _ = RunData.open(tmp_path / "run").load_model()
    for k, v in model.state_dict().items():
        assert torch.equal(v, average[k]), k


def test_resume_with_the_average_reproduces_the_uninterrupted_run_exactly(tiny_config, tmp_path):
    common = dict(method="aloe", max_steps=14, eval_test=False, random_start=True, eps=4 / 255, ema_decay=0.9)
    train(tiny_config(out=str(tmp_path / "full"), **common))
    train(tiny_config(out=str(tmp_path / "split"), stop_at_step=7, **common))
    train(tiny_config(out=str(tmp_path / "split"), resume=True, **common))
    a, b = _last(tmp_path / "full"), _last(tmp_path / "split")
    for key in ("model", "trained_model"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["ema_updates"] == b["ema_updates"] == 14


def test_without_the_flag_the_checkpoint_is_as_before(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=3, eval_test=False))
    ckpt = _last(tmp_path / "run")
    assert "trained_model" not in ckpt and "ema_updates" not in ckpt


def test_a_detector_run_validates_the_average_and_the_trained_weights(tiny_data_dir, tmp_path, monkeypatch):
    from oodguard.training import trainer
    from oodguard.training.config import resolve_config

    from .conftest import TINY_MODEL

    cfg = resolve_config("robust_disc", data=str(tiny_data_dir), outliers=str(tiny_data_dir), out=str(tmp_path / "run"),
                         calibration_size=40, batch_size=32, outlier_batch_size=32, max_steps=12,
                         model_kwargs=dict(TINY_MODEL), attack_steps=1, threads=1, progress=False,
                         disc_val_samples=20, ema_decay=0.8, seed=3)
    validated = []  # the weights each validation saw, in call order
    real_validate = trainer._disc_validate

    def recording_validate(cfg, model, val, device):
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_validate(cfg, model, val, device)

    monkeypatch.setattr(trainer, "_disc_validate", recording_validate)
    train(cfg)
    records = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
               if "disc_val" in r]
    assert records and all("disc_val_trained_weights" in r for r in records)
    assert records[-1]["disc_val"]["n_in"] == records[-1]["disc_val_trained_weights"]["n_in"] == 20
    # the last epoch's two validations: first the average ("disc_val"), then the trained weights, as saved
    ckpt = _last(tmp_path / "run")
    assert len(validated) == 2 * len(records)
    for seen, key in zip(validated[-2:], ("model", "trained_model")):
        for k, v in seen.items():
            assert torch.equal(v, ckpt[key][k]), (key, k)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_a_decay_outside_0_1_is_refused(tiny_config, decay):
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_config(ema_decay=decay).validate()
