"""Training benchmark: images/s and seconds per epoch of msp / oe / adv / aoe / aloe on this CPU.

Every number is the real trainer: `oodguard.training.trainer.train(cfg)` runs WARMUP + N optimiser
steps on CIFAR-10 (+ the Tiny-ImageNet outliers) and reports images/s over the steps after its own
warm-up (the first 5 steps: allocator and oneDNN warm-up, and torch.compile's compilation). Each
step is the full step — data augmentation, PGD on inliers/outliers, the joint forward, backward,
SGD — with the default recipe: batch 64 in + 128 out, PGD ε = 1/255, 2 steps, channels_last on,
threads = the cores. Nothing is re-implemented here.

Then the knobs, one at a time against that default: channels_last off, torch threads 1 (vs the
cores), torch.compile on (a failure is recorded with its reason). Results: a JSON file, a markdown
section for docs/benchmarks.md and a printed table. The reference ALOE code's cost on these machines
(../shared/ALOE.md: ResNet-18, 2 threads: 1.30 s per plain step, 14.3 s per ALOE step) is shown next
to ours.

    python bench/train.py                      # ~10-15 min on 2 idle cores
    python bench/train.py --quick              # smoke: small_cnn, msp + aloe, 3 timed steps (~1 min)
    python bench/train.py --models resnet18 --methods aloe --steps 5 --variants none
    # the default model's two stages (scripts/train_default.py), each with the upload augmentation on and off:
    python bench/train.py --recipe airbench --models airbench --methods msp --variants upload_augment_off \
        --variant-models airbench --variant-methods msp --out docs/bench/train_airbench_pretrain.json
    python bench/train.py --recipe airbench --models airbench --methods aloe --variants upload_augment_off \
        --variant-models airbench --variant-methods aloe --set batch_size=128 --set outlier_batch_size=128 \
        --set upload_augment_p=1 --out docs/bench/train_airbench_finetune.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = ("msp", "oe", "adv", "aoe", "aloe")
VARIANTS = ("channels_last_off", "threads_1", "upload_augment_off", "compile")
TRAINER_WARMUP_STEPS = 5  # training/trainer.py excludes its first 5 steps from images/s
# ../shared/ALOE.md, "Cost on these machines" (2 CPU threads, reference settings): seconds per step
REFERENCE_STEP_S = {("resnet18", "msp"): 1.30, ("resnet18", "aloe"): 14.3,
                    ("densenet100", "msp"): 1.98, ("densenet100", "aloe"): 38.0}
ALOE_TARGET = 0.85  # issue 7: ALOE step time <= 0.85x the reference's


@dataclass
class Measurement:
    model: str
    method: str
    variant: str  # "default" or one of VARIANTS
    seconds_per_step: float | None
    images_per_s: float | None  # in-distribution images per second
    all_images_per_s: float | None  # in-distribution + outlier images per second
    seconds_per_epoch: float | None  # steps per epoch of the full training split x seconds per step
    steps_per_epoch: int | None
    timed_steps: int
    wall_s: float  # the whole call: data loading, warm-up (and compilation), timed steps, checkpoint
    threads: int
    recipe: str = "cpu"
    batch_size: int | None = None  # in-distribution images per step
    outlier_batch_size: int | None = None  # outliers per step (oe / aoe / aloe)
    upload_augment_p: float | None = None  # share of images re-rendered as uploads (0 when the variant turns it off)
    error: str | None = None


def measure(model: str, method: str, variant: str, steps: int, workdir: Path, cores: int, recipe: str = "cpu",
            settings: dict | None = None) -> Measurement:
    """One real training run of WARMUP + steps steps of `recipe` with `settings` (TrainConfig fields) on top;
    never raises (a failure is recorded)."""
    from oodguard.training.config import resolve_config
    from oodguard.training.trainer import train

    overrides = {"method": method, "model": model, "max_steps": TRAINER_WARMUP_STEPS + steps, "eval_test": False,
                 "progress": False, "overwrite": True, "out": str(workdir / f"{model}-{method}-{variant}"),
                 "threads": 1 if variant == "threads_1" else cores, **(settings or {})}
    if variant == "channels_last_off":
        overrides["channels_last"] = False
    if variant == "compile":
        overrides["compile"] = True
    if variant == "upload_augment_off":  # the upload-form augmentation's cost: default (on) vs off
        overrides["upload_augment"] = False
    cfg = resolve_config(recipe, **overrides)
    shape = {"recipe": recipe, "batch_size": cfg.batch_size,
             "outlier_batch_size": cfg.outlier_batch_size if method in ("oe", "aoe", "aloe") else None,
             "upload_augment_p": cfg.upload_augment_p if cfg.upload_augment else 0.0}
    t0 = time.perf_counter()
    try:
        result = train(cfg)
    except Exception as exc:  # torch.compile without a working toolchain, out of memory, ...
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Measurement(model, method, variant, None, None, None, None, None, 0, round(time.perf_counter() - t0, 1),
                           cfg.threads, **shape, error=f"{type(exc).__name__}: {first}")
    ips = result.images_per_s
    per_step = cfg.batch_size / ips if ips and ips == ips else None
    spe = round(result.step / result.epoch) if result.epoch else None
    return Measurement(
        model, method, variant, _r(per_step, 4), _r(ips, 1), _r(result.all_images_per_s, 1),
        _r(per_step * spe, 1) if per_step and spe else None, spe, result.step - TRAINER_WARMUP_STEPS,
        round(time.perf_counter() - t0, 1), cfg.threads, **shape)


def _r(v: float | None, digits: int) -> float | None:
    return None if v is None or v != v else round(v, digits)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(model, method, variant) in run order: the method grid, then the knobs (compile last)."""
    runs = [(m, meth, "default") for m in args.models for meth in args.methods]
    for variant in args.variants:
        for m in args.variant_models:
            if variant == "compile" and m not in args.compile_models:
                continue
            runs += [(m, meth, variant) for meth in args.variant_methods]
    return sorted(runs, key=lambda r: r[2] == "compile")  # stable: compile runs last


# -- report ----------------------------------------------------------------------------------------------


def relative_costs(results: list[dict]) -> dict[tuple[str, str], float]:
    """seconds/step of each (model, method) at the default settings / that model's msp step."""
    base = {r["model"]: r["seconds_per_step"] for r in results
            if r["variant"] == "default" and r["method"] == "msp" and r["seconds_per_step"]}
    return {(r["model"], r["method"]): r["seconds_per_step"] / base[r["model"]] for r in results
            if r["variant"] == "default" and r["seconds_per_step"] and r["model"] in base}


def variant_effects(results: list[dict]) -> list[dict]:
    """Each knob's run against the default run of the same model and method: speed-up = default / variant time."""
    default = {(r["model"], r["method"]): r for r in results if r["variant"] == "default"}
    rows = []
    for r in results:
        if r["variant"] == "default":
            continue
        d = default.get((r["model"], r["method"]))
        speedup = (d["seconds_per_step"] / r["seconds_per_step"]
                   if d and d["seconds_per_step"] and r["seconds_per_step"] else None)
        rows.append({**r, "default_seconds_per_step": d["seconds_per_step"] if d else None, "speedup": speedup})
    return rows


def _f(v, digits: int = 2, suffix: str = "") -> str:
    return "-" if v is None else f"{v:,.{digits}f}{suffix}"


_RECIPE_TEXT_FIELDS = ("batch_size", "outlier_batch_size", "upload_augment_p")


def _recipe_text(results: list[dict]) -> str:
    """What the default rows ran: the recipe, batch sizes and upload augmentation (the same for every row)."""
    r = next((r for r in results if r["variant"] == "default"), results[0] if results else None)
    if r is None or r.get("batch_size") is None:  # a report written before these fields existed
        return "cpu recipe: batch 64 in + 128 out"
    outliers = f" + {r['outlier_batch_size']} out" if r.get("outlier_batch_size") else ""
    return (f"{r.get('recipe', 'cpu')} recipe: batch {r['batch_size']} in{outliers}, "
            f"{100 * r['upload_augment_p']:.0f}% of images re-rendered as uploads")


def render_markdown(report: dict) -> str:
    env, results = report["environment"], report["results"]
    rel = relative_costs(results)
    # --set values the recipe text does not already give (it reads batch sizes and augmentation from the rows)
    settings = "".join(f", {k} = {v}" for k, v in report.get("settings", {}).items() if k not in _RECIPE_TEXT_FIELDS)
    out = ["## Training benchmark", "", f"Command: `{report['command']}`", "",
           f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}; GOMP_SPINCOUNT={env['gomp_spincount']}, "
           f"OMP_WAIT_POLICY={env['omp_wait_policy']}; load average at start {env['load_average_start']}. "
           f"Each row: {report['timed_steps']} timed steps after the trainer's {TRAINER_WARMUP_STEPS} warm-up steps "
           f"(`oodguard.training.trainer.train`, {_recipe_text(results)}{settings}, PGD ε = 1/255 × 2 steps, "
           f"channels_last, {env['cores']} threads; the upload-form augmentation treats inliers and outliers alike).",
           "",
           "| model | method | s / step | images/s (in) | images/s (in + out) | s / epoch | cost vs msp | reference s / step | vs reference |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["variant"] != "default":
            continue
        ref = REFERENCE_STEP_S.get((r["model"], r["method"]))
        vs_ref = r["seconds_per_step"] / ref if ref and r["seconds_per_step"] else None
        if r["error"]:
            out.append(f"| {r['model']} | {r['method']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        out.append(f"| {r['model']} | {r['method']} | {_f(r['seconds_per_step'], 3)} | {_f(r['images_per_s'], 1)} | "
                   f"{_f(r['all_images_per_s'], 1)} | {_f(r['seconds_per_epoch'], 0)} | "
                   f"{_f(rel.get((r['model'], r['method'])), 2, '×')} | {_f(ref)} | {_f(vs_ref, 2, '×')} |")
    effects = variant_effects(results)
    if effects:
        out += ["", "| model | method | setting | s / step | default s / step | speed-up vs default |", "|---|---|---|---:|---:|---:|"]
        for r in effects:
            if r["error"]:
                out.append(f"| {r['model']} | {r['method']} | {r['variant']} | failed: {r['error'].replace('|', '/')} | | |")
                continue
            out.append(f"| {r['model']} | {r['method']} | {r['variant']} | {_f(r['seconds_per_step'], 3)} | "
                       f"{_f(r['default_seconds_per_step'], 3)} | {_f(r['speedup'], 2, '×')} |")
    compiled = ", ".join(f"{r['model']}/{r['method']} {r['wall_s']:.0f} s" for r in results if r["variant"] == "compile")
    out += ["", "Settings: `channels_last_off` = `--no-channels-last`; `threads_1` = `--threads 1` (default: the cores); "
            "`upload_augment_off` = `--no-upload-augment` (the speed-up it shows is what the augmentation costs); "
            "`compile` = `--compile` (torch.compile of the model for the attack and the training forward; its "
            "compilation falls in the warm-up steps, so it is excluded from s / step but not from the run's wall time"
            + (f": {compiled})." if compiled else "; not measured in this run).")]
    return "\n".join(out).rstrip() + "\n"


def table_text(report: dict) -> str:
    rel = relative_costs(report["results"])
    lines = [f"{'model':>10} {'method':>6} {'variant':>18} {'s/step':>8} {'img/s':>8} {'s/epoch':>8} {'vs msp':>7} {'wall s':>7}"]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['model']:>10} {r['method']:>6} {r['variant']:>18}  failed: {r['error']}")
            continue
        cost = rel.get((r["model"], r["method"])) if r["variant"] == "default" else None
        lines.append(f"{r['model']:>10} {r['method']:>6} {r['variant']:>18} {_f(r['seconds_per_step'], 3):>8} "
                     f"{_f(r['images_per_s'], 1):>8} {_f(r['seconds_per_epoch'], 0):>8} {_f(cost, 2, 'x'):>7} {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def environment(cores: int) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "started": datetime.now(timezone.utc).isoformat()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke run: small_cnn, msp + aloe, 3 timed steps, no compile.")
    p.add_argument("--models", default="small_cnn,fast_cnn,resnet18")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="Timed steps per run (after the trainer's 5 warm-up steps).")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Knobs to measure (or 'none'): " + ", ".join(VARIANTS))
    p.add_argument("--variant-models", default="small_cnn,fast_cnn,resnet18", help="Models the knobs are measured on.")
    p.add_argument("--variant-methods", default="msp,aloe", help="Methods the knobs are measured on.")
    p.add_argument("--compile-models", default="small_cnn", help="Models torch.compile is tried on (slow to compile).")
    p.add_argument("--cache-dir", default=str(REPO / "runs" / "bench" / "train"), help="Run directories of the measurements.")
    p.add_argument("--out", default="docs/bench/train.json")
    p.add_argument("--markdown", default=None, help="Also write the markdown tables here.")
    p.add_argument("--recipe", default="cpu", help="Training recipe of every run (training/config.py RECIPES).")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="A TrainConfig field for every run, VALUE as JSON (e.g. batch_size=128); repeatable.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.models, args.methods, args.steps = "small_cnn", "msp,aloe", min(args.steps, 3)
        args.variants, args.variant_models, args.variant_methods = "channels_last_off,threads_1", "small_cnn", "msp"
    split = lambda s: [x for x in s.split(",") if x and x != "none"]  # noqa: E731
    for name in ("models", "methods", "variants", "variant_models", "variant_methods", "compile_models"):
        setattr(args, name, split(getattr(args, name)))
    bad = [m for m in args.methods + args.variant_methods if m not in METHODS] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown methods/variants: {', '.join(bad)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.settings = _parse_settings(p, args.set)
    from oodguard.training.config import RECIPES

    if args.recipe not in RECIPES:
        p.error(f"unknown --recipe {args.recipe!r}; valid: {', '.join(RECIPES)}")
    return args


def _parse_settings(p: argparse.ArgumentParser, items: list[str]) -> dict:
    from dataclasses import fields

    from oodguard.training.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            p.error(f"--set {item!r}: expected FIELD=VALUE with FIELD a TrainConfig field")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value  # a bare string
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Same OpenMP waiting as `oodguard train` (training/cli_train.py); torch is first imported below.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cores = len(os.sched_getaffinity(0))
    report = {"command": "python bench/train.py " + " ".join(shlex.quote(a) for a in args.argv),
              "environment": environment(cores), "timed_steps": args.steps, "recipe": args.recipe,
              "settings": args.settings, "results": []}
    workdir = Path(args.cache_dir)
    runs = plan(args)
    for i, (model, method, variant) in enumerate(runs, 1):
        m = measure(model, method, variant, args.steps, workdir, cores, args.recipe, args.settings)
        report["results"].append(m.__dict__)
        shown = f"failed: {m.error}" if m.error else f"{m.seconds_per_step:.3f} s/step, {m.images_per_s:.1f} img/s"
        print(f"[{i}/{len(runs)}] {model}/{method} {variant}: {shown} (wall {m.wall_s:.0f} s)", flush=True)
    report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table_text(report))
    print(f"wrote {out}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(report))
        print(f"wrote {args.markdown}")
    return 0 if all(r["error"] is None or r["variant"] == "compile" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
