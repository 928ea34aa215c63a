"""The eval callback that records hidden states: ggml asks it about every graph node of a
decode, and it copies each block's output (`l_out-<il>`, after steering) of the wanted batch
rows into a numpy array, ending the graph early when later blocks are not wanted."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import llama_cpp as ll
import numpy as np

from .. import ggml


@contextlib.contextmanager
def interrupt_after_decode() -> Iterator[list[bool]]:
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


class StateRecorder:
    """The eval callback: copies `l_out-<il>` rows of one decode into a numpy array, and
    ends the graph after block `through` when later blocks are not wanted."""

    def __init__(self, n_layer: int, n_embd: int):
        self.n_layer, self.n_embd = n_layer, n_embd
        self.callback = ll.ggml_backend_sched_eval_callback(self._on_eval)
        self._block_output = ggml.block_output_reader()
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
            layer = self._block_output(tensor)
            if layer < 0:
                return False
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
        n_rows = ggml.Tensor.from_address(tensor).ne[1]
        # the last block only computes output rows, which are exactly the wanted ones
        pick = list(range(n_rows)) if n_rows == len(self.rows) else self.rows
        self.out[:, layer, :] = ggml.tensor_rows(tensor, pick)
