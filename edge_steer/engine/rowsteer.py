"""Steering per batch row, so that sequences under different steerings share one
`llama_decode`.

llama.cpp's control vector is one per context: each steered block's output `l_out-<il>` is
`ggml_add(block output, direction)`, one `n_embd` direction broadcast over every row. For a
decode whose rows want different vectors, the context holds a control vector of zeros over
the steered blocks (`Context.zero_control_vector`), so that each of them ends in that add,
and the eval callback repoints the add's second operand, before the graph is computed, at a
tensor of this decode's rows (one row per batch row, each its own sequence's vector, on the
block's own device). The add then does the per-row work: the same float32 add as the native
control vector, so the result is bit for bit the native one, with no stop in the graph, no
copy of hidden states and no Python per row.

Cost: ggml asks about every graph node (some 700 a decode on Gemma 3 270M). While no plan is
set the answer is an immediate False; with a plan, each ask reads the node's name, and each
block some vector moves gets its rows written to its device (one small copy, skipped while
the rows are the ones it holds: most steps of a steady batch). A graph that llama.cpp
reuses keeps the repointed operands; blocks that a later plan leaves alone are pointed back
at the control vector.

A plan holds at most `capacity` rows (the context's sequences: the batcher's mixed steps
hold one row per sequence), so it is one micro-batch. Were llama.cpp to split it, a GPU
could still be computing one micro-batch while the rows of the next are written over the
same tensor.
"""

from __future__ import annotations

import llama_cpp as ll
import numpy as np

from .. import ggml


class RowSteering:
    """The callback and the plan of the next decode: which vector each batch row gets."""

    def __init__(self, n_layer: int, capacity: int):
        self.n_layer = n_layer
        self.capacity = capacity  # rows a plan may hold (a context's sequences)
        self.callback = ll.ggml_backend_sched_eval_callback(self._on_eval)
        self._block_output = ggml.block_output_reader()
        self.vectors: np.ndarray | None = None  # (n_vectors, n_layer, n_embd); None: no plan
        self.row_vector = np.zeros(0, dtype=np.intp)  # batch row -> index into vectors
        self.output_rows = np.zeros(0, dtype=np.intp)  # batch rows that produce outputs
        self.moved = [False] * n_layer  # per block: does some row get a nonzero vector
        self.error: BaseException | None = None
        self._ubatch = (0, 0, -1)  # the micro-batch computed: first batch row, rows, last block
        self._moved_by: np.ndarray | None = None  # the vectors `moved` was computed for
        self._range = (0, -1)  # and the blocks it was computed for
        self._rows_of: dict[int, ggml.DeviceRows] = {}  # block -> its rows, on its device
        self._direction_of: dict[int, int] = {}  # block -> the add's own operand, once moved
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block -> (vectors, rows)
        self._checked = False  # ggml's tensor layout, proven on the first node asked about

    def plan(
        self,
        vectors: np.ndarray,
        row_vector: np.ndarray,
        output_rows: np.ndarray,
        first: int,
        last: int,
    ) -> None:
        """Steer the next decode: batch row r gets vectors[row_vector[r]][il] added to the
        output of block il, for first <= il <= last (a zero vector for unsteered rows). The
        context must hold a zero control vector over those blocks. At most `capacity` rows,
        unless they all get one vector. Pass the same `vectors` array again while the set is
        the same: which blocks they move is worked out once."""
        if len(row_vector) > self.capacity and np.any(row_vector != row_vector[0]):
            raise ValueError(f"{len(row_vector)} rows where per-row steering holds {self.capacity}")
        if vectors is not self._moved_by or (first, last) != self._range:
            moved = np.any(vectors != 0, axis=(0, 2))
            self.moved = [first <= il <= last and bool(moved[il]) for il in range(self.n_layer)]
            self._moved_by, self._range = vectors, (first, last)
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

    def close(self) -> None:
        """Free the rows' device memory (after the context: no graph may read it)."""
        for rows in self._rows_of.values():
            rows.close()
        self._rows_of.clear()

    def _on_eval(self, tensor: int, ask: bool, _user: int) -> bool:
        if self.vectors is None:
            return False
        try:
            if not self._checked:
                ggml.check_layout(tensor)
                self._checked = True
            layer = self._block_output(tensor)
            if layer >= 0:
                node = ggml.Tensor.from_address(tensor)
                self._follow_ubatch(node, layer)
                self._point(node, layer)
        except BaseException as exc:  # an exception must not cross into C
            self.error = exc  # `check` raises it after the decode, whose results are void
        return False  # never a stop: the graph runs through

    def _follow_ubatch(self, node: ggml.Tensor, layer: int) -> None:
        """llama.cpp may split a batch into micro-batches, in batch order (with KV cells per
        sequence, a run of consecutive sequence ids each). ggml asks about every block's
        `l_out`, steered or not: blocks starting again mean a new micro-batch, and its
        first block has all its rows."""
        first, size, seen = self._ubatch
        if layer <= seen:
            first, size = first + size, 0
        if size == 0:
            size = node.ne[1]
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

    def _point(self, node: ggml.Tensor, layer: int) -> None:
        """Point block `layer`'s control-vector add at this decode's rows, or, where no
        vector moves the block, back at the control vector's own (zero) direction."""
        assert self.vectors is not None
        device = self._rows_of.get(layer)
        mine = device is not None and node.src[1] == device.tensor
        if not self.moved[layer] or node.ne[1] == 0:  # (a prompt chunk with no output)
            if mine:  # a reused graph, repointed under an earlier plan
                node.src[1] = self._direction_of[layer]
            return
        if not mine:
            direction = _control_vector_operand(node, layer)
            device = self._device_rows(layer, direction)
            self._direction_of[layer] = direction
        assert device is not None
        rows = self._rows(node.ne[1])
        if len(rows) != node.ne[1]:
            raise RuntimeError(f"l_out-{layer} has {node.ne[1]} rows, the plan {len(rows)}")
        if np.all(rows == rows[0]):
            rows = rows[:1]  # one vector for every row: ggml_add broadcasts it, as natively
        held = self._held.get(layer)
        if held is None or held[0] is not self.vectors or not np.array_equal(held[1], rows):
            device.write(self.vectors[rows, layer])
            self._held[layer] = (self.vectors, rows)
        node.src[1] = device.tensor

    def _device_rows(self, layer: int, direction: int) -> ggml.DeviceRows:
        """Block `layer`'s rows, in the memory its control vector lives in (its device)."""
        if layer not in self._rows_of:
            head = ggml.Tensor.from_address(direction)
            buft = ggml.buffer_type(head.buffer)
            self._rows_of[layer] = ggml.DeviceRows(buft, head.ne[0], self.capacity)
        return self._rows_of[layer]


def _control_vector_operand(node: ggml.Tensor, layer: int) -> int:
    """The direction tensor of the control vector's add that ends block `layer`: the only
    tensor per-row steering ever replaces. Anything else means no zero control vector was
    set over the block (`Context.zero_control_vector`)."""
    direction = node.src[1]
    head = ggml.Tensor.from_address(direction) if direction else None
    if (
        node.op != ggml.GGML_OP_ADD
        or head is None
        or head.op != ggml.GGML_OP_NONE
        or head.type != ggml.GGML_TYPE_F32
        or head.ne[0] != node.ne[0]
        or any(n != 1 for n in head.ne[1:])
        or not head.buffer
    ):
        raise RuntimeError(f"l_out-{layer} does not end in a control vector's add")
    return direction
