"""`edge-steer train`: train a control vector on the model itself and store it."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import BadInput
from .options import (
    LOAD,
    LayersOpt,
    check_files_named,
    clean_errors,
    err,
    load_model,
    out,
    progress_bar,
    with_options,
)


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@clean_errors
@with_options(LOAD)
def train(
    name: Annotated[str, typer.Argument(help="Concept name: built-in (lazy, happy, ...) or new.")],
    positive: Annotated[
        str | None, typer.Option("--positive", help="Persona words, comma-separated.")
    ] = None,
    negative: Annotated[
        str | None, typer.Option("--negative", help="Opposite persona words, paired by position.")
    ] = None,
    pairs: Annotated[
        str | None, typer.Option("--pairs", help="JSONL of {positive, negative} prompts.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="pca-diff, pca-center or mean-diff (default: mean-diff).",
        ),
    ] = None,
    layers: LayersOpt = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Also write the vector here (.gguf or .npz)."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Which pairs --limit picks, and their order.")
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            help="Most pairs to train on (default: 128 persona x continuation pairs; "
            "every line of --pairs).",
        ),
    ] = None,
    *,
    opts,
) -> None:
    """Train a control vector on the model itself and store it for `--vector NAME`."""
    from .. import convert, library, steering, store, training
    from ..vectors import Key

    if method is not None and method not in training.METHODS:
        raise BadInput(f"unknown method {method!r}: use one of {', '.join(training.METHODS)}")
    store.check_name(name)
    check_files_named(pairs=pairs)
    library.check_sources(name, positive, negative, pairs, limit, seed)
    if output is not None:  # -o "" is a slip to name, not a wish for no copy
        convert.check_output(output)  # before minutes of training, not after
    loaded = load_model(opts, training.TrainOptions.batch)
    span = steering.parse_layers(layers, loaded.n_layer)
    data = library.contrast_pairs(
        loaded,
        name,
        positive=positive,
        negative=negative,
        pairs_file=pairs,
        seed=seed,
        limit=limit,
    )
    options = training.TrainOptions(
        method=method or training.DEFAULT_METHOD, layers=span, threads=opts.threads
    )
    start = time.perf_counter()
    err.print(
        f"[dim]training {escape(repr(name))} on {escape(loaded.name)} from {len(data)} pairs[/]"
    )
    with progress_bar() as on_progress:
        vector = library.train_vector(loaded, name, data, options, on_progress)
    path = library.store_vector(loaded, name, vector)  # first: a failed -o loses no training
    meta = vector.metadata
    err.print(
        f"[dim]trained in {time.perf_counter() - start:.1f}s: blocks {meta.get(Key.LAYER_FIRST)}-"
        f"{meta.get(Key.LAYER_LAST)}, {meta.get(Key.METHOD)}[/]"
    )
    out.print(f"stored {path}", markup=False)
    if output is not None:
        convert.save(vector, output)
        out.print(f"wrote {output}", markup=False)
