"""The `edge-steer` command line: one Typer app; each module in this package registers its
commands on it (as `llm` plugins do with `register_commands`). Command modules import the
library and `options`, never each other."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import bench, console, doctor, evaluate, generate, models, serve, train, vectors, worker

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,  # --install-completion: bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},  # every command, as llama.cpp
    help="Steer local GGUF language models with control vectors, natively in llama.cpp.",
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"edge-steer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Steer local GGUF language models with control vectors, natively in llama.cpp."""


for module in (generate, train, models, vectors, evaluate, bench, doctor, serve, worker):
    module.register(app)


def main() -> None:
    try:
        try:
            app(prog_name="edge-steer")
        finally:
            sys.stdout.flush()  # here, where a failure is ours to report, not at exit
    except OSError as exc:
        if not console.output_failed(exc):
            raise
        sys.exit(1)
