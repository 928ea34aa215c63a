"""`edge-steer worker`: lend this machine's devices to a model loading elsewhere (`--rpc`),
through llama.cpp's RPC server from the installed library."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import ThreadsOpt, clean_errors, err, note


def register(app: typer.Typer) -> None:
    app.command()(worker)


@clean_errors
def worker(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; loopback unless --allow-remote.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 50052,
    threads: ThreadsOpt = None,
    device: Annotated[
        list[str],
        typer.Option(
            "--device", "-d", help="Devices to serve (CPU, CUDA0, ...; default: GPUs, else CPU)."
        ),
    ] = [],  # noqa: B006 (Typer reads the default; it is never mutated)
    cache: Annotated[
        str | None,
        typer.Option("--cache", help="Folder caching tensors the client sent, for fast reloads."),
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a non-loopback --host. No authentication, no encryption: anyone who "
            "reaches the port can run code here.",
        ),
    ] = False,
) -> None:
    """Serve this machine's devices to `--rpc` clients until Ctrl-C."""
    from .. import machine, rpc
    from ..errors import BadInput

    names = [n.strip() for d in device for n in d.split(",") if n.strip()]
    if device and not names:  # not the default: "" is a slip, not a choice
        raise BadInput("--device is blank: name devices (CPU, CUDA0, ...), or leave it out")
    if allow_remote and not rpc.is_loopback(host):
        err.print(f"[bold yellow]warning:[/] {rpc.SECURITY_WARNING}")
    code = rpc.run_worker(
        host,
        port,
        threads=machine.math_cores() if threads is None else threads,
        devices=names,
        cache_dir=cache,
        allow_remote=allow_remote,
        on_note=note,
    )
    raise typer.Exit(code)
