"""OpenAI request bodies -> checked generation jobs; each mistake is an `ApiError` naming
the field it found wrong."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import chat, vectors
from ..constants import DEFAULT_CTX
from ..engine import SAMPLING_LIMITS, Model, SamplerSettings, range_text
from ..errors import BadInput
from .api_error import ApiError
from .pool import VectorPool

Kind = Literal["chat", "completion"]
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each; matching costs the engine thread O(stop) per token at worst
MAX_DEPTH = 32  # nesting of JSON values; OpenAI's bodies need 5
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Served:
    """What requests are checked against: the model, its names, its vectors, its lanes."""

    pool: VectorPool
    model_id: str
    aliases: frozenset[str] = frozenset()
    n_ctx: int = DEFAULT_CTX

    @property
    def model(self) -> Model:
        return self.pool.model

    def names(self) -> list[str]:
        return [self.model_id, *self.pool.presets]


@dataclass
class Job:
    """One checked request, ready for a lane."""

    kind: Kind
    model: str  # as the client named it; echoed back
    prompt: list[int]
    max_tokens: int
    settings: SamplerSettings
    steering: dict[str, float] = field(default_factory=dict)
    stops: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    cache_prompt: bool = True  # reuse a lane's cached prefix (exact CLI tokens: False)


def decode(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object of valid text, else ApiError: nothing a client sends
    may fail deeper down (an over-long integer, nesting past the recursion limit, a lone
    surrogate that cannot become UTF-8 for llama.cpp)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8, 4300+ digits
        raise ApiError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    for name, value in body.items():
        _check_value(name, value)
    return body


def _check_value(name: str, value: object) -> None:
    """Refuse nesting past MAX_DEPTH and lone surrogates anywhere in field `name`."""
    param = None if LONE_SURROGATE.search(name) else name  # never echo a bad name back
    stack = [(name, 0), (value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(f"values are nested more than {MAX_DEPTH} deep", param=param)
        if isinstance(item, str) and LONE_SURROGATE.search(item):
            raise ApiError(
                "text holds a lone surrogate (\\ud800-\\udfff): send valid Unicode",
                param=param,
                code="invalid_text",
            )
        if isinstance(item, dict):
            stack += [(part, depth + 1) for pair in item.items() for part in pair]
        elif isinstance(item, list):
            stack += [(part, depth + 1) for part in item]


def parse(body: dict[str, Any], kind: Kind, served: Served) -> Job:
    """Check an OpenAI chat or completion body (from `decode`); raise ApiError naming the
    bad field."""
    _refuse_unsupported(body)
    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name:
        what = "is required" if model_name is None else "must be a model's name"
        raise ApiError(f"`model` {what}: GET /v1/models lists them", param="model")
    steering = _steering(model_name, body.get("steering"), served)
    prompt, stops = _chat_prompt(body, served) if kind == "chat" else _text_prompt(body, served)
    if len(prompt) >= served.n_ctx:
        raise _too_long(str(len(prompt)), served, "messages" if kind == "chat" else "prompt")
    default = served.n_ctx - len(prompt) if kind == "chat" else COMPLETION_MAX_TOKENS
    return Job(
        kind=kind,
        model=model_name,
        prompt=prompt,
        max_tokens=min(_max_tokens(body, default), served.n_ctx),  # no more fits anyway
        settings=_settings(body),
        steering=steering,
        stops=tuple(dict.fromkeys([*stops, *_stops(body.get("stop"))])),
        stream=_flag(body, "stream"),
        cache_prompt=_flag(body, "cache_prompt", default=True),
        include_usage=_include_usage(body.get("stream_options")),
    )


def _too_long(tokens: str, served: Served, param: str) -> ApiError:
    return ApiError(
        f"the prompt is {tokens} tokens, and a lane's context of {served.n_ctx} needs room "
        "for at least one more to generate: shorten it, or restart the server with a larger "
        "--ctx",
        param=param,
        code="context_length_exceeded",
    )


def _refuse_past_context(text: str, served: Served, param: str) -> None:
    """Text that cannot fit is refused before llama.cpp tokenizes it, which can take many
    seconds (and goes on after the client has left)."""
    fewest = served.model.fewest_tokens(text.encode(), served.n_ctx)
    if fewest >= served.n_ctx:
        raise _too_long(f"at least {fewest}", served, param)


def _include_usage(stream_options: object) -> bool:
    if stream_options is None:
        return False
    usage = stream_options.get("include_usage") if isinstance(stream_options, dict) else None
    if not isinstance(stream_options, dict) or not isinstance(usage, bool | None):
        raise ApiError(
            '`stream_options` must be an object such as {"include_usage": true}',
            param="stream_options",
        )
    return bool(usage)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """Fields we cannot honour fail loudly rather than being silently ignored."""
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise ApiError("only n=1 is supported: send one request per choice", param="n")
    refused = {
        "logprobs": body.get("logprobs") not in (None, False, 0),
        "top_logprobs": body.get("top_logprobs") not in (None, 0),
        "echo": bool(body.get("echo")),
        "best_of": body.get("best_of") not in (None, 1),
        "suffix": body.get("suffix") is not None,
        "tools": bool(body.get("tools")) or bool(body.get("functions")),
        "tool_choice": body.get("tool_choice") not in (None, "none", "auto"),
        "modalities": body.get("modalities") not in (None, ["text"]),
        "audio": body.get("audio") is not None,
        "response_format": _format_type(body.get("response_format")) not in (None, "text"),
        "logit_bias": bool(body.get("logit_bias")),
    }
    for name, present in refused.items():
        if present:
            raise ApiError(f"`{name}` is not supported by edge-steer serve", param=name)


def _format_type(response_format: object) -> object:
    """`response_format`'s type: only plain text is produced (no JSON mode or schema)."""
    if isinstance(response_format, dict):
        return response_format.get("type")
    return response_format


def preset_and_suffix(model_name: str, served: Served) -> tuple[dict[str, float], str]:
    """`MODEL`, `PRESET` or either with `+SPEC`: the preset's steering and the suffix."""
    base, plus, suffix = model_name.partition("+")
    if plus and not base:
        raise ApiError(
            f"`model` names no model before '+': use MODEL+SPEC, e.g. {served.model_id}+happy:1",
            status=404,
            param="model",
            code="model_not_found",
        )
    if base in served.pool.presets:
        return dict(served.pool.presets[base]), suffix
    if base == served.model_id or base in served.aliases:
        return {}, suffix
    raise unknown_model(base, served)


def unknown_model(name: str, served: Served) -> ApiError:
    return ApiError(
        f"unknown model {name!r}: this server serves {', '.join(map(repr, served.names()))}",
        status=404,
        param="model",
        code="model_not_found",
    )


def steering_of(model_name: str, served: Served) -> dict[str, float]:
    """What a model name with a suffix steers by (`demo+happy:1`, `cheerful+lazy:-1`)."""
    return _steering(model_name, None, served)


def _steering(model_name: str, field_value: object, served: Served) -> dict[str, float]:
    """Preset, then the model-name suffix, then the body's `steering` field; later wins."""
    steering, suffix = preset_and_suffix(model_name, served)  # specs: names folded already
    suffixed = served.pool.check(spec_strengths(suffix, "model"), "model", switchable=steering)
    steering.update(suffixed)
    if isinstance(field_value, str):
        field_value = spec_strengths(field_value, "steering")
    if field_value is not None and not isinstance(field_value, dict):
        raise ApiError(
            '`steering` must be an object such as {"happy": 0.8} or a spec "happy:0.8,lazy:-1"',
            param="steering",
            code="invalid_steering",
        )
    steering.update(_folded(served.pool.check(field_value or {}, switchable=steering)))
    steering = {name: s for name, s in steering.items() if s != 0}
    try:
        vectors.check_strengths(steering)  # preset, suffix and field together
    except BadInput as exc:
        raise ApiError(str(exc), param="steering", code="invalid_steering") from None
    return steering


def _folded(steering: Mapping[str, float]) -> dict[str, float]:
    """The `steering` field's names merged as a spec's are (`vectors.merge_strengths`):
    `HAPPY` overrides a preset's `happy`, and a preset's file path is matched as written."""
    return vectors.merge_strengths(steering.items())


def spec_strengths(spec: str, param: str) -> dict[str, float]:
    """ "happy:0.8,lazy:-1" -> {"happy": 0.8, "lazy": -1.0}; repeats add up, as on the CLI."""
    try:
        return vectors.spec_strengths([spec])
    except BadInput:
        raise ApiError(
            f"bad steering spec {spec[:80]!r}: use NAME[:STRENGTH], comma-separated, "
            "e.g. happy:0.8,lazy:-1",
            param=param,
            code="invalid_steering",
        ) from None


def _chat_prompt(body: Mapping[str, Any], served: Served) -> tuple[list[int], tuple[str, ...]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("`messages` must be a non-empty list", param="messages")
    if len(messages) >= served.n_ctx:  # a token each at least; llama.cpp's tokenizer would
        raise ApiError(  # take time quadratic in their number to say so
            f"{len(messages)} messages cannot fit a lane's context of {served.n_ctx} tokens: "
            "send fewer, or restart the server with a larger --ctx",
            param="messages",
            code="context_length_exceeded",
        )
    plain = [_message(m, i) for i, m in enumerate(messages)]
    _refuse_past_context("".join(m["content"] for m in plain), served, "messages")
    tokens, stops = chat.format_prompt(served.model, plain)
    return tokens, tuple(stops)


def _message(message: object, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(f"{where} must be an object with a `role`", param=where)
    role = {"developer": "system"}.get(message["role"], message["role"])
    if role not in ("system", "user", "assistant"):
        raise ApiError(f"{where}: role {role!r} is not supported", param=where)
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(f"{where}: only text content parts are supported", param=where)
        texts = [p.get("text") for p in content]
        if not all(isinstance(text, str) for text in texts):
            raise ApiError(f"{where}: a text part's `text` must be a string", param=where)
        content = "".join(texts)
    if content is None and (message.get("tool_calls") or message.get("function_call")):
        raise ApiError(f"{where}: tool calls are not supported by edge-steer serve", param=where)
    if not isinstance(content, str):
        raise ApiError(f"{where}: `content` must be a string", param=where)
    if "\0" in content:
        raise ApiError(
            f"{where}: `content` holds a NUL character (\\u0000), where the chat template "
            "would cut it short: remove it",
            param=where,
        )
    return {"role": role, "content": content}


def _text_prompt(body: Mapping[str, Any], served: Served) -> tuple[list[int], tuple[str, ...]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a list, as some clients send it
    if isinstance(prompt, str) and prompt:
        _refuse_past_context(prompt, served, "prompt")
        return served.model.tokenize_prompt(prompt), ()
    if isinstance(prompt, list) and prompt and all(_is_whole(t) for t in prompt):
        n_vocab = served.model.n_vocab
        if (outside := next((t for t in prompt if not 0 <= t < n_vocab), None)) is not None:
            raise ApiError(
                f"`prompt` token id {outside} is not in this model's vocabulary (0 to "
                f"{n_vocab - 1})",
                param="prompt",
            )
        return list(prompt), ()
    raise ApiError(
        "`prompt` must be one non-empty string (or one list of token ids); "
        "send one request per prompt",
        param="prompt",
    )


def _is_whole(value: object) -> bool:
    """An int in JSON's sense: true and false are no numbers."""
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_whole(value) or value < 1:
            raise ApiError(f"`{name}` must be a whole number of at least 1", param=name)
        return value
    return default


def _settings(body: Mapping[str, Any]) -> SamplerSettings:
    """OpenAI's sampling fields plus llama.cpp's (top_k, min_p, repeat_penalty), each within
    the engine's SAMPLING_LIMITS, as the CLI checks them."""
    base = SamplerSettings()
    seed = body.get("seed")
    low, high = SAMPLING_LIMITS["seed"]
    if seed is not None and not _is_whole(seed):
        raise ApiError("`seed` must be an integer", param="seed")
    if seed is not None and not low <= seed <= high:
        raise ApiError(f"`seed` must be between {low} and {high} (-1: random)", param="seed")
    fields = (
        "temperature",
        "top_p",
        "min_p",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
    )
    numbers: dict[str, Any] = {name: _number(body, name, getattr(base, name)) for name in fields}
    top_k = int(_number(body, "top_k", base.top_k, whole=True))
    return SamplerSettings(**numbers, top_k=top_k, seed=seed)


def _number(body: Mapping[str, Any], name: str, default: float, whole: bool = False) -> float:
    low, high = SAMPLING_LIMITS[name]
    value = body.get(name)
    if value is None:
        return default
    kinds = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value:  # NaN
        raise ApiError(f"`{name}` must be a {'whole ' if whole else ''}number", param=name)
    if not low <= value <= high:  # exact for any int, where float(value) may overflow
        raise ApiError(f"`{name}` must be between {range_text(name, ' and ')}", param=name)
    return float(value)


def _stops(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ApiError(
            f"`stop` must be a string or up to {MAX_STOPS} strings, each of 1 to "
            f"{MAX_STOP_CHARS} characters",
            param="stop",
        )
    return stops


def _flag(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"`{name}` must be true or false", param=name)
    return value
