"""`edge-steer serve`: the OpenAI-compatible server with per-request steering."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ..constants import API_KEY_ENV, DEFAULT_CTX
from ..errors import BadInput, DoesNotFit
from .options import (
    LOAD,
    LayersOpt,
    clean_errors,
    err,
    load_options,
    note,
    progress_bar,
    with_options,
)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@clean_errors
@with_options(LOAD)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            "-np",
            help="Lanes: requests decoded together, each a sequence of one context.",
        ),
    ] = 1,
    ctx: Annotated[
        int, typer.Option("--ctx", "-c", help="Context size of each lane.")
    ] = DEFAULT_CTX,
    preset: Annotated[
        list[str],
        typer.Option("--preset", help="NAME=SPEC, listed as a model, e.g. calm=happy:0.5."),
    ] = [],  # noqa: B006 (Typer reads the default; it is never mutated)
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar=API_KEY_ENV, help="Require `Authorization: Bearer KEY`."),
    ] = None,
    allow_train: Annotated[
        bool,
        typer.Option(
            "--allow-train", help="Train a built-in concept a request names but the store lacks."
        ),
    ] = False,
    allow_host: Annotated[
        list[str],
        typer.Option(
            "--allow-host",
            help="Also answer requests for this Host name (behind a proxy); '*': any.",
        ),
    ] = [],  # noqa: B006 (Typer reads the default; it is never mutated)
    repack: Annotated[
        bool | None,
        typer.Option(
            "--repack/--no-repack",
            help="llama.cpp's repacked CPU weight layouts: faster on AVX2/AVX-512/NEON, but "
            "batched replies may then differ from a request's reply alone at greedy near-ties "
            "(default: only with --parallel 1).",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        int, typer.Option("--queue", help="Requests that may wait for a lane; then 503.")
    ] = 32,
    layers: LayersOpt = None,
    *,
    opts,
) -> None:
    """Serve the model over an OpenAI-compatible API, steering each request on its own."""
    try:
        from ..server import startup
    except ImportError as exc:
        raise BadInput(
            f"the server needs the `server` extra ({exc.name} is missing): "
            "pip install uvicorn starlette (the `server` extra)"
        ) from None
    from .. import runtime
    from .download_bar import RichBar

    presets = startup.parse_presets(preset)  # before minutes of downloading, not after
    startup.check_counts(parallel, queue, port)
    startup.check_access(host, api_key, allow_host)
    load = load_options(opts, ctx)
    every_lane = dataclasses.replace(load, ctx=ctx * parallel)  # each lane's KV counts
    try:
        path, _ = runtime.model_path(every_lane, on_note=note, download_bar=RichBar)
    except DoesNotFit as exc:
        if parallel == 1:
            raise
        raise DoesNotFit(
            f"{exc} (that context is --parallel {parallel} lanes of --ctx {ctx} tokens: "
            "fewer lanes need less)"
        ) from None
    options = startup.ServeOptions(
        load=dataclasses.replace(load, model=str(path)),
        model_id=startup.model_id(opts.model, path),
        host=host,
        port=port,
        parallel=parallel,
        layers=layers,
        presets=presets,
        allow_train=allow_train,
        api_key=api_key,
        queue_size=queue,
        allow_hosts=allow_host,
        repack=repack,
    )
    with progress_bar() as on_progress:
        startup.serve(
            options,
            on_note=note,
            on_progress=on_progress,
            on_listening=lambda url: err.print(
                f"listening on [bold]{url}[/] (playground: {url}/, API: {url}/v1); Ctrl-C stops"
            ),
        )
