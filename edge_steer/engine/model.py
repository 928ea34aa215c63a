"""A loaded GGUF model: weights, vocabulary, chat template, and where llama.cpp put them."""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as ll

from .. import ggml, machine
from ..errors import BadInput, EngineError
from . import log
from .recorder import interrupt_after_decode


def default_threads() -> int:
    return max(1, machine.math_cores())


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
        params.use_extra_bufts = repack  # never the AMX layouts: ggml.drop_amx_buffer
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
        ggml.drop_amx_buffer()
        with log.recorded() as lines, interrupt_after_decode() as interrupted:
            # Ctrl-C while llama.cpp loads: Python's handler would run inside a log callback,
            # where ctypes swallows the KeyboardInterrupt and the load went on to the end
            self._progress = _stop_when(interrupted)  # llama.cpp keeps the pointer
            params.progress_callback = self._progress
            self.ptr = ll.llama_model_load_from_file(str(self.path).encode(), params)
            if interrupted and self.ptr:  # after the last progress call: loaded, not wanted
                ll.llama_model_free(self.ptr)
                self.ptr = None
        self.load_log = tuple(lines)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {self.path}: {log.last_error()}")
        self._vocab = ll.llama_model_get_vocab(self.ptr)
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
    def live(self) -> int:
        """The llama.cpp model, for a call into it: after `close` a BadInput, not a crash
        (llama.cpp reads freed memory, or aborts, when handed a freed or NULL model)."""
        if not self.ptr:
            raise BadInput(f"the model {self.name} is closed: load it again")
        return self.ptr

    @property
    def vocab(self) -> int:
        """The model's vocabulary, which lives and dies with it (see `live`)."""
        self.live  # noqa: B018  # raises once closed
        return self._vocab

    @property
    def overridden(self) -> dict[str, str]:
        """Weight name -> buffer type for each tensor override llama.cpp applied."""
        found = (log.OVERRIDDEN.match(line) for line in self.load_log)
        return {m[1]: m[2] for m in found if m}

    @property
    def buffers(self) -> dict[str, int]:
        """Weight bytes per buffer (CPU_Mapped, CUDA0, Metal, ...), as llama.cpp allocated."""
        return log.buffer_sizes(self.load_log, log.MODEL_BUFFER)

    @property
    def layer_devices(self) -> dict[str, int]:
        """Device name (CPU, CUDA0, RPC0, ...) -> how many blocks llama.cpp assigned to it."""
        counts: dict[str, int] = {}
        for match in filter(None, (log.ASSIGNED.match(line) for line in self.load_log)):
            counts[match[1]] = counts.get(match[1], 0) + 1
        return counts

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.live, key.encode(), buf, len(buf))
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

    def tokenize_prompt(self, text: str) -> list[int]:
        """A user's prompt as llama-cli and llama-server read it: the text of a special token
        (`<|im_start|>`, `[INST]`) is that token, so hand-written templates work."""
        return self.tokenize(text, parse_special=True)

    @functools.cached_property
    def longest_piece(self) -> int:
        """Bytes of text one token can stand for at most (special tokens' text included)."""
        return max(len(self.piece(t, special=True)) for t in range(self.n_vocab))

    def fewest_tokens(self, text: bytes, limit: int) -> int:
        """A lower bound on the tokens `text` becomes, where that may reach `limit`: how text
        far past a context is refused without tokenizing it, which llama.cpp does in time
        that grows with the square of some inputs (20 s for 4 MB of spaces). 0 below 8
        bytes a token (prose has about 4), which tokenizes fast anyway; above, it scans
        the vocabulary once (0.3 s for 262k tokens)."""
        if len(text) < 8 * limit:
            return 0
        return -(-len(text) // self.longest_piece)

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
        if any("\0" in m["content"] for m in messages):
            raise BadInput(
                "a message holds a NUL character (\\x00), which would cut it short in the "
                "chat template: remove it"
            )
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
        with self.lock:  # not under a decode of one of its contexts (they take the lock)
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


def _stop_when(interrupted: list[bool]):
    """A load progress callback: llama.cpp stops loading once it returns false."""
    return ll.llama_progress_callback(lambda _progress, _data: not interrupted)
