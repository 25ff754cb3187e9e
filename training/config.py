"""Training configuration: one typed dataclass with every knob, plus two named recipes.

Recipes (`--recipe`):

- `cpu` (default): `small_cnn`, channels_last, weight decay 5e-4, 30 epochs of schedule. Meant to be run
  with `--time-budget SECONDS`: the cosine schedule is then fitted to the budget after a short timing
  probe, so the learning rate reaches ~0 when the budget ends.
- `fast`: the default model's pre-training (`make train-default`): `fast_cnn` (airbench94's widths), 18
  epochs of batches of 256 (16 in `make train-default`), SGD nesterov lr 0.2 after a 170-step warm-up,
  cosine to 0, label smoothing 0.1, 2-pixel translations + flips. ~4 minutes an epoch on 2 cores.
- `airbench`: airbench94's recipe (its network, `airbench`, and hyper-parameters) for the default model's
  pre-training: batches of 1,000, SGD nesterov with momentum 0.85, lr 1.27 (airbench's 10 per 1,024 images of
  a summed loss, written for our mean loss), weight decay 1.5e-3, BatchNorm shifts at a 64x learning rate,
  label smoothing 0.2, 2-pixel translations + flips, a warm-up over the first fifth (`warmup_frac`), half of
  the images re-rendered as uploads. ~4.3 minutes an epoch on 2 cores.
- `robust_disc`: the robust detector (issue 14; `--method disc`): a `small_cnn` with two outputs (in-distribution,
  outlier) adversarially trained at ε = 8/255 with PGD-3 (steps of 4/255, random start) on both sides, 8 epochs
  of 128 + 128 images, the attack run on the model in eval mode (`attack_bn` "eval": each side's batch is all
  inliers or all outliers, and train-mode BatchNorm normalised each by its own statistics, a different function
  from the evaluated one: the inliers' margins correlated -0.02 with eval mode's), validated every epoch under
  PGD-10 (`disc_val` in log.jsonl; every epoch's checkpoint is kept so the composition can take the one
  validation chose). Composed with a classifier by `oodguard guard`.
- `paper`: the ALOE paper's recipe (DenseNet-BC-100, 100 epochs, SGD nesterov lr 0.1 cosine per
  iteration to 1e-6, weight decay 1e-4, batches of 64 in + 128 out, PGD ε = 1/255, 2 steps of 1/255,
  λ = 0.5, seed 1). A GPU job: `oodguard train --recipe paper --method aloe --out runs/paper`.

Every recipe also re-renders each training image (inliers and outliers alike) as a random upload
(`--upload-augment`, on by default; see augment.py) and holds 10% of the outlier classes out of
training as validation data (`--outlier-holdout`). Any explicit flag overrides the recipe.
"""

from __future__ import annotations

from pathlib import Path

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("msp", "oe", "adv", "aoe", "aloe", "disc")
METHOD_HELP = {
    "msp": "CE(f(x), y) — the plain classifier (scored later by max softmax)",
    "oe": "CE(f(x), y) + λ·OE(f(x_out)) — outlier exposure",
    "adv": "CE(f(x_adv), y) — PGD adversarial training on inliers",
    "aoe": "CE(f(x_adv), y) + λ·OE(f(x_out)) — adversarial inliers, clean outliers",
    "aloe": "CE(f(x_adv), y) + λ·OE(f(x_out_adv)) — adversarial inliers and adversarial outliers",
    "disc": "CE(d(x_adv), in) + λ·CE(d(x_out_adv), out) — a 2-output in-vs-out discriminator, both sides attacked",
}
USES_OUTLIERS = {"oe", "aoe", "aloe", "disc"}
ATTACKS_INLIERS = {"adv", "aoe", "aloe", "disc"}
ATTACKS_OUTLIERS = {"aloe", "disc"}
# `disc` trains a detector, not a classifier: output DISC_IN scores "in-distribution", DISC_OUT "outlier"
DISC_CLASSES = ("in_distribution", "outlier")
DISC_IN, DISC_OUT = 0, 1
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {"model": "small_cnn", "epochs": 30, "weight_decay": 5e-4, "channels_last": True},
    # the default model's pre-training: fast_cnn, large batches, label smoothing, short translations
    "fast": {"model": "fast_cnn", "epochs": 18, "batch_size": 256, "lr": 0.2, "warmup_steps": 170, "min_lr": 0.0,
             "weight_decay": 5e-4, "label_smoothing": 0.1, "crop_pad": 2, "channels_last": True},
    # airbench94 (github.com/KellerJordan/cifar10-zoo): its network and hyper-parameters, in mean-loss form
    "airbench": {"model": "airbench", "epochs": 12, "batch_size": 1000, "lr": 1.27, "momentum": 0.85, "min_lr": 0.0,
                 "weight_decay": 1.5e-3, "norm_bias_lr_scale": 64.0, "label_smoothing": 0.2, "crop_pad": 2,
                 "warmup_frac": 0.2, "upload_augment_p": 0.5, "channels_last": True},
    # the robust detector (issue 14): a small in-vs-out discriminator adversarially trained at ε = 8/255 with
    # 3-step PGD (steps of 4/255 from a uniform random start), both sides attacked, equal weights. One-step
    # training (FGSM from a random start, step 10/255) overfit catastrophically within the first epoch: 84%
    # training accuracy against FGSM, validation AUROC 0.0001 under PGD-10. The per-epoch PGD validation
    # (`disc_val` in log.jsonl) watches for it.
    "robust_disc": {"method": "disc", "model": "small_cnn", "epochs": 8, "batch_size": 128, "outlier_batch_size": 128,
                    "lr": 0.1, "warmup_frac": 0.05, "min_lr": 0.0, "weight_decay": 5e-4, "lambda_oe": 1.0,
                    "eps": 8 / 255, "attack_steps": 3, "step_size": 4 / 255, "random_start": True,
                    "attack_bn": "eval", "crop_pad": 4, "channels_last": True, "keep_epoch_checkpoints": True},
    "paper": {"model": "densenet100", "epochs": 100, "weight_decay": 1e-4, "channels_last": False, "seed": 1},
}


@dataclass
class TrainConfig:
    # what to train
    method: str = "aloe"  # msp | oe | adv | aoe | aloe (see METHOD_HELP)
    model: str = "small_cnn"  # a name from oodguard.training.architectures.list_architectures()
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs, e.g. {"widths": [48, 96, 192]}
    recipe: str = "cpu"  # a RECIPES name (cpu | airbench | fast | paper): defaults applied before explicit flags
    # data
    data: str = "cifar10"  # 'cifar10', a dir holding cifar10_{train,test}.npz, an .npz, or a labelled image folder
    outliers: str = "tinyimagenet"  # 'tinyimagenet', a dir holding tinyimagenet_outliers.npz, an .npz, or an image folder
    data_dir: str | None = None  # where named datasets live (default $OODGUARD_DATA_DIR or ../shared/datasets)
    cache_dir: str | None = None  # decoded-array cache (default $OODGUARD_CACHE_DIR or ~/.cache/oodguard)
    on_corrupt: str = "fail"  # fail | skip: what a corrupt image does
    subset: int | None = None  # train on a seeded random subset of N in-distribution images
    calibration_size: int = 5000  # images held out of the training split for calibration
    split_seed: int = 0  # seed of the calibration split (fixed, independent of --seed)
    # fraction of the outlier *classes* held out of training (validation OOD data for choosing scores and
    # thresholds; recorded in split.json). Classes, not images: a held-out image's class-mates are not trained on.
    outlier_holdout: float = 0.1
    # augmentation, identical for inliers and outliers, before the attack
    upload_augment: bool = True  # re-render each image as a random upload (see augment.UploadAugment)
    upload_augment_p: float = 1.0  # the fraction of images re-rendered (the rest pass as stored), both sides alike
    upload_quality_min: int = 20  # the lowest JPEG quality an upload is drawn with
    upload_quality_max: int = 95  # the highest (a fine-tune may narrow the range to the forms it works on)
    upload_blur_p: float = 0.0  # the fraction of uploads softened by a Gaussian blur first (radius 0.3-1 px)
    crop_pad: int = 4  # random translation of up to this many pixels (zero padding), plus a random flip
    # run
    out: str = "runs/default"
    resume: bool = False
    init_from: str | None = None  # run dir (or .pt) whose weights start this run: fine-tuning, fresh optimiser/schedule
    overwrite: bool = False
    seed: int = 1
    # length
    epochs: int = 30  # schedule length in epochs of the (sharded) training set
    max_steps: int | None = None  # schedule length in optimiser steps (overrides epochs)
    time_budget: float | None = None  # seconds of training; stop cleanly, save, exit 0
    fit_schedule_to_budget: bool = True  # with a time budget: shrink the cosine schedule to what fits
    stop_at_step: int | None = None  # stop cleanly at this global step without changing the schedule
    # optimisation (paper: SGD nesterov 0.9, lr 0.1 cosine per iteration to 1e-6)
    batch_size: int = 64  # in-distribution images per step (per rank)
    outlier_batch_size: int = 128  # outlier images per step (per rank)
    lr: float = 0.1
    min_lr: float = 1e-6
    warmup_steps: int = 0  # linear warm-up before the cosine decay (0 in the paper)
    warmup_frac: float = 0.0  # warm-up as a fraction of the planned steps (the larger of the two is used)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None: 5e-4 for wrn* and small_cnn, else 1e-4
    # BatchNorm shifts (biases) train at lr x this, with weight decay / this (the same decay per step);
    # airbench's 64 lets them move as fast as the large-lr convolutions need
    norm_bias_lr_scale: float = 1.0
    lambda_oe: float = 0.5  # weight of the OE loss (disc: of the outlier cross-entropy)
    label_smoothing: float = 0.0  # of the in-distribution cross-entropy (not of the attack's loss)
    # exponential moving average of the weights and BN statistics, updated every step (0: off). With it on, the
    # average is the run's model (checkpoint "model": evaluated, exported, validated); the trained weights stay
    # in the checkpoint for --resume. Why: adversarial training's weights wander from step to step (the robust
    # validation AUROC of a detector swung 29-43 between epochs), and an average smooths that out. Measured on the
    # detector it trailed the trained weights at every epoch (docs/results.md), so no recipe turns it on.
    ema_decay: float = 0.0
    # training attack (pixel units; paper: ε = 1/255, 2 steps of 1/255, no random start)
    eps: float = 1 / 255
    attack_steps: int = 2
    step_size: float = 1 / 255
    random_start: bool = False
    # BN during the attack: 'train' = as the reference (batch stats, running stats move);
    # 'frozen' = batch stats, running stats untouched; 'eval' = running stats
    attack_bn: str = "train"
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # None: on for CUDA (bf16 autocast), off on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (CUDA mostly; slow first steps)
    threads: int | None = None  # torch intra-op threads (default: cores available, / local ranks under DDP)
    # reporting
    log_every: int = 20  # steps between progress-bar updates
    progress: bool = True  # tqdm bar on stderr (rank 0)
    save_every_epochs: int = 1  # last.pt every N epochs (always at the end / on stop)
    # last.pt every N steps as well (None / 0: only at epochs): an ALOE epoch on 2 CPU cores is ~50 min, and a
    # process killed outright (SIGKILL, a lost session) loses everything since the last save
    save_every_steps: int | None = None
    keep_epoch_checkpoints: bool = False  # also keep checkpoints/epoch_XXX.pt
    eval_test: bool = True  # measure test accuracy at the end (logged, printed)
    # disc: the catastrophic-overfitting watch, on N calibration-split images and N held-out outliers
    # every epoch: clean AUROC and AUROC under PGD-10 at the training ε on both sides (0: off)
    disc_val_samples: int = 500

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.model.startswith("wrn") or self.model == "small_cnn" else 1e-4

    def validate(self) -> None:
        """Raise ValueError with every problem named (the CLI turns it into a usage error)."""
        from .architectures import list_architectures

        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.model not in list_architectures():
            problems.append(f"unknown model {self.model!r}; valid models: {', '.join(list_architectures())}")
        if self.recipe not in RECIPES:
            problems.append(f"unknown recipe {self.recipe!r}; valid recipes: {', '.join(RECIPES)}")
        if self.on_corrupt not in ("fail", "skip"):
            problems.append("on_corrupt must be 'fail' or 'skip'")
        if self.attack_bn not in ("train", "frozen", "eval"):
            problems.append("attack_bn must be 'train', 'frozen' or 'eval'")
        for name in ("batch_size", "outlier_batch_size", "epochs", "log_every", "save_every_epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("max_steps", "subset", "stop_at_step", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"{name} must be >= 1 when given")
        if self.save_every_steps is not None and self.save_every_steps < 0:
            problems.append("save_every_steps must be >= 0 (0: only at epoch ends)")
        if self.time_budget is not None and self.time_budget <= 0:
            problems.append("time_budget must be > 0 seconds")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append("need lr > 0 and 0 <= min_lr <= lr")
        if self.eps < 0 or self.step_size < 0 or self.attack_steps < 0:
            problems.append("eps, attack_steps and step_size must be >= 0")
        if self.calibration_size < 0 or self.lambda_oe < 0 or self.warmup_steps < 0 or self.crop_pad < 0:
            problems.append("calibration_size, lambda_oe, warmup_steps and crop_pad must be >= 0")
        if not 0 <= self.upload_augment_p <= 1 or not 0 <= self.warmup_frac < 1:
            problems.append("upload_augment_p must be in [0, 1] and warmup_frac in [0, 1)")
        if not 0 <= self.upload_blur_p <= 1:
            problems.append("upload_blur_p must be in [0, 1]")
        if not 1 <= self.upload_quality_min <= self.upload_quality_max <= 100:
            problems.append("need 1 <= upload_quality_min <= upload_quality_max <= 100")
        if self.norm_bias_lr_scale <= 0:
            problems.append("norm_bias_lr_scale must be > 0")
        if not 0 <= self.label_smoothing < 1:
            problems.append("label_smoothing must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            problems.append("ema_decay must be in [0, 1) (0: off)")
        if not 0 <= self.outlier_holdout < 1:
            problems.append("outlier_holdout must be in [0, 1) (a fraction of the outlier classes)")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite are mutually exclusive")
        if self.init_from is not None and not Path(self.init_from).exists():
            problems.append(f"--init-from: {self.init_from} does not exist (a run directory or a .pt checkpoint)")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_decay"] = self.resolved_weight_decay()
        return d


def resolve_config(recipe: str = "cpu", **overrides: Any) -> TrainConfig:
    """TrainConfig defaults <- recipe <- explicit overrides (None means 'not given')."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    values = {**RECIPES[recipe], "recipe": recipe}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (ignores keys this version does not know)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
