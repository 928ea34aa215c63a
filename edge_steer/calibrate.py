"""Strength calibration: scale a trained vector so that +/-1.0 costs one fluency budget.

Residual norms differ by orders of magnitude between blocks and models, and the directions of
different concepts push on fluency very differently, so no rule computed from the training
states alone makes 1.0 mean the same thing everywhere (the "separation" rule left +/-1 at
x1.00-1.03 perplexity with effects of 0.5-2 nats on Gemma 3 270M). Here the cost is measured:
perplexity of held-in neutral prose (`concepts/calibration.txt`, not the text `eval` uses) at
a few scales of the vector, both signs, and the scale where the worse sign reaches BUDGET is
found by secant steps on log(load) against log(scale), where the load is the cost in units of
the budget: the cost grows like a power of the push.

On a chat model the same pass also bounds how much +/-1 may flatten the model's next-token
distributions (mean entropy on the same prose, ENTROPY_BUDGET): sampled chat replies from a
flatter distribution wander off into loops, which perplexity alone does not see
(docs/training.md, step 7).
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
# nats of mean next-token entropy that +/-1 may add on a chat model: on SmolLM2-135M-Instruct
# the concept-signs that added 0.33 or more looped in 4-11% of chat replies, those under 0.18
# no more often than chance allows against unsteered replies (docs/training.md, step 7)
ENTROPY_BUDGET = 0.25
TOLERANCE = 0.02  # accept a scale whose perplexity ratio is within 2% of the budget
TOKENS = 128  # calibration tokens: enough for a stable ratio, cheap on 262k-token vocabularies
STEPS = 4  # cost measurements at most
FIRST_SCALE = 2.0  # the first guess, times the vector as trained
POWER = 1.4  # log(perplexity ratio) ~ scale**POWER: measured 1.2-1.5 on Gemma 3 270M
MEASURABLE = 0.004  # a load below this is noise (perplexity x1.0005 at the default budget)


@dataclass(frozen=True)
class Point:
    """One measurement, at the sign that cost more: perplexity ratio and entropy rise."""

    scale: float
    ratio: float
    entropy: float  # nats added to the mean next-token entropy
    load: float  # the cost in units of the budget: 1.0 = exactly at it

    def __str__(self) -> str:
        return f"{self.scale:.4g}:{self.ratio:.4g}:{self.entropy:+.3f}"


@dataclass(frozen=True)
class Budget:
    """What +/-1 may cost: a perplexity ratio, and on chat models an entropy rise."""

    perplexity: float = BUDGET
    entropy: float | None = None

    def load(self, ratio: float, entropy: float) -> float:
        """The larger share of the two limits that a measured cost uses."""
        share = math.log(max(ratio, 1e-9)) / math.log(self.perplexity)
        return max(share, entropy / self.entropy) if self.entropy else share


def budget_for(model: Model, perplexity: float = BUDGET) -> Budget:
    """The entropy limit applies where users sample chat replies: models with a template."""
    return Budget(perplexity, ENTROPY_BUDGET if model.chat_template else None)


@dataclass(frozen=True)
class Calibration:
    """The chosen scale and the measurements it was chosen from."""

    scale: float
    budget: Budget
    points: tuple[Point, ...]
    reference: float  # unsteered perplexity of the calibration text

    def metadata(self) -> dict[str, str | float | int]:
        found: dict[str, str | float | int] = {
            Key.CALIBRATION_BUDGET: self.budget.perplexity,
            Key.CALIBRATION_SCALE: round(self.scale, 6),
            Key.CALIBRATION_REFERENCE_PPL: round(self.reference, 4),
            Key.CALIBRATION_POINTS: ",".join(map(str, self.points)),
            Key.CALIBRATION_TOKENS: TOKENS,
            Key.SCALE_RULE: "calibrated",
        }
        if self.budget.entropy is not None:
            found[Key.CALIBRATION_ENTROPY_BUDGET] = self.budget.entropy
        return found


def calibrate(
    model: Model,
    rows: np.ndarray,
    span: tuple[int, int],
    *,
    budget: Budget,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """The factor for `rows` (the vector by block, as trained) at which the worse of +/-1
    uses up `budget` on the calibration text; the search starts at FIRST_SCALE.
    `progress(done, STEPS)` follows the search steps (it may end early: then STEPS/STEPS)."""
    text = dataset.calibration_text()
    with Context(model, n_ctx=TOKENS + 16, n_batch=TOKENS + 16, threads=threads) as ctx:

        def fluency(scale: float) -> tuple[float, float]:
            ctx.set_steering(rows * np.float32(scale) if scale else None, *span)
            return metrics.fluency(ctx, text, window=TOKENS, limit=TOKENS)

        reference, flatness = fluency(0.0)
        worse = [1.0, -1.0]  # signs to measure: both at first, then the one that cost more

        def cost(scale: float) -> Point:
            measured = []
            for sign in worse:
                ppl, entropy = fluency(sign * scale)
                ratio, rise = ppl / reference, entropy - flatness
                measured.append((sign, Point(scale, ratio, rise, budget.load(ratio, rise))))
            sign, point = max(measured, key=lambda m: m[1].load)
            worse[:] = [sign]
            return point

        report = progress or (lambda _done, _total: None)
        report(0, STEPS)
        found = _search(cost, budget, reference, lambda done: report(done, STEPS))
        if len(found.points) < STEPS:  # ended early; a full search reported its last step
            report(STEPS, STEPS)
        return found


def _search(
    cost: Callable[[float], Point], budget: Budget, reference: float, step: Callable[[int], None]
) -> Calibration:
    """Secant steps on y = log(load) against x = log(scale), from FIRST_SCALE."""
    points: list[Point] = []
    scale = FIRST_SCALE

    def miss(point: Point) -> float:
        """How far a load is from the budget, in log-perplexity terms (TOLERANCE's units)."""
        return abs(point.load - 1.0) * math.log(budget.perplexity)

    for _ in range(STEPS):
        points.append(cost(scale))
        step(len(points))
        if miss(points[-1]) <= TOLERANCE:
            break
        scale = _next_scale(points)
    best = min(points, key=miss)
    return Calibration(best.scale, budget, tuple(points), reference)


def extrapolate(scale: float, load: float, power: float = POWER) -> float:
    """The scale at which a cost measured as `load` at `scale` would reach the budget
    (load 1.0) if it grows like scale**power."""
    return math.exp(math.log(scale) - math.log(load) / power)


def _next_scale(points: list[Point]) -> float:
    usable = [(p.scale, p.load) for p in points if p.load > MEASURABLE]
    if not usable:
        return points[-1].scale * 4  # no measurable cost yet: push much harder
    power = POWER
    if len(usable) > 1:
        (s0, c0), (s1, c1) = usable[-2], usable[-1]
        x0, y0, x, y = math.log(s0), math.log(c0), math.log(s1), math.log(c1)
        power = (y - y0) / (x - x0) if x != x0 else POWER
        power = min(max(power, 0.5), 4.0)
    return extrapolate(*usable[-1], power)
