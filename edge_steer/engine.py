"""The only module that talks to llama.cpp.

Built on llama-cpp-python's low-level API because the high-level `Llama` class exposes neither
the eval callback (hidden-state capture) nor tensor buffer overrides (experts in CPU RAM).
Steering is llama.cpp's own `llama_set_adapter_cvec`: no Python runs per token for it.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import math
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import numpy as np

from . import ggml, machine, prefixes
from .constants import DEFAULT_CTX, VERBOSE_ENV, env
from .errors import BadInput, EngineError

LOG_TAIL: deque[str] = deque(maxlen=40)
SCORED_TOGETHER = 8  # texts `Context.score` decodes side by side, in any context
MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ: llama.cpp refuses a context with more
_VERBOSE = env(VERBOSE_ENV) not in ("", "0")
_recording: list[str] | None = None  # every line while a model or context is made


@ll.llama_log_callback
def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """Keep llama.cpp's chatter out of the terminal, but remember it for error messages."""
    line = (text or b"").decode(errors="replace")
    LOG_TAIL.append(line)
    if _recording is not None:
        _recording.append(line)
    if _VERBOSE:
        print(line, end="", file=sys.stderr)


ll.llama_log_set(_on_log, None)  # _on_log is module-level, so the callback stays alive
ll.llama_backend_init()


def default_threads() -> int:
    return max(1, machine.cpu_cores())


def backend_info() -> dict[str, object]:
    """What this llama.cpp build can do: CPU features, backends, GPU offload support."""
    return {
        "system_info": ll.llama_print_system_info().decode(errors="replace").strip(" |"),
        "gpu_offload_supported": bool(ll.llama_supports_gpu_offload()),
    }


class Model:
    """A loaded GGUF model: weights, vocabulary and chat template.

    `gpu_layers` is llama.cpp's n_gpu_layers (the output layer counts as one; -1 = all).
    Weights whose names match a `cpu_tensors` regex stay in CPU memory whatever `gpu_layers`
    says (llama.cpp tensor buffer overrides; how MoE experts stay in RAM). Where llama.cpp
    put things is read back from its own load log: `overridden`, `buffers`, `layer_devices`.
    `repack=False` keeps CPU weights in plain buffers (no AVX/NEON re-layout): slower, but
    the same kernels an RPC worker's CPU runs, so results match a worker bit for bit.
    `mmap=False` reads the file instead of mapping it (llama.cpp's --no-mmap): what
    `repack.should_map` advises when most CPU weights get repacked, which would otherwise
    be held twice.
    `devices` (ggml device names) limits offloading to those; None means this machine's
    GPUs, never the RPC workers an earlier load registered (llama.cpp would use those too,
    and abort the process if one is gone).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        gpu_layers: int = 0,
        cpu_tensors: Sequence[str] = (),
        repack: bool = True,
        devices: Sequence[str] | None = None,
        mmap: bool = True,
    ):
        self.path = Path(path)
        # llama.cpp work on this model's contexts (make, steer, decode, free), one call at a
        # time: contexts of one model must not decode from several threads at once, and a
        # server trains on one thread while its engine thread streams (they take turns)
        self.lock = threading.RLock()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.use_extra_bufts = repack
        if not mmap:
            params.load_mode = ll.LLAMA_LOAD_MODE_NONE
        if devices is None and ggml.RPC_SERVERS:
            devices = [d.name for d in machine.gpus()]
        self._devices = _device_array(devices)  # llama.cpp keeps the pointer
        if self._devices is not None:
            params.devices = ctypes.addressof(self._devices)
        self._overrides = _override_array(cpu_tensors)  # llama.cpp keeps the pointer
        if self._overrides is not None:
            params.tensor_buft_overrides = ctypes.addressof(self._overrides)
        with _recorded_log() as log:
            self.ptr = ll.llama_model_load_from_file(str(self.path).encode(), params)
        self.load_log = tuple(log)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {self.path}: {_last_error()}")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_layer = ll.llama_model_n_layer(self.ptr)
        self.n_embd = ll.llama_model_n_embd(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = ll.llama_model_n_ctx_train(self.ptr)
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.architecture = self.meta("general.architecture") or "unknown"
        self.name = self.meta("general.name") or self.path.stem
        template = ll.llama_model_chat_template(self.ptr, None)
        self.chat_template: str | None = template.decode() if template else None

    @property
    def overridden(self) -> dict[str, str]:
        """Weight name -> buffer type for each tensor override llama.cpp applied."""
        found = (_OVERRIDDEN.match(line) for line in self.load_log)
        return {m[1]: m[2] for m in found if m}

    @property
    def buffers(self) -> dict[str, int]:
        """Weight bytes per buffer (CPU_Mapped, CUDA0, Metal, ...), as llama.cpp allocated."""
        return _buffer_sizes(self.load_log, _BUFFER)

    @property
    def layer_devices(self) -> dict[str, int]:
        """Device name (CPU, CUDA0, RPC0, ...) -> how many blocks llama.cpp assigned to it."""
        counts: dict[str, int] = {}
        for match in filter(None, (_ASSIGNED.match(line) for line in self.load_log)):
            counts[match[1]] = counts.get(match[1], 0) + 1
        return counts

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False):
        data = utf8(text)
        cap = len(data) + 16
        out = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), out, cap, add_special, parse_special)
        if n < 0:
            out = (ll.llama_token * -n)()
            n = ll.llama_tokenize(self.vocab, data, len(data), out, -n, add_special, parse_special)
        tokens = list(out[:n])
        if len(tokens) > 1 and tokens[0] == tokens[1] == self.bos:
            tokens = tokens[1:]  # the text wrote BOS itself (chat templates) and we added one
        return tokens

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode(errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str | None:
        """Format a conversation with the GGUF's own template; None if llama.cpp can't."""
        if not self.chat_template:
            return None
        keep = [(utf8(m["role"]), utf8(m["content"])) for m in messages]  # outlive the call
        chat = (ll.llama_chat_message * len(keep))(*(ll.llama_chat_message(r, c) for r, c in keep))
        tmpl = self.chat_template.encode()
        size = 4096 + 2 * sum(len(c) for _, c in keep)
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(tmpl, chat, len(keep), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = ll.llama_chat_apply_template(tmpl, chat, len(keep), True, buf, n)
        return buf.raw[:n].decode(errors="replace") if n >= 0 else None

    def close(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def utf8(text: str) -> bytes:
    """`text` for llama.cpp. A str can hold lone surrogates (JSON's "\\ud800", or bytes that
    were not UTF-8 in a command line): those are the caller's mistake, not a crash."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise BadInput(
            f"the text is not valid UTF-8: character {exc.start} is a lone surrogate "
            f"({text[exc.start]!r}); send plain UTF-8 text"
        ) from None


_OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
_ASSIGNED = re.compile(r"\w+: layer +\d+ assigned to device (\S+),")
_BUFFER = re.compile(r"\w+: +(\S+) model buffer size = +([\d.]+) MiB")
_CONTEXT_BUFFER = re.compile(r"\w+: +(\S+ +(?:KV|output|compute)) buffer size = +([\d.]+) MiB")


@contextlib.contextmanager
def _recorded_log() -> Iterator[list[str]]:
    """Every line llama.cpp logs inside the block (how much it allocated, and where)."""
    global _recording
    LOG_TAIL.clear()
    lines: list[str] = []
    _recording = lines
    try:
        yield lines
    finally:
        _recording = None


def _buffer_sizes(log: Sequence[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Bytes per buffer named by `pattern`'s first group, from llama.cpp's "= N MiB" lines."""
    sizes: dict[str, int] = {}
    for match in filter(None, (pattern.match(line) for line in log)):
        name = " ".join(match[1].split())
        sizes[name] = sizes.get(name, 0) + round(float(match[2]) * (1 << 20))
    return sizes


class _Override(ctypes.Structure):
    """struct llama_model_tensor_buft_override: {const char *pattern; buffer type}."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _override_array(patterns: Sequence[str]) -> ctypes.Array | None:
    """A NULL-terminated override array sending `patterns` to the CPU buffer type. The
    array holds the pattern bytes, so keeping it referenced keeps them alive too."""
    if not patterns:
        return None
    cpu = ggml.cpu_buffer_type()
    entries = [_Override(p.encode(), cpu) for p in patterns] + [_Override(None, None)]
    return (_Override * len(entries))(*entries)


def _device_array(names: Sequence[str] | None) -> ctypes.Array | None:
    """A NULL-terminated array of ggml devices, for llama_model_params.devices."""
    if names is None:
        return None
    found = [ggml.device_by_name(name) for name in names]
    if not all(found):
        raise BadInput(f"no ggml device named {names[found.index(None)]!r}")
    return (ctypes.c_void_p * (len(found) + 1))(*found, None)


def _last_error() -> str:
    lines = [line.strip() for line in LOG_TAIL if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or ["unknown error"])[-1]


@dataclass
class GenerationStats:
    """What the last `generate` did: prompt tokens decoded, tokens generated, seconds."""

    prompt_tokens: int = 0
    generated: int = 0
    seconds: float = 0.0


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
}


def out_of_range(settings: SamplerSettings) -> str | None:
    """The first setting outside SAMPLING_LIMITS (NaN and infinities included), or None."""
    for name, (low, high) in SAMPLING_LIMITS.items():
        value = getattr(settings, name)
        if not (math.isfinite(value) and low <= value <= high):
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

    def sample(self, ctx: Context, row: int = -1) -> int:
        """Pick the next token from the logits of batch row `row` (default: the last one);
        llama.cpp also records it for the penalties."""
        return ll.llama_sampler_sample(self.ptr, ctx.ptr, row)

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


class Batch:
    """An owned llama_batch that we fill token by token (several sequences allowed)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = ll.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> None:
        i = self.n
        if i >= self.capacity:  # past the end is memory llama.cpp never gave us
            raise EngineError(f"batch overflow: {self.capacity} tokens at most")
        self.raw.token[i] = token
        self.raw.pos[i] = pos
        self.raw.n_seq_id[i] = 1
        self.raw.seq_id[i][0] = seq
        self.raw.logits[i] = output
        self.n += 1
        self.raw.n_tokens = self.n

    def __del__(self) -> None:
        ll.llama_batch_free(self.raw)


class Context:
    """A llama.cpp context: KV cache, decoding, steering, optional hidden-state capture.

    Generation contexts are made without an eval callback, because ggml calls it for every
    graph node of every decode; capture contexts install one and run a few big batches.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = DEFAULT_CTX,
        n_batch: int = 512,
        threads: int | None = None,
        n_seq: int = 1,
        capture: bool = False,
    ):
        self.model = model
        if n_ctx < 1 or n_batch < 1 or not 1 <= n_seq <= MAX_SEQUENCES:
            raise BadInput(f"bad context sizes: n_ctx {n_ctx}, n_batch {n_batch}, n_seq {n_seq}")
        n_batch = min(n_batch, n_ctx)  # llama.cpp caps a batch at the context: agree with it
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.kv_unified = True
        self._capture: _Capture | None = _Capture(model.n_layer, model.n_embd) if capture else None
        if self._capture is not None:
            params.cb_eval = self._capture.callback  # referenced by self._capture
        with model.lock, _recorded_log() as log:
            self.ptr = ll.llama_init_from_model(model.ptr, params)
        self.buffers = _buffer_sizes(log, _CONTEXT_BUFFER)  # "CPU KV", "CUDA0 compute", ...
        if not self.ptr:
            raise EngineError(f"could not create a llama.cpp context: {_last_error()}")
        self._agree_on_sizes(n_ctx, n_batch)
        self.batch = Batch(self.n_batch)
        self.tokens: list[int] = []  # what sequence 0 holds in the KV cache
        self._steering: np.ndarray | None = None
        self.stats = GenerationStats()

    def _agree_on_sizes(self, n_ctx: int, n_batch: int) -> None:
        """Take the sizes llama.cpp made, which every check before a decode relies on: a
        batch over its n_batch or n_ubatch aborts the process (GGML_ASSERT), not Python.
        The KV cache is padded to 256 cells; the context holds what was asked, no more."""
        made_batch, made_ubatch = ll.llama_n_batch(self.ptr), ll.llama_n_ubatch(self.ptr)
        if made_batch != n_batch or made_ubatch != n_batch:
            self.close()
            raise EngineError(
                f"llama.cpp made a batch of {made_batch} (micro-batch {made_ubatch}) "
                f"where {n_batch} was asked"
            )
        self.n_ctx = min(n_ctx, ll.llama_n_ctx(self.ptr))
        self.n_batch = n_batch

    # -- steering -------------------------------------------------------------------------
    def set_steering(self, rows: np.ndarray | None, first: int = 1, last: int = -1) -> None:
        """Add rows[il] to the output of block il for first <= il <= last (None = off).

        `rows` is (n_layer, n_embd) indexed by block; llama.cpp cannot steer block 0. The
        buffer llama.cpp wants starts at block 1, so row il goes to slot il-1, in a full
        zero-padded n_layer x n_embd buffer (slots past `len` would keep old values).
        Changing the steering empties the KV cache, whose tokens were computed under the old
        one; setting the same steering again keeps it.
        """
        m = self.model
        last = m.n_layer - 1 if last < 0 else last
        buf = None
        if rows is not None and np.any(rows[first : last + 1]):
            buf = np.zeros((m.n_layer, m.n_embd), dtype=np.float32)
            buf[first - 1 : last] = rows[first : last + 1]  # what llama.cpp adds, and no more
        if _same_steering(buf, self._steering):
            return  # same vectors: the cached tokens stay valid, and no graph rebuild
        self.forget(0)  # tokens in the KV cache were computed under the old steering
        self._steering = buf  # keep the memory alive while llama.cpp might read it
        pointer = None if buf is None else buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        with m.lock:
            if buf is None:
                ll.llama_set_adapter_cvec(self.ptr, None, 0, m.n_embd, -1, -1)
                return
            if ll.llama_set_adapter_cvec(self.ptr, pointer, buf.size, m.n_embd, first, last):
                raise EngineError(f"llama.cpp refused the control vector: {_last_error()}")

    # -- decoding -------------------------------------------------------------------------
    def forget(self, keep: int = 0) -> None:
        """Drop everything after the first `keep` tokens of sequence 0 from the KV cache."""
        memory = ll.llama_get_memory(self.ptr)
        if keep == 0:
            ll.llama_memory_clear(memory, True)
        else:
            ll.llama_memory_seq_rm(memory, 0, keep, -1)
        del self.tokens[keep:]

    def _decode(self) -> None:
        with self.model.lock:
            check_decode(ll.llama_decode(self.ptr, self.batch.raw))


    def ingest(self, tokens: Sequence[int]) -> int:
        """Make sequence 0 hold exactly `tokens`, reusing the longest cached prefix.

        The last token is always (re)decoded so that fresh logits are ready for sampling.
        Returns how many tokens were decoded.
        """
        if len(tokens) > self.n_ctx:
            raise BadInput(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}: "
                "raise --ctx or shorten the conversation (/clear)"
            )
        same = min(self.cached_prefix(tokens), len(tokens) - 1)
        self.forget(same)
        self._append(tokens[same:])
        return len(tokens) - same

    def _append(self, tokens: Sequence[int]) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self.batch.clear()
            pos = len(self.tokens)
            for i, token in enumerate(chunk):
                self.batch.add(token, pos + i, 0, start + i == len(tokens) - 1)
            self._decode()
            self.tokens.extend(chunk)

    def score(self, texts: Sequence[tuple[Sequence[int], int]]) -> list[np.ndarray]:
        """For each (tokens, start): log P(tokens[i] | tokens[:i]) for every i >= start
        (1 <= start < len(tokens)), each from an empty cache.

        Texts share batches as separate sequences (up to SCORED_TOGETHER, whatever the
        context's n_seq: llama.cpp's numbers shift with batch shape, by up to 0.07 nats a
        token, and a score should not depend on how many samples a context was made for), so
        many short ones cost about what one long one does; logits are kept only for scored
        positions, and the last token is never decoded (nothing predicts past it)."""
        for tokens, start in texts:
            if not 1 <= start < len(tokens) <= self.n_batch:
                raise BadInput(f"cannot score {len(tokens)} tokens from position {start}")
        scores: list[np.ndarray] = [np.empty(0)] * len(texts)
        for group in self.packed_groups([tokens[:-1] for tokens, _ in texts], SCORED_TOGETHER):
            logps = self._score_group([texts[i] for i in group])
            for index, values in zip(group, logps, strict=True):
                scores[index] = values
        return scores

    def _score_group(self, texts: Sequence[tuple[Sequence[int], int]]) -> list[np.ndarray]:
        self.forget(0)
        self.batch.clear()
        targets: list[int] = []
        counts: list[int] = []
        for seq, (tokens, start) in enumerate(texts):
            for pos, token in enumerate(tokens[:-1]):
                self.batch.add(token, pos, seq, pos >= start - 1)
            targets.extend(tokens[start:])
            counts.append(len(tokens) - start)
        self._decode()
        logps = self._log_probs(np.asarray(targets))
        self.forget(0)
        return np.split(logps, np.cumsum(counts)[:-1])

    def _log_probs(self, targets: np.ndarray) -> np.ndarray:
        """log-softmax of the last batch's output rows, at `targets` (one per row), in blocks
        of rows so that a 262k vocabulary never needs more than ~16 MiB of scratch. float32
        throughout: numpy's pairwise sum keeps the normaliser's relative error near 1e-7."""
        n_vocab = self.model.n_vocab
        logits = np.ctypeslib.as_array(ll.llama_get_logits(self.ptr), shape=(len(targets), n_vocab))
        out = np.empty(len(targets), dtype=np.float64)
        step = max(1, (16 << 20) // (4 * n_vocab))
        scratch = np.empty((min(step, len(targets)), n_vocab), dtype=np.float32)
        for lo in range(0, len(targets), step):
            rows = logits[lo : lo + step]
            shifted = scratch[: len(rows)]
            top = rows.max(axis=1)
            np.exp(np.subtract(rows, top[:, None], out=shifted), out=shifted)
            picked = rows[np.arange(len(rows)), targets[lo : lo + step]]
            out[lo : lo + step] = picked - top - np.log(shifted.sum(axis=1))
        return out

    def decode_packed(self, group: Sequence[int], sequences: Sequence[Sequence[int]]) -> None:
        """Decode sequences[i] for each i in `group` side by side from an empty cache, as
        sequence ids 0.., with logits kept only at each one's last token."""
        self.forget(0)
        self.batch.clear()
        for seq, index in enumerate(group):
            last = len(sequences[index]) - 1
            for pos, token in enumerate(sequences[index]):
                self.batch.add(token, pos, seq, pos == last)
        self._decode()

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the KV cache already holds."""
        same = 0
        for a, b in zip(self.tokens, tokens, strict=False):
            if a != b:
                break
            same += 1
        return same

    def logits(self) -> np.ndarray:
        """Logits of the last decoded output token."""
        ptr = ll.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def generate(
        self,
        prompt: Sequence[int],
        sampler: Sampler,
        *,
        max_tokens: int = 256,
    ) -> Iterator[str]:
        """Stream text pieces after `prompt`; stops on EOG, `max_tokens` or a full context.
        Tokens stay in the KV cache, so a later `ingest` reuses them."""
        self.stats = stats = GenerationStats(self.ingest(prompt))
        sampler.accept_prompt(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _ in range(max_tokens):
            if len(self.tokens) >= self.n_ctx:
                break
            start = time.perf_counter()  # our time only, not the consumer's between pieces
            token = sampler.sample(self)
            if self.model.is_eog(token):
                break
            piece = decoder.decode(self.model.piece(token))
            self._append([token])
            stats.generated += 1
            stats.seconds += time.perf_counter() - start
            if piece:
                yield piece
        yield decoder.decode(b"", final=True)

    def sample_many(
        self, prompts: Sequence[Sequence[int]], samplers: Sequence[Sampler], max_tokens: int
    ) -> list[list[int]]:
        """One sampled continuation per prompt, decoded side by side: sequence i holds prompt
        i, and each step is one `llama_decode` of every live sequence's next token. Each stops
        at end-of-generation or `max_tokens`. Needs a context made with n_seq >= len(prompts);
        leaves its cache empty."""
        if not prompts:
            return []
        if len(prompts) > ll.llama_n_seq_max(self.ptr):
            raise BadInput(f"{len(prompts)} prompts need a context made with n_seq >= that")
        if (
            any(not p for p in prompts)
            or sum(map(len, prompts)) + len(prompts) * max_tokens > self.n_ctx
        ):
            raise BadInput("the prompts and their continuations do not fit the context")
        self.forget(0)
        self._prefill_sequences([p[:-1] for p in prompts])
        outputs: list[list[int]] = [[] for _ in prompts]
        step = {seq: p[-1] for seq, p in enumerate(prompts)}
        for sampler, prompt in zip(samplers, prompts, strict=True):
            sampler.accept_prompt(prompt)
        for _ in range(max_tokens):
            self.batch.clear()
            rows = {}
            for seq, token in step.items():
                rows[seq] = self.batch.n
                self.batch.add(token, len(prompts[seq]) + len(outputs[seq]) - 1, seq, True)
            self._decode()
            step = {}
            for seq, row in rows.items():
                token = samplers[seq].sample(self, row)
                if not self.model.is_eog(token):
                    outputs[seq].append(token)
                    step[seq] = token
            if not step:
                break
        self.forget(0)
        return outputs

    def _prefill_sequences(self, sequences: Sequence[Sequence[int]]) -> None:
        """Decode sequence i into sequence id i, packed into full batches, no logits kept."""
        self.batch.clear()
        for seq, tokens in enumerate(sequences):
            for pos, token in enumerate(tokens):
                if self.batch.n == self.n_batch:
                    self._decode()
                    self.batch.clear()
                self.batch.add(token, pos, seq, False)
        if self.batch.n:
            self._decode()

    # -- capture --------------------------------------------------------------------------
    def capture(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]] | None = None
    ) -> list[np.ndarray]:
        """Hidden states `l_out-il` (output of block il, after steering) for each sequence.

        Returns one (n_positions, n_layer, n_embd) float32 array per sequence; positions
        default to the last token. Short sequences share a batch as separate sequence ids, so
        capture runs at close to plain prompt-processing speed.
        """
        if self._capture is None:
            raise RuntimeError("this context was created without capture=True")
        positions = positions or [[len(s) - 1] for s in sequences]
        results: list[np.ndarray | None] = [None] * len(sequences)
        for group in self.packed_groups(sequences):
            for index, states in self._capture_group(group, sequences, positions):
                results[index] = states
        return results  # type: ignore[return-value]

    def capture_last(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        through: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """(n, n_layer, n_embd) states `l_out-il` at each sequence's last token, for blocks
        0..`through` (default: all). Later blocks are not computed at all (their rows stay
        zero): the graph ends after block `through`, output layer included. Prefixes that
        sequences share are decoded once (`_shared_rounds`). `progress(done, total)` follows
        each round."""
        if self._capture is None:
            raise RuntimeError("this context was created without capture=True")
        through = self.model.n_layer - 1 if through is None else through
        out = np.zeros((len(sequences), self.model.n_layer, self.model.n_embd), np.float32)
        done = 0
        if progress:
            progress(done, len(sequences))
        for members in self._shared_rounds(sequences, through):
            out[members] = self._capture.out
            done += len(members)
            if progress:
                progress(done, len(sequences))
        return out

    def next_token_probs(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """(n, n_vocab) next-token probabilities after each sequence, each from an empty
        cache, many sequences per decode, shared prefixes decoded once."""
        n_vocab = self.model.n_vocab
        out = np.empty((len(sequences), n_vocab), dtype=np.float32)
        for members in self._shared_rounds(sequences):
            logits = ll.llama_get_logits(self.ptr)
            rows = np.ctypeslib.as_array(logits, shape=(len(members), n_vocab))
            shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
            out[members] = shifted / shifted.sum(axis=1, keepdims=True)
        return out

    def _shared_rounds(
        self, sequences: Sequence[Sequence[int]], through: int | None = None
    ) -> Iterator[list[int]]:
        """Decode `sequences` from an empty cache in rounds, yielding each round's members
        once their last tokens' logits (or, with `through`, captured states) are ready, in
        member order; the cache is emptied after the last round.

        Leading tokens that sequences share (a persona instruction before many
        continuations) are decoded once per round, and every sequence of that group uses
        those KV cells (`llama_memory_seq_cp`): only what follows is decoded per sequence
        (prefixes.py plans the groups). Results equal decoding each sequence in full, up to
        llama.cpp's batch-shape rounding (the same as packing them side by side)."""
        for seq in sequences:
            if not 1 <= len(seq) <= self.n_batch:
                raise BadInput(f"cannot decode {len(seq)} tokens in batches of {self.n_batch}")
        limits = prefixes.Limits(ll.llama_n_seq_max(self.ptr), self.n_batch, self.n_ctx)
        for packed in prefixes.rounds(prefixes.groups(sequences, limits), sequences, limits):
            self._decode_round(packed, sequences, through)
            yield [m for group in packed for m in group.members]
        self.forget(0)

    def _decode_round(
        self,
        packed: Sequence[prefixes.Group],
        sequences: Sequence[Sequence[int]],
        through: int | None,
    ) -> None:
        """The groups' prefixes in one decode, shared with their members, then every
        member's remaining tokens in another, outputs at each member's last token."""
        self.forget(0)
        ids = {m: i for i, m in enumerate(m for group in packed for m in group.members)}
        self.batch.clear()
        for group in packed:
            lead = group.members[0]
            for pos, token in enumerate(sequences[lead][: group.shared]):
                self.batch.add(token, pos, ids[lead], False)
        if self.batch.n:
            self._decode_capturing([], through)
            memory = ll.llama_get_memory(self.ptr)
            for group in packed:
                for member in group.members[1:]:
                    ll.llama_memory_seq_cp(memory, ids[group.members[0]], ids[member], -1, -1)
        self.batch.clear()
        for group in packed:
            for member in group.members:
                tokens = sequences[member]
                for pos in range(group.shared, len(tokens)):
                    self.batch.add(tokens[pos], pos, ids[member], pos == len(tokens) - 1)
        outputs = [i for i in range(self.batch.n) if self.batch.raw.logits[i]]
        self._decode_capturing(outputs, through)

    def _decode_capturing(self, rows: list[int], through: int | None) -> None:
        """Decode the batch; with `through`, capture the states of batch `rows` through
        that block into `self._capture.out` (the graph ends there)."""
        if through is None:
            self._decode()
            return
        assert self._capture is not None
        self._capture.start(rows, self.batch.n, through)
        with _interrupt_after_decode() as interrupted:
            self._capture.interrupted = interrupted
            self._decode()
        self._capture.finish()

    def packed_groups(
        self, sequences: Sequence[Sequence[int]], most: int | None = None
    ) -> Iterator[list[int]]:
        """Indices of `sequences` packed into batches: at most n_batch tokens and the
        context's n_seq (or `most`) sequences each."""
        group: list[int] = []
        used = 0
        n_seq = min(ll.llama_n_seq_max(self.ptr), most or ll.llama_n_seq_max(self.ptr))
        for i, seq in enumerate(sequences):
            if not seq:
                raise BadInput("cannot capture hidden states of an empty prompt")
            if len(seq) > self.n_batch or len(seq) > self.n_ctx:
                raise BadInput(
                    f"prompt of {len(seq)} tokens exceeds the capture batch of {self.n_batch}"
                )
            if group and (used + len(seq) > self.n_batch or len(group) == n_seq):
                yield group
                group, used = [], 0
            group.append(i)
            used += len(seq)
        if group:
            yield group

    def _capture_group(self, group, sequences, positions) -> Iterator[tuple[int, np.ndarray]]:
        self.forget(0)
        self.batch.clear()
        wanted: list[int] = []  # batch indices whose states we keep, in batch order
        for seq_id, index in enumerate(group):
            base = self.batch.n
            keep = set(positions[index])
            for pos, token in enumerate(sequences[index]):
                self.batch.add(token, pos, seq_id, pos in keep)
            wanted.extend(base + p for p in sorted(keep))
        assert self._capture is not None
        self._capture.start(wanted, self.batch.n)
        self._decode()
        states = self._capture.finish()  # (n_wanted, n_layer, n_embd)
        self.forget(0)
        offset = 0
        for index in group:
            n = len(set(positions[index]))
            yield index, states[offset : offset + n]
            offset += n

    def close(self) -> None:
        if self.ptr:
            with self.model.lock:
                ll.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _same_steering(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))


@contextlib.contextmanager
def _interrupt_after_decode() -> Iterator[list[bool]]:
    """Ctrl-C during a decode whose eval callback runs Python. A KeyboardInterrupt raised
    inside the callback is swallowed by ctypes ("Exception ignored on calling ctypes
    callback") and leaves the graph cut short, so here SIGINT only records itself in the
    yielded list (the callback then ends the graph at once), and KeyboardInterrupt is raised
    after llama_decode has returned. Only in the main thread, and only over Python's own
    handler; elsewhere nothing changes."""
    interrupted: list[bool] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupted
        return
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        raise KeyboardInterrupt


class _Capture:
    """The eval callback: copies `l_out-<il>` rows of one decode into a numpy array, and
    ends the graph after block `through` when later blocks are not wanted."""

    def __init__(self, n_layer: int, n_embd: int):
        self.n_layer, self.n_embd = n_layer, n_embd
        self.callback = ll.ggml_backend_sched_eval_callback(self._on_eval)
        self.rows: list[int] = []
        self.n_tokens = 0
        self.through = n_layer - 1
        self.out = np.zeros((0, n_layer, n_embd), dtype=np.float32)
        self.seen: set[int] = set()
        self.error: BaseException | None = None
        self.interrupted: list[bool] = []  # non-empty: Ctrl-C, end the graph now

    def start(self, rows: list[int], n_tokens: int, through: int | None = None) -> None:
        self.rows, self.n_tokens, self.seen, self.error = rows, n_tokens, set(), None
        self.through = self.n_layer - 1 if through is None else through
        self.out = np.zeros((len(rows), self.n_layer, self.n_embd), dtype=np.float32)

    def finish(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        if len(self.seen) != self.through + 1:
            missing = sorted(set(range(self.through + 1)) - self.seen)
            raise RuntimeError(f"llama.cpp produced no l_out for layers {missing}")
        return self.out

    def _on_eval(self, tensor: int, ask: bool, _user: int) -> bool:
        try:
            if self.interrupted:
                return False
            name = ggml.tensor_name(tensor)
            if not name.startswith(b"l_out-"):
                return False
            layer = int(name[6:])
            if ask:
                return layer <= self.through
            self._store(layer, tensor)
            # False ends the graph: nothing after `through` (nor the logits) is computed
            return layer < self.through or self.through == self.n_layer - 1
        except BaseException as exc:  # an exception must not cross into C
            self.error = exc
            return False

    def _store(self, layer: int, tensor: int) -> None:
        self.seen.add(layer)
        if not self.rows:
            return  # a decode that only fills the KV cache (shared prefixes)
        n_rows = ggml.TensorHead.from_address(tensor).ne[1]
        # the last block only computes output rows, which are exactly the wanted ones
        pick = list(range(n_rows)) if n_rows == len(self.rows) else self.rows
        self.out[:, layer, :] = ggml.tensor_rows(tensor, pick)


def check_decode(status: int) -> None:
    """llama_decode's status as an error: the engine's decodes and the baselines' alike."""
    if status != 0:
        raise EngineError(f"llama_decode failed with status {status}: {_last_error()}")


# -- baselines for benchmarks: llama.cpp driven as directly as Python can ----------------


def bare_decode(ctx: Context, prompt: Sequence[int], n_gen: int) -> tuple[float, list[int], float]:
    """The floor any Python can reach: the prompt through `llama_decode` in n_batch chunks,
    then `n_gen` greedy tokens from the shortest loop (no end-of-generation check), under
    the current steering. Returns (prompt seconds, tokens, generation seconds); the cache
    is left empty. Benchmarks compare `generate` and `ingest` against it."""
    ctx.forget(0)
    sampler = ll.llama_sampler_init_greedy()
    one = (ll.llama_token * 1)()  # llama_decode reads the token through this array
    step = ll.llama_batch_get_one(one, 1)
    tokens: list[int] = []
    try:
        start = time.perf_counter()
        for begin in range(0, len(prompt), ctx.n_batch):
            chunk = prompt[begin : begin + ctx.n_batch]
            array = (ll.llama_token * len(chunk))(*chunk)  # referenced until decode returns
            check_decode(ll.llama_decode(ctx.ptr, ll.llama_batch_get_one(array, len(chunk))))
        raw, sample, decode = ctx.ptr, ll.llama_sampler_sample, ll.llama_decode
        ll.llama_synchronize(raw)  # asynchronous backends (CUDA, RPC) may still be computing
        middle = time.perf_counter()
        for _ in range(n_gen):
            one[0] = token = sample(sampler, raw, -1)
            if status := decode(raw, step):
                check_decode(status)
            tokens.append(token)
        end = time.perf_counter()
    finally:
        ll.llama_sampler_free(sampler)
        ctx.forget(0)
    return middle - start, tokens, end - middle


def prefill(ctx: Context, sequences: Sequence[Sequence[int]]) -> None:
    """Decode prompts packed exactly as `capture` packs them and keep nothing: plain
    prompt processing, the baseline that capture's speed is measured against."""
    for group in ctx.packed_groups(sequences):
        ctx.decode_packed(group, sequences)
    ctx.forget(0)
