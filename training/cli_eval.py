"""`oodguard evaluate`, `oodguard export`, `oodguard calibrate`: from a trained run to a served bundle;
`oodguard guard`: a classifier run and a detector run composed into one.

    oodguard evaluate runs/NAME --ood tinyimagenet --ood gaussian --attack none,paper --max-samples 1000
    oodguard export runs/NAME                       # -> runs/NAME/export/model.onnx (+ export.json)
    oodguard calibrate runs/NAME                    # -> runs/NAME/bundle/ and runs/NAME/bundle.tar.gz
    oodguard bundle verify runs/NAME/bundle

torch is imported inside the commands, so the rest of the CLI works with only the `serve` extra.
Exit codes: 0 ok, 1 a check failed (parity gate, bundle verification), 2 bad input (paths, flags, data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _jpeg_bands(text: str) -> tuple[tuple[int, int], ...]:
    """--jpeg-bands 'A-B,C-D,...' -> ((A, B), (C, D), ...), checked: integers, in 1-100, disjoint, covering 1-100."""
    from oodguard.service.upload_form import FormGroups

    bands = []
    for part in _split_list([text]):
        lo, sep, hi = part.partition("-")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
            _fail(f"--jpeg-bands: {part!r} is not a band LOWEST-HIGHEST of JPEG qualities (e.g. 50-64)")
        bands.append((int(lo), int(hi)))
    try:
        groups = FormGroups(tuple(bands))
    except ValueError as exc:
        _fail(f"--jpeg-bands: {exc}")
    if not groups.covers_every_quality():
        missing = [q for q in range(1, 101) if groups.band_of(q) is None]
        _fail(f"--jpeg-bands must cover every JPEG quality 1-100; none covers {missing[0]}" +
              (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return groups.bands


def _split_list(values: list[str] | None) -> list[str]:
    """`--x a,b --x c` -> [a, b, c]."""
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def _floats(values: list[str], flag: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes numbers like 0.90,0.95,0.99, got {','.join(values)}") from None


def _fail(message: str, code: int = 2) -> None:
    _err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _input_errors():
    """Exception types that mean bad input (exit 2), imported lazily with torch."""
    from oodguard.service.bundle import BundleError

    from .data import DataError
    from .run_dir import RunDirError

    return (RunDirError, DataError, BundleError, FileNotFoundError, ValueError)


def evaluate(
    run_dir: Path = typer.Argument(..., help="Training run directory (config.json, split.json, checkpoints/last.pt)."),
    ood: Optional[list[str]] = typer.Option(
        None, "--ood", help="OOD set, repeatable: tinyimagenet, gaussian, uniform, blobs, or a path (.npz / image "
        "folder). Default: tinyimagenet, gaussian, uniform, blobs."),
    attack: Optional[list[str]] = typer.Option(
        None, "--attack", help="Comma-separated protocols: none; paper (eps 1/255, 10 steps of 1/255) and strong "
        "(eps 8/255, 100 steps of 2/255), both worst case per image over 4 objectives (x 2 restarts for paper) with "
        "the best iterate kept; fast (paper's budget, one objective, last iterate: for smoke runs). Default: none,paper."),
    attack_samples: Optional[list[str]] = typer.Option(
        None, "--attack-samples", help="Images per set for an attacked protocol, e.g. strong=500,paper=2000 (a seeded "
        "subset of the clean images). Default: strong=500."),
    attack_sets: Optional[list[str]] = typer.Option(
        None, "--attack-sets", help="OOD sets to attack (comma-separated names as in the tables). Default: all."),
    shifts: Optional[list[str]] = typer.Option(
        None, "--shifts", help="Comma-separated upload forms to evaluate (stored, png, jpeg_q30, jpeg_q50, jpeg_q95, "
        "upscale_x2, upscale_x3, upscale_x4, non_square), 'all' or 'none'. Realised TPR / FPR at tpr95 per form, "
        "with one threshold and with each form's group threshold. Default: all."),
    scores: Optional[list[str]] = typer.Option(
        None, "--scores", help="Comma-separated scores: msp, energy, odin, mahalanobis. Default: all four."),
    certify: Optional[list[str]] = typer.Option(
        None, "--certify", help="Comma-separated L-inf radii, e.g. 1/255,2/255: per OOD image a sound upper bound of "
        "msp / energy over its whole eps-ball (interval bound propagation; models of conv, BatchNorm, ReLU, GELU, "
        "pooling and linear layers; others are refused), reported as rows certified_<k>_255: clean "
        "in-distribution scores vs those worst cases (guaranteed AUROC, FPR95)."),
    certify_samples: Optional[int] = typer.Option(
        None, "--certify-samples", min=1, help="Images per side for the certified rows (a seeded subset, as "
        "--attack-samples). Default: all evaluated images."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Images per set (seeded subset)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    maha_fit_samples: int = typer.Option(5000, "--maha-fit-samples", min=10,
                                         help="Training images (calibration split excluded) to fit Mahalanobis on."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory. Default RUN_DIR/eval."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="OODGUARD_DATA_DIR",
                                            help="Where named datasets live."),
    seed: int = typer.Option(0, "--seed"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write ROC and histogram PNGs."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
) -> None:
    """Measure OOD detection clean, under PGD attack and (--certify) certified, per score; writes eval.json,
    eval.md and plots."""
    from .evaluate import EvalConfig, evaluate_run

    cfg = EvalConfig(max_samples=max_samples, batch_size=batch_size, maha_fit_samples=maha_fit_samples,
                     seed=seed, data_dir=str(data_dir) if data_dir else None, plots=plots, device=device,
                     certify=_radii(_split_list(certify)), certify_samples=certify_samples)
    if ood:
        cfg.ood = list(ood)
    if attack:
        cfg.attacks = _split_list(attack)
    if scores:
        cfg.scores = _split_list(scores)
    if attack_sets:
        cfg.attack_sets = _split_list(attack_sets)
    if attack_samples:
        cfg.attack_samples = _counts(_split_list(attack_samples), "--attack-samples")
    from .evaluate import DEFAULT_SHIFTS

    forms = _split_list(shifts) if shifts else ["all"]
    cfg.shifts = list(DEFAULT_SHIFTS) if forms == ["all"] else [] if forms == ["none"] else forms
    try:
        report = evaluate_run(run_dir, cfg, out)
    except _input_errors() as exc:
        _fail(str(exc))
    table = Table(title=Text(f"AUROC / FPR95 (%) — {run_dir}"))
    table.add_column("score")
    table.add_column("OOD set")
    columns = [*report["attacks"], *(report.get("certified") or {}).get("rows", {})]  # certified: guaranteed
    for a in columns:
        table.add_column("clean" if a == "none" else a, justify="right")
    for score, per_set in report["results"].items():
        for set_name, per_attack in per_set.items():
            cells = ["–" if a not in per_attack else
                     f"{100 * per_attack[a]['auroc']:.1f} / {100 * per_attack[a]['fpr_at_95_tpr']:.1f}"
                     + (f" (n={per_attack[a]['n_in']}+{per_attack[a]['n_out']})" if a != "none" else "")
                     for a in columns]
            table.add_row(score, Text(set_name), *cells)
    _out.print(table)
    if report.get("shifts"):
        _print_shifts(report["shifts"])
    _out.print(f"accuracy (clean): {100 * report['accuracy']['clean']:.2f}%")
    _out.print(f"wrote {Path(out) if out else Path(run_dir) / 'eval'}/eval.md, eval.json, plots", markup=False)


def _radii(items: list[str]) -> list[float]:
    """'1/255' or '0.0039' -> float."""
    out = []
    for item in items:
        num, _, den = item.partition("/")
        try:
            out.append(float(num) / (float(den) if den else 1.0))
        except (ValueError, ZeroDivisionError):
            raise typer.BadParameter(f"expected radii like 1/255,2/255 or 0.0039, got {item!r}",
                                     param_hint="--certify") from None
    return out


def _counts(items: list[str], flag: str) -> dict[str, int]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise typer.BadParameter(f"expected PROTOCOL=N like strong=500, got {item!r}", param_hint=flag) from None
    return out


def _print_shifts(shifts: dict) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for score in shifts["thresholds"]:
        table = Table(title=Text(f"Upload forms — {score}, tpr95 from the calibration split "
                                 f"({shifts['calibration_images']} images): one threshold (mixed forms) | "
                                 "each form's group threshold (form-conditional bundles)"))
        table.add_column("form")
        table.add_column("accuracy", justify="right")
        table.add_column("TPR, one threshold", justify="right")
        sets = list(next(iter(shifts["forms"].values()))["scores"][score]["sets"])
        for key in sets:
            table.add_column(f"FPR {key}", justify="right")
        table.add_column("group")
        table.add_column("TPR, group threshold", justify="right")
        for key in sets:
            table.add_column(f"FPR {key}, group threshold", justify="right")
        for form, row in shifts["forms"].items():
            r = row["scores"][score]
            fc = r.get("form_conditional") or {"realised_tpr": None, "fpr": {}}
            table.add_row(form, pct(row["accuracy"]), pct(r["realised_tpr"]), *(pct(r["sets"][k]["fpr"]) for k in sets),
                          row.get("group", "-"), pct(fc["realised_tpr"]), *(pct(fc["fpr"].get(k)) for k in sets))
        _out.print(table)


def export(
    run_dir: Path = typer.Argument(..., help="Training run directory."),
    scores: Optional[list[str]] = typer.Option(
        None, "--scores", help="Comma-separated exported scores: msp, energy, mahalanobis, detector (a composed "
        "run, `oodguard guard`). ODIN is not exportable: its input pre-processing needs gradients. Default: "
        "msp,energy,mahalanobis (and detector for a composed run)."),
    out: Optional[Path] = typer.Option(None, "--out", help="ONNX file. Default RUN_DIR/export/model.onnx."),
    parity_samples: int = typer.Option(256, "--parity-samples", min=256,
                                       help="Real images for the onnxruntime-vs-torch parity gate."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="OODGUARD_DATA_DIR"),
) -> None:
    """Export model + scores to ONNX (opset 17, dynamic batch); fails and writes nothing if parity > 1e-4."""
    from .export import ExportError, export_run

    try:
        result = export_run(run_dir, _split_list(scores) or None, out, parity_samples=parity_samples,
                            data_dir=str(data_dir) if data_dir else None)
    except ExportError as exc:
        _fail(str(exc), code=1)
    except _input_errors() as exc:
        _fail(str(exc))
    _out.print(f"wrote {result.onnx_path} (outputs: {', '.join(result.outputs)})", markup=False)
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in result.parity_max_abs_diff.items())
    _out.print(f"parity on {result.info['parity']['images']} real images, max |onnxruntime - torch|: {diffs}", markup=False)


def calibrate(
    run_dir: Path = typer.Argument(..., help="Training run directory (exported first with `oodguard export`)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Exported model. Default RUN_DIR/export/model.onnx."),
    score: str = typer.Option("msp", "--score", help="The ONNX score output the service thresholds, or 'auto': the "
                              "graph's score with the lowest FPR95 under the paper attack on validation data (the "
                              "calibration split vs the outlier classes held out of training)."),
    calibration_forms: Optional[list[str]] = typer.Option(
        None, "--calibration-forms", help="Upload forms the calibration images are rendered in, equal shares "
        "(comma-separated; see `oodguard evaluate --shifts`). Default: stored,png,jpeg_q50,jpeg_q95,upscale_x3,non_square."),
    auto_samples: int = typer.Option(500, "--auto-samples", min=1, help="Images per side attacked by --score auto."),
    auto_attack: str = typer.Option("paper", "--auto-attack", help="The worst-case protocol --score auto compares "
                                    "under: 'paper' (ε = 1/255) or 'strong' (ε = 8/255, 100 steps: a robust bundle's choice)."),
    tpr: Optional[list[str]] = typer.Option(None, "--tpr", help="Comma-separated TPR targets. Default 0.90,0.95,0.99."),
    default: float = typer.Option(0.95, "--default", help="The default operating point (one of --tpr)."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name. Default <model>-<method>."),
    version: Optional[str] = typer.Option(None, "--version", help="Bundle version. Default: UTC time YYYYmmdd-HHMMSS."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory. Default RUN_DIR/bundle (+ .tar.gz)."),
    ood: Optional[list[str]] = typer.Option(None, "--ood", help="OOD sets for the FPR validation. Default: those "
                                            "of the run's evaluation, else tinyimagenet and gaussian."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Images per validation set (the calibration split is used whole)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="OODGUARD_DATA_DIR"),
    tarball: bool = typer.Option(True, "--tarball/--no-tarball", help="Also write <bundle>.tar.gz."),
    per_class: bool = typer.Option(False, "--per-class/--no-per-class", help="Also calibrate one threshold per "
                                   "predicted class: a `tprXX_per_class` operating point next to each `tprXX`."),
    form_calibration: bool = typer.Option(True, "--form-calibration/--no-form-calibration", help="One calibration "
                                          "per upload-form group (native, JPEG quality bands, smaller, larger: read from each "
                                          "upload's header), so each form is accepted at the target rate; off: one "
                                          "threshold for every form, from the --calibration-forms mix."),
    jpeg_bands: Optional[str] = typer.Option(None, "--jpeg-bands", help="The JPEG quality bands of the form groups, "
                                             "e.g. '1-9,10-48,49-64,65-100': they must cover 1-100. Default: the bands "
                                             "chosen on the shipped model's validation data (scripts/choose_jpeg_bands.py "
                                             "chooses them for another model)."),
) -> None:
    """Calibrate thresholds on the held-out split with onnxruntime and assemble a verified bundle.

    For a TPR target t and n calibration scores: threshold = the k-th smallest score, k = floor((1 - t)(n + 1));
    accept iff score >= threshold, i.e. iff the conformal p-value (1 + #{cal <= s}) / (n + 1) > 1 - t.
    """
    from oodguard.service.bundle import BundleError

    from .calibrate import CalibrateConfig, calibrate_run

    cfg = CalibrateConfig(onnx=str(onnx) if onnx else None, score=score, default_tpr=default, name=name,
                          version=version, out=str(out) if out else None, ood=list(ood) if ood else None,
                          max_samples=max_samples, batch_size=batch_size, auto_samples=auto_samples, auto_attack=auto_attack,
                          data_dir=str(data_dir) if data_dir else None, tarball=tarball)
    if calibration_forms:
        cfg.calibration_forms = _split_list(calibration_forms)
    if tpr:
        cfg.tprs = _floats(_split_list(tpr), "--tpr")
    cfg.per_class = per_class
    cfg.form_calibration = form_calibration
    if jpeg_bands:
        cfg.jpeg_bands = _jpeg_bands(jpeg_bands)
    try:
        built = calibrate_run(run_dir, cfg)
    except BundleError as exc:  # the assembled bundle failed verification
        _fail(f"bundle verification failed: {exc}", code=1)
    except _input_errors() as exc:
        _fail(str(exc))
    m = built.manifest
    table = Table(title=f"{m.name}:{m.version} — score {m.score.name}, {m.calibration.size} calibration images")
    for col in ("operating point", "threshold", "target TPR", "realised TPR (test split)"):
        table.add_column(col, justify="left" if col == "operating point" else "right")
    for op in m.operating_points:
        mark = " (default)" if op.name == m.default_operating_point else ""
        table.add_row(op.name + mark, f"{op.threshold:.6g}", f"{100 * op.target_tpr:.1f}%",
                      f"{100 * (op.realised_tpr or 0):.2f}%")
    _out.print(table)
    fpr = Table(title="FPR per OOD set (OOD accepted as in-distribution)")
    fpr.add_column("OOD set (set/attack: attacked)")
    for op in m.operating_points:
        fpr.add_column(op.name, justify="right")
    for key in m.operating_points[0].fpr:
        fpr.add_row(Text(key), *(f"{100 * op.fpr[key]:.1f}%" if key in op.fpr else "-" for op in m.operating_points))
    _out.print(fpr)
    validation = m.metrics.get("validation", {})
    if validation.get("forms"):
        forms = Table(title=f"Realised TPR per upload form at {m.default_operating_point} (test split)")
        forms.add_column("form")
        forms.add_column("group (its threshold)")
        forms.add_column("realised TPR", justify="right")
        sets = list(next(iter(validation["forms"].values()))[m.default_operating_point]["fpr"])
        for key in sets:
            forms.add_column(f"FPR {key}", justify="right")
        for form, row in validation["forms"].items():
            point = row[m.default_operating_point]
            group = row.get("group", "-") if validation.get("form_conditional") else "one threshold"
            forms.add_row(form, group, f"{100 * point['realised_tpr']:.1f}%", *(f"{100 * point['fpr'][k]:.1f}%" for k in sets))
        _out.print(forms)
    selection = m.metrics.get("score_selection")
    if selection:
        sel = Table(title=Text(f"--score auto: {selection['rule']}"))
        for col in ("score", "clean AUROC", "clean FPR95", "attacked AUROC", "attacked FPR95"):
            sel.add_column(col, justify="left" if col == "score" else "right")
        for name, r in selection["candidates"].items():
            sel.add_row(name + (" (chosen)" if name == selection["chosen"] else ""),
                        *(f"{100 * r[a][k]:.1f}%" for a in ("clean", "attacked") for k in ("auroc", "fpr_at_95_tpr")))
        _out.print(sel)
    _out.print(f"bundle: {built.bundle_dir} (verified: {', '.join(built.verify.checks)})", markup=False)
    if built.tarball:
        _out.print(f"archive: {built.tarball}", markup=False)


def guard(
    classifier: Path = typer.Option(..., "--classifier", help="Classifier run directory (msp / oe / adv / aoe / aloe)."),
    detector: Path = typer.Option(..., "--detector", help="Detector run directory (`oodguard train --method disc`)."),
    out: Path = typer.Option(..., "--out", help="New run directory for the composed model."),
    detector_checkpoint: Optional[Path] = typer.Option(
        None, "--detector-checkpoint", help="A checkpoint of the detector run other than its last (e.g. "
        "DETECTOR/checkpoints/epoch_012.pt, the epoch its per-epoch validation chose)."),
) -> None:
    """Compose a classifier and an in-vs-out detector into one run: evaluate, export and calibrate it as usual;
    the detector's margin is its `detector` score (exported by default)."""
    from .compose import compose_guarded

    try:
        path = compose_guarded(classifier, detector, out, detector_checkpoint)
    except _input_errors() as exc:
        _fail(str(exc))
    _out.print(f"wrote {path}: {classifier} guarded by {detector} (score 'detector'); next: oodguard evaluate "
               f"{path} --scores energy,detector", markup=False)


def register(app: typer.Typer) -> None:
    """Add `evaluate`, `export` and `calibrate` to the root `oodguard` app."""
    app.command("evaluate")(evaluate)
    app.command("export")(export)
    app.command("calibrate")(calibrate)
    app.command("guard")(guard)
