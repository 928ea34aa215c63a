"""Shared-prefix decoding: the plan saves what it can within llama.cpp's limits, and the
states and probabilities it gives are those of decoding every prompt in full."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_steer import dataset, prefixes
from edge_steer.engine import Context, hidden, scoring

LIMITS = prefixes.Limits(sequences=8, batch=64, cells=128)


def decoded(plan: list[prefixes.Group], prompts) -> int:
    return sum(g.shared + sum(len(prompts[m]) - g.shared for m in g.members) for g in plan)


def test_persona_heads_are_decoded_once() -> None:
    heads = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, h] for h in (50, 51, 52)]  # share 10 of 11
    suffixes = [[100 + s, 200 + s] for s in range(6)]
    prompts = [head + suffix for head in heads for suffix in suffixes]
    plan = prefixes.groups(prompts, LIMITS)
    assert sorted(m for g in plan for m in g.members) == list(range(len(prompts)))
    assert [(len(g.members), g.shared) for g in plan] == [(6, 11)] * 3  # not one group of 10
    assert decoded(plan, prompts) == 3 * 11 + 18 * 2


def test_plans_are_optimal_and_within_limits() -> None:
    """Against every split of the sorted prompts into runs, on random small cases."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        prompts = [list(rng.integers(0, 3, size=rng.integers(1, 7))) for _ in range(7)]
        limits = prefixes.Limits(sequences=3, batch=12, cells=20)
        plan = prefixes.groups(prompts, limits)
        assert sorted(m for g in plan for m in g.members) == list(range(7))
        for group in plan:
            rest = sum(len(prompts[m]) - group.shared for m in group.members)
            assert len(group.members) <= 3 and rest <= 12 and rest + group.shared <= 20
            assert all(group.shared <= len(prompts[m]) - 1 for m in group.members)
            assert all(
                prompts[m][: group.shared] == prompts[group.members[0]][: group.shared]
                for m in group.members
            )
        assert decoded(plan, prompts) == brute_force(prompts, limits)
        for packed in prefixes.rounds(plan, prompts, limits):
            assert sum(len(g.members) for g in packed) <= 3
            assert sum(g.shared for g in packed) <= 12


def brute_force(prompts, limits: prefixes.Limits) -> int:
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                runs.append(run)
                run = []
            run.append(index)
        runs.append(run)
        cost = 0
        for run in runs:
            shared = prefixes._shared(prompts, run)
            rest = sum(len(prompts[m]) - shared for m in run)
            if len(run) > limits.sequences or rest > limits.batch or rest + shared > limits.cells:
                break
            cost += shared + rest
        else:
            best = cost if best is None else min(best, cost)
    return best


@pytest.fixture(scope="module")
def prompt_tokens(tiny_dense):
    pairs = dataset.contrast_pairs(dataset.load_builtin("happy"), tiny_dense, limit=24)
    return [tiny_dense.tokenize(p, parse_special=True) for pair in pairs for p in pair]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def test_capture_last_equals_full_decodes(tiny_dense, prompt_tokens) -> None:
    """Every block's state at the last token, as decoding each prompt alone gives it, no
    further off than packing prompts side by side already is (llama.cpp's batch shapes
    round differently); with `through`, the same up to that block, nothing after it."""
    with Context(tiny_dense, n_ctx=512, n_seq=16, threads=1, capture=True) as ctx:
        alone = np.stack([hidden.capture(ctx, [t])[0][0] for t in prompt_tokens])
        packed = np.stack([s[0] for s in hidden.capture(ctx, prompt_tokens)])
        shared = hidden.capture_last(ctx, prompt_tokens)
        early = hidden.capture_last(ctx, prompt_tokens, through=3)
    rounding = relative_error(packed, alone)
    assert rounding < 0.01 and relative_error(shared, alone) < 2 * rounding
    assert np.array_equal(early[:, :4], shared[:, :4]) and not early[:, 4:].any()


def test_next_token_probs_equal_full_decodes(tiny_dense, prompt_tokens) -> None:
    with Context(tiny_dense, n_ctx=512, n_seq=16, threads=1) as ctx:
        alone = np.stack([scoring.next_token_probs(ctx, [t])[0] for t in prompt_tokens[:12]])
        shared = scoring.next_token_probs(ctx, prompt_tokens[:12])
    assert np.abs(shared - alone).max() < 5e-3  # batch-shape rounding: 1.5e-3 measured
    assert (shared.argmax(axis=1) == alone.argmax(axis=1)).all()
