"""`oodguard train`: train a classifier (msp / oe / adv / aoe / aloe) or an in-vs-out detector (disc) into a run directory.

Torch is imported inside the command, so `oodguard --help` (and the service) work without it.
Every option defaults to the chosen recipe (`--recipe cpu`, the default, `airbench`, `fast`, `robust_disc` or `paper`); an
explicit flag always wins. Under `torchrun --nproc-per-node N -m oodguard.cli train ...` it trains
data-parallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import typer

from .config import METHODS, RECIPES, USES_OUTLIERS, TrainConfig

_DEFAULTS = TrainConfig()
_EXIT_CODES = {"interrupted": 130, "terminated": 143}  # clean stop after a signal, checkpoint saved


def _default(name: str) -> str:
    """'[default: X]' text: the cpu recipe's value, and each other recipe's where it differs."""
    cpu = RECIPES["cpu"].get(name, getattr(_DEFAULTS, name))
    fmt = lambda v: "off" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
    others = [f"{r} recipe: {fmt(values[name])}" for r, values in RECIPES.items()
              if r != "cpu" and name in values and values[name] != cpu]
    return "; ".join([fmt(cpu), *others])


def _opt(*names: str, key: str, help: str, default_text: str | None = None, **kw: Any) -> Any:
    return typer.Option(None, *names, help=help, show_default=default_text or _default(key), **kw)


def _pixels(value: str | None, flag: str) -> float | None:
    """'1/255', '0.0039' or '8/255' -> float pixel units."""
    if value is None:
        return None
    try:
        return float(Fraction(value.strip()))
    except (ValueError, ZeroDivisionError):
        raise typer.BadParameter(f"{value!r} is not a number or fraction like 1/255", param_hint=flag) from None


def _existing_path_or_name(spec: str | None) -> str | None:
    """Paths are recorded absolute (so --resume works from any directory); dataset names stay names."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def train_command(
    method: Optional[str] = _opt("--method", key="method", help="Training method: " + " | ".join(METHODS) + "."),
    model: Optional[str] = _opt("--model", key="model", help="Architecture (training/architectures.py): small_cnn, "
                                "fast_cnn, airbench, resnet18, wrn40_2, densenet100."),
    model_kwargs: Optional[str] = _opt("--model-kwargs", key="model_kwargs",
                                       help='Extra model arguments as JSON, e.g. \'{"widths": [48, 96, 192]}\'; '
                                       '\'{"flip_average": true}\' (any model) serves the mean of the image\'s and '
                                       'its mirror image\'s features (in the exported graph too; twice the inference cost).'),
    recipe: str = typer.Option("cpu", "--recipe", help="Defaults to start from: 'cpu' (small_cnn, fast on 2 cores, "
                               "use with --time-budget), 'airbench' (airbench94's network and hyper-parameters, 12 "
                               "epochs of batch 1000: the default model's pre-training, ~50 min on 2 cores), 'fast' "
                               "(fast_cnn, 18 epochs of batch 256, label smoothing), 'robust_disc' (--method disc: a small_cnn in-vs-out "
                               "detector, fast adversarial training at ε = 8/255 on both sides) or 'paper' "
                               "(DenseNet-BC-100, 100 epochs: a GPU job)."),
    data: Optional[str] = _opt("--data", key="data", help="In-distribution data: 'cifar10', a directory holding "
                               "cifar10_{train,test}.npz, an .npz, or a labelled image folder (class sub-folders)."),
    outliers: Optional[str] = _opt("--outliers", key="outliers", help="Outlier-exposure data: 'tinyimagenet', a directory "
                                   "holding tinyimagenet_outliers.npz, an .npz, or an image folder (used by oe/aoe/aloe)."),
    data_dir: Optional[str] = _opt("--data-dir", key="data_dir", envvar="OODGUARD_DATA_DIR",
                                   help="Where named datasets live.", default_text="../shared/datasets next to the repo"),
    cache_dir: Optional[str] = _opt("--cache-dir", key="cache_dir", envvar="OODGUARD_CACHE_DIR",
                                    help="Decoded-image cache.", default_text="~/.cache/oodguard"),
    on_corrupt: Optional[str] = _opt("--on-corrupt", key="on_corrupt", help="Corrupt image: 'fail' or 'skip' (counted)."),
    subset: Optional[int] = _opt("--subset", key="subset", help="Train on a seeded random subset of N images."),
    calibration_size: Optional[int] = _opt("--calibration-size", key="calibration_size",
                                           help="Training images held out for calibration (recorded in split.json)."),
    split_seed: Optional[int] = _opt("--split-seed", key="split_seed", help="Seed of the calibration split."),
    outlier_holdout: Optional[float] = _opt("--outlier-holdout", key="outlier_holdout",
                                            help="Fraction of the outlier classes held out of training as validation "
                                            "OOD data (recorded in split.json; used by calibrate --score auto)."),
    upload_augment: Optional[bool] = _opt("--upload-augment/--no-upload-augment", key="upload_augment",
                                          help="Re-render every training image (inliers and outliers alike) as a random "
                                          "upload: JPEG (quality --upload-quality-min..max, 20-95 by default) or "
                                          "lossless, resized through 24-128 px."),
    upload_augment_p: Optional[float] = _opt("--upload-augment-p", key="upload_augment_p",
                                             help="Fraction of the images re-rendered as uploads (the rest pass as "
                                             "stored), inliers and outliers alike."),
    upload_quality_min: Optional[int] = _opt("--upload-quality-min", key="upload_quality_min",
                                             help="Lowest JPEG quality of an upload (drawn uniformly up to "
                                             "--upload-quality-max)."),
    upload_quality_max: Optional[int] = _opt("--upload-quality-max", key="upload_quality_max",
                                             help="Highest JPEG quality of an upload."),
    upload_blur_p: Optional[float] = _opt("--upload-blur-p", key="upload_blur_p",
                                          help="Fraction of the uploads softened by a Gaussian blur (radius 0.3-1 px) "
                                          "first, inliers and outliers alike (off; its measured effect: docs/results.md)."),
    crop_pad: Optional[int] = _opt("--crop-pad", key="crop_pad", help="Random translation of up to N pixels (+ flip)."),
    label_smoothing: Optional[float] = _opt("--label-smoothing", key="label_smoothing",
                                            help="Label smoothing of the in-distribution cross-entropy."),
    out: Path = typer.Option(..., "--out", help="Run directory (config.json, split.json, log.jsonl, checkpoints/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out bit-for-bit from checkpoints/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous run's files in --out."),
    init_from: Optional[str] = _opt("--init-from", key="init_from",
                                    help="Fine-tune: start from the weights of this run directory (or .pt checkpoint); "
                                    "optimiser and schedule start fresh. The run must share this run's calibration split and "
                                    "architecture; with another number of outputs (a classifier starting a --method disc "
                                    "detector) all but the output layer is copied."),
    seed: Optional[int] = _opt("--seed", key="seed", help="Seed for initialisation, data order, augmentation."),
    epochs: Optional[int] = _opt("--epochs", key="epochs", help="Schedule length in epochs."),
    max_steps: Optional[int] = _opt("--max-steps", key="max_steps", help="Schedule length in steps (overrides --epochs)."),
    time_budget: Optional[float] = _opt("--time-budget", key="time_budget",
                                        help="Seconds of training; then stop cleanly, save, exit 0."),
    fit_schedule_to_budget: Optional[bool] = _opt("--fit-schedule/--no-fit-schedule", key="fit_schedule_to_budget",
                                                  help="With --time-budget: after 25 timed steps, shorten the cosine "
                                                  "schedule to what fits, so the LR reaches ~0 at the budget."),
    stop_at_step: Optional[int] = _opt("--stop-at-step", key="stop_at_step",
                                       help="Stop (and save) at this global step without changing the schedule."),
    batch_size: Optional[int] = _opt("--batch-size", key="batch_size", help="In-distribution images per step (per rank)."),
    outlier_batch_size: Optional[int] = _opt("--outlier-batch-size", key="outlier_batch_size",
                                             help="Outlier images per step (per rank)."),
    lr: Optional[float] = _opt("--lr", key="lr", help="Peak learning rate (SGD)."),
    min_lr: Optional[float] = _opt("--min-lr", key="min_lr", help="Learning rate at the end of the cosine schedule."),
    warmup_steps: Optional[int] = _opt("--warmup-steps", key="warmup_steps", help="Linear LR warm-up steps."),
    warmup_frac: Optional[float] = _opt("--warmup-frac", key="warmup_frac",
                                        help="Linear LR warm-up as a fraction of the planned steps (the larger of "
                                        "this and --warmup-steps)."),
    momentum: Optional[float] = _opt("--momentum", key="momentum", help="SGD momentum."),
    nesterov: Optional[bool] = _opt("--nesterov/--no-nesterov", key="nesterov", help="Nesterov momentum."),
    weight_decay: Optional[float] = _opt("--weight-decay", key="weight_decay",
                                         help="Weight decay.", default_text="5e-4 for small_cnn and wrn40_2, else 1e-4"),
    norm_bias_lr_scale: Optional[float] = _opt("--norm-bias-lr-scale", key="norm_bias_lr_scale",
                                               help="BatchNorm shifts train at lr x this (weight decay / this)."),
    lambda_oe: Optional[float] = _opt("--lambda-oe", key="lambda_oe", help="Weight λ of the OE loss."),
    eps: Optional[str] = _opt("--eps", key="eps", help="Training PGD L∞ radius in pixel units (e.g. 1/255)."),
    attack_steps: Optional[int] = _opt("--attack-steps", key="attack_steps", help="Training PGD steps."),
    step_size: Optional[str] = _opt("--step-size", key="step_size", help="Training PGD step in pixel units (e.g. 1/255)."),
    random_start: Optional[bool] = _opt("--random-start/--no-random-start", key="random_start",
                                        help="Uniform random start in the ε-ball."),
    attack_bn: Optional[str] = _opt("--attack-bn", key="attack_bn", help="BN during the training attack: 'train' "
                                    "(the reference), 'frozen' (batch stats, running stats untouched) or 'eval'."),
    device: Optional[str] = _opt("--device", key="device", help="auto, cpu, cuda or cuda:N."),
    amp: Optional[bool] = _opt("--amp/--no-amp", key="amp", help="Mixed precision (bf16 autocast).",
                               default_text="on for CUDA, off on CPU"),
    channels_last: Optional[bool] = _opt("--channels-last/--no-channels-last", key="channels_last",
                                         help="channels_last memory format (faster convolutions on CPU)."),
    compile: Optional[bool] = _opt("--compile/--no-compile", key="compile", help="torch.compile the model."),
    threads: Optional[int] = _opt("--threads", key="threads", help="torch intra-op threads. On a CPU shared with "
                                  "other busy processes use 1: OpenMP threads then wait on each other at every op.",
                                  default_text="available cores / ranks per node"),
    log_every: Optional[int] = _opt("--log-every", key="log_every", help="Steps between progress-bar updates."),
    progress: Optional[bool] = _opt("--progress/--no-progress", key="progress", help="Progress bar on stderr."),
    save_every_epochs: Optional[int] = _opt("--save-every-epochs", key="save_every_epochs",
                                            help="Write checkpoints/last.pt every N epochs (and always at the end)."),
    save_every_steps: Optional[int] = _opt("--save-every-steps", key="save_every_steps",
                                           help="Also write checkpoints/last.pt every N steps (0: only at epoch ends); "
                                           "kept on --resume unless given again.", default_text="off"),
    keep_epoch_checkpoints: Optional[bool] = _opt("--keep-epoch-checkpoints/--no-keep-epoch-checkpoints",
                                                  key="keep_epoch_checkpoints", help="Keep checkpoints/epoch_XXX.pt too."),
    eval_test: Optional[bool] = _opt("--eval-test/--no-eval-test", key="eval_test",
                                     help="Measure test accuracy at the end."),
    ema_decay: Optional[float] = _opt("--ema-decay", key="ema_decay",
                                      help="Keep an exponential moving average of the weights (decay per step, e.g. "
                                      "0.998) and make it the run's model; 0: off.", default_text="0 (off)"),
    disc_val_samples: Optional[int] = _opt("--disc-val-samples", key="disc_val_samples",
                                           help="disc: calibration-split images and held-out outliers (each) of the "
                                           "per-epoch validation, clean and under PGD-10 at --eps (0: off)."),
) -> None:
    """Train a classifier (ALOE and baselines) into a run directory; prints images/s at the end.

    Methods: msp = CE(f(x), y); oe = CE + λ·OE(f(x_out)); adv = CE(f(x_adv), y);
    aoe = CE(f(x_adv), y) + λ·OE(f(x_out)); aloe = CE(f(x_adv), y) + λ·OE(f(x_out_adv)),
    where x_adv / x_out_adv are L∞ PGD (--eps, --attack-steps, --step-size) maximising CE / the OE loss.
    disc = CE(d(x_adv), in) + λ·CE(d(x_out_adv), out): a two-output in-vs-out detector (not a classifier),
    each side attacked toward the other's output (--recipe robust_disc).
    Example (2 CPU cores, 2 minutes): oodguard train --method aloe --data ../shared/datasets
    --outliers ../shared/datasets --time-budget 120 --out runs/smoke
    """
    overrides = dict(
        method=method, model=model, data=_existing_path_or_name(data), outliers=_existing_path_or_name(outliers),
        data_dir=data_dir, cache_dir=cache_dir, on_corrupt=on_corrupt, subset=subset,
        calibration_size=calibration_size, split_seed=split_seed, outlier_holdout=outlier_holdout,
        upload_augment=upload_augment, upload_augment_p=upload_augment_p, upload_quality_min=upload_quality_min,
        upload_quality_max=upload_quality_max,
        upload_blur_p=upload_blur_p, crop_pad=crop_pad, label_smoothing=label_smoothing, out=str(out), resume=resume, overwrite=overwrite,
        init_from=str(Path(init_from).resolve()) if init_from else None,
        seed=seed, epochs=epochs, max_steps=max_steps, time_budget=time_budget,
        fit_schedule_to_budget=fit_schedule_to_budget, stop_at_step=stop_at_step, batch_size=batch_size,
        outlier_batch_size=outlier_batch_size, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, warmup_frac=warmup_frac,
        momentum=momentum, norm_bias_lr_scale=norm_bias_lr_scale,
        nesterov=nesterov, weight_decay=weight_decay, lambda_oe=lambda_oe, eps=_pixels(eps, "--eps"),
        attack_steps=attack_steps, step_size=_pixels(step_size, "--step-size"), random_start=random_start,
        attack_bn=attack_bn, device=device, amp=amp, channels_last=channels_last, compile=compile, threads=threads,
        log_every=log_every, progress=progress, save_every_epochs=save_every_epochs, save_every_steps=save_every_steps,
        keep_epoch_checkpoints=keep_epoch_checkpoints, eval_test=eval_test, disc_val_samples=disc_val_samples,
        ema_decay=ema_decay,
    )
    if model_kwargs is not None:
        try:
            overrides["model_kwargs"] = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not valid JSON ({exc})", param_hint="--model-kwargs") from None
        if not isinstance(overrides["model_kwargs"], dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--model-kwargs")

    from .config import resolve_config

    try:
        cfg = resolve_config(recipe, **overrides)
        cfg.validate()
    except ValueError as exc:
        _fail(str(exc))
    if resume:
        _check_resume_overrides(cfg, overrides)

    # OpenMP threads that spin-wait for each other starve when other processes share the cores. Measured
    # on the shared 2-core machine (small_cnn, batch 64, 2 threads; images/s busy machine / idle machine):
    # libgomp default spinning 100-400 / 1280, OMP_WAIT_POLICY=PASSIVE 330-680 / 1030,
    # GOMP_SPINCOUNT=10000 ~500 / 1250, 1 thread ~750 / 780. A short spin keeps the idle speed and avoids
    # most of the collapse. libgomp reads it when torch is first imported, just below; set
    # OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to override.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"

    # torch from here on
    from .data import DataError
    from .run_dir import RunDirError
    from .trainer import train

    try:
        result = train(cfg)
    except (DataError, RunDirError) as exc:
        _fail(str(exc))
    except ValueError as exc:  # configuration problems found while building the run (sizes, devices, ...)
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _print_summary(result.config or cfg, result)
    if result.stopped in _EXIT_CODES:
        raise typer.Exit(_EXIT_CODES[result.stopped])


def _check_resume_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> None:
    """On --resume only operational flags may change; anything else would break bit-for-bit continuation."""
    from .run_dir import RunDirError, last_checkpoint_path, load_checkpoint
    from .trainer import OPERATIONAL_KEYS

    path = last_checkpoint_path(cfg.out)
    try:
        stored = load_checkpoint(path)["config"]
    except RunDirError as exc:
        _fail(f"--resume: {exc}")
    canon = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731  (tuples vs lists)
    changed = [f"--{k.replace('_', '-')} (run: {stored.get(k)!r}, given: {v!r})" for k, v in overrides.items()
               if v is not None and k not in OPERATIONAL_KEYS and k in stored and canon(stored[k]) != canon(v)]
    if changed:
        _fail("--resume continues the stored configuration; these flags differ from it: " + ", ".join(changed)
              + ". Start a new run (new --out) to change them.")


def _print_summary(cfg: TrainConfig, r: Any) -> None:
    acc = "n/a" if r.test_accuracy is None else f"{r.test_accuracy:.4f}"
    lines = [
        f"oodguard train: {cfg.method}/{cfg.model} stopped ({r.stopped}) at step {r.step}/{r.total_steps} "
        f"({r.epoch:.2f} epochs) after {r.train_seconds:.1f} s of training",
        f"  images/s: {r.images_per_s:.1f} in-distribution ({r.all_images_per_s:.1f} incl. outliers), "
        f"batch {cfg.batch_size}" + (f"+{cfg.outlier_batch_size}" if cfg.method in USES_OUTLIERS else ""),
        f"  test accuracy: {acc}" if cfg.method != "disc" else "  detector: per-epoch validation AUROC (clean, PGD) in log.jsonl",
        f"  run: {r.run_dir} (checkpoint {Path(r.run_dir) / 'checkpoints' / 'last.pt'})",
    ]
    if r.stopped in _EXIT_CODES:
        lines.append(f"  resume with: oodguard train --out {r.run_dir} --resume")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add `train` to the root `oodguard` app."""
    app.command("train", short_help="Train a classifier (msp / oe / adv / aoe / aloe) or a detector (disc); see --method.")(train_command)
