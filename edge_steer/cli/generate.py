"""`edge-steer generate` and `edge-steer chat`: steered text, once or as a conversation."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .options import (
    LOAD,
    SAMPLING,
    STEER,
    JsonOpt,
    check_max_tokens,
    clean_errors,
    load_steered,
    print_json,
    sampler_settings,
    stream,
    with_options,
)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)


@clean_errors
@with_options(LOAD, STEER, SAMPLING)
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")
    ] = 256,
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Continue a text (plain completion, what base models want)."""
    from ..engine import Sampler

    check_max_tokens(max_tokens)
    steered = load_steered(opts)
    sampler = Sampler(steered.model, sampler_settings(opts))
    start = time.perf_counter()
    tokens = steered.model.tokenize(prompt)
    text = stream(steered.context.generate(tokens, sampler, max_tokens=max_tokens), as_json)
    if as_json:
        print_json(_result(steered, prompt, text, time.perf_counter() - start))


@clean_errors
@with_options(LOAD, STEER, SAMPLING)
def chat(
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer this once and exit.")
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

    check_max_tokens(max_tokens)
    steered = load_steered(opts)
    session = ChatSession(
        steered.context, steered.steering, sampler_settings(opts), system, max_tokens
    )
    if prompt is None:
        repl(session)
        return
    start = time.perf_counter()
    text = stream(session.reply(prompt), as_json).strip()
    if as_json:
        print_json(_result(steered, prompt, text, time.perf_counter() - start))


def _result(steered, prompt: str, text: str, seconds: float) -> dict:
    stats, layers = steered.context.stats, steered.steering.layers
    return {
        "model": str(steered.model.path),
        "vectors": steered.steering.strengths(),
        "layers": list(layers) if layers else None,
        "prompt": prompt,
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated,
        "tokens_per_second": round(stats.generated / stats.seconds, 2) if stats.seconds else None,
        "seconds": round(seconds, 3),
    }
