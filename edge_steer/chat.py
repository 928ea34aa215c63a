"""A steered conversation: messages, prompt formatting, KV reuse, live steering changes."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace

from .engine import Context, GenerationStats, Model, Sampler, SamplerSettings, utf8
from .errors import BadInput
from .files import looks_like_path
from .steering import Steering
from .vectors import check_strength, identity

TRANSCRIPT_STOP = ("\nUser:", "\nAssistant:")  # a base model writing the next turn


def format_prompt(model: Model, messages: list[dict[str, str]]) -> tuple[list[int], tuple]:
    """Tokens for the conversation plus an assistant turn, and the stop strings to use.

    Uses the GGUF's own chat template; base models without one get a plain transcript.
    """
    text = model.apply_chat_template(messages)
    if text is None:
        return model.tokenize(transcript(messages)), TRANSCRIPT_STOP
    return model.tokenize(text, parse_special=True), ()


def fit_to_context(
    model: Model,
    messages: list[dict[str, str]],
    n_ctx: int,
    max_tokens: int,
    raise_with: str = "--ctx",
) -> tuple[list[int], tuple, int]:
    """`format_prompt` of a conversation that fits the context, and how many of its earliest
    messages (after the system prompt) it leaves out to fit.

    A conversation that leaves the reply less than min(max_tokens, n_ctx / 4) tokens loses
    whole turns from its start, as ollama and llama-cli's context shift drop them, until it
    takes half the context: each drop re-evaluates the whole prompt (minutes for a 7B on a
    Pi), so the next turns fit without another. Turns go whole, so the kept ones still begin
    with a user message, as templates such as Mistral's demand. The newest turn is always
    kept; when it alone does not fit, that is a BadInput."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    newest = utf8(messages[-1]["content"]) if messages else b""
    if (fewest := model.fewest_tokens(newest, n_ctx)) >= n_ctx:  # before a long tokenizing
        raise _too_long(f"at least {fewest}", "", n_ctx, raise_with)
    tokens, stops = format_prompt(model, messages)
    dropped = 0
    starts = [i for i, turn in enumerate(turns) if turn["role"] == "user" and i > 0]
    if len(tokens) > n_ctx - min(max_tokens, n_ctx // 4) and starts:
        dropped, tokens, stops = _fewest_dropped(model, system, turns, starts, n_ctx // 2)
    if len(tokens) >= n_ctx:
        with_system = " with the system prompt" if system else ""
        raise _too_long(str(len(tokens)), with_system, n_ctx, raise_with)
    return tokens, stops, dropped


def _fewest_dropped(
    model: Model,
    system: list[dict[str, str]],
    turns: list[dict[str, str]],
    starts: list[int],
    most: int,
) -> tuple[int, list[int], tuple]:
    """The fewest earliest turns to leave out (a user message at `starts` then opens the
    prompt) for the prompt to take at most `most` tokens, else all but the newest turn. A
    prompt shrinks as more go, so a binary search formats log2(turns) prompts, not one a
    turn (a /load of 2000 messages took a minute)."""
    low, high = 0, len(starts) - 1
    while low < high:
        middle = (low + high) // 2
        if len(format_prompt(model, system + turns[starts[middle] :])[0]) <= most:
            high = middle
        else:
            low = middle + 1
    tokens, stops = format_prompt(model, system + turns[starts[low] :])
    return starts[low], tokens, stops


def _too_long(tokens: str, with_system: str, n_ctx: int, raise_with: str) -> BadInput:
    return BadInput(
        f"the message is {tokens} tokens{with_system} but the context holds {n_ctx}: "
        f"raise {raise_with}, or shorten the message"
    )


def until_stop(pieces: Iterator[str], stops: tuple[str, ...]) -> Generator[str, None, bool]:
    """Pass text through until a stop string, holding back what could be its beginning.
    Returns (to `yield from`) whether a stop string ended it.

    Each stop is followed character by character (Knuth-Morris-Pratt), so a piece costs
    O(len(piece)) per stop however long the stops and the text get."""
    matchers = [_StopMatcher(stop) for stop in stops if stop]
    pending = ""  # text not passed on yet: the longest partial match of any stop
    for piece in pieces:
        text = pending + piece
        for end, char in enumerate(piece, start=len(pending) + 1):
            found = [len(m.stop) for m in matchers if m.feed(char)]
            if found:
                yield text[: end - max(found)]  # the longest stop ending here starts first
                return True
        hold = max((m.matched for m in matchers), default=0)
        yield text[: len(text) - hold]
        pending = text[len(text) - hold :]
    yield pending
    return False


class _StopMatcher:
    """How much of one stop string the text seen so far ends with."""

    def __init__(self, stop: str):
        self.stop, self.matched = stop, 0
        self.fallback = [0] * len(stop)  # KMP: longest proper border of stop[: i + 1]
        border = 0
        for i in range(1, len(stop)):
            while border and stop[i] != stop[border]:
                border = self.fallback[border - 1]
            border += stop[i] == stop[border]
            self.fallback[i] = border

    def feed(self, char: str) -> bool:
        """Take the next character; True when the whole stop string has just been seen."""
        matched = self.matched
        while matched and self.stop[matched] != char:
            matched = self.fallback[matched - 1]
        self.matched = matched + (self.stop[matched] == char)
        return self.matched == len(self.stop)


def _conversation_parts(data: object) -> tuple[str | None, dict[str, float], list[dict]]:
    """System prompt, vector strengths and messages of saved conversation data, checked."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise BadInput("not a saved conversation: expected a JSON object with 'messages'")
    messages = data["messages"]
    for message in messages:
        if not (
            isinstance(message, dict)
            and message.get("role") in ("user", "assistant")
            and isinstance(message.get("content"), str)
        ):
            raise BadInput(f"bad message in the saved conversation: {message!r:.80}")
    system = data.get("system")
    strengths = data.get("vectors") or {}
    if not isinstance(system, str | None) or not isinstance(strengths, dict):
        raise BadInput("bad 'system' or 'vectors' in the saved conversation")
    for name, strength in strengths.items():
        check_strength(name, strength)
    return system, strengths, [{"role": m["role"], "content": m["content"]} for m in messages]


def transcript(messages: list[dict[str, str]]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


@dataclass
class ChatSession:
    """One conversation on one context; the KV cache is reused between turns."""

    ctx: Context
    steering: Steering
    settings: SamplerSettings
    system: str | None = None
    max_tokens: int = 512
    messages: list[dict[str, str]] = field(default_factory=list)
    forgotten: int = 0  # the earliest messages, left out once the context filled up
    last_stats: GenerationStats = field(default_factory=GenerationStats)  # the last reply's

    def __post_init__(self) -> None:
        self.set_system(self.system)
        self.steering.apply(self.ctx)

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages[self.forgotten :]

    def prompt(self) -> tuple[list[int], tuple]:
        """The conversation's tokens and stops, leaving out its earliest turns where the
        context is full (`fit_to_context`); `messages` keeps them all, for /save."""
        model, n_ctx = self.ctx.model, self.ctx.n_ctx
        tokens, stops, dropped = fit_to_context(model, self.conversation(), n_ctx, self.max_tokens)
        self.forgotten += dropped
        return tokens, stops

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer; a reply cut short (Ctrl-C) is kept as said. A
        message too long for the context is not kept."""
        self.messages.append({"role": "user", "content": text})
        try:
            tokens, stop = self.prompt()
        except BadInput:
            self.messages.pop()
            raise
        answer: list[str] = []
        try:
            sampler = Sampler(self.ctx.model, self.settings)
            pieces = self.ctx.generate(tokens, sampler, max_tokens=self.max_tokens)
            self.last_stats = pieces.stats
            for piece in until_stop(pieces, stop):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def set_vector(self, name: str, strength: float) -> None:
        """Change steering live, then re-evaluate the history under the new vector now, so the
        next reply starts at once (the context drops what the old steering computed)."""
        self.steering.set(name, strength)
        self.steering.apply(self.ctx)
        if self.messages:
            self.ctx.ingest(self.prompt()[0])

    def set_system(self, text: str | None) -> None:
        self.check_system(text)
        self.system = text or None

    def check_system(self, text: str | None) -> None:
        """A system prompt must leave room for the conversation: fit_to_context keeps it
        whole when it drops turns down to half the context."""
        if text:
            if "\0" in text:
                raise BadInput("the system prompt holds a NUL character (\\x00): remove it")
            tokens = len(self.ctx.model.tokenize(text, add_special=False))
            if tokens > self.ctx.n_ctx // 2:
                raise BadInput(
                    f"the system prompt is {tokens} tokens, more than half the context "
                    f"({self.ctx.n_ctx}): shorten it, or raise --ctx"
                )

    def saved(self) -> dict:
        """The conversation as JSON data (`/save`): enough for `restore` to go on with it."""
        return {
            "model": self.ctx.model.name,
            "model_file": str(self.ctx.model.path),  # what to pass as --model to go on with it
            "system": self.system,
            "vectors": {
                identity(name) if looks_like_path(name) else name: strength
                for name, strength in self.steering.strengths().items()
            },  # a file's path holds from any folder the conversation is loaded in
            "messages": self.messages,
        }

    def restore(self, data: object) -> None:
        """Go on with a conversation from `saved()` data: its system prompt, vectors and
        messages, the history evaluated under those vectors now. Anything wrong with it (a
        vector that cannot be found or trained, or Ctrl-C while one trains; a message or
        system prompt that cannot fit) leaves the session as it was."""
        system, strengths, messages = _conversation_parts(data)
        steering = replace(self.steering, active={})
        for name, strength in strengths.items():
            steering.set(name, strength)
        self.check_system(system)
        head = [{"role": "system", "content": system}] if system else []
        model, n_ctx = self.ctx.model, self.ctx.n_ctx
        fitted = (
            fit_to_context(model, head + messages, n_ctx, self.max_tokens) if messages else None
        )
        tokens, _, dropped = fitted or ([], (), 0)
        self.steering.active = steering.active  # nothing fails past here
        self.system, self.messages, self.forgotten = system, messages, dropped
        self.ctx.forget(0)
        self.steering.apply(self.ctx)
        if tokens:
            self.ctx.ingest(tokens)

    def clear(self) -> None:
        self.messages.clear()
        self.forgotten = 0
        self.ctx.forget(0)
