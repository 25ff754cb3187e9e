"""`oodguard deploy` and `oodguard rollback`: put a new model in front of traffic, or take it back.

Two targets:

- `--url http://host:8000`: a running service's admin API (token from `OODGUARD_ADMIN_TOKEN`, never
  a flag, so it stays out of shell history and `ps`). The bundle is verified here, uploaded as a
  .tar.gz, validated again by the service and activated there.
- `--models-dir DIR`: the service's models directory (shared volume). The bundle is verified, copied
  in and the ACTIVE pointer moved; a service started with `--watch-interval` swaps to it.

Given a training run directory instead of a bundle, `oodguard export` and `oodguard calibrate` are
run first as subprocesses (they need torch; this module never imports it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .bundle import bundle_summary, manifest_sha256, verify_bundle
from .loaded_model import contract_diff
from .manifest import MANIFEST_FILE, BundleManifest, load_manifest
from .errors import OodguardError
from .store import ModelStore, TarLimits, copy_bundle, ref, safe_extract_tar, split_ref

TOKEN_ENV = "OODGUARD_ADMIN_TOKEN"
_err = Console(stderr=True, soft_wrap=True)
_out = Console(soft_wrap=True)


class DeployError(Exception):
    """A deploy step failed; the message is printed without a traceback."""


# -- the source: bundle dir, bundle archive or training run -----------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _oodguard(*args: str) -> None:
    """Run an `oodguard` sub-command of the training half in a subprocess (keeps torch out of this process)."""
    cmd = [sys.executable, "-m", "oodguard.cli", *args]
    _err.print(f"[dim]$ oodguard {' '.join(args)}[/dim]")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise DeployError(f"`oodguard {args[0]}` failed with exit code {proc.returncode}")


def bundle_from_run(
    run_dir: Path, out_dir: Path, name: str | None, version: str | None, data_dir: Path | None = None
) -> Path:
    """`oodguard export` + `oodguard calibrate` a training run into a bundle directory under `out_dir`."""
    onnx_path, bundle = out_dir / "model.onnx", out_dir / "bundle"
    data_args = ["--data-dir", str(data_dir)] if data_dir else []
    _oodguard("export", str(run_dir), "--out", str(onnx_path), *data_args)
    calibrate_args = ["calibrate", str(run_dir), "--onnx", str(onnx_path), "--out", str(bundle), "--no-tarball"]
    if name:
        calibrate_args += ["--name", name]
    if version:
        calibrate_args += ["--version", version]
    _oodguard(*calibrate_args, *data_args)
    return bundle


def _extract_archive(archive: Path, dest: Path) -> Path:
    with open(archive, "rb") as fh:
        return safe_extract_tar(fh, dest, TarLimits())


def tar_bundle(bundle_dir: Path, sink) -> None:
    """Write `bundle_dir` as a .tar.gz (files under one top-level folder named after the version)."""
    manifest = load_manifest(bundle_dir)
    with tarfile.open(fileobj=sink, mode="w:gz") as tar:
        tar.add(bundle_dir, arcname=f"{manifest.name}-{manifest.version}", recursive=True)


# -- printing -----------------------------------------------------------------------------------------


_HEADLINE = ("auroc", "fpr95", "fpr_at_95", "accuracy")


def flat_metrics(metrics: dict[str, Any], limit: int = 10) -> dict[str, float]:
    """The headline numbers (AUROC, FPR95, accuracy) of a nested metrics dict, as `a.b.c: value`."""
    leaves: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if any(h in prefix.rsplit(".", 1)[-1].lower() for h in _HEADLINE):
                leaves[prefix] = float(value)

    walk("", metrics)
    return {k: leaves[k] for k in sorted(leaves)[:limit]}


def _operating_point(summary: dict[str, Any] | None, name: str | None) -> dict[str, Any]:
    for op in (summary or {}).get("operating_points", []):
        if op.get("name") == name:
            return op
    return {}


def print_change(old: dict[str, Any] | None, new: dict[str, Any], action: str) -> None:
    """`old -> new` with both bundles' key metrics side by side."""
    old_ref = f"{old['name']}/{old['version']}" if old else "(none)"
    new_ref = f"{new['name']}/{new['version']}"
    _out.print(f"[bold]{action}[/bold]: {old_ref} -> [bold green]{new_ref}[/bold green]")
    table = Table(show_header=True, header_style="bold")
    for column in ("", old_ref, new_ref):
        table.add_column(column)
    rows: dict[str, tuple[str, str]] = {}
    for key, width in (("sha256", 12), ("method", 24), ("model", 24), ("created_at", 19)):
        rows[key] = (str((old or {}).get(key) or "-")[:width], str(new.get(key) or "-")[:width])
    op_name = new.get("default_operating_point")
    old_op, new_op = _operating_point(old, op_name), _operating_point(new, op_name)
    rows[f"{op_name}: threshold"] = (_fmt(old_op.get("threshold")), _fmt(new_op.get("threshold")))
    rows[f"{op_name}: realised TPR"] = (_fmt(old_op.get("realised_tpr")), _fmt(new_op.get("realised_tpr")))
    for ood_set in dict.fromkeys([*new_op.get("fpr", {}), *old_op.get("fpr", {})]):
        rows[f"{op_name}: FPR {ood_set}"] = (_fmt(old_op.get("fpr", {}).get(ood_set)), _fmt(new_op.get("fpr", {}).get(ood_set)))
    old_m, new_m = flat_metrics((old or {}).get("metrics") or {}), flat_metrics(new.get("metrics") or {})
    for key in dict.fromkeys([*new_m, *old_m]):
        rows[key] = (_fmt(old_m.get(key)), _fmt(new_m.get(key)))
    for key, (a, b) in rows.items():
        table.add_row(key, a, b)
    _out.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# -- HTTP target ----------------------------------------------------------------------------------------


class _Admin:
    """A small client of the service's admin API."""

    def __init__(self, url: str, timeout: float):
        import httpx

        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise typer.BadParameter(f"set {TOKEN_ENV} to the service's admin token", param_hint="--url")
        self._httpx = httpx
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, **kw) -> dict[str, Any]:
        try:
            resp = self.client.request(method, path, **kw)
        except self._httpx.HTTPError as exc:
            raise DeployError(f"cannot reach {self.client.base_url}{path}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": {"code": f"http_{resp.status_code}", "message": resp.text[:300]}}
        if resp.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            check = f" [check: {error['check']}]" if error.get("check") else ""
            raise DeployError(
                f"{method} {path} -> HTTP {resp.status_code} {error.get('code', '')}: {error.get('message', body)}{check}"
            )
        return body


def _deploy_url(bundle: Path, url: str, activate: bool, allow_contract_change: bool, timeout: float) -> None:
    admin = _Admin(url, timeout)
    listing = admin.call("GET", "/admin/models")
    old = listing.get("active")
    manifest = load_manifest(bundle)
    with tempfile.TemporaryFile() as archive:
        tar_bundle(bundle, archive)
        size = archive.tell()
        archive.seek(0)
        _err.print(f"uploading {manifest.name}/{manifest.version} ({size / 1e6:.1f} MB) to {url}")
        registered = admin.call("POST", "/admin/models", content=archive.read(), headers={"Content-Type": "application/gzip"})
    _err.print(
        f"registered {registered['name']}/{registered['version']} ({'new' if registered['created'] else 'already present'}; "
        f"checks: {', '.join(registered['checks'])})"
    )
    if not registered.get("contract_compatible", True) and not allow_contract_change:
        changes = ", ".join(registered.get("contract_changes", {}))
        raise DeployError(f"the new bundle changes the client contract ({changes}); pass --allow-contract-change")
    if not activate:
        _out.print(f"registered {registered['name']}/{registered['version']}; not activated (--no-activate)")
        return
    params = {"allow_contract_change": "true"} if allow_contract_change else {}
    swap = admin.call("POST", f"/admin/models/{registered['name']}/{registered['version']}/activate", params=params)
    print_change(swap.get("previous") or old, swap["current"], "activated" if swap["result"] == "success" else "unchanged")
    if swap.get("timings_s"):
        t = swap["timings_s"]
        _out.print(f"swap: validate {t.get('validate', 0):.3f}s, warm {t.get('warm', 0):.3f}s")


def _rollback_url(url: str, timeout: float) -> None:
    swap = _Admin(url, timeout).call("POST", "/admin/rollback")
    print_change(swap.get("previous"), swap["current"], "rolled back")


# -- models-dir target ---------------------------------------------------------------------------------


def _active_summary(store: ModelStore) -> tuple[dict[str, Any] | None, BundleManifest | None]:
    pointer = store.pointer()
    if pointer is None:
        return None, None
    vdir = store.version_dir(*split_ref(pointer[0]))
    try:
        manifest = load_manifest(vdir)
    except ValueError:
        return {"name": pointer[0].split("/")[0], "version": pointer[0].split("/")[1]}, None
    return bundle_summary(manifest, manifest_sha256(vdir)), manifest


def _deploy_models_dir(bundle: Path, models_dir: Path, activate: bool, allow_contract_change: bool, keep: int) -> None:
    store = ModelStore(models_dir, keep_versions=keep)
    old, old_manifest = _active_summary(store)
    report = verify_bundle(bundle)
    new_manifest = report.manifest
    changes = contract_diff(old_manifest, new_manifest) if old_manifest else {}
    if changes and activate and not allow_contract_change:
        raise DeployError(f"the new bundle changes the client contract ({', '.join(changes)}); pass --allow-contract-change")
    with store.staging_dir() as stage:
        staged = copy_bundle(bundle, stage / "bundle")
        verify_bundle(staged)  # the copy, not just the source, is what will be served
        name, version, dest, created = store.install(staged)
    _err.print(f"installed {ref(name, version)} at {dest} ({'new' if created else 'already present'})")
    if not activate:
        _out.print(f"registered {ref(name, version)}; not activated (--no-activate)")
        return
    store.set_active(name, version, allow_contract_change=bool(changes), action="deploy")
    store.prune(name)
    print_change(old, bundle_summary(new_manifest, manifest_sha256(dest)), "activated")
    _out.print("a service watching this models dir (--watch-interval) swaps to it on its next poll")


def _rollback_models_dir(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    old, _ = _active_summary(store)
    target = store.rollback_target()
    if target is None:
        raise DeployError(f"{models_dir} has no previous version to roll back to")
    vdir = store.version_dir(*split_ref(target))
    report = verify_bundle(vdir)
    store.commit_rollback(target)
    print_change(old, bundle_summary(report.manifest, report.sha256), "rolled back")


# -- commands -------------------------------------------------------------------------------------------


def _target(url: Optional[str], models_dir: Optional[Path]) -> None:
    if bool(url) == bool(models_dir):
        raise typer.BadParameter("give exactly one of --url or --models-dir", param_hint="--url / --models-dir")


def deploy(
    source: Path = typer.Argument(..., help="A bundle directory, a bundle .tar.gz, or a training run directory."),
    url: Optional[str] = typer.Option(None, "--url", help="Service base URL; token from $OODGUARD_ADMIN_TOKEN."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Deploy into this models directory instead."),
    activate: bool = typer.Option(True, "--activate/--no-activate", help="Make it the served version."),
    allow_contract_change: bool = typer.Option(
        False, "--allow-contract-change", help="Accept different classes / input / outputs / score."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (run directories only)."),
    version: Optional[str] = typer.Option(None, "--version", help="Bundle version (run directories only)."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", envvar="OODGUARD_DATA_DIR", help="Datasets for export/calibrate (run directories only)."
    ),
    keep_versions: int = typer.Option(5, "--keep-versions", min=1, help="Versions kept per model (--models-dir)."),
    timeout: float = typer.Option(120.0, "--timeout", help="HTTP timeout in seconds (--url)."),
) -> None:
    """Verify a bundle (exporting + calibrating a run first), upload or copy it, activate it."""
    _target(url, models_dir)
    if not source.exists():
        raise typer.BadParameter(f"{source} does not exist", param_hint="SOURCE")
    try:
        with tempfile.TemporaryDirectory(prefix="oodguard-deploy-") as work:
            work_dir = Path(work)
            if is_run_dir(source):
                bundle = bundle_from_run(source, work_dir, name, version, data_dir)
            elif source.is_dir() and (source / MANIFEST_FILE).is_file():
                bundle = source
            elif source.is_file() and tarfile.is_tarfile(source):
                bundle = _extract_archive(source, work_dir / "x")
            else:
                raise typer.BadParameter(
                    f"{source} is neither a bundle (manifest.json), a .tar.gz of one, "
                    "nor a training run (config.json + checkpoints/)",
                    param_hint="SOURCE",
                )
            report = verify_bundle(bundle)
            _err.print(f"verified {ref(report.manifest.name, report.manifest.version)}: {', '.join(report.checks)}")
            if url:
                _deploy_url(bundle, url, activate, allow_contract_change, timeout)
            else:
                _deploy_models_dir(bundle, models_dir, activate, allow_contract_change, keep_versions)
    except (OodguardError, DeployError) as exc:  # BundleError included
        _err.print(f"[red]deploy failed:[/red] {exc}")
        raise typer.Exit(1) from None


def rollback(
    url: Optional[str] = typer.Option(None, "--url", help="Service base URL; token from $OODGUARD_ADMIN_TOKEN."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Roll back this models directory's pointer."),
    timeout: float = typer.Option(120.0, "--timeout", help="HTTP timeout in seconds (--url)."),
) -> None:
    """Switch back to the previously active version."""
    _target(url, models_dir)
    try:
        if url:
            _rollback_url(url, timeout)
        else:
            _rollback_models_dir(models_dir)
    except (OodguardError, DeployError) as exc:  # BundleError included
        _err.print(f"[red]rollback failed:[/red] {exc}")
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    """Add `deploy` and `rollback` to the root `oodguard` app."""
    app.command("deploy")(deploy)
    app.command("rollback")(rollback)
