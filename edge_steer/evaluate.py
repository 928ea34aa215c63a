"""Measure a steering setting: effect on held-out probes and cost in perplexity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .dataset import Probe
from .engine import Context, Model


def probe_margin(ctx: Context, probes: Sequence[Probe]) -> float:
    """Mean of log P(positive continuation) - log P(negative continuation), in nats."""
    model = ctx.model
    margins = []
    for probe in probes:
        prompt = model.tokenize(probe.prompt)
        totals = []
        for continuation in (probe.positive, probe.negative):
            tokens = model.tokenize(probe.prompt + continuation)
            totals.append(ctx.score(tokens, _shared_prefix(prompt, tokens)).sum())
        margins.append(totals[0] - totals[1])
    return float(np.mean(margins))


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return max(1, n)


def perplexity(ctx: Context, text: str, window: int = 256) -> float:
    """Perplexity of `text` in independent windows (each window starts fresh with BOS)."""
    model: Model = ctx.model
    tokens = model.tokenize(text, add_special=False)
    bos = [model.bos] if model.bos >= 0 else []
    logps = [ctx.score(bos + tokens[i : i + window], 1) for i in range(0, len(tokens), window)]
    return float(np.exp(-np.concatenate(logps).mean()))
