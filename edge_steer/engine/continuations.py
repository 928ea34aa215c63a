"""Many sampled continuations decoded side by side, one sequence each (evaluation's and chat
evaluation's samples). Uses the whole KV cache (`Context.scratch`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import BadInput
from . import packing
from .sampling import Sampler

if TYPE_CHECKING:
    from .context import Context


def sample_many(
    ctx: Context, prompts: Sequence[Sequence[int]], samplers: Sequence[Sampler], max_tokens: int
) -> list[list[int]]:
    """One sampled continuation per prompt, decoded side by side: sequence i holds prompt i,
    and each step is one `llama_decode` of every live sequence's next token. Each stops at
    end-of-generation or `max_tokens`. Needs a context made with n_seq >= len(prompts); uses
    the whole KV cache (`Context.scratch`)."""
    if not prompts:
        return []
    if len(prompts) > ctx.n_seq:
        raise BadInput(f"{len(prompts)} prompts need a context made with n_seq >= that")
    if (
        any(not p for p in prompts)
        or sum(map(len, prompts)) + len(prompts) * max_tokens > ctx.n_ctx
    ):
        raise BadInput("the prompts and their continuations do not fit the context")
    outputs: list[list[int]] = [[] for _ in prompts]
    with ctx.scratch() as batch:
        packing.prefill_sequences(ctx, [p[:-1] for p in prompts])
        step = {seq: p[-1] for seq, p in enumerate(prompts)}
        for sampler, prompt in zip(samplers, prompts, strict=True):
            sampler.accept_prompt(prompt)
        for _ in range(max_tokens):
            batch.clear()
            rows = {}
            for seq, token in step.items():
                rows[seq] = batch.n
                batch.add(token, len(prompts[seq]) + len(outputs[seq]) - 1, seq, True)
            ctx.decode()
            step = {}
            for seq, row in rows.items():
                token = samplers[seq].sample(ctx, row)
                if not ctx.model.is_eog(token):
                    outputs[seq].append(token)
                    step[seq] = token
            if not step:
                break
    return outputs
