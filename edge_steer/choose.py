"""Choose the steered blocks and the direction method per model and concept, from held-in
validation, instead of one fixed span for every model.

Every VALIDATION_EVERY-th contrast pair is held in; the others train one candidate per
method and span of depth. Candidates are compared at equal cost: each is pushed to its
estimated scale at the fluency budget (perplexity of held-in calibration text at a trial
push, both signs, extrapolated with calibrate.POWER). There it is judged by behaviour on the
held-in pairs: how much of the persona's own effect on the next-token distribution it
reproduces, pushing negative prompts up and positive prompts down (1.0 = all of it). The
candidate that reproduces most wins, and calibration then finds its exact scale.

Why behaviour, not read-out: the separation of held-in states along a direction favoured
mean-diff everywhere and said nothing about cost, and separation per unit of cost at a fixed
trial push favoured directions whose push was too small to cost anything measurable. No span
or method is best for every concept (tools/span_sweep.py on Gemma 3 270M, docs/training.md "How
vectors are trained"): honest moved the held-out probes -2.3 / +2.0 nats with mean-diff at
30-65% of depth and -0.9 / +0.7 with pca-diff at 50-85%, creative and lazy did best at 50-85%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import calibrate, dataset, metrics
from .engine import Context, Model, scoring

VALIDATION_EVERY = 4  # pair i is held in when i % 4 == 3
MIN_PAIRS = 8  # fewer pairs than this: no validation split, the default span and method
SPANS = ((0.3, 0.65), (0.5, 0.85))  # fractions of depth
CANDIDATE_METHODS = ("pca-diff", "mean-diff")
PAIRS = 8  # held-in pairs whose next-token distributions judge the candidates
TRIAL_SCALE = 2.0  # the first push, times a candidate's separation-scaled rows
TOKENS = 64  # calibration-text tokens per cost measurement
MIN_COST = 0.005  # a smaller log perplexity ratio is noise: push harder and measure again
BATCH = 512


@dataclass(frozen=True)
class Candidate:
    method: str
    layers: tuple[int, int]
    scale: float  # estimated scale at the budget, times the separation-scaled rows
    effect: float  # share of the persona's next-token effect reproduced at that scale

    def describe(self) -> str:
        first, last = self.layers
        return f"{self.method}:{first}-{last}:x{self.scale:.3g}:{self.effect:.3g}"


def span_blocks(n_layer: int, span: tuple[float, float]) -> tuple[int, int]:
    """Blocks from span[0] to span[1] of the depth (block 0 cannot be steered)."""
    first = max(1, round(n_layer * span[0]))
    return first, min(n_layer - 1, max(first, round(n_layer * span[1]) - 1))


def split(n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the validation pairs."""
    index = np.arange(n_pairs)
    held = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
    return index[~held], index[held]


def reproduced(base: np.ndarray, up: np.ndarray, down: np.ndarray) -> float:
    """Share of the persona effect a push reproduces. `base` holds the unsteered next-token
    probabilities of (positive, negative) prompts interleaved; `up` those of the negatives
    pushed positive, `down` those of the positives pushed negative."""
    persona = base[0::2] - base[1::2]
    moved = (up - base[1::2]) + (base[0::2] - down)
    scale = 2 * float(np.sum(persona * persona))
    return float(np.sum(moved * persona)) / scale if scale > 0 else 0.0


def candidates(
    model: Model,
    units: Callable[[str], tuple[np.ndarray, np.ndarray]],
    prompts: Sequence[str],
    methods: Sequence[str],
    spans: Sequence[tuple[int, int]],
    *,
    budget: float = calibrate.BUDGET,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Each method on each block span, at its estimated budget scale, judged on `prompts`
    (held-in positive and negative prompts, interleaved). `units(method)` gives the unit
    directions and their projected gaps, from the training pairs. `progress(done, total)`
    follows the candidates."""
    tokens = [model.tokenize(p, parse_special=True) for p in prompts]
    text = dataset.calibration_text()
    batch = max(BATCH, TOKENS + 16, *map(len, tokens))
    found = []
    with Context(model, n_ctx=batch, n_batch=batch, n_seq=len(tokens), threads=threads) as ctx:

        def steer(rows: np.ndarray | None, layers: tuple[int, int]) -> Context:
            ctx.set_steering(rows, *layers)
            return ctx

        def cost(rows: np.ndarray, layers: tuple[int, int]) -> Callable[[float], float]:
            """Log perplexity ratio of the worse sign, as a function of the push."""

            def at(push: float) -> float:
                signed = (steer(rows * np.float32(s * push), layers) for s in (1, -1))
                ratios = [metrics.perplexity(c, text, TOKENS, limit=TOKENS) for c in signed]
                return math.log(max(ratios) / reference)

            return at

        base = scoring.next_token_probs(steer(None, (1, model.n_layer - 1)), tokens)
        reference = metrics.perplexity(ctx, text, TOKENS, limit=TOKENS)
        report = progress or (lambda _done, _total: None)
        report(0, len(methods) * len(spans))
        for method in methods:
            directions, gaps = units(method)
            for first, last in spans:
                rows = directions * gaps[:, None] / np.float32(last - first + 1)
                scale = _budget_scale(cost(rows, (first, last)), budget)
                push = rows * np.float32(scale)
                up = scoring.next_token_probs(steer(push, (first, last)), tokens[1::2])
                down = scoring.next_token_probs(steer(-push, (first, last)), tokens[0::2])
                found.append(Candidate(method, (first, last), scale, reproduced(base, up, down)))
                report(len(found), len(methods) * len(spans))
    return found


def _budget_scale(cost: Callable[[float], float], budget: float) -> float:
    """The scale where the cost would reach log(budget), from one measured push,
    extrapolated as calibration does. While the cost is too small to measure, the next push
    is where the budget would be reached were it MIN_COST: as far as is known to be safe,
    one step instead of several fixed ones (each costs two perplexity measurements)."""
    push = TRIAL_SCALE
    measured = cost(push)
    for _ in range(2):
        if measured >= MIN_COST:
            break
        push = calibrate.extrapolate(push, MIN_COST, budget)
        measured = cost(push)
    return calibrate.extrapolate(push, max(measured, MIN_COST), budget)


def best(
    model: Model,
    units: Callable[[str], tuple[np.ndarray, np.ndarray]],
    prompts: Sequence[str],
    *,
    method: str | None = None,
    layers: tuple[int, int] | None = None,
    budget: float = calibrate.BUDGET,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """The best candidate and all that were tried; a given `method` or `layers` is kept.
    `units(method)` gives directions and gaps from the training pairs, `prompts` the held-in
    pairs' (positive, negative) texts, interleaved."""
    methods = [method] if method else list(CANDIDATE_METHODS)
    spans = [layers] if layers else sorted({span_blocks(model.n_layer, s) for s in SPANS})
    found = candidates(
        model, units, prompts, methods, spans, budget=budget, threads=threads, progress=progress
    )
    return max(found, key=lambda c: c.effect), found
