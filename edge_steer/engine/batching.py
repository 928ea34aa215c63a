"""Continuous batching: many sequences on one context, each under its own steering, the
next token of all of them in one `llama_decode` (what llama-server does for its slots, plus
steering per slot).

Each step decodes the next token of every generating sequence, then one prompt chunk of a
sequence being admitted. On a CPU a decode is memory-bound, so N rows cost far less than N
decodes. Sequences join and leave between steps; each keeps its KV cells (`Slot.tokens`)
for the next prompt that starts the same way under the same steering.

Steering: when every row of a step wants the same vectors, llama.cpp's own control vector
does it (`Context.steer_all_rows`: no Python per token); when they differ, `rowsteer` points
the control vector's adds at each row's own vectors, bit for bit what the control vector
would add.

Exactness: llama.cpp's CPU kernels are not all batch-invariant. Its repacked weight layouts
(AVX2/AVX-512/NEON, the default) multiply rows in blocks of four, and a row rounds differently
with other rows beside it; measured on Gemma 3 Q4_K_M, up to about 1 in logit after a few
tokens, enough to flip a greedy near-tie (llama-server's slots part the same way). With
plain layouts (`Model(repack=False)`), and ggml's tiled K-quant kernel for 8 rows or more
switched off (`ggml.one_row_kernels`), a generating row's logits are bit for bit those it gets
alone, whatever other rows share its decode; a prompt chunk is too, if it has its decode to
itself. So a step decodes the generating rows together and a prompt chunk on its own, cut
as `Context.ingest` cuts it: with plain layouts every sequence gets exactly the tokens it
gets decoded alone (tested on Gemma 3 Q4_K_M; F16 and F32 weights go through tiled kernels
that are not batch-invariant either way). Where exactness is given up for the repacked
layouts' speed, `merge_prompts` puts the chunk in the generating rows' decode, as
llama-server does, saving a pass over the weights per chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import llama_cpp as ll
import numpy as np

from .. import prefixes
from ..errors import BadInput
from .context import Context
from .sampling import Sampler

_PER_ROW = object()  # the context's control vector is rowsteer's zeros, not a steering's


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
    the context must hold a chunk, and one token of every slot. `merge_prompts`: a prompt
    chunk shares the generating rows' decode when they are all under its steering (one
    pass over the weights, as in llama-server), for contexts whose kernels are not
    batch-invariant anyway; else it has a decode of its own."""

    def __init__(
        self,
        ctx: Context,
        *,
        first: int,
        last: int,
        prompt_chunk: int,
        merge_prompts: bool = False,
    ):
        if ctx.n_batch < max(prompt_chunk, ctx.n_seq):
            raise BadInput(f"a batch of {ctx.n_batch} cannot take {prompt_chunk} prompt tokens")
        if merge_prompts and ctx.separate_kv:  # its batches hold throwaway rows (_add_tokens)
            raise BadInput("prompts merge into generating decodes only with one KV pool")
        self.ctx, self.first, self.last = ctx, first, last
        self.prompt_chunk = prompt_chunk
        self.merge_prompts = merge_prompts
        self.slots = [Slot(seq) for seq in range(ctx.n_seq)]
        self._admitted: deque[Slot] = deque()  # slots with prompt tokens left, in order
        self._native: Hashable = None  # the key llama.cpp's control vector holds, or _PER_ROW
        ctx.steer_all_rows(None)  # key None: unsteered (a steering set before is not ours)
        self._last_stacked: tuple[list, np.ndarray | None] = ([], None)  # see _stacked

    def reusable(self, slot: Slot, prompt: Sequence[int], key: Hashable) -> int:
        """How many leading `prompt` tokens `slot` already holds under steering `key`."""
        return prefixes.common_length(slot.tokens, prompt) if slot.key == key else 0

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
        memory = ll.llama_get_memory(self.ctx.live)
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
        ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx.live), slot.seq, 0, -1)
        slot.tokens.clear()
        slot.key, slot.rows = None, None

    def step(self) -> list[Slot]:
        """The next token of every generating slot in one decode, then one prompt chunk in
        a decode of its own (or, with `merge_prompts`, in the same decode); admitted prompts
        take turns, a chunk each. Returns the slots that sampled a token (`Slot.sampled`):
        each generating slot, and the admitted one once its whole prompt is in."""
        rows = [slot for slot in self.slots if slot.busy and slot.next_token is not None]
        admitted = self._admitted[0] if self._admitted else None
        if admitted is not None and rows and self._merges(rows, admitted):
            return self._decode_step(rows, admitted)
        sampled = self._decode_step(rows, None) if rows else []
        if admitted is not None:
            sampled += self._decode_step([], admitted)
        return sampled

    def prefill(self) -> list[Slot]:
        """Every admitted prompt at once, packed into as few decodes as the batch allows,
        one steering's prompts after another; returns those slots, each having sampled its
        first token. For a caller that starts many slots together (evaluation's samples),
        where `step`, one prompt chunk per decode, would cost a pass over the weights per
        prompt."""
        admitted, sampled = list(self._admitted), []
        self._admitted.clear()
        for key in dict.fromkeys(slot.key for slot in admitted):
            sampled += self._prefill_group([slot for slot in admitted if slot.key == key])
        return sampled

    def _prefill_group(self, group: list[Slot]) -> list[Slot]:
        """The pending prompts of `group` (all under one steering), packed into batches."""
        batch = self.ctx.batch
        ended: list[Slot] = []  # slots whose last prompt token is in the batch
        sampled: list[Slot] = []

        def flush() -> None:
            self._decode([group[0]] * batch.n, prompt=True)
            for index, slot in zip(batch.output_rows(), ended, strict=True):
                assert slot.sampler is not None
                slot.sampled = slot.sampler.sample(self.ctx, int(index))
            sampled.extend(ended)
            ended.clear()
            batch.clear()

        batch.clear()
        for slot in group:
            for k, token in enumerate(slot.pending):
                if batch.n == self.ctx.n_batch:
                    flush()
                batch.add(token, len(slot.tokens), slot.seq, k == len(slot.pending) - 1)
                slot.tokens.append(token)
            ended.append(slot)
            slot.pending = []
        flush()
        return sampled

    def _merges(self, rows: list[Slot], admitted: Slot) -> bool:
        """Whether the admitted slot's prompt chunk joins the generating rows' decode, as in
        llama-server: only with `merge_prompts`, and under one steering for all (a chunk's
        rows under a steering of their own would overflow per-row steering's capacity)."""
        return self.merge_prompts and all(slot.key == admitted.key for slot in rows)

    def _decode_step(self, rows: list[Slot], admitted: Slot | None) -> list[Slot]:
        """One decode: the next token of each generating slot of `rows`, then the next
        chunk of `admitted`'s prompt; samples for each of them that has an output."""
        self.ctx.batch.clear()
        steer_as, padded = self._add_tokens(rows)
        done = False
        if admitted is not None:
            done = self._add_chunk(admitted, n_before=len(steer_as))
            steer_as += [admitted] * (self.ctx.batch.n - len(steer_as))
        self._decode(steer_as, prompt=not rows)
        memory = ll.llama_get_memory(self.ctx.live)
        for slot in padded:
            ll.llama_memory_seq_rm(memory, slot.seq, len(slot.tokens), -1)
        sampled = list(rows)
        if done:
            sampled.append(self._admitted.popleft())
        elif admitted is not None:  # prompts take turns: a short one never waits for a long
            self._admitted.rotate(-1)  # one's whole prefill
        for index, slot in zip(self.ctx.batch.output_rows(), sampled, strict=True):
            assert slot.sampler is not None
            slot.sampled = slot.sampler.sample(self.ctx, int(index))
        return sampled

    def _add_tokens(self, rows: list[Slot]) -> tuple[list[Slot], list[Slot]]:
        """Each generating slot's next token into the batch; returns whose steering each
        batch row takes, and the slots given a throwaway row (see below)."""
        steer_as: list[Slot] = []
        padded: list[Slot] = []
        for slot in self._with_padding(rows):
            if slot.next_token is None or not slot.busy:
                # llama.cpp splits a batch over KV streams into runs of consecutive sequence
                # ids, each run a pass over the weights: a throwaway row closes the gap
                self.ctx.batch.add(self.ctx.model.bos, len(slot.tokens), slot.seq, False)
                padded.append(slot)
                steer_as.append(rows[0])
                continue
            self.ctx.batch.add(slot.next_token, len(slot.tokens), slot.seq, True)
            slot.tokens.append(slot.next_token)
            slot.next_token = None
            steer_as.append(slot)
        return steer_as, padded

    def _with_padding(self, rows: list[Slot]) -> list[Slot]:
        """`rows`, and with KV cells per sequence every slot between them."""
        if not self.ctx.separate_kv or not rows:
            return rows
        return self.slots[rows[0].seq : rows[-1].seq + 1]

    def _add_chunk(self, slot: Slot, n_before: int) -> bool:
        """The next chunk of `slot`'s prompt into the batch, after `n_before` rows: on its
        own, cut as `Context.ingest` cuts it (see the module's note), else what the batch
        has room for. Returns whether that was the prompt's last chunk (its last row then
        gives an output)."""
        size = min(self.prompt_chunk, self.ctx.n_batch - n_before)
        chunk = slot.pending[:size]
        done = len(chunk) == len(slot.pending)
        start = len(slot.tokens)
        for k, token in enumerate(chunk):
            self.ctx.batch.add(token, start + k, slot.seq, done and k == len(chunk) - 1)
        slot.tokens.extend(chunk)
        del slot.pending[: len(chunk)]
        return done

    def _decode(self, rows: list[Slot], *, prompt: bool = False) -> None:
        """Decode the batch, `rows[i]` being the slot of batch row i (all one slot's for a
        `prompt` chunk)."""
        self._steer(rows, prompt)
        self.ctx.decode()

    def _steer(self, rows: list[Slot], prompt: bool) -> None:
        """llama.cpp's control vector when every row wants the same steering; otherwise
        one of zeros, whose adds `rowsteer` points at each row's own vectors. A prompt
        chunk between mixed steps goes through `rowsteer` too (all its rows one vector):
        changing the control vector makes llama.cpp rebuild its graphs (2.3 ms on the demo
        model on 2 cores), and it would change twice per request admitted."""
        per_row = self.ctx.row_steering
        keys = {slot.key for slot in rows}
        stay_per_row = prompt and self._native is _PER_ROW
        if len(keys) == 1 and not stay_per_row:
            if per_row is not None:
                per_row.clear()
            key = rows[0].key
            if key != self._native:
                self.ctx.steer_all_rows(rows[0].rows, self.first, self.last)
                self._native = key
            return
        if per_row is None:
            raise BadInput(
                "sequences under different steerings in one decode need a context "
                "made with row_steering=True"
            )
        if self._native is not _PER_ROW:
            self.ctx.zero_control_vector(self.first, self.last)
            self._native = _PER_ROW
        distinct = {slot.key: slot.rows for slot in rows}  # each steering once, in row order
        index = {key: i for i, key in enumerate(distinct)}
        row_vector = np.array([index[slot.key] for slot in rows], dtype=np.intp)
        outputs = self.ctx.batch.output_rows()
        per_row.plan(self._stacked(distinct), row_vector, outputs, self.first, self.last)

    def _stacked(self, distinct: dict[Hashable, np.ndarray | None]) -> np.ndarray:
        """The vectors of `distinct` steerings as one array, (n, n_layer, n_embd); the same
        array again while the steerings are the same (most steps), so nothing is copied."""
        parts = list(distinct.values())
        last_parts, last = self._last_stacked
        if (
            last is None
            or len(parts) != len(last_parts)
            or any(a is not b for a, b in zip(parts, last_parts, strict=False))
        ):
            model = self.ctx.model
            zero = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
            last = np.stack([zero if part is None else part for part in parts])
            self._last_stacked = (parts, last)
        return last
