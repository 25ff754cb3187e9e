"""Rebuild a run directory (config, split, checkpoint) from a shipped bundle whose training run is gone.

The bundle's graph holds every weight and its manifest the full training config; the calibration split and
the held-out outlier classes follow from the recorded seeds. What a bundle does not keep is the BatchNorm
layers the ONNX exporter folded into the convolution before them: those come back as the folded convolution
(weight and bias) followed by an identity BatchNorm whose shift is the folded bias, the same function.
The rebuilt model is checked against the bundle's graph (onnxruntime) on real calibration images: logits
within 1e-4 or nothing is written.

Works for the conv / BN / activation / pooling / linear graphs of `fast_cnn` and `small_cnn`. Use: evaluate a
shipped model under attack, or compose it with a detector (`oodguard guard`), when only the bundle is left.
`--flip-average` rebuilds it as the test-time-flip-averaged model (same weights, parity checked before the option
is set): how the shipped `default:20261201.2` was made from `default:20261201.1` (scripts/train_default.py
--finetuned).

    python scripts/run_from_bundle.py models/default --out ~/oodguard-runs/default-from-bundle [--flip-average]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from oodguard.service.bundle import make_session
from oodguard.training import data
from oodguard.training.architectures import create_model
from oodguard.training.config import TrainConfig
from oodguard.training.data import calibration_split, load_outliers, outlier_holdout, to_tensor
from oodguard.training.run_dir import CHECKPOINT_FORMAT, save_last_checkpoint, write_json_atomic, write_run_record

PARITY_ATOL = 1e-4


def rebuild_model(onnx_path: Path, model_config: dict) -> nn.Module:
    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    model = create_model(**model_config).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    if len(convs) != len(conv_nodes):
        raise SystemExit(f"{onnx_path}: {len(conv_nodes)} convolutions in the graph, {len(convs)} in {model_config}")
    state = model.state_dict()
    names = {id(m): name for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    for conv, node in zip(convs, conv_nodes):
        name = names[id(conv)]
        state[f"{name}.weight"] = weights[node.input[1]]
        if len(node.input) > 2:  # BatchNorm folded into this conv: the next module is that BN, made identity
            prefix, index = name.rsplit(".", 1)
            bn_name = f"{prefix}.{int(index) + 1}"
            if not isinstance(modules.get(bn_name), nn.BatchNorm2d):
                raise SystemExit(f"{onnx_path}: conv {name} has a folded bias but {bn_name} is not a BatchNorm")
            bn = modules[bn_name]
            state[f"{bn_name}.weight"] = torch.ones_like(state[f"{bn_name}.weight"])
            state[f"{bn_name}.bias"] = weights[node.input[2]]
            state[f"{bn_name}.running_mean"] = torch.zeros_like(state[f"{bn_name}.running_mean"])
            state[f"{bn_name}.running_var"] = torch.full_like(state[f"{bn_name}.running_var"], 1.0 - bn.eps)
    for key in state:
        if f"model.{key}" in weights:  # unfolded BatchNorms, the head, the normalisation buffers
            state[key] = weights[f"model.{key}"]
    model.load_state_dict(state)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="new run directory (must not exist)")
    parser.add_argument("--data-dir", default=None, help="where the named datasets live (default: ../shared/datasets)")
    parser.add_argument("--flip-average", action="store_true",
                        help="the rebuilt run's model averages each image's and its mirror image's features in eval "
                             "mode (the model option `flip_average`; weights unchanged, checked for parity before)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new directory")
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    training = manifest["training"]
    config = dict(training["config"])
    train_cfg = dict(config["train"])
    model_config = dict(training["model_config"])
    model = rebuild_model(args.bundle / "model.onnx", model_config)

    train_cfg["data_dir"] = args.data_dir
    full = data.load_in_distribution(train_cfg["data"], "train", data_dir=args.data_dir)
    if full.sha256 != manifest["lineage"]["datasets"].get(Path(full.source).name):
        raise SystemExit(f"{full.source}: not the data the bundle was trained on (sha256 differs)")
    defaults = TrainConfig()  # what a run that did not record a field was trained with
    split_seed = int(train_cfg.get("split_seed", defaults.split_seed))
    train_idx, cal_idx = calibration_split(len(full), int(train_cfg.get("calibration_size", defaults.calibration_size)),
                                           split_seed)
    outliers = load_outliers(train_cfg.get("outliers", defaults.outliers), data_dir=args.data_dir)
    _, held_out = outlier_holdout(outliers, float(train_cfg.get("outlier_holdout", defaults.outlier_holdout)), split_seed)
    split = {"dataset": full.source, "dataset_sha256": full.sha256, "n_total": len(full),
             "calibration_size": len(cal_idx), "seed": split_seed, "cal_indices": cal_idx.tolist(),
             "train_size": len(train_idx),
             "outlier_holdout": {"source": outliers.source, "sha256": outliers.sha256, **held_out}}

    images = to_tensor(full.images[cal_idx[:256]])
    with torch.no_grad():
        mine = model(images).numpy()
    theirs = make_session(str(args.bundle / "model.onnx")).run(["logits"], {"image": images.numpy()})[0]
    diff = float(np.abs(mine - theirs).max())
    if diff > PARITY_ATOL:
        raise SystemExit(f"rebuilt model differs from the bundle's graph by {diff:.2e} (> {PARITY_ATOL}): not written")

    if args.flip_average:  # after the parity check: the bundle's graph is the single-view model
        model_config["flip_average"] = True
        train_cfg["model_kwargs"] = {**(train_cfg.get("model_kwargs") or {}), "flip_average": True}
        config["model_config"] = model_config
    args.out.mkdir(parents=True)
    record = {**config, "train": {**train_cfg, "out": str(args.out)},
              "rebuilt_from_bundle": {"bundle": str(args.bundle), "name": manifest["name"], "version": manifest["version"],
                                      "onnx_sha256": manifest["files"]["model.onnx"],
                                      "original_checkpoint_sha256": manifest["lineage"].get("checkpoint_sha256"),
                                      "parity_max_abs_logit_diff": diff, "flip_average_added": args.flip_average}}
    write_run_record(args.out, record, split)
    save_last_checkpoint(args.out, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config,
                                    "config": record["train"], "step": 0, "epoch": 0.0, "train_seconds": 0.0,
                                    "rebuilt_from_bundle": record["rebuilt_from_bundle"]})
    write_json_atomic(args.out / "summary.json", {"event": "rebuilt_from_bundle", **record["rebuilt_from_bundle"]})
    print(f"{args.out}: {model_config['name']} rebuilt from {args.bundle} ({manifest['name']}:{manifest['version']}), "
          f"logits within {diff:.1e} of the bundle's graph on 256 calibration images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
