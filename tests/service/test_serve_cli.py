"""`oodguard serve`: every flag derived from a `Settings` field, the names it had before kept, values reach the settings."""

from __future__ import annotations

import os

import pytest
import typer.main
from typer.testing import CliRunner

from oodguard.cli import app
from oodguard.service import cli as serve_cli
from oodguard.service.settings import Settings

# The flags `oodguard serve` had before they were derived: scripts and deploy files use them.
_EARLIER_FLAGS = {
    "--bundle", "--models-dir", "--host", "--port", "--max-batch", "--max-wait-ms", "--batching", "--no-batching",
    "--threads", "--decode-threads", "--max-body-bytes", "--max-images", "--max-pixels", "--max-image-side",
    "--max-request-pixels", "--request-timeout", "--watch-interval", "--client-timeout", "--max-connections",
    "--drift-alpha", "--keep-versions", "--validate-timeout", "--http", "--access-log", "--no-access-log", "--log-level",
}


@pytest.fixture(autouse=True)
def _no_oodguard_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("OODGUARD_")]:
        monkeypatch.delenv(key)


def _serve_params() -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands["serve"].params}


def _serve(monkeypatch, args: list[str], env: dict[str, str] | None = None):
    """Run `oodguard serve ARGS` up to the server: (exit code, the Settings it would serve with, output)."""
    seen = []
    monkeypatch.setattr(serve_cli, "run_server", lambda settings: seen.append(settings) or 0)
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    return result.exit_code, (seen[0] if seen else None), result.output


def test_every_setting_but_the_token_is_a_flag_documented_from_its_field():
    params = _serve_params()
    assert set(params) == set(Settings.model_fields) - {"admin_token"}
    for name, param in params.items():
        field = Settings.model_fields[name]
        assert field.description in param.help and f"Env: OODGUARD_{name.upper()}." in param.help, name
    flags = {flag for p in params.values() for flag in (*p.opts, *p.secondary_opts)}
    assert _EARLIER_FLAGS <= flags, _EARLIER_FLAGS - flags
    assert not any("token" in flag for flag in flags)  # secrets never on a command line
    assert serve_cli.flag_name("request_timeout_s") == "--request-timeout"
    assert serve_cli.flag_name("intra_op_threads") == "--threads"


def test_help_lists_the_derived_flags():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for flag in ("--max-batch", "--max-upload-bytes", "--keep-alive-timeout", "--fast-predict", "--threads"):
        assert flag in result.output


def test_flags_reach_the_settings_and_win_over_the_environment(monkeypatch, tmp_path):
    code, settings, out = _serve(
        monkeypatch,
        ["--bundle", str(tmp_path), "--threads", "2", "--max-images", "3", "--max-connections", "7",
         "--request-timeout", "4.5", "--no-batching", "--http", "h11", "--max-upload-bytes", "99999999",
         "--keep-alive-timeout", "2", "--max-batch", "16"],
        env={"OODGUARD_MAX_BATCH": "8", "OODGUARD_DECODE_THREADS": "3"},
    )
    assert code == 0, out
    assert (settings.intra_op_threads, settings.max_images_per_request, settings.limit_concurrency) == (2, 3, 7)
    assert (settings.request_timeout_s, settings.batching, settings.http) == (4.5, False, "h11")
    assert (settings.max_upload_bytes, settings.keep_alive_timeout_s) == (99999999, 2.0)
    assert settings.max_batch == 16 and settings.decode_threads == 3  # the flag wins; the environment fills in
    assert settings.bundle == tmp_path


@pytest.mark.parametrize("args", [["--max-batch", "0"], ["--http", "bogus"], ["--max-upload-bytes", "10"]])
def test_bad_values_exit_2_without_a_traceback(monkeypatch, tmp_path, args):
    code, settings, out = _serve(monkeypatch, ["--bundle", str(tmp_path), *args])
    assert code == 2 and settings is None and "Traceback" not in out
