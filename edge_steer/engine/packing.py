"""Many sequences in one context: packing them into batches as separate sequence ids, and
decoding prefixes they share once. Every unit here uses the whole KV cache
(`Context.scratch`): it starts empty and is left empty."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import llama_cpp as ll

from .. import prefixes
from ..errors import BadInput

if TYPE_CHECKING:
    from .context import Context

RoundDecoder = Callable[[list[int]], None]  # decode the batch, outputs at these batch rows


def packed_groups(
    ctx: Context, sequences: Sequence[Sequence[int]], most: int | None = None
) -> Iterator[list[int]]:
    """Indices of `sequences` packed into batches: at most n_batch tokens and the context's
    n_seq (or `most`) sequences each."""
    group: list[int] = []
    used = 0
    n_seq = min(ctx.n_seq, most or ctx.n_seq)
    for i, seq in enumerate(sequences):
        if not seq:
            raise BadInput("cannot decode an empty prompt")
        if len(seq) > ctx.n_batch or len(seq) > ctx.n_ctx:
            raise BadInput(f"a prompt of {len(seq)} tokens exceeds the batch of {ctx.n_batch}")
        if group and (used + len(seq) > ctx.n_batch or len(group) == n_seq):
            yield group
            group, used = [], 0
        group.append(i)
        used += len(seq)
    if group:
        yield group


def decode_packed(ctx: Context, group: Sequence[int], sequences: Sequence[Sequence[int]]) -> None:
    """Decode sequences[i] for each i in `group` side by side from an empty cache, as
    sequence ids 0.., with logits kept only at each one's last token. The cache keeps them
    until the caller's next unit empties it."""
    ctx.forget(0)
    ctx.batch.clear()
    for seq, index in enumerate(group):
        last = len(sequences[index]) - 1
        for pos, token in enumerate(sequences[index]):
            ctx.batch.add(token, pos, seq, pos == last)
    ctx.decode()


def prefill_sequences(ctx: Context, sequences: Sequence[Sequence[int]]) -> None:
    """Decode sequence i into sequence id i, packed into full batches, no logits kept."""
    batch = ctx.batch
    batch.clear()
    for seq, tokens in enumerate(sequences):
        for pos, token in enumerate(tokens):
            if batch.n == ctx.n_batch:
                ctx.decode()
                batch.clear()
            batch.add(token, pos, seq, False)
    if batch.n:
        ctx.decode()


def shared_rounds(
    ctx: Context, sequences: Sequence[Sequence[int]], decode: RoundDecoder | None = None
) -> Iterator[list[int]]:
    """Decode `sequences` from an empty cache in rounds, yielding each round's members once
    their last tokens' outputs are ready, in member order. `decode` runs each decode of a
    round (default: a plain `Context.decode`); capture passes one that records states.

    Leading tokens that sequences share (a persona instruction before many continuations)
    are decoded once per round, and every sequence of that group uses those KV cells
    (`llama_memory_seq_cp`): only what follows is decoded per sequence (prefixes.py plans
    the groups). Results equal decoding each sequence in full, up to llama.cpp's batch-shape
    rounding (the same as packing them side by side)."""
    for seq in sequences:
        if not 1 <= len(seq) <= ctx.n_batch:
            raise BadInput(f"cannot decode {len(seq)} tokens in batches of {ctx.n_batch}")
    run = decode or (lambda _rows: ctx.decode())
    limits = prefixes.Limits(ctx.n_seq, ctx.n_batch, ctx.n_ctx)
    with ctx.scratch():
        for packed in prefixes.rounds(prefixes.groups(sequences, limits), sequences, limits):
            _decode_round(ctx, packed, sequences, run)
            yield [m for group in packed for m in group.members]


def _decode_round(
    ctx: Context,
    packed: Sequence[prefixes.Group],
    sequences: Sequence[Sequence[int]],
    decode: RoundDecoder,
) -> None:
    """The groups' prefixes in one decode, shared with their members, then every member's
    remaining tokens in another, outputs at each member's last token."""
    ctx.forget(0)
    batch = ctx.batch
    ids = {m: i for i, m in enumerate(m for group in packed for m in group.members)}
    batch.clear()
    for group in packed:
        lead = group.members[0]
        for pos, token in enumerate(sequences[lead][: group.shared]):
            batch.add(token, pos, ids[lead], False)
    if batch.n:
        decode([])
        memory = ll.llama_get_memory(ctx.live)
        for group in packed:
            for member in group.members[1:]:
                ll.llama_memory_seq_cp(memory, ids[group.members[0]], ids[member], -1, -1)
    batch.clear()
    for group in packed:
        for member in group.members:
            tokens = sequences[member]
            for pos in range(group.shared, len(tokens)):
                batch.add(tokens[pos], pos, ids[member], pos == len(tokens) - 1)
    decode([int(i) for i in batch.output_rows()])
