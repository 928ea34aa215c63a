"""Strength calibration: scale a trained vector so that +/-1.0 costs one fluency budget.

Residual norms differ by orders of magnitude between blocks and models, and the directions of
different concepts push on fluency very differently, so no rule computed from the training
states alone makes 1.0 mean the same thing everywhere (the "separation" rule left +/-1 at
x1.00-1.03 perplexity with effects of 0.5-2 nats on Gemma 3 270M). Here the cost is measured:
perplexity of held-in neutral prose (`concepts/calibration.txt`, not the text `eval` uses) at
a few scales of the vector, both signs, and the scale where the worse sign reaches BUDGET is
found by secant steps on log(log ratio) against log(scale): the cost grows like a power of
the push.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import dataset, metrics
from .engine import Context, Model
from .vectors import Key

BUDGET = 1.15  # perplexity ratio that strength +/-1 costs (the worse sign); docs/training.md
TOLERANCE = 0.02  # accept a scale whose perplexity ratio is within 2% of the budget
TOKENS = 128  # calibration tokens: enough for a stable ratio, cheap on 262k-token vocabularies
STEPS = 4  # cost measurements at most
FIRST_SCALE = 2.0  # the first guess, times the vector as trained
POWER = 1.4  # log(perplexity ratio) ~ scale**POWER: measured 1.2-1.5 on Gemma 3 270M


@dataclass(frozen=True)
class Calibration:
    """The chosen scale and what it was chosen from: (scale, worse-sign perplexity ratio)."""

    scale: float
    budget: float
    points: tuple[tuple[float, float], ...]
    reference: float  # unsteered perplexity of the calibration text

    def metadata(self) -> dict[str, str | float | int]:
        return {
            Key.CALIBRATION_BUDGET: self.budget,
            Key.CALIBRATION_SCALE: round(self.scale, 6),
            Key.CALIBRATION_REFERENCE_PPL: round(self.reference, 4),
            Key.CALIBRATION_POINTS: ",".join(f"{s:.4g}:{r:.4g}" for s, r in self.points),
            Key.CALIBRATION_TOKENS: TOKENS,
            Key.SCALE_RULE: "calibrated",
        }


def calibrate(
    model: Model,
    rows: np.ndarray,
    span: tuple[int, int],
    *,
    budget: float = BUDGET,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """The factor for `rows` (the vector by block, as trained) at which the worse of +/-1
    raises calibration-text perplexity by `budget`; the search starts at FIRST_SCALE.
    `progress(done, STEPS)` follows the search steps (it may end early: then STEPS/STEPS)."""
    text = dataset.calibration_text()
    with Context(model, n_ctx=TOKENS + 16, n_batch=TOKENS + 16, threads=threads) as ctx:

        def perplexity(scale: float) -> float:
            ctx.set_steering(rows * np.float32(scale) if scale else None, *span)
            return metrics.perplexity(ctx, text, window=TOKENS, limit=TOKENS)

        reference = perplexity(0.0)
        worse = [1.0, -1.0]  # signs to measure: both at first, then the one that cost more

        def cost(scale: float) -> float:
            ratios = {sign: perplexity(sign * scale) / reference for sign in worse}
            worse[:] = [max(ratios, key=ratios.__getitem__)]
            return max(ratios.values())

        report = progress or (lambda _done, _total: None)
        report(0, STEPS)
        found = _search(cost, budget, reference, lambda done: report(done, STEPS))
        report(STEPS, STEPS)
        return found


def _search(cost, budget: float, reference: float, step: Callable[[int], None]) -> Calibration:
    """Secant steps on y = log(log ratio) against x = log(scale), from FIRST_SCALE."""
    points: list[tuple[float, float]] = []
    scale = FIRST_SCALE

    def miss(ratio: float) -> float:
        """How far a measured ratio is from the budget, in log terms."""
        return abs(math.log(max(ratio, 1e-9)) - math.log(budget))

    for _ in range(STEPS):
        ratio = cost(scale)
        points.append((scale, ratio))
        step(len(points))
        if miss(ratio) <= TOLERANCE:
            break
        scale = _next_scale(points, budget)
    best = min(points, key=lambda p: miss(p[1]))
    return Calibration(best[0], budget, tuple(points), reference)


def extrapolate(scale: float, log_ratio: float, budget: float, power: float = POWER) -> float:
    """The scale at which log(perplexity ratio), measured as `log_ratio` at `scale`, would
    reach log(budget) if it grows like scale**power."""
    target = math.log(math.log(budget))
    return math.exp(math.log(scale) + (target - math.log(log_ratio)) / power)


def _next_scale(points: list[tuple[float, float]], budget: float) -> float:
    usable = [(s, math.log(r)) for s, r in points if r > 1.0005]
    if not usable:
        return points[-1][0] * 4  # no measurable cost yet: push much harder
    power = POWER
    if len(usable) > 1:
        (s0, c0), (s1, c1) = usable[-2], usable[-1]
        x0, y0, x, y = math.log(s0), math.log(c0), math.log(s1), math.log(c1)
        power = (y - y0) / (x - x0) if x != x0 else POWER
        power = min(max(power, 0.5), 4.0)
    return extrapolate(*usable[-1], budget, power)
