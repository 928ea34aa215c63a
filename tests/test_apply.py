"""Control vectors are applied by llama.cpp exactly where and as much as they should be."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_rows

from edge_steer.engine import Context, Model, hidden

PROMPTS = ["The quick brown fox jumps over", "Once upon a time", "Water boils at"]


@pytest.fixture(scope="module", params=["tiny_dense_path", "tiny_moe_path", "demo_path"])
def model(request):
    with Model(request.getfixturevalue(request.param)) as loaded:
        yield loaded


def capture(model: Model, rows=None, first: int = 1, last: int = -1) -> list[np.ndarray]:
    with Context(model, n_ctx=256, n_batch=256, n_seq=4, capture=True) as ctx:
        ctx.set_steering(rows, first, last)
        return hidden.capture(ctx, [model.tokenize(p) for p in PROMPTS])


def tolerance(states: np.ndarray) -> float:
    return float(np.abs(states).max()) * 4e-6 + 1e-5  # a few float32 ulps of the residual


def test_row_l_moves_exactly_l_out_l_and_nothing_before(model: Model) -> None:
    layer = model.n_layer // 2
    rows = random_rows(model, {layer: 10.0})
    base, steered = capture(model), capture(model, rows)
    for b, s in zip(base, steered, strict=True):
        assert np.array_equal(b[:, :layer], s[:, :layer])  # blocks before L untouched, bit for bit
        delta = s[:, layer] - b[:, layer]
        assert np.allclose(delta, rows[layer], rtol=0, atol=tolerance(b[:, layer]))
        assert not np.allclose(s[:, layer + 1], b[:, layer + 1])  # and it propagates onwards


def test_last_block_is_steerable(model: Model) -> None:
    last = model.n_layer - 1
    rows = random_rows(model, {last: 5.0})
    for b, s in zip(capture(model), capture(model, rows), strict=True):
        assert np.array_equal(b[:, :last], s[:, :last])
        assert np.allclose(s[:, last] - b[:, last], rows[last], atol=tolerance(b[:, last]))


def test_layer_range_excludes_what_it_should(model: Model) -> None:
    low, high = 2, model.n_layer - 2
    rows = random_rows(model, {low: 10.0, high: 10.0})
    base = capture(model)
    only_high = capture(model, rows, first=high, last=high)
    for b, s in zip(base, only_high, strict=True):
        assert np.array_equal(b[:, :high], s[:, :high])  # row `low` was outside the range
        assert np.allclose(s[:, high] - b[:, high], rows[high], atol=tolerance(b[:, high]))
    outside = capture(model, rows, first=low + 1, last=high - 1)
    assert all(np.array_equal(b, s) for b, s in zip(base, outside, strict=True))


def test_switching_off_restores_unsteered_bit_for_bit(model: Model) -> None:
    rows = random_rows(model, {1: 5.0, model.n_layer // 2: 5.0})
    with Context(model, n_ctx=256, n_batch=256, n_seq=4, capture=True) as ctx:
        tokens = [model.tokenize(p) for p in PROMPTS]
        before = hidden.capture(ctx, tokens)
        ctx.set_steering(rows)
        steered = hidden.capture(ctx, tokens)
        ctx.set_steering(None)
        after = hidden.capture(ctx, tokens)
    assert not np.array_equal(before[0], steered[0])
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_logits_restore_after_switching_off(model: Model) -> None:
    tokens = model.tokenize(PROMPTS[0])
    with Context(model, n_ctx=128) as ctx:
        ctx.ingest(tokens)
        plain = ctx.logits()
        ctx.set_steering(random_rows(model, {model.n_layer // 2: 50.0}))
        ctx.ingest(tokens)
        steered = ctx.logits()
        ctx.set_steering(None)
        ctx.ingest(tokens)
        assert np.array_equal(ctx.logits(), plain)
    assert not np.array_equal(steered, plain)


def test_changing_steering_invalidates_the_cache_without_the_callers_help(model: Model) -> None:
    """A prompt cached under one steering, then steering changed and a longer prompt sharing
    that prefix ingested: the logits are exactly those of a fresh context steered from the
    start. Setting the same steering again keeps the cache (nothing is recomputed)."""
    first, more = model.tokenize(PROMPTS[0]), model.tokenize(" and then", add_special=False)
    rows = random_rows(model, {1: 20.0, model.n_layer // 2: 50.0})
    with Context(model, n_ctx=128) as fresh:
        fresh.set_steering(rows)
        fresh.ingest(first + more)
        expected = fresh.logits()
    with Context(model, n_ctx=128) as ctx:
        ctx.ingest(first)
        ctx.set_steering(rows)
        assert ctx.ingest(first + more) == len(first + more)  # all of it decoded again
        assert np.array_equal(ctx.logits(), expected)
        ctx.set_steering(rows.copy())  # the same vectors: the cache stays
        assert ctx.ingest(first + more + more) == len(more)


def test_capture_positions_and_batching_agree(model: Model) -> None:
    tokens = model.tokenize(PROMPTS[0])
    with Context(model, n_ctx=256, n_batch=256, n_seq=4, capture=True) as ctx:
        every = hidden.capture(ctx, [tokens], [list(range(len(tokens)))])[0]
        last = hidden.capture(ctx, [tokens])[0]
    assert every.shape == (len(tokens), model.n_layer, model.n_embd)
    assert np.allclose(every[-1], last[0], atol=tolerance(last))
