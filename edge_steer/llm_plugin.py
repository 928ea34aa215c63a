"""An `llm` plugin: edge-steer's catalog models, steered, inside Simon Willison's `llm`.

`llm -m edge-steer/demo-chat -o vector happy:1 "Hi"`: llm brings its logs, conversations
(`-c`), templates, aliases and `llm chat`; edge-steer brings the model and its vectors. One
model and context per (file, context size) stay loaded for the process, so `llm chat` does
not reload between turns, and a conversation's cached prefix is reused as in `edge-steer chat`.

Registered through the `llm` entry point in pyproject.toml; `llm` itself is not a dependency
of edge-steer, so nothing else imports this module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import llm
from pydantic import Field, field_validator

from .constants import DEFAULT_CTX
from .errors import EdgeSteerError

PREFIX = "edge-steer/"
_loaded: dict[tuple[str, int], Any] = {}  # (model name, ctx) -> runtime.Steered


@llm.hookimpl
def register_models(register) -> None:
    from . import catalog

    for entry in catalog.entries():
        register(SteeredModel(catalog.short_name(entry)))


class SteeredModel(llm.Model):
    """One catalog model; vectors and sampling come as `-o` options on each prompt."""

    can_stream = True

    class Options(llm.Options):
        vector: str | None = Field(
            default=None,
            description="Vectors as `edge-steer chat --vector` takes them: happy:1,lazy:-0.5",
        )
        layers: str | None = Field(default=None, description="Steer only blocks A-B")
        temperature: float | None = Field(default=None, description="0 is greedy (0.8)")
        top_k: int | None = Field(default=None, description="llama.cpp's top-k (40)")
        top_p: float | None = Field(default=None, description="llama.cpp's top-p (0.95)")
        min_p: float | None = Field(default=None, description="llama.cpp's min-p (0.05)")
        repeat_penalty: float | None = Field(default=None, description="1.0 is off")
        seed: int | None = Field(default=None, description="Sampling seed")
        max_tokens: int = Field(default=512, description="Most tokens in the reply", ge=1)
        ctx: int = Field(default=DEFAULT_CTX, description="Context size in tokens", ge=16)

        @field_validator("vector")
        @classmethod
        def _vector_spec(cls, value: str | None) -> str | None:
            from . import vectors

            if value:
                try:
                    vectors.check_strengths(vectors.spec_strengths([value]))
                except EdgeSteerError as exc:
                    raise ValueError(str(exc)) from None
            return value

    def __init__(self, name: str):
        self.name = name
        self.model_id = PREFIX + name

    def __str__(self) -> str:
        return f"edge-steer: {self.model_id}"

    def execute(self, prompt, stream, response, conversation) -> Iterator[str]:
        """The reply to `prompt` after the conversation so far, steered as its options say."""
        try:
            yield from self._reply(prompt, response)
        except EdgeSteerError as exc:
            raise llm.ModelError(str(exc)) from None

    def _reply(self, prompt, response) -> Iterator[str]:
        from .chat import ChatSession

        options = prompt.options
        steered = _steered(self.name, options.ctx)
        steered.steering.layers = _layers(options.layers, steered.model.n_layer)
        _set_vectors(steered, options.vector)
        system, history, message = _turns(prompt.messages)
        session = ChatSession(
            steered.context,
            steered.steering,
            _sampling(options),
            system,
            options.max_tokens,
            messages=history,
        )
        yield from session.reply(message)
        stats = steered.context.stats
        response.set_usage(input=stats.prompt_tokens, output=stats.generated)


def _steered(name: str, ctx: int):
    """The model and context for (name, ctx), loaded on first use and kept."""
    if (name, ctx) not in _loaded:
        from . import runtime

        _loaded[(name, ctx)] = runtime.load_from(
            runtime.LoadOptions(model=name, ctx=ctx), on_note=_note, on_progress=_progress
        )
    return _loaded[(name, ctx)]


def _layers(text: str | None, n_layer: int) -> tuple[int, int] | None:
    from .steering import parse_layers

    return parse_layers(text, n_layer)


def _set_vectors(steered, spec: str | None) -> None:
    """Make the session's vectors exactly `spec` (built-in concepts train on first use)."""
    from . import vectors

    wanted = vectors.spec_strengths([spec]) if spec else {}
    for name in set(steered.steering.strengths()) - set(wanted):
        steered.steering.set(name, 0)
    for name, strength in wanted.items():
        steered.steering.set(name, strength)


def _sampling(options):
    """SamplerSettings from the options given; llama.cpp's defaults for the rest."""
    from .engine import SAMPLING_LIMITS, SamplerSettings, out_of_range
    from .errors import BadInput

    names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
    given = {n: getattr(options, n) for n in names if getattr(options, n) is not None}
    settings = SamplerSettings(**given)
    if bad := out_of_range(settings):
        low, high = SAMPLING_LIMITS[bad]
        value = getattr(settings, bad)
        raise BadInput(f"-o {bad} {value} is out of range: use {low:g} to {high:g}")
    return settings


def _turns(chain) -> tuple[str | None, list[dict[str, str]], str]:
    """llm's whole chain for this turn (`prompt.messages`: system, earlier turns of `-c` or
    `llm chat`, this prompt) as the system prompt, the history, and the message to answer."""
    system, history = None, []
    for message in chain:
        text = "".join(getattr(part, "text", None) or "" for part in message.parts)
        if message.role == "system":
            system = text
        elif message.role in ("user", "assistant"):
            history.append({"role": message.role, "content": text})
    last = history.pop() if history and history[-1]["role"] == "user" else {"content": ""}
    return system, history, last["content"]


def _note(message: str) -> None:
    print(f"edge-steer: {message}", file=sys.stderr)


def _progress(label: str, done: int, total: int) -> None:
    """Training on first use: a line as each stage starts and ends (llm owns the terminal)."""
    if done == 0:
        _note(f"{label} ...")
    elif done >= total:
        _note(f"{label}: done")
