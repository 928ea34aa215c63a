"""Log-probabilities of texts and next-token distributions, many texts per decode. Uses the
whole KV cache (`Context.scratch`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadInput
from . import packing

if TYPE_CHECKING:
    from .context import Context

SCORED_TOGETHER = 8  # texts `score` decodes side by side, in any context

Scored = tuple[Sequence[int], int]  # (tokens, first position scored)
Measured = tuple[np.ndarray, np.ndarray]  # (log-probabilities, entropies) per scored token


def score(ctx: Context, texts: Sequence[Scored]) -> list[np.ndarray]:
    """For each (tokens, start): log P(tokens[i] | tokens[:i]) for every i >= start
    (1 <= start < len(tokens)), each from an empty cache; see `score_and_entropy`."""
    return [logps for logps, _ in score_and_entropy(ctx, texts)]


def score_and_entropy(ctx: Context, texts: Sequence[Scored]) -> list[Measured]:
    """For each (tokens, start): log P(tokens[i] | tokens[:i]) for every i >= start
    (1 <= start < len(tokens)), each from an empty cache, and the entropy (nats) of the
    next-token distribution at each of those positions: how unsure the model is there,
    whatever the text goes on to say.

    Texts share batches as separate sequences (up to SCORED_TOGETHER, whatever the context's
    n_seq: llama.cpp's numbers shift with batch shape, by up to 0.07 nats a token, and a
    score should not depend on how many samples a context was made for), so many short ones
    cost about what one long one does; logits are kept only for scored positions, and the
    last token is never decoded (nothing predicts past it)."""
    for tokens, start in texts:
        if not 1 <= start < len(tokens) <= ctx.n_batch:
            raise BadInput(f"cannot score {len(tokens)} tokens from position {start}")
    scores: list[Measured] = [(np.empty(0), np.empty(0))] * len(texts)
    inputs = [tokens[:-1] for tokens, _ in texts]
    with ctx.scratch():
        for group in packing.packed_groups(ctx, inputs, SCORED_TOGETHER):
            measured = _score_group(ctx, [texts[i] for i in group])
            for index, values in zip(group, measured, strict=True):
                scores[index] = values
    return scores


def _score_group(ctx: Context, texts: Sequence[Scored]) -> list[Measured]:
    ctx.forget(0)
    ctx.batch.clear()
    targets: list[int] = []
    counts: list[int] = []
    for seq, (tokens, start) in enumerate(texts):
        for pos, token in enumerate(tokens[:-1]):
            ctx.batch.add(token, pos, seq, pos >= start - 1)
        targets.extend(tokens[start:])
        counts.append(len(tokens) - start)
    ctx.decode()
    logps, entropies = _log_probs(ctx.output_logits(len(targets)), np.asarray(targets))
    cuts = np.cumsum(counts)[:-1]
    return list(zip(np.split(logps, cuts), np.split(entropies, cuts), strict=True))


def _log_probs(logits: np.ndarray, targets: np.ndarray) -> Measured:
    """log-softmax of each logits row at its target, and the row's entropy, in blocks of rows
    so that a 262k vocabulary never needs more than ~32 MiB of scratch. float32 throughout:
    numpy's pairwise sum keeps the normaliser's relative error near 1e-7."""
    n_vocab = logits.shape[1]
    out = np.empty(len(targets), dtype=np.float64)
    entropies = np.empty(len(targets), dtype=np.float64)
    step = max(1, (16 << 20) // (4 * n_vocab))
    shape = (min(step, len(targets)), n_vocab)
    centred, weights = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    for lo in range(0, len(targets), step):
        rows = logits[lo : lo + step]
        z, e = centred[: len(rows)], weights[: len(rows)]
        top = rows.max(axis=1)
        np.exp(np.subtract(rows, top[:, None], out=z), out=e)
        total = e.sum(axis=1)
        picked = rows[np.arange(len(rows)), targets[lo : lo + step]]
        out[lo : lo + step] = picked - top - np.log(total)
        # H = log(total) - sum(e * z) / total, with z = logits - top and e = exp(z)
        weighted = np.multiply(e, z, out=z).sum(axis=1)
        entropies[lo : lo + step] = np.log(total) - weighted / total
    return out, entropies


def next_token_probs(ctx: Context, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """(n, n_vocab) next-token probabilities after each sequence, each from an empty cache,
    many sequences per decode, shared prefixes decoded once."""
    out = np.empty((len(sequences), ctx.model.n_vocab), dtype=np.float32)
    for members in packing.shared_rounds(ctx, sequences):
        rows = ctx.output_logits(len(members))
        shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
        out[members] = shifted / shifted.sum(axis=1, keepdims=True)
    return out
