"""`edge-steer generate` and `edge-steer chat`: steered text, once or as a conversation."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import BadInput
from .options import (
    LOAD,
    SAMPLING,
    STEER,
    JsonOpt,
    check_max_tokens,
    clean_errors,
    load_steered,
    note_full_context,
    print_json,
    progress_bar,
    sampler_settings,
    stream,
    with_options,
)

if TYPE_CHECKING:
    from ..engine import GenerationStats


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)


@clean_errors
@with_options(LOAD, STEER, SAMPLING)
def generate(
    text: Annotated[
        str | None,
        typer.Argument(help="Text to continue (or -p, or piped in).", show_default=False),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Text to continue; - reads stdin.")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")
    ] = 256,
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Continue a text (plain completion, what base models want)."""
    from ..engine import Sampler

    prompt = _given_prompt(text, prompt)
    if prompt is None:
        raise BadInput(
            "no prompt: give one as an argument (edge-steer generate 'Once upon a time'), "
            "with -p TEXT, or pipe it in"
        )
    if not prompt.strip():
        raise BadInput("the prompt is empty: give some text to continue")
    if opts.layers is not None and not opts.vector:
        raise BadInput("--layers picks the blocks that --vector steers, and no --vector is given")
    check_max_tokens(max_tokens)
    steered = load_steered(opts)
    sampler = Sampler(steered.model, sampler_settings(opts))
    start = time.perf_counter()
    tokens = steered.context.prompt_tokens(prompt)
    pieces = steered.context.generate(tokens, sampler, max_tokens=max_tokens)
    text = stream(pieces, as_json)
    note_full_context(pieces.stats, steered.context.n_ctx)
    if as_json:
        print_json(_result(steered, prompt, text, pieces.stats, time.perf_counter() - start))


@clean_errors
@with_options(LOAD, STEER, SAMPLING)
def chat(
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this once and exit; - reads stdin."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens per reply.")
    ] = 512,
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Chat with a model, steered by control vectors that you can change live."""
    from ..chat import ChatSession
    from .repl import repl

    prompt = _stdin_prompt() if prompt == "-" else prompt  # else piped lines are messages
    if prompt is not None and not prompt.strip():
        raise BadInput("-p is empty: give the message to send, or leave -p out to chat")
    if prompt is None and as_json:
        raise BadInput("--json prints one answer: give the message with -p TEXT (-p - reads stdin)")
    check_max_tokens(max_tokens)
    with progress_bar() as progress:  # vectors trained later, by /vector, report here too
        steered = load_steered(opts, progress)
        session = ChatSession(
            steered.context, steered.steering, sampler_settings(opts), system, max_tokens
        )
        if prompt is None:
            repl(session, progress)
            return
    start = time.perf_counter()
    text = stream(session.reply(prompt), as_json).strip()
    note_full_context(session.last_stats, steered.context.n_ctx)
    if as_json:
        print_json(_result(steered, prompt, text, session.last_stats, time.perf_counter() - start))


def _given_prompt(argument: str | None, option: str | None) -> str | None:
    """The prompt from the argument or -p (`-` meaning stdin), else from stdin when it is
    piped; None on a terminal with neither."""
    if argument is not None and option is not None:
        raise BadInput("give the prompt once: as an argument or with -p, not both")
    given = argument if argument is not None else option
    if given == "-" or (given is None and not sys.stdin.isatty()):
        return _stdin_prompt()
    return given


def _stdin_prompt() -> str:
    piped = sys.stdin.read()
    if not piped.strip():
        raise BadInput("the prompt read from stdin is empty: pipe some text in, or use -p")
    return piped.rstrip("\n")


def _result(steered, prompt: str, text: str, stats: GenerationStats, seconds: float) -> dict:
    layers = steered.steering.layers
    return {
        "model": str(steered.model.path),
        "vectors": steered.steering.strengths(),
        "layers": list(layers) if layers else None,
        "prompt": prompt,
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated,
        "stop_reason": stats.stop_reason,  # stop, length or context
        "tokens_per_second": round(stats.generated / stats.seconds, 2) if stats.seconds else None,
        "seconds": round(seconds, 3),
    }
