"""Continuous batching (engine/batching.py): sequences under different steerings share each
llama_decode, and every one gets exactly the greedy tokens it gets decoded alone."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_rows

from edge_steer.engine import Context, Sampler, SamplerSettings
from edge_steer.engine.batching import Batcher

GREEDY = SamplerSettings(temperature=0)
NORM = 0.5  # per sqrt(n_embd): distinct greedy text that stays fluent
PROMPTS = [
    "The best thing about mornings is",
    "My plan for the weekend:",
    "Dear diary, today",
    "Seven small",
]


def steerings(model) -> list[np.ndarray | None]:
    """Unsteered, and three random steerings strong enough to change greedy text."""
    middle = {n: NORM * model.n_embd**0.5 for n in range(2, model.n_layer // 2)}
    return [None, *(random_rows(model, middle, seed) for seed in (1, 2, 3))]


def alone(model, prompt: list[int], rows: np.ndarray | None, n: int) -> list[int]:
    """Greedy tokens of `prompt` under `rows`, decoded on its own (what the CLI does)."""
    with Context(model, n_ctx=256) as ctx:
        ctx.set_steering(rows)
        pieces = ctx.generate(prompt, Sampler(model, GREEDY), max_tokens=n)
        "".join(pieces)
        return ctx.tokens[len(prompt) :]


def batched(model, jobs, n: int, *, stagger: int = 0, keys: str = "each") -> list[list[int]]:
    """Greedy tokens of each (prompt, rows) job, all on one context, continuous batching;
    job i joins `stagger * i` steps after the first. keys="one": every job's steering is
    taken for the same (so llama.cpp's control vector does it)."""
    out: list[list[int]] = [[] for _ in jobs]
    with Context(
        model, n_ctx=512 * len(jobs), n_batch=512 + len(jobs), n_seq=len(jobs), row_steering=True
    ) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=512)
        step = 0
        while any(len(tokens) < n for tokens in out):
            for i, (prompt, rows) in enumerate(jobs):
                if step == stagger * i:
                    key = None if rows is None else (0 if keys == "one" else i)
                    batcher.start(batcher.slots[i], prompt, Sampler(model, GREEDY), key, rows)
            for slot in batcher.step():
                tokens = out[slot.seq]
                tokens.append(slot.sampled)
                if len(tokens) < n:
                    slot.next_token = slot.sampled
                else:
                    batcher.release(slot)
            step += 1
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("stagger", [0, 3])
def test_per_row_steering_equals_the_native_control_vector(demo_model, stagger) -> None:
    """The same schedule twice, four prompts under one steering: once through llama.cpp's
    control vector (one key: native), once through the eval callback (four keys, the same
    vectors). Every token is the same: per-row steering adds nothing of its own."""
    model = demo_model
    rows = steerings(model)[1]
    prompts = [model.tokenize(p) for p in PROMPTS]
    native = batched(model, [(p, rows) for p in prompts], 16, stagger=stagger, keys="one")
    per_row = batched(model, [(p, rows) for p in prompts], 16, stagger=stagger, keys="each")
    assert per_row == native


@pytest.mark.parametrize("model_name", ["demo_model", "tiny_dense"])
def test_each_sequence_gets_its_own_steering(request, model_name) -> None:
    """Four prompts under four steerings in one batch, against each decoded alone. Bit for
    bit they may part after a few tokens (llama.cpp's rows are not batch-invariant: a row's
    attention and matmuls round differently beside other rows, up to ~1 logit on Gemma 3 and
    0.01 on a llama model; llama-server parts the same way), so: the first tokens agree,
    and each continuation is closest to its own steering's, never to another's."""
    model = request.getfixturevalue(model_name)
    prompts = [model.tokenize(p) for p in PROMPTS]
    jobs = list(zip(prompts, steerings(model), strict=True))
    expected = [alone(model, prompt, rows, 12) for prompt, rows in jobs]
    got = batched(model, jobs, 12, stagger=1)
    for mine, own in zip(got, expected, strict=True):
        assert mine[:2] == own[:2]
        others = [common_prefix(mine, e) for e in expected if e is not own]
        assert common_prefix(mine, own) > max(others), (mine, own)


def two_rows(model, plain: tuple, steered: tuple) -> list[np.ndarray]:
    """Logits of one decode holding a generating row of one sequence, then the prompt of
    another, each under its (key, rows)."""
    prompt = model.tokenize(PROMPTS[0])
    with Context(model, n_ctx=1024, n_batch=520, n_seq=2, row_steering=True) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=512)
        first, second = batcher.slots
        batcher.start(first, prompt, Sampler(model, GREEDY), *plain)
        batcher.step()
        first.next_token = first.sampled
        batcher.start(second, prompt, Sampler(model, GREEDY), *steered)
        batcher.step()
        n_outputs = sum(bool(ctx.batch.raw.logits[i]) for i in range(ctx.batch.n))
        return list(ctx.output_logits(n_outputs).copy())


def test_per_row_steering_adds_exactly_what_the_control_vector_adds(demo_model) -> None:
    """Logits, bit for bit, in one decode of two rows: each row under its own steering
    through the eval callback equals the same row under llama.cpp's control vector."""
    rows = steerings(demo_model)[1]
    native = two_rows(demo_model, ("v", rows), ("v", rows))  # one key: the control vector
    per_row = two_rows(demo_model, ("v", rows), ("w", rows))  # two keys: the callback
    assert all(np.array_equal(a, b) for a, b in zip(native, per_row, strict=True))
    unsteered = two_rows(demo_model, (None, None), (None, None))
    mixed = two_rows(demo_model, (None, None), ("w", rows))
    assert np.array_equal(mixed[0], unsteered[0])  # the plain row gets nothing added
    assert np.array_equal(mixed[1], native[1])  # the steered row gets all of it
    assert not np.array_equal(mixed[0], mixed[1])
