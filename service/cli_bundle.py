"""`oodguard bundle verify PATH` and `oodguard bundle info PATH` — numpy + onnxruntime only, no torch.

PATH is a bundle directory or a bundle archive (.tar.gz / .tgz / .tar), which is extracted safely
(no absolute paths, no `..`, no links or devices, bounded size: `store.safe_extract_tar`) into a
temporary directory that is removed afterwards.

verify runs `bundle.verify_bundle` — the same gate the service applies before serving — and prints
each check that passed, or the one that failed with its message (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .bundle import BundleError, bundle_summary, manifest_sha256, verify_bundle
from .manifest import load_manifest
from .store import TarLimits, safe_extract_tar

_out = Console(soft_wrap=True, highlight=False)
_err = Console(stderr=True, soft_wrap=True, highlight=False)

bundle_app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)

# verify_bundle's checks in order, and which of them each BundleError.check belongs to
CHECKS = ("schema", "hashes", "calibration", "onnx", "golden")
_STAGE_OF = {"path": "path", "schema": "schema", "files": "hashes", "hash": "hashes", "calibration": "calibration",
             "onnx": "onnx", "contract": "onnx", "golden": "golden", "archive": "archive"}
_DESCRIPTION = {
    "path": "bundle path exists",
    "archive": "archive extracted safely",
    "schema": "manifest.json parses and matches the schema",
    "hashes": "every file present and its sha256 matches the manifest",
    "calibration": "calibration scores are a finite, sorted float array of the declared size",
    "onnx": "model.onnx loads in onnxruntime with the declared input/output contract",
    "golden": "golden outputs reproduce within 1e-4",
}


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[Path]:
    """Yield a bundle directory for `path` (a directory as is, an archive extracted to a temp dir)."""
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise BundleError("path", f"{path} does not exist")
    if not _is_archive(path):
        raise BundleError("path", f"{path} is neither a bundle directory nor a .tar.gz / .tgz / .tar archive")
    with tempfile.TemporaryDirectory(prefix="oodguard-bundle-") as tmp, open(path, "rb") as fh:
        yield safe_extract_tar(fh, Path(tmp), TarLimits())


@bundle_app.command("verify")
def verify(
    path: Path = typer.Argument(..., help="Bundle directory or .tar.gz archive."),
    threads: int = typer.Option(1, "--threads", min=0, help="onnxruntime intra-op threads (0 = all cores)."),
) -> None:
    """Check schema, file hashes, calibration, ONNX contract and golden outputs; exit 1 on the first failure."""
    passed: list[str] = []
    try:
        with open_bundle(path) as root:
            if root != path:
                passed.append("archive")
            report = verify_bundle(root, intra_op_threads=threads)
    except BundleError as exc:
        stage = _STAGE_OF.get(exc.check, exc.check)
        if stage in CHECKS:
            passed += list(CHECKS[: CHECKS.index(stage)])
        for check in passed:
            _out.print(f"[green]✓[/green] {check}: {_DESCRIPTION[check]}")
        _out.print(f"[red]✗ {stage}[/red]: {escape(exc.reason)}")
        _err.print(f"bundle {path} FAILED verification ({exc.check}): {exc.reason}", markup=False)
        raise typer.Exit(1)
    for check in passed + report.checks:
        _out.print(f"[green]✓[/green] {check}: {_DESCRIPTION.get(check, check)}")
    worst = max(report.golden_max_abs_diff.values(), default=0.0)
    m = report.manifest
    _out.print(f"bundle {m.name}:{m.version} OK (manifest sha256 {report.sha256}; golden max abs diff {worst:.2e})",
               markup=False)


@bundle_app.command("info")
def info(
    path: Path = typer.Argument(..., help="Bundle directory or .tar.gz archive."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a bundle: name, version, classes, score, operating points, calibration, metrics."""
    try:
        with open_bundle(path) as root:
            manifest = load_manifest(root)
            summary = bundle_summary(manifest, manifest_sha256(root))
    except (BundleError, ValueError) as exc:
        _err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2)
    if as_json:
        _out.print_json(json.dumps(summary, default=str))
        return
    _out.print(_info_table(manifest, summary))


def _info_table(manifest, summary: dict) -> Table:
    rows: list[tuple[str, str]] = [
        ("sha256 (manifest)", summary["sha256"]),
        ("created", summary["created_at"]),
        ("description", manifest.description or "-"),
        ("model / method", f"{summary['model'] or '?'} / {summary['method'] or '?'}"),
        ("classes", ", ".join(manifest.classes)),
    ]
    inp = manifest.input
    rows.append(("input", f"{inp.name} {inp.dtype} N×{inp.channels}×{inp.height}×{inp.width} {inp.layout} "
                          f"{inp.color} in {list(inp.value_range)}, resize {inp.resize}"))
    rows.append(("outputs", ", ".join(manifest.outputs)))
    params = ", ".join(f"{k}={v:g}" for k, v in manifest.score.params.items())
    rows.append(("score", f"{manifest.score.name} (output {manifest.score.output}{', ' + params if params else ''}; "
                          "higher = more in-distribution)"))
    rows.append(("calibration", f"{manifest.calibration.size} scores; {manifest.calibration.split}"))
    forms = manifest.calibration.forms
    if forms:
        rows.append(("upload-form groups", f"rule {manifest.calibration.form_rule}: "
                     + "; ".join(f"{g} ({f.size} scores: {f.rendering})" for g, f in forms.items())))
    for op in manifest.operating_points:
        default = " (default)" if op.name == manifest.default_operating_point else ""
        realised = f", realised TPR {100 * op.realised_tpr:.2f}%" if op.realised_tpr is not None else ""
        fpr = ("; FPR " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in op.fpr.items())) if op.fpr else ""
        rule = ("accept iff score >= its upload-form group's threshold ("
                + ", ".join(f"{g} {t:.6g}" for g, t in op.form_thresholds.items()) + ")") if op.form_thresholds \
            else f"accept iff score >= {op.threshold:.6g}"
        rows.append((f"operating point {op.name}{default}", f"{rule} (target TPR {100 * op.target_tpr:g}%{realised}){fpr}"))
    rows.append(("code version", manifest.lineage.code_version or "-"))
    rows += [(f"dataset {name}", digest) for name, digest in manifest.lineage.datasets.items()]
    rows.append(("files", ", ".join(sorted(manifest.files))))

    table = Table(title=Text(f"bundle {manifest.name}:{manifest.version}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in rows:
        table.add_row(Text(field), Text(value))  # manifest text is data, never rich markup
    return table


def register(app: typer.Typer) -> None:
    """Add `oodguard bundle verify|info` to the root app."""
    app.add_typer(bundle_app, name="bundle")
