"""What every command shares: consoles, option types, error handling, loading.

Commands import from here and from the library, never from each other. Heavy modules (the
engine, numpy, huggingface_hub) are imported inside functions, so `--help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from ..constants import DEFAULT_CTX, RPC_ENV
from ..errors import BadInput, EdgeSteerError
from .console import err, out
from .progress import StepProgress, progress_bar

if TYPE_CHECKING:
    from ..engine import GenerationStats

F = TypeVar("F", bound=Callable)


def print_error(exc: EdgeSteerError) -> None:
    """One red line on stderr: the error's own message, naming the problem and the fix."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}")


def fail(exc: EdgeSteerError) -> typer.Exit:
    """Print `exc`; the exit that goes with its class (see errors.py)."""
    print_error(exc)
    return typer.Exit(exc.exit_code)


def clean_errors(func: F) -> F:
    """Our errors -> one red line on stderr and the class's exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgeSteerError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def note(message: str) -> None:
    """A dim line on stderr: what `auto` chose, what is being downloaded."""
    err.print(f"[dim]{escape(message)}[/]")


def complete_models(incomplete: str) -> list[str]:
    """Shell completion for --model: the catalog's names (files complete as files)."""
    from .. import catalog

    names = [catalog.short_name(entry) for entry in catalog.entries()]
    return [name for name in names if name.startswith(incomplete)]


def complete_vectors(incomplete: str) -> list[str]:
    """Shell completion for --vector: built-in concepts and vectors in the store."""
    from .. import dataset, store

    done, comma, last = incomplete.rpartition(",")  # `lazy:-1,ha` completes the last one
    names = set(dataset.builtin_names()) | {path.stem for path in store.stored_vectors()}
    return sorted(done + comma + name for name in names if name.startswith(last))


# -- options shared by several commands -----------------------------------------------------

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Catalog name (mistral:q4_k_m, mixtral:q3_k_m, demo: `edge-steer models list`), "
        "hf:REPO/FILE, or a GGUF path. Downloaded on first use. "
        "Default: $EDGE_STEER_MODEL, else mistral:q4_k_m.",
        show_default=False,
        autocompletion=complete_models,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object.")]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Steer only blocks A-B (inclusive, as direction.N).")
]
RetrainOpt = Annotated[
    bool, typer.Option("--retrain", help="Train built-in concept vectors again, even if stored.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", "-t", help="CPU threads (default: one per physical core)."),
]


RpcOpt = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        help="HOST:PORT[,HOST:PORT...] of `edge-steer worker`s whose devices take layers "
        f"like GPUs (no authentication: trusted networks only). Default: ${RPC_ENV}.",
        show_default=False,
    ),
]


def _group(**params: tuple[Any, Any]) -> dict[str, tuple[Any, Any]]:
    return params


# name -> (annotation, default); commands take them through `with_options`
LOAD = _group(
    model=(ModelOpt, None),
    threads=(ThreadsOpt, None),
    gpu_layers=(
        Annotated[
            str | None,
            typer.Option(
                "--gpu-layers", "-ngl", help="Layers on the GPU: N, all or auto (default: auto)."
            ),
        ],
        None,
    ),
    moe_offload=(
        Annotated[
            str | None,
            typer.Option(
                "--moe-offload",
                help="MoE experts kept in CPU RAM: none, all, N (first N layers) or auto "
                "(default).",
            ),
        ],
        None,
    ),
    force=(
        Annotated[
            bool, typer.Option("--force", help="Go ahead even if RAM or disk looks too small.")
        ],
        False,
    ),
    rpc=(RpcOpt, None),
)
STEER = _group(
    vector=(
        Annotated[
            list[str],
            typer.Option(
                "--vector",
                "-v",
                help="NAME_OR_PATH[:STRENGTH], repeatable or comma-separated.",
                autocompletion=complete_vectors,
            ),
        ],
        [],
    ),
    layers=(LayersOpt, None),
    retrain=(RetrainOpt, False),
    ctx=(Annotated[int, typer.Option("--ctx", "-c", help="Context size in tokens.")], DEFAULT_CTX),
)
# llama.cpp's own defaults (llama-cli / llama-completion), so that `--temp 0` gives their tokens
SAMPLING = _group(
    temp=(Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")], 0.8),
    top_k=(Annotated[int, typer.Option("--top-k", help="0 = off.")], 40),
    top_p=(Annotated[float, typer.Option("--top-p", help="1.0 = off.")], 0.95),
    min_p=(Annotated[float, typer.Option("--min-p", help="0.0 = off.")], 0.05),
    repeat_penalty=(
        Annotated[float, typer.Option("--repeat-penalty", help="1.0 = off.")],
        1.0,
    ),
    repeat_last_n=(
        Annotated[int, typer.Option("--repeat-last-n", help="Tokens the penalty looks back.")],
        64,
    ),
    seed=(
        Annotated[
            int | None, typer.Option("--seed", "-s", help="Sampling seed (default: random).")
        ],
        None,
    ),
)


def with_options(*groups: dict[str, tuple[Any, Any]]) -> Callable[[F], F]:
    """Add shared option groups to a command: Typer sees them as the command's own options,
    the command receives them together as `opts` (one list of options, no copies per command)."""
    names = [name for group in groups for name in group]

    def decorate(func: F) -> F:
        hints = typing.get_type_hints(func, include_extras=True)  # in func's own module
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "opts"
        ]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=dflt)
            for group in groups
            for name, (ann, dflt) in group.items()
        ]

        @functools.wraps(func)
        def wrapper(**kwargs):
            opts = SimpleNamespace(**{name: kwargs.pop(name) for name in names})
            check_shared(opts)
            return func(**kwargs, opts=opts)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the new signature, not the original
        return wrapper  # type: ignore[return-value]

    return decorate


def check_shared(opts: SimpleNamespace) -> None:
    """The shared options a command was given, checked before anything loads: a wrong
    number is one line and exit 2 up front, not a crash or a silent no-op minutes later."""
    from .. import runtime, store, vectors

    if hasattr(opts, "threads"):
        runtime.check_threads(opts.threads)
    if hasattr(opts, "ctx"):
        runtime.check_ctx(opts.ctx)
    if hasattr(opts, "vector"):
        for spec in opts.vector:
            _refuse_odd_file_name(spec)
        strengths = vectors.spec_strengths(opts.vector)
        for name in strengths:
            store.check_name_or_path(name)
        vectors.check_strengths(strengths)
    if hasattr(opts, "temp"):
        sampler_settings(opts)


def check_files_named(**given: str | None) -> None:
    """File options given as "" (an unset shell variable) are a slip, not a wish for none:
    check_files_named(plot=...) refuses `--plot ''`, which wrote no plot and exited 0."""
    for name, value in given.items():
        if value is not None and not value.strip():
            flag = "--" + name.replace("_", "-")
            raise BadInput(f"{flag} is empty: name a file, or leave {flag} out")


def _refuse_odd_file_name(spec: str) -> None:
    """A vector file whose name holds a spec's own punctuation (`:` sets the strength, `,`
    separates vectors) cannot be named in --vector: say so, where the spec's error would send
    the user looking for a typo."""
    text = spec.strip()
    for candidate in (text, text.rpartition(":")[0]):
        marks = [mark for mark in ":," if mark in candidate]
        if marks and _is_file(candidate):
            raise BadInput(
                f"--vector {candidate}: a file whose name holds {marks[0]!r} cannot be given "
                "here (':' sets the strength, ',' separates vectors): rename it, or link it "
                "under another name"
            )


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, RuntimeError):  # a name too long for a path; no home for ~user
        return False


_SAMPLING_FLAGS = {
    "temperature": "--temp",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n",
    "seed": "--seed",
}


def sampler_settings(opts: SimpleNamespace):
    """SamplerSettings from the SAMPLING options, each checked against the engine's limits."""
    from ..engine import SamplerSettings, out_of_range, range_text

    settings = SamplerSettings(
        temperature=opts.temp,
        top_k=opts.top_k,
        top_p=opts.top_p,
        min_p=opts.min_p,
        repeat_penalty=opts.repeat_penalty,
        repeat_last_n=opts.repeat_last_n,
        seed=opts.seed,
    )
    if bad := out_of_range(settings):
        raise BadInput(
            f"{_SAMPLING_FLAGS[bad]} {getattr(settings, bad)} is out of range: "
            f"use {range_text(bad)}"
        )
    return settings


def check_max_tokens(max_tokens: int) -> None:
    if max_tokens < 1:
        raise BadInput(
            f"--max-tokens {max_tokens} is out of range: use 1 or more "
            "(generation also stops at the end of the context)"
        )


def model_file(model: str | None, **options: Any):
    """model_files.resolve_model, telling the user on stderr what it downloads, with a
    progress bar."""
    from .. import model_files
    from .download_bar import RichBar

    return model_files.resolve_model(model, say=note, tqdm_class=RichBar, **options)


def load_options(opts: SimpleNamespace, ctx: int | None = None):
    """The LOAD options (and --ctx, unless `ctx` is given) as runtime's one LoadOptions value.
    No --rpc reads $EDGE_STEER_RPC (so its errors name it); an empty one means none."""
    from ..runtime import LoadOptions

    return LoadOptions(
        model=opts.model,
        ctx=ctx if ctx is not None else getattr(opts, "ctx", DEFAULT_CTX),
        threads=opts.threads,
        gpu_layers=opts.gpu_layers,
        moe_offload=opts.moe_offload,
        force=opts.force,
        rpc=opts.rpc,
    )


def load_model(opts: SimpleNamespace, ctx: int):
    """runtime.load_model_from for the LOAD options, with notes and download bars on stderr."""
    from .. import runtime
    from .download_bar import RichBar

    return runtime.load_model_from(load_options(opts, ctx), on_note=note, download_bar=RichBar)


def load_steered(opts: SimpleNamespace, progress: StepProgress | None = None):
    """runtime.load_from for the LOAD and STEER options: model, context and steering, with
    notes, download bars and training progress on stderr. Vectors trained later (a chat's
    /vector) report to `progress` too, so a caller that lives on passes its own."""
    from .. import runtime
    from .download_bar import RichBar

    with progress_bar() as own_progress:
        return runtime.load_from(
            load_options(opts),
            vectors=opts.vector,
            layers=opts.layers,
            retrain=opts.retrain,
            on_note=note,
            on_progress=progress or own_progress,
            download_bar=RichBar,
        )


def print_json(data: object) -> None:
    import json

    print(json.dumps(data))


def note_full_context(stats: GenerationStats, n_ctx: int) -> None:
    """An answer cut off by the context, not by -n, says so (it looked finished)."""
    if stats.stop_reason == "context":
        note(f"stopped: the context ({n_ctx} tokens) is full; raise --ctx for a longer answer")


def stream(pieces: Iterable[str], quiet: bool) -> str:
    """Print text pieces as they come (unless `quiet`), as the model wrote them: a Text is
    neither markup nor a label to neutralise (see console.inert); return the whole text."""
    from rich.text import Text

    text = []
    for piece in pieces:
        text.append(piece)
        if not quiet:
            out.print(Text(piece), end="")
    if not quiet:
        out.print()
    return "".join(text)
