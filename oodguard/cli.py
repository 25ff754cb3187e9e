"""The `oodguard` command: one entry point for train / evaluate / export / calibrate / bundle / serve / deploy.

Each half registers its own sub-commands. Command modules import torch lazily (inside the command)
so that `oodguard serve` and `oodguard bundle ...` work with only the `serve` extra installed.
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="oodguard",
    help="Inference-time out-of-distribution guard for image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# module path -> function `register(app)`; a module whose optional dependencies are missing
# is skipped so the rest of the CLI keeps working.
_COMMAND_MODULES = (
    "oodguard.training.cli_train",  # train
    "oodguard.training.cli_eval",  # evaluate, export, calibrate
    "oodguard.service.cli",  # serve
    "oodguard.service.cli_bundle",  # bundle verify / info
    "oodguard.service.cli_deploy",  # deploy, rollback
)


@app.callback()
def _root(
    log_level: str = typer.Option("INFO", "--log-level", envvar="OODGUARD_LOG_LEVEL", help="Python logging level."),
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register_all() -> None:
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            # Only tolerate a missing *third-party* dependency of an optional half, never our own bugs.
            if exc.name and exc.name.startswith("oodguard"):
                raise
            continue
        mod.register(app)


_register_all()


# Third-party module -> the extra that installs it, for a readable error instead of a traceback.
_EXTRA_OF = {
    **dict.fromkeys(("torch", "torchvision", "onnx", "onnxscript", "matplotlib", "sklearn", "tqdm", "safetensors"), "train"),
    **dict.fromkeys(("fastapi", "uvicorn", "onnxruntime", "prometheus_client", "PIL", "multipart", "pydantic_settings",
                     "httpx", "starlette"), "serve"),
}


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        typer.echo(f"Error: this command needs the '{extra}' extra ({exc.name} is not installed): "
                   f"pip install 'oodguard[{extra}]'", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
