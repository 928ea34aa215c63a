"""Continuous batching: many sequences on one context, each under its own steering, one
`llama_decode` per step (what llama-server does for its slots, plus steering per slot).

Each step decodes the next token of every generating sequence and then one prompt chunk of
a sequence being admitted. On a CPU a decode is memory-bound, so N rows cost far less than
N decodes. Sequences join and leave between steps; each keeps its KV cells (`Slot.tokens`)
for the next prompt that starts the same way under the same steering.

Steering: when every row of a step wants the same vectors, llama.cpp's own control vector
does it (`Context.steer_all_rows`: no Python per token); when they differ, `rowsteer` adds
each row's own vectors, bit for bit what the control vector would add.

Exactness: a sequence's tokens are those it gets decoded alone. llama.cpp computes each row
of a batch on its own (each row's activations are quantized on their own), and measured here
on Gemma 3 and llama-architecture models the logits of a row are identical whatever other
sequences share its decode, with one exception: on Gemma 3 a prompt's logits change (up to
1 in logit) when other rows come after it in the batch. So a step holds at most one prompt
chunk, and it comes last; chunks are cut as `Context.ingest` cuts them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import llama_cpp as ll
import numpy as np

from ..errors import BadInput
from .context import Context
from .sampling import Sampler


@dataclass(eq=False)
class Slot:
    """One sequence id of the context: what its KV cells hold and what it is doing."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # what its KV cells hold, in order
    key: Hashable = None  # identity of the steering `tokens` were computed under
    rows: np.ndarray | None = None  # that steering, (n_layer, n_embd); None: unsteered
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    sampler: Sampler | None = None  # None: the slot is free
    next_token: int | None = None  # sampled and accepted: decoded at the next step
    sampled: int | None = None  # sampled at the last step, for the caller to accept or not

    @property
    def busy(self) -> bool:
        return self.sampler is not None


class Batcher:
    """The slots of `ctx` (one per sequence id) and the step that decodes them together.
    `prompt_chunk` is how many prompt tokens a step takes (the CLI's n_batch); a batch of
    the context must hold a chunk plus one token of every other slot."""

    def __init__(self, ctx: Context, *, first: int, last: int, prompt_chunk: int):
        if ctx.n_batch < prompt_chunk + ctx.n_seq - 1:
            raise BadInput(
                f"a batch of {ctx.n_batch} cannot take {prompt_chunk} + {ctx.n_seq - 1} tokens"
            )
        if ctx.n_seq > 1 and ctx.row_steering is None:
            raise BadInput("batching sequences needs a context made with row_steering=True")
        self.ctx, self.first, self.last = ctx, first, last
        self.prompt_chunk = prompt_chunk
        self.slots = [Slot(seq) for seq in range(ctx.n_seq)]
        self._admitted: deque[Slot] = deque()  # slots with prompt tokens left, in order
        self._native: Hashable = None  # the steering llama.cpp's control vector holds

    def reusable(self, slot: Slot, prompt: Sequence[int], key: Hashable) -> int:
        """How many leading `prompt` tokens `slot` already holds under steering `key`."""
        if slot.key != key:
            return 0
        same = 0
        for a, b in zip(slot.tokens, prompt, strict=False):
            if a != b:
                break
            same += 1
        return same

    def start(
        self,
        slot: Slot,
        prompt: Sequence[int],
        sampler: Sampler,
        key: Hashable,
        rows: np.ndarray | None,
        *,
        reuse: bool = True,
    ) -> None:
        """Give `slot` a prompt to continue under steering (`key`, `rows`). Its cached
        prefix is kept when `reuse` and the steering is the same; the last prompt token is
        always decoded again, for fresh logits (as `Context.ingest` does)."""
        if not prompt:
            raise BadInput("an empty prompt")
        keep = min(self.reusable(slot, prompt, key), len(prompt) - 1) if reuse else 0
        memory = ll.llama_get_memory(self.ctx.ptr)
        ll.llama_memory_seq_rm(memory, slot.seq, keep, -1)
        del slot.tokens[keep:]
        slot.key, slot.rows = key, rows
        slot.pending = list(prompt[keep:])
        slot.sampler, slot.next_token, slot.sampled = sampler, None, None
        sampler.accept_prompt(prompt)
        self._admitted.append(slot)

    def release(self, slot: Slot) -> None:
        """The slot's job is over; its KV cells stay for a prompt that starts the same way."""
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler, slot.next_token, slot.sampled = None, None, None
        slot.pending = []
        if slot in self._admitted:
            self._admitted.remove(slot)

    def forget(self, slot: Slot) -> None:
        """Drop what the slot's KV cells hold (after a failed decode, say)."""
        ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx.ptr), slot.seq, 0, -1)
        slot.tokens.clear()
        slot.key, slot.rows = None, None

    def step(self) -> list[Slot]:
        """One decode: the next token of every generating slot, then one prompt chunk.
        Returns the slots that sampled a token (`Slot.sampled`): each generating slot, and
        the admitted one once its whole prompt is in. Nothing to do: returns []."""
        batch = self.ctx.batch
        batch.clear()
        rows: list[Slot] = []
        for slot in self.slots:
            if slot.busy and slot.next_token is not None:
                batch.add(slot.next_token, len(slot.tokens), slot.seq, True)
                slot.tokens.append(slot.next_token)
                slot.next_token = None
                rows.append(slot)
        filling = self._admitted[0] if self._admitted else None
        if filling is not None:
            chunk = filling.pending[: self.prompt_chunk]
            done = len(chunk) == len(filling.pending)
            start = len(filling.tokens)
            for k, token in enumerate(chunk):
                batch.add(token, start + k, filling.seq, done and k == len(chunk) - 1)
            filling.tokens.extend(chunk)
            del filling.pending[: len(chunk)]
            rows.extend([filling] * len(chunk))
            if done:
                self._admitted.popleft()
        if not rows:
            return []
        self._steer(rows)
        self.ctx.decode()
        if self.ctx.row_steering is not None:
            self.ctx.row_steering.check()
        sampled = [slot for i, slot in enumerate(rows) if batch.raw.logits[i]]
        outputs = [i for i in range(batch.n) if batch.raw.logits[i]]
        for slot, index in zip(sampled, outputs, strict=True):
            assert slot.sampler is not None
            slot.sampled = slot.sampler.sample(self.ctx, index)
        return sampled

    def _steer(self, rows: list[Slot]) -> None:
        """llama.cpp's control vector when every row wants the same steering; otherwise
        none, and each row's own vectors through `rowsteer`."""
        per_row = self.ctx.row_steering
        keys = {slot.key for slot in rows}
        if len(keys) == 1:
            if per_row is not None:
                per_row.clear()
            key = rows[0].key
            if key != self._native:
                self.ctx.steer_all_rows(rows[0].rows, self.first, self.last)
                self._native = key
            return
        assert per_row is not None  # one sequence (no row steering) never mixes steerings
        if self._native is not None:
            self.ctx.steer_all_rows(None)
            self._native = None
        index: dict[Hashable, int] = {}
        stacked: list[np.ndarray] = []
        model = self.ctx.model
        for slot in rows:
            if slot.key not in index:
                index[slot.key] = len(stacked)
                zero = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
                stacked.append(zero if slot.rows is None else slot.rows)
        row_vector = np.array([index[slot.key] for slot in rows], dtype=np.intp)
        outputs = np.flatnonzero([self.ctx.batch.raw.logits[i] for i in range(len(rows))])
        per_row.plan(np.stack(stacked), row_vector, outputs, self.first, self.last)
