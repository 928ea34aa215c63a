"""The only package that talks to llama.cpp.

Built on llama-cpp-python's low-level API because the high-level `Llama` class exposes neither
the eval callback (hidden-state capture) nor tensor buffer overrides (experts in CPU RAM).
Steering is llama.cpp's own `llama_set_adapter_cvec`: no Python runs per token for it.

    log        llama.cpp's log: quiet, remembered for errors, read back for allocations
    model      Model: weights, vocabulary, chat template, where llama.cpp put them
    context    Context: KV cache, incremental decoding, steering, `scratch` (the cache rule)
    sampling   the sampler chain, its settings and their limits
    continuations  many sampled continuations side by side (sample_many)
    packing    many sequences per batch; shared prefixes decoded once
    scoring    log-probabilities of texts; next-token distributions
    recorder   the eval callback that records hidden states
    hidden     hidden-state capture of many prompts
    rowsteer   steering per batch row (the eval callback), for batches of mixed steerings
    batching   continuous batching: many sequences, one decode per step
    baselines  the bare loops benchmarks measure the engine against
"""

from .baselines import bare_decode, prefill
from .context import (
    DEFAULT_BATCH,
    MAX_SEQUENCES,
    Batch,
    Context,
    Generation,
    GenerationStats,
    check_decode,
)
from .log import LOG_TAIL
from .model import Model, backend_info, default_threads, utf8
from .sampling import (
    SAMPLING_LIMITS,
    Sampler,
    SamplerSettings,
    out_of_range,
    range_text,
    takes_whole_number,
)
from .scoring import SCORED_TOGETHER

__all__ = [
    "DEFAULT_BATCH",
    "LOG_TAIL",
    "MAX_SEQUENCES",
    "SAMPLING_LIMITS",
    "SCORED_TOGETHER",
    "Batch",
    "Context",
    "Generation",
    "GenerationStats",
    "Model",
    "Sampler",
    "SamplerSettings",
    "backend_info",
    "bare_decode",
    "check_decode",
    "default_threads",
    "out_of_range",
    "prefill",
    "range_text",
    "takes_whole_number",
    "utf8",
]
