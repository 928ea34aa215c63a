"""A llama.cpp context: its KV cache, decoding one sequence incrementally, and steering.

The units that decode many sequences at once live next to it (packing, scoring,
continuations, hidden) and share one cache rule, `Context.scratch`.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import importlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import llama_cpp as ll
import numpy as np

from .. import prefixes
from ..constants import DEFAULT_CTX
from ..errors import BadInput, EngineError
from . import log
from .model import Model, default_threads, utf8
from .recorder import StateRecorder
from .rowsteer import RowSteering
from .sampling import Sampler

MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ: llama.cpp refuses a context with more
DEFAULT_BATCH = 512  # tokens per decode, as llama.cpp's n_batch default


@dataclass
class GenerationStats:
    """What one `generate` did: prompt tokens decoded, tokens generated, seconds, and why it
    stopped: "stop" (the model ended it), "length" (max_tokens), "context" (the context is
    full); "" while it runs or when it was closed early."""

    prompt_tokens: int = 0
    generated: int = 0
    seconds: float = 0.0
    stop_reason: str = ""


@dataclass
class Generation:
    """What `Context.generate` returns: iterate it for the text pieces; `stats` fills in as
    they come (final once the iteration ends)."""

    pieces: Iterator[str]
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def __next__(self) -> str:
        return next(self.pieces)

    def close(self) -> None:
        """End it early, as a `break` out of the loop leaves it: the next call may start."""
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()


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

    def output_rows(self) -> np.ndarray:
        """The rows whose logits the decode keeps, in batch order."""
        return np.flatnonzero([self.raw.logits[i] for i in range(self.n)])

    def __del__(self) -> None:
        ll.llama_batch_free(self.raw)


class Context:
    """A llama.cpp context: KV cache, decoding, steering, optional hidden-state capture.

    Sequence 0 is decoded incrementally (`ingest`, `generate`) and its cached prefix is
    reused. Units that decode many sequences at once borrow the whole cache through
    `scratch`. Generation contexts are made without an eval callback, because ggml calls it
    for every graph node of every decode; capture contexts (`capture=True`) install one,
    and so do contexts that batch sequences under different steerings (`row_steering=True`,
    see `rowsteer`). `separate_kv`: each sequence gets KV cells of its own (n_ctx / n_seq),
    laid out as if it were alone, instead of one pool they all share.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = DEFAULT_CTX,
        n_batch: int = DEFAULT_BATCH,
        threads: int | None = None,
        n_seq: int = 1,
        capture: bool = False,
        row_steering: bool = False,
        separate_kv: bool = False,
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
        params.kv_unified = not separate_kv
        if capture and row_steering:
            raise BadInput("a context either records hidden states or steers rows, not both")
        self.recorder = StateRecorder(model.n_layer, model.n_embd) if capture else None
        self.row_steering = RowSteering(model.n_layer, n_seq) if row_steering else None
        if self.recorder is not None:
            params.cb_eval = self.recorder.callback  # referenced by self.recorder
        if self.row_steering is not None:
            params.cb_eval = self.row_steering.callback  # referenced by self.row_steering
        with model.lock, log.recorded() as lines:
            self.ptr = ll.llama_init_from_model(model.live, params)
        self.buffers = log.buffer_sizes(lines, log.CONTEXT_BUFFER)  # "CPU KV", "CUDA0 compute"
        if not self.ptr:
            raise EngineError(f"could not create a llama.cpp context: {log.last_error()}")
        self._agree_on_sizes(n_ctx, n_batch)
        self.n_seq = ll.llama_n_seq_max(self.ptr)
        self.separate_kv = separate_kv
        self.threads = params.n_threads  # for a context made beside this one
        self.batch = Batch(self.n_batch)
        self.tokens: list[int] = []  # what sequence 0 holds in the KV cache
        self._steering: tuple[np.ndarray, int, int] | None = None  # (buffer, first, last)
        self._last_stats = GenerationStats()

    @property
    def live(self) -> int:
        """The llama.cpp context, for a call into it: once it or its model is closed, a
        BadInput rather than a crash (see `Model.live`)."""
        if not self.ptr:
            raise BadInput("the context is closed: open another")
        self.model.live  # noqa: B018  # raises once the model is closed
        return self.ptr

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
        self._steer(rows, first, last, keep_cache=False)

    def steer_all_rows(self, rows: np.ndarray | None, first: int = 1, last: int = -1) -> None:
        """`set_steering`, keeping the KV cache: for a caller that knows which steering each
        cached sequence was computed under (`batching.Batcher`)."""
        self._steer(rows, first, last, keep_cache=True)

    def zero_control_vector(self, first: int = 1, last: int = -1) -> None:
        """A control vector of zeros over blocks first..last, keeping the KV cache: it adds
        nothing, but ends each of those blocks in an add that per-row steering
        (`rowsteer`) points at each row's own vectors."""
        m = self.model
        last = m.n_layer - 1 if last < 0 else last
        self._apply_steering(np.zeros((m.n_layer, m.n_embd), dtype=np.float32), first, last)

    def _steer(self, rows: np.ndarray | None, first: int, last: int, *, keep_cache: bool) -> None:
        m = self.model
        last = m.n_layer - 1 if last < 0 else last
        buf = None
        if rows is not None and np.any(rows[first : last + 1]):
            buf = np.zeros((m.n_layer, m.n_embd), dtype=np.float32)
            buf[first - 1 : last] = rows[first : last + 1]  # what llama.cpp adds, and no more
        self._apply_steering(buf, first, last, keep_cache=keep_cache)

    def _apply_steering(
        self, buf: np.ndarray | None, first: int, last: int, *, keep_cache: bool = True
    ) -> None:
        """Hand llama.cpp `buf` (None: off) over blocks first..last, unless it already holds
        it: a new control vector makes its next decode rebuild the graphs."""
        m = self.model
        if _same_steering(buf, first, last, self._steering):
            return  # same vectors: the cached tokens stay valid, and no graph rebuild
        if not keep_cache:
            self.forget(0)  # tokens in the KV cache were computed under the old steering
        self._steering = None if buf is None else (buf, first, last)  # alive while in use
        with m.lock:
            if buf is None:
                ll.llama_set_adapter_cvec(self.live, None, 0, m.n_embd, -1, -1)
                return
            pointer = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if ll.llama_set_adapter_cvec(self.live, pointer, buf.size, m.n_embd, first, last):
                raise EngineError(f"llama.cpp refused the control vector: {log.last_error()}")

    # -- decoding -------------------------------------------------------------------------
    def forget(self, keep: int = 0) -> None:
        """Drop everything after the first `keep` tokens of sequence 0 from the KV cache."""
        memory = ll.llama_get_memory(self.live)
        if keep == 0:
            ll.llama_memory_clear(memory, True)
        else:
            ll.llama_memory_seq_rm(memory, 0, keep, -1)
        del self.tokens[keep:]

    def decode(self) -> None:
        """Decode what `batch` holds (one llama.cpp call at a time per model); raises what
        went wrong in a per-row steering callback."""
        with self.model.lock:
            check_decode(ll.llama_decode(self.live, self.batch.raw))
        if self.row_steering is not None:
            self.row_steering.check()

    def prompt_tokens(self, text: str) -> list[int]:
        """`text` tokenized as a prompt (`Model.tokenize_prompt`); text that cannot fit this
        context, whatever its tokens, is refused first, without tokenizing (see
        `Model.fewest_tokens`)."""
        fewest = self.model.fewest_tokens(utf8(text), self.n_ctx + 1)
        if fewest > self.n_ctx:
            self._refuse_prompt(f"at least {fewest}")
        return self.model.tokenize_prompt(text)

    def _refuse_prompt(self, tokens: str) -> NoReturn:
        raise BadInput(
            f"the prompt is {tokens} tokens but the context holds {self.n_ctx}: "
            "raise --ctx, or shorten the prompt"
        )

    def ingest(self, tokens: Sequence[int]) -> int:
        """Make sequence 0 hold exactly `tokens`, reusing the longest cached prefix.

        The last token is always (re)decoded so that fresh logits are ready for sampling.
        Returns how many tokens were decoded.
        """
        if len(tokens) > self.n_ctx:
            self._refuse_prompt(str(len(tokens)))
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
            self.decode()
            self.tokens.extend(chunk)

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the KV cache already holds."""
        return prefixes.common_length(self.tokens, tokens)

    def logits(self) -> np.ndarray:
        """Logits of the last decoded output token."""
        ptr = ll.llama_get_logits_ith(self.live, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def output_logits(self, n_rows: int) -> np.ndarray:
        """The last decode's logits, one row per output token in batch order (a view that
        the next decode overwrites)."""
        logits = ll.llama_get_logits(self.live)
        return np.ctypeslib.as_array(logits, shape=(n_rows, self.model.n_vocab))

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Batch]:
        """The whole KV cache and the batch, for a unit that decodes many sequences at once
        (packing, scoring, continuations, hidden): the cache is emptied before and
        after, so sequence 0's tokens, which `ingest` would have reused, are gone."""
        self.forget(0)
        self.batch.clear()
        try:
            yield self.batch
        finally:
            self.forget(0)

    def generate(
        self, prompt: Sequence[int], sampler: Sampler, *, max_tokens: int = 256
    ) -> Generation:
        """Text pieces after `prompt` (iterate the result), and their stats; stops on EOG,
        `max_tokens` or a full context. Tokens stay in the KV cache, so a later `ingest`
        reuses them. Nothing is decoded until the first piece is asked for."""
        self._last_stats = stats = GenerationStats()
        return Generation(self._pieces(prompt, sampler, max_tokens, stats), stats)

    def _pieces(
        self, prompt: Sequence[int], sampler: Sampler, max_tokens: int, stats: GenerationStats
    ) -> Iterator[str]:
        stats.prompt_tokens = self.ingest(prompt)
        ll.llama_synchronize(self.live)  # the prompt's compute (CUDA, RPC: asynchronous) is
        sampler.accept_prompt(prompt)  # not the first token's time
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _ in range(max_tokens):
            if len(self.tokens) >= self.n_ctx:
                stats.stop_reason = "context"
                return
            start = time.perf_counter()  # our time only, not the consumer's between pieces
            token = sampler.sample(self)
            if self.model.is_eog(token):
                stats.stop_reason = "stop"
                return
            piece = decoder.decode(self.model.piece(token))
            self._append([token])
            stats.generated += 1
            stats.seconds += time.perf_counter() - start
            if piece:
                yield piece
        stats.stop_reason = "length"
        # a character the last token left incomplete is dropped, not shown as U+FFFD

    @property
    def stats(self) -> GenerationStats:
        """Deprecated: the stats of the last `generate`; read `Generation.stats` instead."""
        warnings.warn(_MOVED.format("stats", "generate(...).stats"), DeprecationWarning, 2)
        return self._last_stats

    def close(self) -> None:
        if self.ptr:
            with self.model.lock:
                ll.llama_free(self.ptr)
            self.ptr = None
        if self.row_steering is not None:
            self.row_steering.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _same_steering(
    buf: np.ndarray | None, first: int, last: int, held: tuple[np.ndarray, int, int] | None
) -> bool:
    """Whether llama.cpp already holds control vector `buf` over blocks first..last."""
    if buf is None or held is None:
        return buf is None and held is None
    return held[1:] == (first, last) and bool(np.array_equal(buf, held[0]))


def check_decode(status: int) -> None:
    """llama_decode's status as an error: the engine's decodes and the baselines' alike."""
    if status != 0:
        raise EngineError(f"llama_decode failed with status {status}: {log.last_error()}")


_MOVED = "Context.{} is deprecated: use edge_steer.engine.{}"


def _moved(module: str, name: str) -> Callable[..., object]:
    """A deprecated Context method that forwards to the unit `module.name(context, ...)`."""

    def method(self: Context, *args: object, **kwargs: object) -> object:
        warnings.warn(_MOVED.format(name, f"{module}.{name}(context, ...)"), DeprecationWarning, 2)
        unit = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return unit(self, *args, **kwargs)

    method.__name__ = name
    return method


# The batch units were Context methods until 0.3; these keep old callers working.
for _module, _names in {
    "packing": ("packed_groups", "decode_packed"),
    "scoring": ("score", "next_token_probs"),
    "continuations": ("sample_many",),
    "hidden": ("capture", "capture_last"),
}.items():
    for _name in _names:
        setattr(Context, _name, _moved(_module, _name))
