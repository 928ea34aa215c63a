"""Sampling: llama.cpp's sampler chain, its settings and the range each setting may take."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import llama_cpp as ll

from ..constants import RANDOM_SEED

if TYPE_CHECKING:
    from .model import Model


class Decoded(Protocol):
    """What a sampler reads logits from: a context (`Context` fits)."""

    @property
    def live(self) -> object: ...


@dataclass(frozen=True)
class SamplerSettings:
    """llama.cpp sampler chain settings, with llama.cpp's defaults; temperature <= 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # off, as in llama.cpp
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0  # OpenAI's, off
    presence_penalty: float = 0.0  # OpenAI's, off
    seed: int | None = None


# The range each sampler setting may take: what llama.cpp's samplers treat sensibly (OpenAI's
# ranges where it has one). The CLI and the server both check against this table.
SAMPLING_LIMITS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_k": (0, 1 << 20),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.01, 10.0),
    "repeat_last_n": (0, 1 << 20),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    # llama.cpp's seeds are 32-bit and 2^32-1 means random, as -1 does here: anything else
    # would silently be another seed, or no seed at all
    "seed": (-1, RANDOM_SEED - 1),
}


def takes_whole_number(name: str) -> bool:
    """Whether sampler setting `name` is a count or the seed, not a real number."""
    return name == "seed" or isinstance(getattr(SamplerSettings(), name), int)


def range_text(name: str, joiner: str = " to ") -> str:
    """SAMPLING_LIMITS[name] for people: `0 to 1048576` (not 1.04858e+06), `0 to 2`."""
    return joiner.join(
        f"{limit:g}" if isinstance(limit, float) else str(limit) for limit in SAMPLING_LIMITS[name]
    )


def out_of_range(settings: SamplerSettings) -> str | None:
    """The first setting outside SAMPLING_LIMITS (NaN and infinities included), or None."""
    for name, (low, high) in SAMPLING_LIMITS.items():
        value = getattr(settings, name)
        if value is None:  # the seed: random
            continue
        if not ((isinstance(value, int) or math.isfinite(value)) and low <= value <= high):
            return name
    return None


class Sampler:
    """A llama.cpp sampler chain (penalties, top-k, top-p, min-p, temperature, dist)."""

    def __init__(self, model: Model, settings: SamplerSettings):
        self.window = settings.repeat_last_n  # tokens the penalties look back on
        self.ptr = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        s = settings
        if (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) != (1.0, 0.0, 0.0):
            penalties = ll.llama_sampler_init_penalties(
                model.n_vocab,
                s.repeat_last_n,
                s.repeat_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            )
            add(self.ptr, penalties)
        if s.temperature <= 0:
            add(self.ptr, ll.llama_sampler_init_greedy())
            return
        add(self.ptr, ll.llama_sampler_init_top_k(s.top_k))
        add(self.ptr, ll.llama_sampler_init_top_p(s.top_p, 1))
        add(self.ptr, ll.llama_sampler_init_min_p(s.min_p, 1))
        add(self.ptr, ll.llama_sampler_init_temp(s.temperature))
        seed = ll.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        add(self.ptr, ll.llama_sampler_init_dist(seed))

    def sample(self, ctx: Decoded, row: int = -1) -> int:
        """Pick the next token from the logits of batch row `row` (default: the last one);
        llama.cpp also records it for the penalties."""
        return ll.llama_sampler_sample(self.ptr, ctx.live, row)

    def accept_prompt(self, prompt: Sequence[int]) -> None:
        """Record the prompt's last `repeat_last_n` tokens, as the penalties would have seen
        them had they been sampled."""
        for token in prompt[-self.window :] if self.window > 0 else ():
            ll.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        if self.ptr:
            ll.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()
