"""Measure steering: its effect on held-out probes and its cost in fluency, over strengths.

Effect: the change, against the unsteered model, of the mean margin log P(positive
continuation) - log P(negative continuation) over a concept's held-out probes, in nats.
Cost: the perplexity ratio on neutral prose, and the share of short sampled generations that
degenerate into repetition. From these follows the recommended strength range, which is
stored in the vector file's metadata.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dataset, vectors
from .dataset import Probe
from .engine import SCORED_TOGETHER, Context, Model, SamplerSettings, continuations
from .errors import BadInput
from .metrics import is_degenerate, perplexity, probe_margin
from .vectors import EVAL_KEYS, MAX_STRENGTH, Key

EVAL_CTX = 1024  # probes, 256-token perplexity windows and short samples all fit
MAX_PPL_RATIO = 1.25  # the recommended range keeps perplexity within this of unsteered
MIN_EFFECT = 0.1  # nats: a smaller change of the mean probe margin is not a usable effect
DEFAULT_STRENGTHS = "-2..2:1"  # and `refine`: see `halves_over_limit`
DEFAULT_STEP = 0.5
MAX_STRENGTHS = 41
# the CLI's sampling without the repetition penalty, which would hide the very loops counted
SAMPLING = SamplerSettings(repeat_penalty=1.0, seed=0)
Progress = Callable[[int, int], None]


# -- strengths -------------------------------------------------------------------------------


def parse_strengths(text: str) -> tuple[float, ...]:
    """`A..B` (step 0.5), `A..B:STEP` or a comma list `-1,0,1` -> sorted strengths.

    0 is always included: effects and costs are measured against the unsteered model.
    """
    hint = "use A..B, A..B:STEP or a comma list, e.g. -2..2, -2..2:0.5 or -1,0,1"
    try:
        values = _strength_values(text.strip())
    except ValueError as exc:
        detail = "" if "could not convert" in str(exc) else f" ({exc})"
        raise BadInput(f"bad strengths {text!r}{detail}: {hint}") from None
    strengths = {round(v, 6) + 0.0 for v in values}  # + 0.0: -0 is 0
    if not strengths - {0.0}:
        raise BadInput(f"--strengths {text} has no strength but 0 to measure: {hint}")
    return tuple(sorted(strengths | {0.0}))


def _number(text: str) -> float:
    """float() as people write numbers: not `1_0` (10), other scripts' digits or `nan`."""
    number = vectors.parse_number(text)
    if number is None:
        raise ValueError("could not convert")
    return number


def _too_many(count: int) -> None:
    if count > MAX_STRENGTHS:
        raise BadInput(f"{count} strengths is too many (at most {MAX_STRENGTHS}): use fewer")


def _strength_values(spec: str) -> list[float]:
    if ".." not in spec:
        values = [_number(part) for part in spec.split(",")]
        _too_many(len(values))
    else:
        span, _, step_text = spec.partition(":")
        low_text, _, high_text = span.partition("..")
        low, high = _number(low_text), _number(high_text)
        step = _number(step_text) if step_text else DEFAULT_STEP
        if not step > 0:
            raise ValueError("the step must be positive")
        if not low < high:
            raise ValueError("the range must go from low to high")
        count = math.floor((high - low) / step + 1e-9) + 1
        _too_many(count)
        values = [low + i * step for i in range(count)]
    if not all(math.isfinite(v) and abs(v) <= MAX_STRENGTH for v in values):
        raise ValueError(f"strengths must be numbers from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}")
    return values


def share(fraction: float | None) -> str:
    """A rate as a percentage; "-" where nothing was counted."""
    return "-" if fraction is None else f"{fraction:.0%}"


# -- the measurements ------------------------------------------------------------------------


def neutral_prompts(count: int, words: int = 6) -> list[str]:
    """Openings of the neutral text's sentences, taking each paragraph in turn."""
    paragraphs = [
        re.split(r"(?<=[.!?])\s+", block.strip())
        for block in dataset.neutral_text().split("\n\n")
        if block.strip()
    ]
    sentences = [s for row in itertools.zip_longest(*paragraphs) for s in row if s]
    return [" ".join(s.split()[:words]) for s in sentences[:count]]


Setting = tuple[np.ndarray | None, str]  # steering rows at their strength, prompt prefix


def sample_settings(
    ctx: Context,
    jobs: Sequence[Setting],
    settings: EvalSettings,
    span: tuple[int, int],
    progress: Progress | None = None,
) -> list[list[list[int]]]:
    """`settings.samples` sampled continuations of the neutral prompts under each setting
    (`continuations.sample_jobs`: settings share decodes, prompt i has the same seed in
    every one); `ctx` gives the model and threads."""
    texts = neutral_prompts(settings.samples)
    model = ctx.model
    steered = [
        (rows, [model.tokenize(prefix + t, parse_special=True) for t in texts])
        for rows, prefix in jobs
    ]
    return continuations.sample_jobs(
        model,
        steered,
        settings.sampler,
        settings.sample_tokens,
        span,
        threads=ctx.threads,
        progress=progress,
    )


# -- a sweep over strengths ------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How much to measure: strengths, sampled generations, the perplexity window."""

    strengths: tuple[float, ...] = field(default_factory=lambda: parse_strengths(DEFAULT_STRENGTHS))
    samples: int = 8  # sampled generations per setting, for the degenerate rate
    sample_tokens: int = 32
    sampler: SamplerSettings = SAMPLING
    window: int = 256
    # scored tokens of the neutral text (None: all ~1500): enough to cover its six kinds of
    # text (explanation, story, dialogue, instructions, news, letter; neutral.txt puts one of
    # each first), because a vector's cost differs by kind and the recommended range must
    # hold on text it never saw. Not fewer: a persona prompt's cost shows only after the
    # first window (happy: x1.01 on 256 tokens, x1.06 on 512 and on all)
    neutral_tokens: int | None = 768
    # also measure `halves_over_limit` (the CLI's default sweep does; given strengths do not)
    refine: bool = False


@dataclass(frozen=True)
class Point:
    """One measured setting: a vector strength, or a persona prompt (baseline: +1 or -1)."""

    strength: float
    margin: float
    perplexity: float
    degenerate: float | None  # None: nothing sampled (--samples 0)
    sample: str = ""  # the first sampled continuation, to see what the setting does


@dataclass(frozen=True)
class Sweep:
    """The points of a sweep (strength 0 included) and the persona-prompt baseline."""

    points: tuple[Point, ...]
    baseline: tuple[Point, ...] = ()

    @property
    def reference(self) -> Point:
        return next(p for p in self.points if p.strength == 0)

    def effect(self, point: Point) -> float:
        return point.margin - self.reference.margin

    def ppl_ratio(self, point: Point) -> float:
        return point.perplexity / self.reference.perplexity

    def effect_per_cost(self, point: Point) -> float | None:
        """Nats of effect per nat of added perplexity (the log of the ratio), to compare a
        vector with the persona prompt; None where the cost is too small to measure."""
        cost = math.log(self.ppl_ratio(point))
        return self.effect(point) / cost if cost > 1e-3 else None

    def nearest(self, strength: float) -> Point | None:
        """The measured point closest to `strength` on the same side of 0."""
        side = [p for p in self.points if p.strength * strength > 0]
        return min(side, key=lambda p: abs(p.strength - strength), default=None)


def context(model: Model, threads: int | None = None) -> Context:
    """A context for what a sweep scores: probes and perplexity windows (samples are
    decoded in contexts of their own, `sample_settings`)."""
    return Context(model, n_ctx=EVAL_CTX, threads=threads, n_seq=SCORED_TOGETHER)


def measure(
    ctx: Context,
    probes: Sequence[Probe],
    settings: EvalSettings,
    strength: float,
    outputs: Sequence[Sequence[int]],
    prefix: str = "",
) -> Point:
    """Effect and cost of the context's current steering (and `prefix`), as one Point;
    `outputs`: the continuations sampled under it."""
    text = dataset.neutral_text()
    return Point(
        strength=strength,
        margin=probe_margin(ctx, probes, prefix),
        perplexity=perplexity(ctx, text, settings.window, prefix, settings.neutral_tokens),
        degenerate=float(np.mean([is_degenerate(o) for o in outputs])) if outputs else None,
        sample=ctx.model.detokenize(outputs[0]) if outputs else "",
    )


def sweep(
    ctx: Context,
    rows: np.ndarray,
    span: tuple[int, int],
    probes: Sequence[Probe],
    settings: EvalSettings,
    *,
    personas: tuple[str, str] | None = None,
    progress: Progress | None = None,
) -> Sweep:
    """Measure `rows` (the vector at strength 1, by block) at every strength, steering blocks
    `span` (and at `halves_over_limit` with `settings.refine`); then, given `personas`
    (positive and negative prompt texts), the unsteered model prompted with each instead:
    the baseline people compare steering against. Each setting's samples are decoded
    first, beside other settings' (`sample_settings`), then its probes and perplexity."""
    strengths = sorted({*settings.strengths, 0.0})  # effects and costs are relative to 0
    baseline = list(zip((1.0, -1.0), personas or (), strict=False))
    tally = Tally(progress, 2 if settings.samples else 1)
    tally.plan(len(strengths) + len(baseline))

    def steering(strength: float) -> np.ndarray | None:
        return rows * np.float32(strength) if strength else None

    def steered(strengths: list[float], outputs: list[list[list[int]]]) -> list[Point]:
        points = []
        for strength, sampled in zip(strengths, outputs, strict=True):
            ctx.set_steering(steering(strength), *span)
            points.append(measure(ctx, probes, settings, strength, sampled))
            tally.measured()
        return points

    jobs = [(steering(s), "") for s in strengths] + [(None, prefix) for _, prefix in baseline]
    outputs = sample_settings(ctx, jobs, settings, span, tally.sampling())
    points = steered(strengths, outputs[: len(strengths)])
    if settings.refine:
        extra = halves_over_limit(Sweep(tuple(points)))
        tally.plan(len(extra))
        more = sample_settings(
            ctx, [(steering(s), "") for s in extra], settings, span, tally.sampling()
        )
        points = sorted(points + steered(extra, more), key=lambda p: p.strength)
    ctx.set_steering(None)
    persona_points = []
    for (sign, prefix), sampled in zip(baseline, outputs[len(strengths) :], strict=True):
        persona_points.append(measure(ctx, probes, settings, sign, sampled, prefix))
        tally.measured()
    return Sweep(tuple(points), tuple(persona_points))


class Tally:
    """A sweep's progress in parts: a setting's samples (where it has some) and its
    measurement are a part each (samples come in rounds of many settings)."""

    def __init__(self, progress: Progress | None, parts_per_setting: int):
        self.progress, self.parts = progress, parts_per_setting
        self.planned = self.done = 0

    def plan(self, settings: int) -> None:
        self.planned += settings * self.parts

    def sampling(self) -> Progress | None:
        """A `sample_settings` progress that moves this tally, or None with no samples."""
        if self.parts == 1:
            return None
        before = self.done

        def sampled(done: int, _total: int) -> None:
            self.done = before + done
            self._report()

        return sampled

    def measured(self) -> None:
        self.done += 1
        self._report()

    def _report(self) -> None:
        if self.progress:
            self.progress(self.done, self.planned)


def halves_over_limit(result: Sweep) -> list[float]:
    """Half of each side's innermost strength where that one is already over MAX_PPL_RATIO.

    With the default grid of 1, a strong vector (one converted from another tool, or a mix
    such as "happy*3") would otherwise have no measured strength in range on that side, and
    `eval` would recommend nothing for it while 0.5 works."""
    extra = []
    for side in (-1.0, 1.0):
        inner = min(
            (p for p in result.points if p.strength * side > 0),
            key=lambda p: abs(p.strength),
            default=None,
        )
        if inner is not None and result.ppl_ratio(inner) > MAX_PPL_RATIO:
            extra.append(inner.strength / 2)
    return extra


# -- what the sweep says -----------------------------------------------------------------------


def recommend(result: Sweep) -> tuple[float, float] | None:
    """The largest strength range with perplexity within MAX_PPL_RATIO of unsteered.

    From 0 outward on each side, measured strengths stay in while perplexity is within the
    limit and the effect has the strength's sign; a side counts only if the effect at its end
    is at least MIN_EFFECT. None when neither side does: the vector does not work.
    """
    ends = []
    for side in (-1.0, 1.0):
        end: Point | None = None
        for point in sorted(
            (p for p in result.points if p.strength * side > 0), key=lambda p: abs(p.strength)
        ):
            if result.ppl_ratio(point) > MAX_PPL_RATIO or result.effect(point) * side <= 0:
                break
            end = point
        works = end is not None and abs(result.effect(end)) >= MIN_EFFECT
        ends.append(end.strength if works and end else 0.0)
    return None if ends == [0.0, 0.0] else (ends[0], ends[1])


def at_sweep_edge(result: Sweep, span: tuple[float, float]) -> tuple[bool, bool]:
    """For each end of `span`: is it the outermost strength measured on its side? Perplexity
    was then still within the limit there, and the real limit lies further out."""
    strengths = [p.strength for p in result.points]
    return span[0] < 0 and span[0] == min(strengths), span[1] > 0 and span[1] == max(strengths)


def verdict(result: Sweep) -> str:
    """'works' when the effect has the right sign (and at least MIN_EFFECT) at both -1 and +1
    (or the nearest measured strengths); else 'positive only', 'negative only' or 'no effect'."""
    ok = []
    for side in (-1.0, 1.0):
        point = result.nearest(side)
        ok.append(point is not None and result.effect(point) * side >= MIN_EFFECT)
    return {
        (True, True): "works",
        (False, True): "positive only",
        (True, False): "negative only",
        (False, False): "no effect",
    }[(ok[0], ok[1])]


def summary(result: Sweep) -> str:
    """One line for file metadata and listings: effect and cost at -1 and +1 (or nearest)."""
    parts = []
    for side in (-1.0, 1.0):
        point = result.nearest(side)
        if point is not None:
            parts.append(
                f"{point.strength:+g}: effect {result.effect(point):+.2f} nats, "
                f"ppl x{result.ppl_ratio(point):.3f}, degenerate {share(point.degenerate)}"
            )
    return "; ".join(parts)


# -- the result in the vector file -------------------------------------------------------------


def save(path: str | Path, result: Sweep, model: Model, fingerprint: str, layers: str) -> None:
    """Rewrite the vector file (atomically) with this evaluation's keys (`EVAL_KEYS`);
    the keys of an earlier evaluation go, so a vector that no longer works loses its range."""
    vector = vectors.read(path)
    meta = {k: v for k, v in vector.metadata.items() if k not in EVAL_KEYS and v is not None}
    span = recommend(result)
    if span is not None:
        meta[Key.RECOMMENDED_MIN], meta[Key.RECOMMENDED_MAX] = float(span[0]), float(span[1])
    meta[Key.EVAL_VERDICT] = verdict(result)
    meta[Key.EVAL_SUMMARY] = summary(result)
    meta[Key.EVAL_LAYERS] = layers
    meta[Key.EVAL_MODEL] = fingerprint
    meta[Key.EVAL_MODEL_NAME] = model.name
    try:
        vectors.write(vectors.ControlVector(vector.directions, vector.model_hint, meta), path)
    except OSError as exc:
        raise BadInput(
            f"cannot write the evaluation into {path} ({exc.strerror or exc}): "
            "pass --no-save, or copy the vector somewhere writable"
        ) from None
