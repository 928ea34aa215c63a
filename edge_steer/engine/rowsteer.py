"""Steering per batch row: the eval callback that adds each row's own vector to a block's
output, so that sequences under different steerings share one `llama_decode`.

llama.cpp's control vector is one per context and added to every row. Where the rows of a
decode want different vectors, the context runs with no control vector and this callback
adds them: after llama.cpp computes `l_out-<il>` (a block's output, where its control vector
would have been added) and before the next block reads it, the rows are read, each gets its
own vector added in float32 (the same add llama.cpp's `ggml_add` does, so the result is bit
for bit the native one) and they are written back.

Cost: ggml asks about every graph node (some 700 a decode on Gemma 3 270M). While no plan is
set the answer is an immediate False; with a plan, each ask reads the node's name, and the
graph is computed in pieces that end at each block some row's vector moves (a trained vector
moves a few blocks, not all): on a GPU each piece ends in a synchronisation and two small
copies.
"""

from __future__ import annotations

import ctypes

import llama_cpp as ll
import numpy as np

from .. import ggml


class RowSteering:
    """The callback and the plan of the next decode: which vector each batch row gets."""

    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.callback = ll.ggml_backend_sched_eval_callback(self._on_eval)
        self._block_output = ggml.block_output_reader()
        self.vectors: np.ndarray | None = None  # (n_vectors, n_layer, n_embd); None: no plan
        self.row_vector = np.zeros(0, dtype=np.intp)  # batch row -> index into vectors
        self.output_rows = np.zeros(0, dtype=np.intp)  # batch rows that produce outputs
        self.stops = [False] * n_layer  # per block: does some row get a nonzero vector
        self.error: BaseException | None = None
        self._ubatch = (0, 0, -1)  # the micro-batch computed: first batch row, rows, last block
        self._stops_of: np.ndarray | None = None  # the vectors `stops` was computed for
        self._range = (0, -1)  # and the blocks it was computed for

    def plan(
        self,
        vectors: np.ndarray,
        row_vector: np.ndarray,
        output_rows: np.ndarray,
        first: int,
        last: int,
    ) -> None:
        """Steer the next decode: batch row r gets vectors[row_vector[r]][il] added to the
        output of block il, for first <= il <= last (a zero vector for unsteered rows).
        Pass the same `vectors` array again while the set is the same: which blocks they
        move is worked out once per array."""
        if vectors is not self._stops_of or (first, last) != self._range:
            moved = np.any(vectors != 0, axis=(0, 2))
            self.stops = [first <= il <= last and bool(moved[il]) for il in range(self.n_layer)]
            self._stops_of, self._range = vectors, (first, last)
        self.vectors, self.row_vector, self.output_rows = vectors, row_vector, output_rows
        self.error = None
        self._ubatch = (0, 0, -1)

    def clear(self) -> None:
        """No plan: the callback answers every ask with False at once."""
        self.vectors = None

    def check(self) -> None:
        """Raise what went wrong inside the callback during the last decode."""
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"per-row steering failed: {error}") from error

    def _on_eval(self, tensor: int, ask: bool, _user: int) -> bool:
        if self.vectors is None:
            return False
        try:
            layer = self._block_output(tensor)
            if layer < 0:
                return False
            if ask:
                self._follow_ubatch(tensor, layer)
                return self.stops[layer]
            self._add(tensor, layer)
            return True
        except BaseException as exc:  # an exception must not cross into C
            self.error = exc
            return False  # ends the graph: the decode's results are not used

    def _follow_ubatch(self, tensor: int, layer: int) -> None:
        """llama.cpp may split a batch into micro-batches, in batch order (with KV cells per
        sequence, a run of consecutive sequence ids each). ggml asks about every block's
        `l_out`, steered or not: blocks starting again mean a new micro-batch, and its
        first block has all its rows."""
        first, size, seen = self._ubatch
        if layer <= seen:
            first, size = first + size, 0
        if size == 0:
            size = ggml.TensorHead.from_address(tensor).ne[1]
        self._ubatch = (first, size, layer)

    def _rows(self, n_rows: int) -> np.ndarray:
        """Which vector each row of this `l_out` gets (see `_follow_ubatch`)."""
        first, size, _ = self._ubatch
        rows = self.row_vector[first : first + size]
        if n_rows != len(rows):  # the last block computes only the rows that give outputs
            outputs = self.output_rows[
                (self.output_rows >= first) & (self.output_rows < first + size)
            ]
            rows = self.row_vector[outputs]
        return rows

    def _add(self, tensor: int, layer: int) -> None:
        assert self.vectors is not None
        head = ggml.TensorHead.from_address(tensor)
        n_rows, width = head.ne[1], head.ne[0]
        rows = self._rows(n_rows)
        if len(rows) != n_rows or head.nb[1] != width * 4 or head.type != ggml.GGML_TYPE_F32:
            raise RuntimeError(f"unexpected l_out-{layer}: {n_rows} rows of {width}")
        states = np.empty((n_rows, width), dtype=np.float32)
        pointer = states.ctypes.data_as(ctypes.c_void_p)
        ggml.tensor_get(tensor, pointer, states.nbytes)
        if np.all(rows == rows[0]):
            states += self.vectors[rows[0], layer]
        else:
            states += self.vectors[rows, layer]
        ggml.tensor_set(tensor, pointer, states.nbytes)
