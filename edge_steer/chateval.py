"""What a chat user sees under steering, measured without an outside judge.

At each strength the steered model answers everyday questions (`dataset.chat_questions`,
never the probes) in its own chat format, REPLIES times each, sampled with the same seeds at
every strength.
Each reply is then read by the *unsteered* model twice: once after the concept's positive
persona instruction and the question, once after the negative one. The persona score is
log P(reply | positive) - log P(reply | negative) per reply token: does the steered reply
read like what the persona-prompted model itself writes? It should rise with the strength.
Beside it: reply length, the share of replies that end their turn, and the share that
degenerate into repetition (`metrics.is_degenerate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from math import comb

import numpy as np

from . import chat, dataset, evaluate, metrics
from .engine import SCORED_TOGETHER, Context, Model, continuations, scoring
from .errors import BadInput

REPLY_TOKENS = 64  # per reply: enough for a tone to show, cheap enough for every strength
# replies per question: a loop at +/-1 is a rare event (SmolLM2's trippy +1: 2-7 in 96,
# docs/training.md), and with one reply per question each chance loop moved the share by 12%
REPLIES = 3
MAX_REPLIES = 8  # 64 replies side by side in one context, as many sequences as training uses
LOOPS_SIGNIFICANT = 0.05  # `excess_loops_p` under this: more loops than chance explains


@dataclass(frozen=True)
class ChatPoint:
    strength: float
    persona: float  # mean per-token log-likelihood ratio, positive vs negative persona
    tokens: float  # mean reply length
    ended: float  # share of replies that ended their turn within REPLY_TOKENS
    degenerate: float  # share of replies that loop
    sample: str  # the first reply
    replies: int  # how many replies the shares are of

    @property
    def looping(self) -> int:
        """How many of the replies loop."""
        return round(self.degenerate * self.replies)


def excess_loops_p(steered: ChatPoint, unsteered: ChatPoint) -> float:
    """How likely chance alone makes at least `steered.looping` of the loops land among the
    steered replies, were steering harmless (Fisher's exact test, one-sided): a loop is rare
    (SmolLM2 unsteered: 1 of 192), so 1 of 24 against 0 of 24 says nothing (p = 0.5)."""
    k, n, loops = steered.looping, steered.replies, steered.looping + unsteered.looping
    total = n + unsteered.replies
    tail = sum(comb(loops, x) * comb(total - loops, n - x) for x in range(k, min(loops, n) + 1))
    return tail / comb(total, n)


def chat_sweep(
    model: Model,
    rows: np.ndarray,
    span: tuple[int, int],
    concept: dataset.Concept,
    strengths: Sequence[float],
    *,
    seed: int = 0,
    replies: int = REPLIES,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[ChatPoint]:
    """`replies` replies per question at each strength (0 included), scored as the module
    says; reply i is sampled with seed + i at every strength."""
    require_chat(model)
    check_replies(replies)
    questions = [q for q in dataset.chat_questions() for _ in range(replies)]
    prompts = [_prompt(model, question) for question in questions]
    personas = dataset.persona_instruction(concept)
    strengths = sorted({*strengths, 0.0})
    tally = evaluate.Tally(progress, 2)
    tally.plan(len(strengths))
    jobs = [(rows * np.float32(s) if s else None, prompts) for s in strengths]
    sampler = replace(evaluate.SAMPLING, seed=seed)
    answers = continuations.sample_jobs(
        model, jobs, sampler, REPLY_TOKENS, span, threads=threads, progress=tally.sampling()
    )
    heads = [[_prompt(model, f"{p} {q}") for q in questions] for p in personas]
    longest = max(len(head) for some in heads for head in some) + REPLY_TOKENS
    found = []
    with Context(
        model, n_ctx=SCORED_TOGETHER * longest, n_seq=SCORED_TOGETHER, threads=threads
    ) as ctx:
        for strength, replied in zip(strengths, answers, strict=True):
            found.append(_point(ctx, strength, heads, replied))
            tally.measured()
    return found


def check_replies(replies: int) -> None:
    if not 1 <= replies <= MAX_REPLIES:
        raise BadInput(f"--chat-replies must be 1-{MAX_REPLIES}, got {replies}")


def require_chat(model: Model) -> None:
    if not model.chat_template:
        raise BadInput(
            f"{model.name} has no chat template: eval --chat measures chat replies, so it "
            "needs an instruct model (e.g. --model demo-chat)"
        )


def _prompt(model: Model, text: str) -> list[int]:
    return chat.format_prompt(model, [{"role": "user", "content": text}])[0]


def _point(
    ctx: Context, strength: float, heads: list[list[list[int]]], replies: list[list[int]]
) -> ChatPoint:
    """Score `replies` with the unsteered model, after each persona's heads (persona
    instruction and question, one per reply)."""
    scored = [i for i, reply in enumerate(replies) if reply]
    per_persona = []
    for persona_heads in heads:
        texts = [(persona_heads[i] + replies[i], len(persona_heads[i])) for i in scored]
        per_persona.append([logps.sum() for logps in scoring.score(ctx, texts)])
    lengths = [len(replies[i]) for i in scored]
    positive, negative = (np.asarray(logps) for logps in per_persona)
    ratio = (positive - negative) / np.asarray(lengths) if scored else np.zeros(0)
    return ChatPoint(
        strength=strength,
        persona=float(ratio.mean()) if scored else 0.0,
        tokens=float(np.mean([len(r) for r in replies])),
        ended=float(np.mean([len(r) < REPLY_TOKENS for r in replies])),
        degenerate=float(np.mean([metrics.is_degenerate(r) for r in replies])),
        sample=ctx.model.detokenize(replies[0]),
        replies=len(replies),
    )
