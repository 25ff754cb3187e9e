"""`oodguard calibrate --score auto`: choose the served score on validation data, under attack.

Candidates are the score outputs of the exported graph (msp, energy, mahalanobis). Each is measured on
validation data only — the run's calibration split (in-distribution, never trained on) against the
outlier classes held out of training (`split.json` → `outlier_holdout`) — never on a test set:

- clean: every image of both sets, scored by onnxruntime (the served artefact);
- attacked: the `paper` worst-case attack (ε = 1/255, `evaluate.ATTACK_PROTOCOLS`; `--auto-attack strong` for
  ε = 8/255, the robust bundle's choice) on a seeded subset of each side, computed against that candidate
  through the torch model, then scored by onnxruntime.

The winner has the lowest attacked FPR95 (ties: lowest clean FPR95, then the candidate order). The whole
comparison goes into the manifest (`metrics.score_selection`), so a bundle says why it serves its score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import data
from .attacks import pgd_worst_case
from .ood_metrics import ood_metrics
from .ood_sets import subsample, subset_indices
from .run_dir import RunData
from .scores import ScoreContext, scored_forward, worst_case_plan

log = logging.getLogger(__name__)

SELECTION_ATTACK = "paper"
SELECTION_ATTACKS = ("paper", "strong")  # worst-case protocols of evaluate.ATTACK_PROTOCOLS a choice may be made under


def attack_in_batches(forward, images: np.ndarray, direction: float, batch_size: int, seed: int, attack_name: str,
                      objectives: tuple[str, ...], restarts: int) -> tuple[np.ndarray, np.ndarray]:
    """(adversarial images, float NCHW; their worst scores) of uint8 NHWC `images` under protocol `attack_name`'s
    budget, `forward` as `attacks.pgd_worst_case` takes it; each batch seeded by its position."""
    from .evaluate import ATTACK_PROTOCOLS

    attack = ATTACK_PROTOCOLS[attack_name]
    adv, scores = [], []
    for start, x in data.iterate_batches(images, batch_size):
        x_adv, score = pgd_worst_case(forward, x, direction=direction, objectives=objectives, eps=attack.eps,
                                      steps=attack.steps, step_size=attack.step_size, restarts=restarts,
                                      random_start=attack.random_start, seed=seed * 7919 + start)
        adv.append(x_adv.cpu().numpy())
        scores.append(score.cpu().numpy())
    return np.concatenate(adv), np.concatenate(scores)


def attacked_images(model, name: str, ctx: ScoreContext, images: np.ndarray, direction: float, batch_size: int,
                    seed: int, attack_name: str = SELECTION_ATTACK) -> np.ndarray:
    from .evaluate import ATTACK_PROTOCOLS

    attack = ATTACK_PROTOCOLS[attack_name]
    objectives, restarts = worst_case_plan(name, attack.objectives, attack.restarts)
    return attack_in_batches(scored_forward(model, name, ctx), images, direction, batch_size, seed, attack_name,
                             objectives, restarts)[0]


def select_score(run: RunData, candidates: list[str], onnx_scores: Callable[[np.ndarray, str], np.ndarray],
                 model: torch.nn.Module, ctx: ScoreContext, cal_images: np.ndarray, attack_samples: int = 500,
                 batch_size: int = 256, seed: int = 0, attack: str = SELECTION_ATTACK) -> tuple[str, dict[str, Any]]:
    """(chosen score, comparison record). `onnx_scores(float NCHW images, name)` runs the exported graph;
    `cal_images` are the calibration images as calibrated (uint8 NHWC, in their upload forms)."""
    if not candidates:
        raise ValueError("--score auto: the exported graph has no score outputs to choose from")
    if attack not in SELECTION_ATTACKS:
        raise ValueError(f"--auto-attack must be one of {', '.join(SELECTION_ATTACKS)}, got {attack!r}")
    val_out = run.outlier_validation_set()
    as_float = lambda u8: data.to_tensor(u8).numpy()  # noqa: E731
    cal_sub = cal_images[subset_indices(len(cal_images), attack_samples, seed)]
    out_sub = subsample(val_out, attack_samples, seed + 1).images
    record: dict[str, Any] = {
        "rule": f"lowest FPR95 under the {attack} worst-case attack (both sides), then lowest clean FPR95",
        "in_distribution": f"calibration split ({len(cal_images)} images clean, {len(cal_sub)} attacked)",
        "ood": (f"held-out outlier classes {held['classes']}" if (held := run.split["outlier_holdout"]).get("classes")
                else "held-out outlier images") + f" of {val_out.source} ({len(val_out)} images clean, "
               f"{len(out_sub)} attacked)",
        "attack": attack,
        "candidates": {},
    }
    for name in candidates:
        clean = ood_metrics(onnx_scores(as_float(cal_images), name), onnx_scores(as_float(val_out.images), name))
        log.info("score %s: attacking %d + %d validation images", name, len(cal_sub), len(out_sub))
        adv_in = attacked_images(model, name, ctx, cal_sub, -1.0, batch_size, seed, attack)
        adv_out = attacked_images(model, name, ctx, out_sub, +1.0, batch_size, seed + 1, attack)
        attacked = ood_metrics(onnx_scores(adv_in, name), onnx_scores(adv_out, name))
        record["candidates"][name] = {"clean": clean, "attacked": attacked}
    chosen = min(candidates, key=lambda n: (record["candidates"][n]["attacked"]["fpr_at_95_tpr"],
                                            record["candidates"][n]["clean"]["fpr_at_95_tpr"], candidates.index(n)))
    record["chosen"] = chosen
    return chosen, record
