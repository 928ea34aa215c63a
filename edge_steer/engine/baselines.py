"""Baselines for benchmarks: llama.cpp driven as directly as Python can, to measure the
engine's own cost against."""

from __future__ import annotations

import time
from collections.abc import Sequence

import llama_cpp as ll

from . import packing
from .context import Context, check_decode


def bare_decode(ctx: Context, prompt: Sequence[int], n_gen: int) -> tuple[float, list[int], float]:
    """The floor any Python can reach: the prompt through `llama_decode` in n_batch chunks,
    then `n_gen` greedy tokens from the shortest loop (no end-of-generation check), under
    the current steering. Returns (prompt seconds, tokens, generation seconds); the cache
    is left empty. Benchmarks compare `generate` and `ingest` against it."""
    ctx.forget(0)
    sampler = ll.llama_sampler_init_greedy()
    one = (ll.llama_token * 1)()  # llama_decode reads the token through this array
    step = ll.llama_batch_get_one(one, 1)
    tokens: list[int] = []
    try:
        start = time.perf_counter()
        for begin in range(0, len(prompt), ctx.n_batch):
            chunk = prompt[begin : begin + ctx.n_batch]
            array = (ll.llama_token * len(chunk))(*chunk)  # referenced until decode returns
            check_decode(ll.llama_decode(ctx.ptr, ll.llama_batch_get_one(array, len(chunk))))
        raw, sample, decode = ctx.ptr, ll.llama_sampler_sample, ll.llama_decode
        ll.llama_synchronize(raw)  # asynchronous backends (CUDA, RPC) may still be computing
        middle = time.perf_counter()
        for _ in range(n_gen):
            one[0] = token = sample(sampler, raw, -1)
            if status := decode(raw, step):
                check_decode(status)
            tokens.append(token)
        end = time.perf_counter()
    finally:
        ll.llama_sampler_free(sampler)
        ctx.forget(0)
    return middle - start, tokens, end - middle


def prefill(ctx: Context, sequences: Sequence[Sequence[int]]) -> None:
    """Decode prompts packed exactly as `hidden.capture` packs them and keep nothing: plain
    prompt processing, the baseline that capture's speed is measured against."""
    with ctx.scratch():
        for group in packing.packed_groups(ctx, sequences):
            packing.decode_packed(ctx, group, sequences)
