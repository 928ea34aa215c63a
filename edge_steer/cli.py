"""The `edge-steer` command line: parse, call one function, render with rich."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from . import catalog
from .errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Steer local GGUF language models with control vectors, natively in llama.cpp.",
    pretty_exceptions_show_locals=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable)


def clean_errors(func: F) -> F:
    """Bad input -> one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Catalog name (mistral:q4_k_m, mixtral:q3_k_m, demo: `edge-steer models list`), "
        "hf:REPO/FILE, or a GGUF path. Downloaded on first use.",
    ),
]
DEFAULT_MODEL = catalog.default_name()
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Go ahead even if RAM or disk looks too small.")
]
VectorOpt = Annotated[
    list[str],
    typer.Option("--vector", "-v", help="NAME_OR_PATH[:STRENGTH], repeatable or comma-separated."),
]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Steer only blocks A-B (inclusive, as direction.N).")
]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context size in tokens.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all).")]
GpuOpt = Annotated[
    str | None,
    typer.Option("--gpu-layers", help="Layers on the GPU: N, all or auto (default: auto)."),
]
MoeOpt = Annotated[
    str | None,
    typer.Option(
        "--moe-offload",
        help="MoE experts kept in CPU RAM: none, all, N (first N layers) or auto (default).",
    ),
]
TempOpt = Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k")]
MinPOpt = Annotated[float, typer.Option("--min-p")]
RepeatOpt = Annotated[float, typer.Option("--repeat-penalty")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling seed (default: random).")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
RetrainOpt = Annotated[
    bool, typer.Option("--retrain", help="Train built-in concept vectors again, even if stored.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object.")]


def _settings(temp, top_p, top_k, min_p, repeat, seed):
    from .engine import SamplerSettings

    return SamplerSettings(temp, top_k, top_p, min_p, repeat, seed=seed)


def _load_model(model: str, gpu_layers: str | None, moe_offload: str | None, n_ctx: int, force):
    """Resolve the model (downloading it on first use), split it between GPU and CPU memory
    (saying what `auto` chose and, from llama.cpp's load log, where the weights went), load it."""
    from . import cli_models, hardware
    from .engine import Model

    use_gpu = hardware.parse_gpu_layers(gpu_layers) != 0
    path = cli_models.resolve(model, use_gpu=use_gpu, force=force, ctx=n_ctx)
    plan = hardware.plan_model(path, gpu_layers, moe_offload, n_ctx)
    for note in plan.notes:
        err.print(note, style="dim")
    loaded = Model(path, gpu_layers=plan.gpu_layers, cpu_tensors=plan.cpu_tensors)
    if plan.cpu_tensors or plan.gpu_bytes:
        buffers = loaded.buffers.items()
        where = ", ".join(f"{name} {hardware.size_text(size)}" for name, size in buffers)
        kept = len(loaded.overridden)
        err.print(f"weights: {where}; {kept} tensors kept in CPU memory", style="dim")
    return loaded


def _open(model, ctx, threads, gpu_layers, moe_offload, specs, layers, retrain, force):
    """Load the model, make a generation context, load and apply the vectors (training
    built-in concepts that this model has no stored vector for yet)."""
    from . import steering
    from .engine import Context

    if ctx < 16:
        raise UserError(f"--ctx {ctx} is too small: use at least 16 tokens")
    loaded = _load_model(model, gpu_layers, moe_offload, ctx, force)
    steer = steering.build(loaded, specs, layers, lambda name: _vector_file(loaded, name, retrain))
    context = Context(loaded, n_ctx=ctx, threads=threads)
    steer.apply(context)
    return loaded, context, steer


def _vector_file(model, name: str, retrain: bool):
    """The file of vector `name` for `model`: stored, or (a built-in concept this model has
    none of yet, or --retrain) trained now behind a progress bar."""
    from . import library

    with _progress(f"training {name!r} on {model.name}") as progress:
        return library.resolve(model, name, retrain=retrain, progress=progress)


@contextlib.contextmanager
def _progress(label: str):
    """A rich progress bar with ETA on stderr, shown only once something reports progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done)

    try:
        yield update
    finally:
        bar.stop()
        if task is not None:
            err.print(f"[dim]{label}: done[/]")


def _stream(pieces: Iterable[str], quiet: bool) -> str:
    text = []
    for piece in pieces:
        text.append(piece)
        if not quiet:
            out.print(piece, end="", markup=False)
    if not quiet:
        out.print()
    return "".join(text)


def _result(context, steer, prompt: str, text: str, seconds: float) -> dict:
    stats = context.stats
    return {
        "model": str(context.model.path),
        "vectors": steer.strengths(),
        "layers": list(steer.layers) if steer.layers else None,
        "prompt": prompt,
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated,
        "tokens_per_second": round(stats.generated / stats.seconds, 2) if stats.seconds else None,
        "seconds": round(seconds, 3),
    }


@app.command()
@clean_errors
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    model: ModelOpt = DEFAULT_MODEL,
    vector: VectorOpt = [],  # noqa: B006 (typer needs a list default)
    layers: LayersOpt = None,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.1,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = 256,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = None,
    moe_offload: MoeOpt = None,
    retrain: RetrainOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a text (plain completion, what base models want)."""
    from .engine import Sampler

    _, context, steer = _open(
        model, ctx, threads, gpu_layers, moe_offload, vector, layers, retrain, force
    )
    sampler = Sampler(context.model, _settings(temp, top_p, top_k, min_p, repeat_penalty, seed))
    start = time.perf_counter()
    tokens = context.model.tokenize(prompt)
    text = _stream(context.generate(tokens, sampler, max_tokens=max_tokens), as_json)
    if as_json:
        print(json.dumps(_result(context, steer, prompt, text, time.perf_counter() - start)))


HELP = """[bold]/vector NAME STRENGTH[/]  set a vector live (0 removes it); history is re-evaluated
[bold]/vectors[/]               show the active vectors
[bold]/system TEXT[/]           set the system prompt (empty clears it)
[bold]/clear[/]                 forget the conversation
[bold]/help[/], [bold]/quit[/]   this help; leave (or Ctrl-D)
End a line with \\ to continue it, or wrap several lines in triple quotes (\"\"\").
Ctrl-C stops the current reply."""


@app.command()
@clean_errors
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    vector: VectorOpt = [],  # noqa: B006
    layers: LayersOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer this once and exit.")
    ] = None,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.1,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = 512,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = None,
    moe_offload: MoeOpt = None,
    retrain: RetrainOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Chat with a model, steered by control vectors that you can change live."""
    from .chat import ChatSession

    _, context, steer = _open(
        model, ctx, threads, gpu_layers, moe_offload, vector, layers, retrain, force
    )
    settings = _settings(temp, top_p, top_k, min_p, repeat_penalty, seed)
    session = ChatSession(context, steer, settings, system, max_tokens)
    if prompt is not None:
        start = time.perf_counter()
        text = _stream(session.reply(prompt), as_json).strip()
        if as_json:
            print(json.dumps(_result(context, steer, prompt, text, time.perf_counter() - start)))
        return
    _repl(session)


def _repl(session) -> None:
    from . import vectors

    name = session.ctx.model.name
    err.print(
        f"[dim]{name} · vectors: {vectors.describe(session.steering.strengths())}"
        " · /help for commands[/]"
    )
    while True:
        try:
            line = _read_message()
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print("\n[dim](/quit or Ctrl-D to leave)[/]")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(session, line.strip()):
                return
            continue
        try:
            _stream(session.reply(line), quiet=False)
        except KeyboardInterrupt:
            err.print("\n[dim][stopped][/]")


def _read_message() -> str:
    first = out.input("[bold green]>>> [/]")
    if first.strip() == '"""':
        lines = []
        while (line := out.input("[dim]... [/]")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(out.input("[dim]... [/]"))
    return "\n".join(lines)


def _command(session, line: str) -> bool:
    """Run one slash command; True means leave."""
    from . import evaluate, vectors

    word, _, rest = line.partition(" ")
    try:
        if word in ("/quit", "/exit", "/bye"):
            return True
        if word == "/help":
            err.print(HELP)
        elif word == "/vectors":
            layers = session.steering.layers
            span = f"{layers[0]}-{layers[1]}" if layers else "all"
            err.print(f"vectors: {vectors.describe(session.steering.strengths())} · layers {span}")
            for name, (vector, _) in session.steering.active.items():
                if note := evaluate.describe_range(vector):
                    err.print(f"  {name}: {note}", markup=False)
        elif word == "/vector":
            name, strength = _vector_args(rest)
            start = time.perf_counter()
            session.set_vector(name, strength)
            err.print(
                f"[dim]vectors: {vectors.describe(session.steering.strengths())} "
                f"(history re-evaluated in {time.perf_counter() - start:.2f}s)[/]"
            )
        elif word == "/system":
            session.set_system(rest.strip())
            err.print("[dim]system prompt " + ("set" if rest.strip() else "cleared") + "[/]")
        elif word == "/clear":
            session.clear()
            err.print("[dim]conversation cleared[/]")
        else:
            err.print(f"[red]unknown command {word}[/]: /help lists them")
    except UserError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
    return False


def _vector_args(rest: str) -> tuple[str, float]:
    parts = rest.split()
    if len(parts) != 2:
        raise UserError("usage: /vector NAME STRENGTH (e.g. /vector lazy -0.5; 0 removes it)")
    from . import vectors

    return vectors.parse_spec(f"{parts[0]}:{parts[1]}")


@app.command("train")
@clean_errors
def train_command(
    name: Annotated[str, typer.Argument(help="Concept name: built-in (lazy, happy, ...) or new.")],
    model: ModelOpt = DEFAULT_MODEL,
    positive: Annotated[
        str | None, typer.Option("--positive", help="Persona words, comma-separated.")
    ] = None,
    negative: Annotated[
        str | None, typer.Option("--negative", help="Opposite persona words, paired by position.")
    ] = None,
    pairs: Annotated[
        str | None, typer.Option("--pairs", help="JSONL of {positive, negative} prompts.")
    ] = None,
    method: Annotated[str, typer.Option("--method", help="pca-diff, pca-center or mean-diff.")] = (
        "pca-diff"
    ),
    layers: LayersOpt = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Also write the vector here (.gguf or .npz)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Shuffles the training pairs.")] = 0,
    limit: Annotated[
        int, typer.Option("--limit", help="Most persona x continuation pairs to train on.")
    ] = 128,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = None,
    moe_offload: MoeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a control vector on the model itself and store it for `--vector NAME`."""
    from . import convert, library, steering, train, vectors

    if method not in train.METHODS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(train.METHODS)}")
    loaded = _load_model(model, gpu_layers, moe_offload, train.TrainOptions.batch, force)
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
    options = train.TrainOptions(method=method, layers=span, threads=threads)
    start = time.perf_counter()
    with _progress(f"training {name!r} on {loaded.name} ({len(data)} pairs)") as progress:
        path = library.train_and_store(loaded, name, data, options, progress)
    err.print(f"[dim]trained in {time.perf_counter() - start:.1f}s[/]")
    out.print(f"stored {path}")
    if output:
        convert.save(vectors.read(path), output)
        out.print(f"wrote {output}")


def _register_subcommands() -> None:
    """Commands living in their own modules, which import the helpers above. Importing
    `cli_doctor` registers `doctor`, `cli_models` `pull` and `models`, `cli_eval` `eval`,
    `cli_bench` `bench`; `vectors` is a group."""
    from . import cli_bench, cli_doctor, cli_eval, cli_models, cli_vectors  # noqa: F401

    app.add_typer(cli_vectors.app, name="vectors")


_register_subcommands()


def main() -> None:
    app(prog_name="edge-steer")


if __name__ == "__main__":
    sys.exit(main())
