"""Many sampled continuations decoded side by side, one sequence each, each under its own
steering: evaluation's and chat evaluation's samples, several strengths in each decode."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ..constants import DEFAULT_CTX, RANDOM_SEED
from ..errors import BadInput
from .batching import Batcher, Slot
from .context import Context
from .model import Model
from .sampling import Sampler, SamplerSettings

# a round of `sample_jobs`: fewer than 64 sequences side by side (from 64 rows llama.cpp's
# CPU flash attention takes a tiled path: the demo model sampled 131 tokens/s at 64 rows, 175
# at 56, 122 at 8; the Mistral 7B stand-in 1.18x at 40 rows against 8), and their KV cells
# within a default context's (so within the memory the model was sized for)
SAMPLED_TOGETHER = 63
SAMPLED_CELLS = DEFAULT_CTX
Progress = Callable[[int, int], None]  # (done, total)
Job = tuple[np.ndarray | None, Sequence[Sequence[int]]]  # steering rows at strength, prompts


def sample_jobs(
    model: Model,
    jobs: Sequence[Job],
    sampler: SamplerSettings,
    max_tokens: int,
    span: tuple[int, int],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[list[list[int]]]:
    """For each job (a steering, prompts), one continuation per prompt, prompt i sampled
    with seed `sampler.seed + i` in every job. Jobs share decodes, one steering per
    sequence (`rowsteer`), up to SAMPLED_TOGETHER sequences in a context of their own:
    one job at a time left a GPU idling. `progress(done, total)` counts jobs."""
    found: list[list[list[int]]] = []
    start = 0
    while start < len(jobs):
        end = start + 1
        while end < len(jobs) and _fits(jobs[start : end + 1], max_tokens):
            end += 1

        def steps(step: int, most: int, before: int = start, width: int = end - start) -> None:
            if progress:
                progress(before + width * step // most, len(jobs))

        found += _sample_round(model, jobs[start:end], sampler, max_tokens, span, threads, steps)
        start = end
    return found


def _fits(jobs: Sequence[Job], max_tokens: int) -> bool:
    """Whether `jobs` make one round (see SAMPLED_TOGETHER)."""
    prompts = _prompts(jobs)
    return len(prompts) <= SAMPLED_TOGETHER and _cells(prompts, max_tokens) <= SAMPLED_CELLS


def _prompts(jobs: Sequence[Job]) -> list[Sequence[int]]:
    """Every job's prompts, in job order: the round's sequences."""
    return [prompt for _, job_prompts in jobs for prompt in job_prompts]


def _cells(prompts: Sequence[Sequence[int]], max_tokens: int) -> int:
    """KV cells the prompts and their continuations take in one pool."""
    return sum(map(len, prompts)) + len(prompts) * max_tokens


def _sample_round(
    model: Model,
    jobs: Sequence[Job],
    sampler: SamplerSettings,
    max_tokens: int,
    span: tuple[int, int],
    threads: int | None,
    progress: Progress,
) -> list[list[list[int]]]:
    """`sample_jobs` for jobs whose prompts are decoded side by side."""
    prompts = _prompts(jobs)
    if not prompts:
        return [[] for _ in jobs]
    steerings = [rows for rows, job_prompts in jobs for _ in job_prompts]
    seed = sampler.seed or 0
    samplers = [  # seed + i wraps below 2**32 - 1, which llama.cpp reads as "random"
        Sampler(model, replace(sampler, seed=(seed + i) % RANDOM_SEED))
        for _, p in jobs
        for i in range(len(p))
    ]
    n_seq, n_ctx = len(prompts), _cells(prompts, max_tokens)  # one pool: a row's attention
    try:  # spans it all, yet KV cells per sequence would take 256 each (llama.cpp pads them)
        with Context(model, n_ctx=n_ctx, n_seq=n_seq, threads=threads, row_steering=True) as ctx:
            outputs = sample_many(ctx, prompts, samplers, max_tokens, steerings, span, progress)
    finally:
        for each in samplers:
            each.close()
    bounds = itertools.pairwise(itertools.accumulate((len(p) for _, p in jobs), initial=0))
    return [outputs[a:b] for a, b in bounds]


def sample_many(
    ctx: Context,
    prompts: Sequence[Sequence[int]],
    samplers: Sequence[Sampler],
    max_tokens: int,
    steerings: Sequence[np.ndarray | None] | None = None,
    span: tuple[int, int] = (1, -1),
    progress: Progress | None = None,
) -> list[list[int]]:
    """One sampled continuation per prompt, decoded side by side: sequence i holds prompt
    i, steered by `steerings[i]` (rows by block at their strength, over blocks `span`; None
    or no `steerings`: unsteered), and each step is one `llama_decode` of every live
    sequence's next token. Sequences given the same array share a steering; different
    ones in one decode need a context made with row_steering=True (`rowsteer`). Each stops
    at end-of-generation or `max_tokens`, and its sampler is closed then. Needs n_seq >=
    len(prompts)."""
    if not prompts or max_tokens < 1:
        return [[] for _ in prompts]
    if len(prompts) > ctx.n_seq:
        raise BadInput(f"{len(prompts)} prompts need a context made with n_seq >= that")
    if ctx.separate_kv:
        needed, room = max(map(len, prompts)) + max_tokens, ctx.n_ctx // ctx.n_seq
    else:
        needed, room = _cells(prompts, max_tokens), ctx.n_ctx
    if any(not p for p in prompts) or needed > room:
        raise BadInput("the prompts and their continuations do not fit the context")
    batcher = Batcher(ctx, first=span[0], last=span[1], prompt_chunk=ctx.n_batch)
    steerings = steerings or [None] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    with ctx.scratch():
        for seq, (prompt, sampler, rows) in enumerate(
            zip(prompts, samplers, steerings, strict=True)
        ):
            key = None if rows is None else id(rows)  # one array, one steering
            batcher.start(batcher.slots[seq], prompt, sampler, key, rows, reuse=False)
        sampled = batcher.prefill()
        for step in range(1, max_tokens + 1):  # every slot is released by the last
            _take(batcher, sampled, outputs, max_tokens)
            if not any(slot.busy for slot in batcher.slots):
                break
            if progress:
                progress(step, max_tokens)
            sampled = batcher.step()
    if progress:
        progress(max_tokens, max_tokens)
    return outputs


def _take(batcher: Batcher, sampled: list[Slot], outputs: list[list[int]], most: int) -> None:
    """Keep each slot's sampled token, to be decoded at the next step; a slot whose
    continuation ended (end-of-generation, `most` tokens) is released."""
    for slot in sampled:
        token = slot.sampled
        assert token is not None
        if batcher.ctx.model.is_eog(token):
            batcher.release(slot)
            continue
        outputs[slot.seq].append(token)
        if len(outputs[slot.seq]) == most:
            batcher.release(slot)
        else:
            slot.next_token = token
