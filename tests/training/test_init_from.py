"""--init-from: fine-tuning starts from another run's weights, never from one that saw our calibration images."""

from __future__ import annotations

import json

import pytest
import torch

from oodguard.training.run_dir import RunDirError, load_checkpoint
from oodguard.training.trainer import train


def test_fine_tuning_starts_from_the_source_weights_and_records_them(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=6, eval_test=False, out=str(tmp_path / "pre")))
    source = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    # A negligible lr and no weight decay: the fine-tuned weights must stay the source's to ~1e-9
    # (BN running statistics still move, so compare the learnable parameters only).
    result = train(tiny_config(method="oe", max_steps=2, eval_test=False, lr=1e-9, min_lr=0.0, weight_decay=0.0,
                               init_from=str(tmp_path / "pre"), out=str(tmp_path / "ft")))
    assert result.step == 2
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")
    params = [k for k in source["model"] if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        assert torch.allclose(source["model"][k], tuned["model"][k], atol=1e-6), k
    lineage = json.loads((tmp_path / "ft" / "config.json").read_text())["lineage"]["init_from"]
    assert lineage["step"] == 6 and len(lineage["sha256"]) == 64 and lineage["method"] == "msp"


def test_fine_tuning_from_scratch_differs(tiny_config, tmp_path):
    # Control for the test above: without --init-from the same run does not start from those weights.
    train(tiny_config(method="msp", max_steps=6, eval_test=False, out=str(tmp_path / "pre")))
    source = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    train(tiny_config(method="oe", max_steps=2, eval_test=False, lr=1e-9, min_lr=0.0, weight_decay=0.0,
                      out=str(tmp_path / "scratch")))
    scratch = load_checkpoint(tmp_path / "scratch" / "checkpoints" / "last.pt")
    assert any(not torch.allclose(source["model"][k], scratch["model"][k], atol=1e-3) for k in source["model"] if "weight" in k)


def test_a_source_with_another_calibration_split_is_refused(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=2, eval_test=False, split_seed=5, out=str(tmp_path / "pre")))
    with pytest.raises(RunDirError, match="calibration split differs"):
        train(tiny_config(method="oe", max_steps=2, eval_test=False, init_from=str(tmp_path / "pre"),
                          out=str(tmp_path / "ft")))


def test_a_source_with_another_model_is_refused(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=2, eval_test=False, out=str(tmp_path / "pre")))
    with pytest.raises(RunDirError, match="is not this run's"):
        train(tiny_config(method="oe", max_steps=2, eval_test=False, init_from=str(tmp_path / "pre"),
                          model_kwargs={"widths": [8, 16, 32], "stem": 8}, out=str(tmp_path / "ft")))


def test_a_classifier_starts_a_detector_with_its_body_and_a_fresh_output_layer(tiny_config, tmp_path):
    # a 10-class classifier's body starts a 2-output in-vs-out detector (`--method disc`): every weight but the
    # head is the source's (a negligible lr keeps them), the head is new, and the lineage says so
    train(tiny_config(method="msp", max_steps=4, eval_test=False, out=str(tmp_path / "pre")))
    source = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    train(tiny_config(method="disc", max_steps=2, eval_test=False, lr=1e-9, min_lr=0.0, weight_decay=0.0,
                      disc_val_samples=8, init_from=str(tmp_path / "pre"), out=str(tmp_path / "det")))
    detector = load_checkpoint(tmp_path / "det" / "checkpoints" / "last.pt")
    assert detector["model"]["head.weight"].shape[0] == 2 and source["model"]["head.weight"].shape[0] == 10
    body = [k for k in source["model"] if not k.startswith("head.") and "running" not in k and "num_batches" not in k]
    assert body
    for k in body:
        assert torch.allclose(source["model"][k], detector["model"][k], atol=1e-6), k
    lineage = json.loads((tmp_path / "det" / "config.json").read_text())["lineage"]["init_from"]
    assert lineage["head"] == "re-initialised: the source has 10 outputs, this model 2"


def test_a_plain_source_may_start_a_flip_averaged_run(tiny_config, tmp_path):
    # flip_average changes prediction, not the weights: the same architecture fine-tunes into the served model
    train(tiny_config(method="msp", max_steps=2, eval_test=False, out=str(tmp_path / "pre")))
    fine_tune = tiny_config(method="oe", max_steps=2, eval_test=False, init_from=str(tmp_path / "pre"),
                            out=str(tmp_path / "ft"))
    fine_tune.model_kwargs = {**fine_tune.model_kwargs, "flip_average": True}
    train(fine_tune)
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")
    assert tuned["model_config"]["flip_average"] is True


def test_a_source_that_trained_on_our_validation_outliers_is_refused(tiny_config, tmp_path):
    train(tiny_config(method="oe", max_steps=2, eval_test=False, outlier_holdout=0.3, out=str(tmp_path / "pre")))
    with pytest.raises(RunDirError, match="validation outliers"):
        train(tiny_config(method="oe", max_steps=2, eval_test=False, init_from=str(tmp_path / "pre"),
                          out=str(tmp_path / "ft")))  # default holdout 0.1: other held-out outliers
    # the same holdout is fine
    train(tiny_config(method="aloe", max_steps=2, eval_test=False, init_from=str(tmp_path / "pre"),
                      outlier_holdout=0.3, out=str(tmp_path / "ft2")))


def test_outlier_holdout_keeps_validation_outliers_out_of_the_stream(tiny_config, tmp_path):
    """The outlier stream the loop draws from holds none of the held-out images (checked on the images fed)."""
    from oodguard.training import trainer as trainer_mod
    from oodguard.training.run_dir import load_split
    from oodguard.training.data import held_out_outliers, load_outliers

    seen = []
    original = trainer_mod.BatchStream.__init__

    def spy(self, images, labels, *a, **k):
        seen.append(images)
        original(self, images, labels, *a, **k)

    cfg = tiny_config(method="oe", max_steps=2, eval_test=False, outlier_holdout=0.2, out=str(tmp_path / "run"))
    trainer_mod.BatchStream.__init__ = spy
    try:
        train(cfg)
    finally:
        trainer_mod.BatchStream.__init__ = original
    record = load_split(tmp_path / "run")["outlier_holdout"]
    held = held_out_outliers(load_outliers(record["source"]), record)
    fed = {img.tobytes() for img in seen[1]}  # [0]: inliers, [1]: outliers
    assert len(held) == record["n_val"] > 0 and len(seen[1]) == record["n_train"]
    assert not any(img.tobytes() in fed for img in held.images)
