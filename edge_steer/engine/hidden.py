"""Hidden-state capture of many prompts at once: each block's output (`l_out-<il>`, after
steering), read by the context's `recorder.StateRecorder`. A context records states only when
made with `capture=True` (ggml calls the callback for every graph node of every decode, which
generation should not pay for). Uses the whole KV cache (`Context.scratch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import packing
from .recorder import StateRecorder, interrupt_after_decode

if TYPE_CHECKING:
    from .context import Context


def capture(
    ctx: Context,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Hidden states `l_out-il` (output of block il, after steering) for each sequence.

    Returns one (n_positions, n_layer, n_embd) float32 array per sequence; positions default
    to the last token. Short sequences share a batch as separate sequence ids, so capture
    runs at close to plain prompt-processing speed.
    """
    recorder = _recorder(ctx)
    positions = positions or [[len(s) - 1] for s in sequences]
    results: list[np.ndarray] = [np.empty(0)] * len(sequences)
    with ctx.scratch():
        for group in packing.packed_groups(ctx, sequences):
            for index, states in _capture_group(ctx, recorder, group, sequences, positions):
                results[index] = states
    return results


def capture_last(
    ctx: Context,
    sequences: Sequence[Sequence[int]],
    *,
    through: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """(n, n_layer, n_embd) states `l_out-il` at each sequence's last token, for blocks
    0..`through` (default: all). Later blocks are not computed at all (their rows stay zero):
    the graph ends after block `through`, output layer included. Prefixes that sequences
    share are decoded once (`packing.shared_rounds`). `progress(done, total)` follows each
    round."""
    recorder = _recorder(ctx)
    model = ctx.model
    last = model.n_layer - 1 if through is None else through
    out = np.zeros((len(sequences), model.n_layer, model.n_embd), np.float32)
    done = 0
    if progress:
        progress(done, len(sequences))

    def decode_recording(rows: list[int]) -> None:
        recorder.start(rows, ctx.batch.n, last)
        with interrupt_after_decode() as interrupted:
            recorder.interrupted = interrupted
            ctx.decode()
        recorder.finish()

    for members in packing.shared_rounds(ctx, sequences, decode_recording):
        out[members] = recorder.out
        done += len(members)
        if progress:
            progress(done, len(sequences))
    return out


def _recorder(ctx: Context) -> StateRecorder:
    if ctx.recorder is None:
        raise RuntimeError("this context was created without capture=True")
    return ctx.recorder


def _capture_group(
    ctx: Context,
    recorder: StateRecorder,
    group: Sequence[int],
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
) -> Iterator[tuple[int, np.ndarray]]:
    ctx.forget(0)
    batch = ctx.batch
    batch.clear()
    wanted: list[int] = []  # batch indices whose states we keep, in batch order
    for seq_id, index in enumerate(group):
        base = batch.n
        keep = set(positions[index])
        for pos, token in enumerate(sequences[index]):
            batch.add(token, pos, seq_id, pos in keep)
        wanted.extend(base + p for p in sorted(keep))
    recorder.start(wanted, batch.n)
    ctx.decode()
    states = recorder.finish()  # (n_wanted, n_layer, n_embd)
    offset = 0
    for index in group:
        n = len(set(positions[index]))
        yield index, states[offset : offset + n]
        offset += n
