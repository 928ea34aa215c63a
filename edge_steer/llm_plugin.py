"""An `llm` plugin: edge-steer's catalog models, steered, inside Simon Willison's `llm`.

`llm -m edge-steer/demo-chat -o vector happy:1 "Hi"`: llm brings its logs, conversations
(`-c`, `llm chat`), templates and aliases; edge-steer brings the model, its chat template and
the vectors. Loaded models stay loaded for the process, so `llm chat` neither reloads nor
re-reads the conversation so far on each turn (the KV cache keeps its prefix).

Registered through the `llm` entry point in pyproject.toml. `llm` is not a dependency of
edge-steer: nothing else imports this module. Importing it stays cheap (no llama.cpp), since
llm loads every plugin for every command, `llm --help` included.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast, get_args

import llm
from pydantic import Field, ValidationInfo, field_validator

from .constants import DEFAULT_CTX
from .errors import EdgeSteerError

if TYPE_CHECKING:
    from .catalog import Entry
    from .engine import SamplerSettings
    from .runtime import Steered

PREFIX = "edge-steer/"
MAX_TOKENS = 512  # a reply's default length, as `edge-steer chat --max-tokens`
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
NUMBERS = (*SAMPLING, "max_tokens", "ctx")
# the CLI's words in edge-steer's messages, as an `llm` user writes them
FOR_LLM = {
    "--ctx": "-o ctx",
    "--model demo (demo-chat to chat)": "-m edge-steer/demo-chat",
    ", or pass --force to try anyway": "",
    ", or pass --force": "",
}

# (catalog name, context size) -> the loaded model and its context, for the whole process:
# llm makes new model objects on every `llm.get_model()`, so they cannot hold it.
_loaded: dict[tuple[str, int], Steered] = {}


@llm.hookimpl
def register_models(register) -> None:
    """One llm model per catalog entry; a model's name without a quant names its default."""
    from . import catalog

    for entry in catalog.entries():
        name = catalog.short_name(entry)
        register(SteeredModel(name), aliases=_aliases(name, entry))


def _aliases(name: str, entry: Entry) -> tuple[str, ...]:
    """`edge-steer/mistral` for `edge-steer/mistral:q4_k_m`, the default quant."""
    from . import catalog

    model, _, quant = name.partition(":")
    return (PREFIX + model,) if quant and catalog.lookup(model) == entry else ()


class SteeredModel(llm.Model):
    """One catalog model; its vectors and sampling come as `-o` options on each prompt."""

    can_stream = True

    class Options(llm.Options):
        vector: str | None = Field(
            default=None,
            description="Vectors and strengths as edge-steer's --vector: happy:1,lazy:-0.5",
        )
        layers: str | None = Field(
            default=None, description="Steer only blocks A-B, e.g. 4-12 (default all)"
        )
        temperature: float | None = Field(default=None, description="0 is greedy (default 0.8)")
        top_k: int | None = Field(default=None, description="Top-k, 0 is off (default 40)")
        top_p: float | None = Field(default=None, description="Top-p, 1 is off (default 0.95)")
        min_p: float | None = Field(default=None, description="Min-p, 0 is off (default 0.05)")
        repeat_penalty: float | None = Field(
            default=None, description="Repetition penalty, 1 is off (default 1)"
        )
        seed: int | None = Field(default=None, description="Sampling seed (default random)")
        max_tokens: int | None = Field(
            default=None, ge=1, description=f"Most tokens in a reply (default {MAX_TOKENS})"
        )
        ctx: int | None = Field(
            default=None, ge=16, description=f"Context size in tokens (default {DEFAULT_CTX})"
        )

        @field_validator("vector")
        @classmethod
        def _vector_spec(cls, value: str | None) -> str | None:
            """Syntax, total strength and names, before anything loads: `llm chat` has no error
            line for a failed turn (it ends in a traceback), so catch here what can be."""
            from . import vectors

            strengths = vectors.spec_strengths([value or ""])
            vectors.check_strengths(strengths)
            for name in strengths:
                _check_known(name)
            return value

        @field_validator("layers")
        @classmethod
        def _layer_span(cls, value: str | None) -> str | None:
            """The syntax of A-B; whether the blocks exist is known once the model loads."""
            from .steering import layer_span

            if value is not None:
                layer_span(value)
            return value

        @field_validator(*NUMBERS, mode="before")
        @classmethod
        def _plain_number(cls, value: object, info: ValidationInfo) -> object:
            """`-o max_tokens 1_0` and `3.0` are typos, not 10 and 3; True is no number."""
            whole = int in get_args(cls.model_fields[info.field_name or ""].annotation)
            if isinstance(value, bool) or (isinstance(value, str) and not _plain(value, whole)):
                raise ValueError(f"{value!r} is not a {'whole ' if whole else ''}number")
            return value

        @field_validator("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
        @classmethod
        def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
            """The engine's own limits for each setting, as the CLI and the server check."""
            from .engine import SamplerSettings, out_of_range, range_text

            if value is None:
                return value
            name = info.field_name or ""
            alone = SamplerSettings(**{name: value})  # type: ignore[arg-type]
            if out_of_range(alone):
                raise ValueError(f"{value} is out of range: use {range_text(name)}")
            return value

    def __init__(self, name: str):
        self.name = name  # the catalog name: demo-chat, mistral:q4_k_m
        self.model_id = PREFIX + name

    def __str__(self) -> str:
        return f"edge-steer: {self.model_id}"

    def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.Response,
        conversation: llm.Conversation | None,
    ) -> Iterator[str]:
        """The reply to `prompt` after the conversation so far, steered as its options say;
        edge-steer's errors (an unknown vector, a model that does not fit) become ModelError,
        which llm shows as one line."""
        try:
            yield from self._reply(prompt, response, conversation)
        except EdgeSteerError as exc:
            raise llm.ModelError(_for_llm(str(exc))) from None

    def _reply(
        self, prompt: llm.Prompt, response: llm.Response, conversation: llm.Conversation | None
    ) -> Iterator[str]:
        options = cast(SteeredModel.Options, prompt.options)
        steered = _steered(self.name, options.ctx or DEFAULT_CTX)
        with steered.turn():  # prompts from several threads take turns on the one context
            yield from _steered_reply(steered, options, prompt, response, conversation)


def _steered_reply(
    steered: Steered,
    options: SteeredModel.Options,
    prompt: llm.Prompt,
    response: llm.Response,
    conversation: llm.Conversation | None,
) -> Iterator[str]:
    from .chat import fit_to_context, until_stop
    from .engine import Sampler

    _steer(steered, options.vector, options.layers)
    messages, max_tokens = _messages(prompt, conversation), options.max_tokens or MAX_TOKENS
    context = steered.context
    tokens, stops, _ = fit_to_context(
        steered.model, messages, context.n_ctx, max_tokens, raise_with="-o ctx"
    )
    sampler = Sampler(steered.model, _sampling(options))
    try:
        pieces = context.generate(tokens, sampler, max_tokens=max_tokens)
        yield from until_stop(pieces, stops)
    finally:
        sampler.close()
    response.set_usage(
        input=len(tokens),
        output=pieces.stats.generated,
        details={"cached_prompt_tokens": len(tokens) - pieces.stats.prompt_tokens},
    )
    response.response_json = {
        "model_file": str(steered.model.path),
        "vectors": steered.steering.strengths(),
        "layers": steered.steering.layers,
    }


def _plain(text: str, whole: bool) -> bool:
    from .vectors import parse_number, parse_whole

    return (parse_whole if whole else parse_number)(text) is not None


def _for_llm(message: str) -> str:
    for cli, llm_words in FOR_LLM.items():
        message = message.replace(cli, llm_words)
    return message


def _check_known(name: str) -> None:
    """A built-in concept, a .gguf file or a vector stored for some model; whether it was made
    for this model is known once the model is loaded."""
    from . import dataset, files, store
    from .errors import NotFound

    path = files.looks_like_path(name)
    if not path and name.lower() in dataset.builtin_names():
        return
    store.check_name_or_path(name)
    try:
        store.find_vectors(name)
    except NotFound as exc:
        raise ValueError(
            str(exc)
            if path
            else f"unknown vector {name!r}: use a built-in concept "
            f"({', '.join(dataset.builtin_names())}), a stored vector "
            "(`edge-steer vectors list`) or a .gguf file"
        ) from None


def _steered(name: str, ctx: int) -> Steered:
    """The model and context for (name, ctx): loaded (downloaded) on first use, then kept."""
    if (name, ctx) not in _loaded:
        from . import runtime

        options = runtime.LoadOptions(model=name, ctx=ctx)
        _loaded[(name, ctx)] = runtime.load_from(options, on_note=_note)
    return _loaded[(name, ctx)]


def _steer(steered: Steered, spec: str | None, layers: str | None) -> None:
    """Put exactly `spec` on the context. The same vectors as last turn keep the KV cache
    (Context.set_steering); a built-in concept this model has no vector for trains first."""
    from . import runtime

    notice = _TrainingNotice()
    steered.steering = runtime.steer(steered.model, spec or "", layers=layers, on_progress=notice)
    notice.finish()
    steered.steering.apply(steered.context)


def _messages(prompt: llm.Prompt, conversation: llm.Conversation | None) -> list[dict[str, str]]:
    """The chat so far (`-c`, `llm chat`) and this prompt, as the chat template takes them:
    one system prompt first (this prompt's, else the last one given: llm sends it with the
    first turn only), then the user and assistant turns."""
    whole_chain = hasattr(prompt, "messages")  # llm >= 0.32; `-c` reads it from the logs
    turns = _chain(prompt) if whole_chain else _from_responses(prompt, conversation)
    systems = [t["content"] for t in turns if t["role"] == "system"] + [prompt.system or ""]
    system = next((s for s in reversed(systems) if s), None)
    head = [{"role": "system", "content": system}] if system else []
    return head + [t for t in turns if t["role"] in ("user", "assistant")]


def _chain(prompt: llm.Prompt) -> list[dict[str, str]]:
    """`prompt.messages` as text: attachments, tool calls and reasoning are not for a
    steered local model."""
    from llm.parts import TextPart

    return [
        {"role": m.role, "content": "".join(p.text for p in m.parts if isinstance(p, TextPart))}
        for m in prompt.messages
    ]


def _from_responses(
    prompt: llm.Prompt, conversation: llm.Conversation | None
) -> list[dict[str, str]]:
    """llm < 0.32 keeps a conversation as its responses, each with its own prompt."""
    turns = []
    for earlier in cast(list[llm.Response], conversation.responses if conversation else []):
        if earlier.prompt.system:
            turns.append({"role": "system", "content": earlier.prompt.system})
        turns.append({"role": "user", "content": earlier.prompt.prompt or ""})
        turns.append({"role": "assistant", "content": earlier.text()})
    return [*turns, {"role": "user", "content": prompt.prompt or ""}]


def _sampling(options: SteeredModel.Options) -> SamplerSettings:
    """The settings given; llama.cpp's defaults (SamplerSettings') for the rest."""
    from .engine import SamplerSettings

    given = {n: getattr(options, n) for n in SAMPLING if getattr(options, n) is not None}
    return SamplerSettings(**given)


def _note(message: str) -> None:
    print(f"edge-steer: {message}", file=sys.stderr, flush=True)


class _TrainingNotice:
    """`on_progress` while vectors resolve: a line on stderr as a concept starts training, one
    as it is done. llm owns the terminal, so no bars; training on first use takes a while."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.started = 0.0

    def __call__(self, label: str, _done: int, _total: int) -> None:
        what = label.rpartition(": ")[0] or label  # "training 'happy' on M", not the stage
        if what != self.current:
            self.finish()
            self.current, self.started = what, time.monotonic()
            _note(f"{what}: the first use of this concept on this model, please wait ...")

    def finish(self) -> None:
        if self.current is not None:
            seconds = time.monotonic() - self.started
            _note(f"{self.current}: done in {seconds:.0f} s, stored for next time")
            self.current = None
