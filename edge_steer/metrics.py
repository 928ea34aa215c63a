"""What calibration and evaluation both measure on a context: probe margins, perplexity,
repetition. Its own module, so that training does not import the evaluator."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from . import prefixes
from .dataset import Probe
from .engine import Context, Model, scoring

REPEAT_NGRAM = 4  # tokens; see `is_degenerate`
DEGENERATE_COVERAGE = 0.5


def probe_margin(ctx: Context, probes: Sequence[Probe], prefix: str = "") -> float:
    """Mean of log P(positive continuation) - log P(negative continuation), in nats.

    `prefix` goes before every probe prompt (the persona prompt of the baseline).
    """
    model = ctx.model
    texts = []
    for probe in probes:
        prompt = model.tokenize(prefix + probe.prompt, parse_special=True)
        for continuation in (probe.positive, probe.negative):
            tokens = model.tokenize(prefix + probe.prompt + continuation, parse_special=True)
            texts.append((tokens, max(1, prefixes.common_length(prompt, tokens))))
    totals = [logps.sum() for logps in scoring.score(ctx, texts)]
    return float(np.mean(np.subtract(totals[0::2], totals[1::2])))


def perplexity(
    ctx: Context, text: str, window: int = 256, prefix: str = "", limit: int | None = None
) -> float:
    """Perplexity of `text` (its first `limit` tokens) in independent windows, each starting
    fresh with BOS (and `prefix`, which is context only: its own tokens are not scored)."""
    return fluency(ctx, text, window, prefix, limit)[0]


def fluency(
    ctx: Context, text: str, window: int = 256, prefix: str = "", limit: int | None = None
) -> tuple[float, float]:
    """`perplexity`, and the mean entropy (nats) of the next-token distributions over the
    same tokens: a push that flattens them makes sampled text wander off (calibrate.py)."""
    model: Model = ctx.model
    tokens = model.tokenize(text, add_special=False)[:limit]
    bos = [model.bos] if model.bos >= 0 else []
    head = model.tokenize(prefix, parse_special=True) if prefix else bos
    start = max(1, len(head))
    windows = [(head + tokens[i : i + window], start) for i in range(0, len(tokens), window)]
    logps, entropies = zip(*scoring.score_and_entropy(ctx, windows), strict=True)
    return float(np.exp(-np.concatenate(logps).mean())), float(np.concatenate(entropies).mean())


def repetition(tokens: Sequence[int], n: int = REPEAT_NGRAM) -> float:
    """Share of the positions that lie inside an n-gram occurring more than once."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    covered: set[int] = set()
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered.update(range(i, i + n))
    return len(covered) / len(tokens) if tokens else 0.0


def is_degenerate(tokens: Sequence[int]) -> bool:
    """Degenerate output: 4-token sequences that occur more than once cover at least half of
    it, as in a loop ("the the the ...") or a phrase said over and over. Fluent text of a few
    dozen tokens repeats a short phrase at most."""
    return repetition(tokens) >= DEGENERATE_COVERAGE
