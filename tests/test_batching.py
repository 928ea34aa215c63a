"""Continuous batching (engine/batching.py): sequences under different steerings share each
llama_decode, and every one gets exactly the greedy tokens it gets decoded alone."""

from __future__ import annotations

import llama_cpp as ll
import numpy as np
import pytest
from conftest import random_rows

from edge_steer import machine
from edge_steer.engine import Context, Model, Sampler, SamplerSettings, batching, continuations
from edge_steer.engine.batching import Batcher
from edge_steer.errors import BadInput
from edge_steer.prefixes import common_length

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


def alone(model, prompt: list[int], rows: np.ndarray | None, n: int, chunk: int = 512) -> list[int]:
    """Greedy tokens of `prompt` under `rows`, decoded on its own (what the CLI does), the
    prompt in chunks of `chunk` tokens."""
    with Context(model, n_ctx=256, n_batch=chunk) as ctx:
        ctx.set_steering(rows)
        pieces = ctx.generate(prompt, Sampler(model, GREEDY), max_tokens=n)
        "".join(pieces)
        return ctx.tokens[len(prompt) :]


def batched(
    model,
    jobs,
    n: int,
    *,
    stagger: int = 0,
    keys: str = "each",
    separate_kv: bool = False,
    merge: bool = False,
    decodes: list[int] | None = None,
) -> list[list[int]]:
    """Greedy tokens of each (prompt, rows) job, all on one context, continuous batching;
    job i joins `stagger * i` steps after the first. keys="one": every job's steering is
    taken for the same (so llama.cpp's control vector does it). `decodes` gets a 1 for
    each llama_decode."""
    out: list[list[int]] = [[] for _ in jobs]
    with Context(
        model,
        n_ctx=512 * len(jobs),
        n_batch=512,
        n_seq=len(jobs),
        row_steering=True,
        separate_kv=separate_kv,
    ) as ctx:
        batcher = Batcher(
            ctx, first=1, last=model.n_layer - 1, prompt_chunk=512, merge_prompts=merge
        )
        if decodes is not None:
            decode = ctx.decode
            ctx.decode = lambda: decodes.append(1) or decode()  # type: ignore[method-assign]
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


@pytest.fixture(scope="module")
def plain_demo(demo_path):
    """The demo model with llama.cpp's plain weight layouts (not repacked), as the server
    loads it for more than one lane."""
    from edge_steer.engine import Model

    with Model(demo_path, repack=False) as model:
        yield model


@pytest.mark.parametrize("stagger", [0, 1])
def test_with_plain_weights_each_sequence_gets_exactly_its_tokens_alone(plain_demo, stagger):
    """Four prompts under four steerings (one unsteered) in one batch: every sequence's
    greedy tokens are exactly those it gets decoded alone."""
    model = plain_demo
    prompts = [model.tokenize(p) for p in PROMPTS]
    jobs = list(zip(prompts, steerings(model), strict=True))
    expected = [alone(model, prompt, rows, 16) for prompt, rows in jobs]
    assert len({tuple(e) for e in expected}) == len(jobs)  # the steerings really differ
    assert batched(model, jobs, 16, stagger=stagger, separate_kv=True) == expected


def test_sampled_jobs_share_decodes_and_each_gets_its_tokens_alone(chat_path, monkeypatch):
    """Evaluation's samples (`continuations.sample_jobs`): four jobs (a steering, four
    prompts), one unsteered, in one round, steered and unsteered rows side by side in each
    decode. Every sequence samples exactly the tokens it gets in a round of its own job
    (under llama.cpp's control vector), seed for seed: with plain layouts SmolLM2's Q4_1
    kernels treat each row alike at 16 rows (Q4_K's do not past 7 rows here)."""
    with Model(chat_path, repack=False) as model:
        prompts = [model.tokenize(p) for p in PROMPTS]
        jobs = [(rows, prompts) for rows in steerings(model)]
        sampler = SamplerSettings(seed=7, repeat_penalty=1.0)
        span = (1, model.n_layer - 1)
        widths: list[int] = []
        monkeypatch.setattr(Batcher, "prefill", counted(Batcher.prefill, widths))
        together = continuations.sample_jobs(model, jobs, sampler, 12, span, threads=2)
        monkeypatch.setattr(continuations, "SAMPLED_TOGETHER", len(PROMPTS))
        apart = continuations.sample_jobs(model, jobs, sampler, 12, span, threads=2)
    assert widths == [16, 4, 4, 4, 4]  # one round of every job, then a round per job
    assert together == apart
    assert len({str(job) for job in together}) == len(jobs)  # the steerings really differ


def counted(prefill, widths: list[int]):
    """`Batcher.prefill`, noting how many slots each round starts."""

    def wrapper(self):
        widths.append(len(self._admitted))
        return prefill(self)

    return wrapper


@pytest.mark.parametrize("model_name", ["demo_model", "tiny_dense"])
def test_with_repacked_weights_sequences_stay_closest_to_their_own(request, model_name):
    """llama.cpp's repacked layouts (Gemma) and F16 weights (the tiny model) are not
    batch-invariant: bit for bit a sequence may part from its alone tokens after a few (up
    to ~1 logit on Gemma 3, 0.01 on the tiny model; llama-server's slots part the same way).
    Still, the first tokens agree and each continuation is closest to its own steering's."""
    model = request.getfixturevalue(model_name)
    prompts = [model.tokenize(p) for p in PROMPTS]
    jobs = list(zip(prompts, steerings(model), strict=True))
    expected = [alone(model, prompt, rows, 12) for prompt, rows in jobs]
    assert_closest_to_their_own(batched(model, jobs, 12, stagger=1), expected)


def assert_closest_to_their_own(got: list[list[int]], expected: list[list[int]]) -> None:
    """Each sequence starts as it does alone and stays closest to its own tokens alone."""
    for mine, own in zip(got, expected, strict=True):
        assert mine[:2] == own[:2]
        others = [common_length(mine, e) for e in expected if e is not own]
        assert common_length(mine, own) > max(others), (mine, own)


@pytest.mark.parametrize("keys", ["one", "each"])
def test_merged_prompt_chunks_join_the_decode_of_rows_under_their_steering(demo_model, keys):
    """With `merge_prompts` (repacked layouts: a reply is not as alone anyway) a prompt
    chunk joins the generating rows' decode when they all share its steering, as in
    llama-server: one decode fewer per request admitted beside others, and each sequence
    still gets its own prompt and steering. Under different steerings the chunk keeps a
    decode of its own (per-row steering holds one row per sequence)."""
    model = demo_model
    prompts = [model.tokenize(p) for p in PROMPTS]
    vectors = [steerings(model)[1]] * 4 if keys == "one" else steerings(model)
    jobs = list(zip(prompts, vectors, strict=True))
    expected = [alone(model, prompt, rows, 12) for prompt, rows in jobs]
    apart: list[int] = []
    merged: list[int] = []
    batched(model, jobs, 12, stagger=2, keys=keys, decodes=apart)
    got = batched(model, jobs, 12, stagger=2, keys=keys, merge=True, decodes=merged)
    assert len(merged) == len(apart) - (len(jobs) - 1 if keys == "one" else 0)
    assert_closest_to_their_own(got, expected)


def test_merging_prompts_needs_one_kv_pool(demo_model) -> None:
    """With KV cells per sequence a batch holds throwaway rows for idle lanes: one would sit
    at the admitted lane's next position, where its chunk goes."""
    ctx = Context(demo_model, n_ctx=1024, n_seq=2, row_steering=True, separate_kv=True)
    with ctx, pytest.raises(BadInput, match="one KV pool"):
        Batcher(ctx, first=1, last=3, prompt_chunk=512, merge_prompts=True)


def two_rows(model, plain: tuple, steered: tuple) -> list[np.ndarray]:
    """Logits of one decode holding the next token of two sequences of one prompt, each
    under its (key, rows)."""
    prompt = model.tokenize(PROMPTS[0])
    with Context(model, n_ctx=1024, n_seq=2, row_steering=True) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=512)
        for slot, (key, rows) in zip(batcher.slots, (plain, steered), strict=True):
            batcher.start(slot, prompt, Sampler(model, GREEDY), key, rows)
            batcher.step()
        for slot in batcher.slots:
            slot.next_token = slot.sampled
        assert len(batcher.step()) == 2
        return list(ctx.output_logits(2).copy())


@pytest.mark.skipif(not machine.gpus(), reason="no GPU device in this llama.cpp build")
def test_on_the_gpu_per_row_steering_adds_exactly_what_the_control_vector_adds(
    tiny_dense_path,
) -> None:
    """With every block on the GPU, the rows live in GPU memory and the repointed adds run
    there: still bit for bit the control vector's logits, and a plain row gets nothing."""
    with Model(tiny_dense_path, gpu_layers=999) as model:
        rows = steerings(model)[1]
        native = two_rows(model, ("v", rows), ("v", rows))
        per_row = two_rows(model, ("v", rows), ("w", rows))
        mixed = two_rows(model, (None, None), ("w", rows))
        unsteered = two_rows(model, (None, None), (None, None))
    assert all(np.array_equal(a, b) for a, b in zip(native, per_row, strict=True))
    assert np.array_equal(mixed[0], unsteered[0]) and np.array_equal(mixed[1], native[1])


def test_per_row_steering_adds_exactly_what_the_control_vector_adds(demo_model) -> None:
    """Logits, bit for bit, in one decode of two rows: each row under its own steering
    through the eval callback equals the same row under llama.cpp's control vector."""
    rows = steerings(demo_model)[1]
    native = two_rows(demo_model, ("v", rows), ("v", rows))  # one key: the control vector
    per_row = two_rows(demo_model, ("v", rows), ("w", rows))  # two keys: the callback
    assert all(np.array_equal(a, b) for a, b in zip(native, per_row, strict=True))
    wide = two_rows(demo_model, ("v", rows), ("w", rows.astype(np.float64)))  # float32 there
    assert all(np.array_equal(a, b) for a, b in zip(native, wide, strict=True))
    unsteered = two_rows(demo_model, (None, None), (None, None))
    mixed = two_rows(demo_model, (None, None), ("w", rows))
    assert np.array_equal(mixed[0], unsteered[0])  # the plain row gets nothing added
    assert np.array_equal(mixed[1], native[1])  # the steered row gets all of it
    assert not np.array_equal(mixed[0], mixed[1])


@pytest.mark.parametrize("moved", ["middle blocks", "last block only"])
def test_a_gap_between_busy_lanes_is_padded_and_leaves_no_trace(plain_demo, moved) -> None:
    """With KV cells per sequence, llama.cpp would split lanes 0 and 2 into two passes over
    the weights; a throwaway row for idle lane 1 keeps them in one, and its cell is gone
    after: both sequences still get exactly their tokens alone, and lane 1 holds nothing.
    A vector that moves only the last block (where llama.cpp keeps just the output rows,
    so the padding row is gone) still reaches lane 2's row."""
    model = plain_demo
    if moved == "middle blocks":
        rows = steerings(model)[1]
    else:
        rows = random_rows(model, {model.n_layer - 1: 4 * NORM * model.n_embd**0.5}, 4)
    prompts = [model.tokenize(p) for p in PROMPTS[:2]]
    expected = [alone(model, prompts[0], None, 10), alone(model, prompts[1], rows, 10)]
    assert expected[1] != alone(model, prompts[1], None, 10)  # the vector changes the text
    got: list[list[int]] = [[], []]
    with Context(model, n_ctx=1536, n_seq=3, row_steering=True, separate_kv=True) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=512)
        first, idle, last = batcher.slots
        batcher.start(first, prompts[0], Sampler(model, GREEDY), None, None)
        batcher.start(last, prompts[1], Sampler(model, GREEDY), "v", rows)
        while min(map(len, got)) < 10:
            for slot in batcher.step():
                tokens = got[0 if slot is first else 1]
                tokens.append(slot.sampled)
                slot.next_token = slot.sampled if len(tokens) < 10 else None
        assert ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctx.ptr), idle.seq) == -1
        # rows are written only where the vector moves a block
        assert ctx.row_steering.moved == [bool(np.any(block)) for block in rows]
    assert got == expected


def first_rows(model, steer) -> np.ndarray:
    """Logits of one decode holding BOS for sequences 0 and 1, after `steer(ctx)`."""
    with Context(model, n_ctx=1024, n_seq=2, row_steering=True) as ctx:
        steer(ctx)
        return decode_bos_pair(ctx)


def decode_bos_pair(ctx) -> np.ndarray:
    ll.llama_memory_clear(ll.llama_get_memory(ctx.ptr), True)
    ctx.batch.clear()
    for seq in (0, 1):
        ctx.batch.add(ctx.model.bos, 0, seq, True)
    ctx.decode()
    return ctx.output_logits(2).copy()


def test_a_reused_graph_follows_each_plan(plain_demo) -> None:
    """llama.cpp reuses a graph whose shapes repeat, with the adds per-row steering
    repointed: one decode under vectors that move many blocks, then one of the same shape
    under a vector that moves a single block, gives that vector's own logits (the blocks
    it leaves alone are pointed back at the zero control vector), and row 0 stays plain."""
    model = plain_demo
    last = model.n_layer - 1
    many = steerings(model)[1]
    one = random_rows(model, {3: 4 * NORM * model.n_embd**0.5}, 5)
    zero = np.zeros_like(one)
    plain = first_rows(model, lambda ctx: None)
    native = first_rows(model, lambda ctx: ctx.steer_all_rows(one, 1, last))
    with Context(model, n_ctx=1024, n_seq=2, row_steering=True) as ctx:
        ctx.zero_control_vector(1, last)
        per_row, both = ctx.row_steering, np.arange(2)
        per_row.plan(np.stack([zero, many]), both, both, 1, last)
        before = decode_bos_pair(ctx)
        per_row.plan(np.stack([zero, one]), both, both, 1, last)
        after = decode_bos_pair(ctx)
        assert ll.llama_perf_context(ctx.ptr).n_reused >= 1  # the second graph was reused
    assert not np.array_equal(before[1], after[1])
    assert np.array_equal(after[0], plain[0])
    assert np.array_equal(after[1], native[1])


def test_a_prompt_admitted_between_mixed_steps_keeps_them_per_row(plain_demo) -> None:
    """Two sequences under two steerings generate (per row); a third, under a third
    steering that also moves the last block, is admitted with a prompt of several chunks,
    the first ones giving no output (so llama.cpp's last block has no rows).
    Its chunks go through per-row steering too (one vector, broadcast), so the control
    vector never changes (which would rebuild llama.cpp's graphs twice), and all three
    still get exactly their tokens alone."""
    model, chunk = plain_demo, 8
    long_prompt = model.tokenize(" ".join(PROMPTS) + " and then, after all of that,")
    assert len(long_prompt) > 2 * chunk
    prompts = [model.tokenize(PROMPTS[0]), model.tokenize(PROMPTS[1]), long_prompt]
    last_block = random_rows(model, {model.n_layer - 1: 4 * NORM * model.n_embd**0.5}, 6)
    vectors = [*steerings(model)[1:3], steerings(model)[3] + last_block]  # where no output is
    jobs = list(zip(prompts, vectors, strict=True))
    expected = [alone(model, prompt, rows, 12, chunk) for prompt, rows in jobs]
    got: list[list[int]] = [[], [], []]
    with Context(model, n_ctx=768, n_seq=3, row_steering=True, separate_kv=True) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=chunk)
        for slot, (prompt, rows) in zip(batcher.slots[:2], jobs, strict=False):
            batcher.start(slot, prompt, Sampler(model, GREEDY), slot.seq, rows)
        steps = 0
        while min(map(len, got)) < 12:
            if steps == 3:  # both generate, per row: admit the third
                assert batcher._native is batching._PER_ROW
                batcher.start(batcher.slots[2], long_prompt, Sampler(model, GREEDY), 2, jobs[2][1])
            for slot in batcher.step():
                got[slot.seq].append(slot.sampled)
                slot.next_token = slot.sampled if len(got[slot.seq]) < 12 else None
            if steps >= 3 and batcher._admitted:
                assert batcher._native is batching._PER_ROW  # no switch for the prompt
            steps += 1
    assert got == expected


def test_a_short_prompt_does_not_wait_for_a_long_ones_prefill(plain_demo) -> None:
    """Admitted prompts take turns, a chunk each: a short prompt admitted behind a long one
    samples its first token after the long one's first chunk, not after all of them, and
    both still get exactly their tokens alone."""
    model, chunk = plain_demo, 8
    long_prompt = model.tokenize(" ".join(PROMPTS) + " and then, after all of that,")
    short_prompt = model.tokenize(PROMPTS[2])
    assert len(long_prompt) > 3 * chunk and len(short_prompt) <= chunk
    jobs = [(long_prompt, steerings(model)[1]), (short_prompt, steerings(model)[2])]
    expected = [alone(model, prompt, rows, 6, chunk) for prompt, rows in jobs]
    got: list[list[int]] = [[], []]
    first_token_step: dict[int, int] = {}
    with Context(model, n_ctx=512, n_seq=2, row_steering=True, separate_kv=True) as ctx:
        batcher = Batcher(ctx, first=1, last=model.n_layer - 1, prompt_chunk=chunk)
        for slot, (prompt, rows) in zip(batcher.slots, jobs, strict=True):
            batcher.start(slot, prompt, Sampler(model, GREEDY), slot.seq, rows)
        step = 0
        while min(map(len, got)) < 6:
            for slot in batcher.step():
                first_token_step.setdefault(slot.seq, step)
                got[slot.seq].append(slot.sampled)
                slot.next_token = slot.sampled if len(got[slot.seq]) < 6 else None
            step += 1
    assert first_token_step[1] == 1  # the long prompt's first chunk, then the short one
    assert first_token_step[0] > first_token_step[1]
    assert got == expected
