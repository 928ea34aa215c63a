"""`edge-steer vectors ...`: convert, list, info, mix and rm control-vector files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand

from .. import files, model_files, store
from ..errors import BadInput, EdgeSteerError
from ..files import size_text
from .console import inert
from .options import JsonOpt, clean_errors, err, model_file, out

app = typer.Typer(
    no_args_is_help=True,
    help="Control-vector files: convert, list, info, mix, rm.",
)

ModelCheckOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Check against (and look names up for) this model."),
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Write here: .gguf or .npz.")]
LayersKeepOpt = Annotated[
    str | None, typer.Option("--layers", help="Keep only blocks A-B (the file's default range).")
]


@app.command("convert")
@clean_errors
def convert_command(
    source: Annotated[Path, typer.Argument(help=".gguf, .npz, .npy, .safetensors or .json")],
    output: OutputOpt,
    layer_base: Annotated[
        str | None,
        typer.Option(
            "--layer-base",
            help="block: key N is added after block N (llama.cpp, repeng). hidden-states: "
            "key N is Hugging Face hidden_states[N] (0 = embeddings). Default: detect.",
        ),
    ] = None,
    shift: Annotated[
        int, typer.Option("--shift", help="Add this to every block (-1 for cvector-generator).")
    ] = 0,
    model: ModelCheckOpt = None,
    model_hint: Annotated[
        str | None,
        typer.Option("--model-hint", help="The architecture it is for (e.g. llama); metadata."),
    ] = None,
    source_note: Annotated[str | None, typer.Option("--source", help="Where it came from.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="How it was made.")] = None,
    scale_rule: Annotated[
        str | None,
        typer.Option("--scale-rule", help="How strength 1 was set (e.g. calibrated); metadata."),
    ] = None,
    layers: LayersKeepOpt = None,
) -> None:
    """Convert a control vector between formats, with explicit layer numbering."""
    from .. import convert

    convert.check_output(output)  # before the input's notes
    shape = model_files.model_shape(model_file(model)) if model else None
    relabel = convert.Relabel(layers, model_hint, source_note, method, scale_rule)
    vector, notes = convert.convert(
        source, layer_base=layer_base, shift=shift, shape=shape, relabel=relabel
    )
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    convert.save(vector, output)
    out.print(f"wrote {output}: {_summary(vector)}", markup=False)


@app.command("list")
@clean_errors
def list_command(as_json: JsonOpt = False) -> None:
    """The vectors in the store, with model, concept, layers and size."""
    rows = [_row(path) for path in store.stored_vectors()]
    if as_json:
        out.print(json.dumps(rows, indent=2), markup=False)
        return
    if not rows:
        err.print(f"no vectors stored in {store.vectors_dir()}", markup=False)
        return
    from rich.table import Table
    from rich.text import Text

    columns = ("name", "model", "concept", "layers", "recommended", "size")
    table = Table(*columns, box=None, header_style="bold")
    for row in rows:
        strengths = row.get("recommended")
        span = f"{strengths[0]:+g} .. {strengths[1]:+g}" if strengths else ""
        named = (Text(inert(str(row[c]), lines=False)) for c in columns[:4])  # not markup
        table.add_row(*named, span, size_text(row["size_bytes"]))
    out.print(table)
    for row in rows:
        if "error" in row:
            err.print(f"{row['path']}: {row['error']}", markup=False)


def _row(path: Path) -> dict:
    """One stored file for `list`; a damaged one is listed with its error, not skipped."""
    row: dict[str, Any] = {"name": path.stem, "path": str(path), "size_bytes": 0}
    shared = path.parent == store.vectors_dir()
    from .. import vectors
    from ..vectors import Key

    try:
        row["size_bytes"] = path.stat().st_size
        vector = vectors.read(path)
    except (EdgeSteerError, OSError) as exc:  # OSError: a link to nowhere
        error = str(exc) if isinstance(exc, EdgeSteerError) else f"unreadable ({exc.strerror})"
        return row | {"model": "?", "concept": "", "layers": "", "error": error}
    meta = vector.metadata
    model = "any" if shared else str(meta.get(Key.MODEL_NAME) or path.parent.name)
    return row | {
        "model": model,
        "model_fingerprint": None if shared else path.parent.name,
        "concept": str(meta.get(Key.CONCEPT, "")),
        "layers": vectors.block_span(vector.layers),
        "n_embd": vector.n_embd,
        "method": meta.get(Key.METHOD),
        "recommended": _recommended(vector),
    }


@app.command("info")
@clean_errors
def info_command(
    name: Annotated[str, typer.Argument(help="A .gguf/.npz path or a stored vector's name.")],
    model: ModelCheckOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Metadata and per-layer norms of one vector."""
    import numpy as np

    from ..vectors import Key

    path = _one(name, model)
    vector = _load(path)
    if model:
        _check_against(model, vector, str(path))
    norms = {
        n: float(np.linalg.norm(vector.directions[n].astype(np.float64))) for n in vector.layers
    }
    if as_json:
        doc = {
            "path": str(path),
            "model_hint": vector.model_hint,
            "n_embd": vector.n_embd,
            "recommended": _recommended(vector),
            "metadata": vector.metadata,
            "norms": norms,
        }
        out.print(json.dumps(doc, indent=2), markup=False)
        return
    out.print(f"[bold]{escape(str(path))}[/]")
    out.print(f"  {_summary(vector)}", markup=False)
    if strengths := _recommended(vector):
        verdict = vector.metadata.get(Key.EVAL_VERDICT, "")
        span = f"{strengths[0]:+g} .. {strengths[1]:+g}"
        out.print(f"  recommended strength {span} ({verdict})", markup=False)
    for key, value in sorted(vector.metadata.items()):
        out.print(f"  {inert(key, lines=False)}: {inert(str(value), lines=False)}", markup=False)
    out.print("  per-block norms:")
    top = max(norms.values()) or 1.0
    for layer, norm in norms.items():
        bar = "█" * max(1, round(30 * norm / top)) if norm else ""
        out.print(f"  {layer:>4} {bar:<30} {norm:.4g}", markup=False)


def _one(name: str, model: str | None) -> Path:
    found = _find(name, model)
    if len(found) > 1:
        places = ", ".join(str(p.parent.name) for p in found)
        raise BadInput(
            f"{len(found)} stored vectors are named {name!r} (models {places}): "
            "pass --model or a path"
        )
    return found[0]


def _load(path: Path):
    """Our GGUF as it is; anything else through the converter (block numbering assumed)."""
    from .. import convert, vectors

    return vectors.read(path) if path.suffix == ".gguf" else convert.load(path)[0]


def _find(name: str, model: str | None) -> list[Path]:
    if files.looks_like_path(name) and Path(name).expanduser().is_file():
        return [Path(name).expanduser()]
    return store.find_vectors(name, model_file(model) if model else None)


@app.command("rm")
@clean_errors
def rm_command(
    names: Annotated[list[str], typer.Argument(help="Stored vector names or store paths.")],
    model: ModelCheckOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete stored vectors (every model's copy unless --model); asks first unless --yes."""
    doomed = list(dict.fromkeys(path for name in names for path in _find(name, model)))
    outside = [p for p in doomed if not store.is_stored(p)]
    if outside:
        raise BadInput(
            f"{outside[0]} is not in the store {store.vectors_dir()}: delete it yourself"
        )
    if folders := [p for p in doomed if p.is_dir()]:  # checked before any file goes
        raise BadInput(f"{folders[0]} is a folder, not a vector: delete it yourself")
    if others := [p for p in doomed if p.suffix.lower() != ".gguf"]:
        raise BadInput(f"{others[0]} is not a stored vector (.gguf): delete it yourself")
    if not yes:
        _confirm_delete(doomed)
    for path in doomed:
        path.unlink()
        out.print(f"deleted {path}", markup=False)


def _confirm_delete(doomed: list) -> None:
    """Ask on a terminal; elsewhere (a script, a pipe) refuse rather than guess."""
    if not sys.stdin.isatty():
        raise BadInput(
            f"this would delete {len(doomed)} file(s), {', '.join(map(str, doomed))} "
            "(eval results included): add --yes to delete without asking"
        )
    for path in doomed:
        out.print(f"  {path}", markup=False)
    if not typer.confirm(f"Delete these {len(doomed)} file(s)?", default=False):
        raise typer.Exit(1)


class _ExpressionCommand(TyperCommand):
    """`mix "-happy"` would read as options -h -a ...: say how to pass a leading minus."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: typer may vendor click
        options = [p for p in self.get_params(ctx) if p.param_type_name == "option"]
        takes_value = {o: not getattr(p, "is_flag", False) for p in options for o in p.opts}
        # "-mixa" is "-m ixa": fine, unless the expression then goes missing
        bundled: list[str] = []
        words = iter(args)
        for word in words:
            if word == "--":
                break
            if word[:1] == "-" and word[1:2] not in ("", "-") and word not in takes_value:
                if not takes_value.get(word[:2]):  # -ox.gguf is -o x.gguf
                    raise _leading_minus(f"{word!r} reads as options", word, ctx)
                bundled.append(word)
            if takes_value.get(word):
                next(words, None)
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as error:  # MissingParameter, from whichever click typer uses
            if bundled and type(error).__name__ == "MissingParameter":
                word = bundled[0]
                raise _leading_minus(
                    f"missing: {word!r} reads as {word[:2]} {word[2:]}", word, ctx
                ) from None
            raise


def _leading_minus(problem: str, word: str, ctx: Any) -> typer.BadParameter:
    return typer.BadParameter(
        f'{problem}: if it is the expression, start it with a space (" {word}"), '
        'or put it last, after "--"',
        ctx=ctx,
        param_hint="EXPRESSION",
    )


@app.command("mix", cls=_ExpressionCommand)
@clean_errors
def mix_command(
    expression: Annotated[str, typer.Argument(help='e.g. "happy*0.5 + lazy*-1"')],
    output: OutputOpt,
    model: ModelCheckOpt = None,
) -> None:
    """Write the weighted sum of vectors (all made for one model) as a new vector."""
    from .. import convert, vectors

    terms = vectors.parse_mix(expression)
    weighted = [(name, _load(_one(name, model)), weight) for name, weight in terms]
    mixed = vectors.mix(weighted)
    if model:
        mixed.model_hint = mixed.model_hint or _check_against(model, mixed, expression)
    convert.save(mixed, output)
    out.print(f"wrote {output}: {_summary(mixed)}", markup=False)


def _check_against(model: str, vector, label: str) -> str:
    """--model: the vector must fit its blocks and width; returns its architecture."""
    from .. import vectors

    shape = model_files.model_shape(model_file(model))
    vectors.check_fits(vector, shape.n_layer, shape.n_embd, label)
    return shape.architecture


def _recommended(vector) -> list[float] | None:
    """The strength range `edge-steer eval` stored in the file, if it was evaluated."""
    from ..vectors import recommended_range

    found = recommended_range(vector)
    return list(found) if found else None


def _summary(vector) -> str:
    from ..vectors import block_span

    hint = f"for {inert(vector.model_hint, lines=False)}, " if vector.model_hint else ""
    return f"{hint}blocks {block_span(vector.layers)}, n_embd {vector.n_embd}"


def register(parent: typer.Typer) -> None:
    app.command("ls", hidden=True)(list_command)
    parent.add_typer(app, name="vectors")
