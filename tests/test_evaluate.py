"""Evaluation: strength syntax, the degeneration rule, the recommended range, and storing it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import random_rows

from edge_steer import evaluate, metrics, store, vectors
from edge_steer.errors import BadInput
from edge_steer.evaluate import Point, Sweep


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-2..2", (-2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2)),
        ("-2..2:1", (-2, -1, 0, 1, 2)),
        ("0.5..1.5:0.5", (0, 0.5, 1, 1.5)),  # 0 is always measured: effects are relative to it
        ("-1,1", (-1, 0, 1)),
        (" 2, -0.25 ,2", (-0.25, 0, 2)),
        ("-1..1:0.3", (-1, -0.7, -0.4, -0.1, 0, 0.2, 0.5, 0.8)),
        ("-0,1", (0, 1)),  # one 0, not a -0 row too
    ],
)
def test_strengths_syntax(text, expected) -> None:
    assert evaluate.parse_strengths(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("2..-2", "from low to high"),
        ("-2..2:0", "step must be positive"),
        ("-2..2:-1", "step must be positive"),
        ("a..b", "bad strengths 'a..b'"),
        ("1,,2", "bad strengths"),
        ("", "bad strengths"),
        ("nan,1", "bad strengths 'nan,1'"),
        ("1_0", "bad strengths '1_0'"),  # was 10
        ("0", "no strength but 0"),  # measured nothing, then said the concept does not work
        ("1e-7,-0", "no strength but 0"),
        ("1e308", "numbers from -10 to 10"),  # ran, and wrote NaN into --json
        ("-100..100:0.5", "401 strengths is too many"),
        (",".join(str(i) for i in range(50)), "50 strengths is too many"),
    ],
)
def test_bad_strengths_are_clear_errors(text, words) -> None:
    with pytest.raises(BadInput, match=words):
        evaluate.parse_strengths(text)


def test_degenerate_means_repeated_ngrams_cover_half() -> None:
    loop = [5, 6, 7] * 10
    assert metrics.repetition(loop) == 1.0 and metrics.is_degenerate(loop)
    fluent = list(range(32))
    assert metrics.repetition(fluent) == 0.0 and not metrics.is_degenerate(fluent)
    one_phrase_twice = [1, 2, 3, 4, *range(10, 22), 1, 2, 3, 4, *range(30, 42)]
    assert metrics.repetition(one_phrase_twice) == 8 / 32
    assert not metrics.is_degenerate(one_phrase_twice)
    half_loop = list(range(100, 116)) + [8, 9] * 8
    assert metrics.repetition(half_loop) == 0.5 and metrics.is_degenerate(half_loop)
    assert metrics.repetition([]) == 0.0 and metrics.repetition([1, 2]) == 0.0


def test_neutral_prompts_are_sentence_openings() -> None:
    prompts = evaluate.neutral_prompts(10)
    assert len(prompts) == 10 and len(set(prompts)) == 10
    assert prompts[0] == "Water moves through the environment in"
    assert prompts[1] == "Maria left the office a little"  # the next paragraph's first
    assert all(len(p.split()) == 6 for p in prompts)


def sweep_of(rows: list[tuple[float, float, float]]) -> Sweep:
    """(strength, effect, ppl ratio) rows; the reference at 0 has margin 0 and perplexity 10."""
    return Sweep(tuple(Point(s, e, 10 * r, 0.0) for s, e, r in rows))


@pytest.mark.parametrize(
    ("rows", "span", "verdict"),
    [
        # works both ways; +2 costs too much perplexity, so the range stops at +1.5
        (
            [(-2, -3, 1.2), (-1, -1.5, 1.0), (0, 0, 1), (1, 1.4, 1.0), (1.5, 2, 1.1), (2, 3, 1.3)],
            (-2, 1.5),
            "works",
        ),
        # the negative side has the wrong sign: only the positive side counts
        (
            [(-1, 0.1, 1.0), (-0.5, 0.2, 1.0), (0, 0, 1), (0.5, 0.3, 1.0), (1, 0.6, 1.1)],
            (0, 1),
            "positive only",
        ),
        # effects too small to use
        ([(-1, -0.05, 1.0), (0, 0, 1), (1, 0.08, 1.0)], None, "no effect"),
        # the perplexity limit is reached right away on both sides
        ([(-1, -2, 1.3), (0, 0, 1), (1, 2, 1.26)], None, "works"),
        # exactly at the limits still counts
        ([(-1, -0.1, 1.25), (0, 0, 1), (1, 0.1, 1.25)], (-1, 1), "works"),
    ],
)
def test_recommended_range_and_verdict(rows, span, verdict) -> None:
    result = sweep_of(rows)
    assert evaluate.recommend(result) == span
    assert evaluate.verdict(result) == verdict


def test_save_stores_the_range_and_replaces_an_old_one(tmp_path, tiny_dense) -> None:
    rng = np.random.default_rng(0)
    original = vectors.ControlVector(
        {n: rng.normal(size=64).astype(np.float32) for n in (2, 3)}, "llama", {"concept": "calm"}
    )
    path = vectors.write(original, tmp_path / "calm.gguf")
    assert vectors.recommended_range(vectors.read(path)) is None
    assert vectors.describe_range(vectors.read(path)) == ""

    works = sweep_of([(-1, -0.5, 1.1), (0, 0, 1), (1, 0.7, 1.2), (2, 1.5, 1.4)])
    evaluate.save(path, works, tiny_dense, store.fingerprint(tiny_dense.path), "all")
    stored = vectors.read(path)
    assert vectors.recommended_range(stored) == (-1.0, 1.0)
    assert stored.metadata["eval_verdict"] == "works"
    assert stored.metadata["eval_model_name"] == tiny_dense.name
    assert stored.metadata["concept"] == "calm" and stored.metadata["eval_layers"] == "all"
    assert "+1: effect +0.70 nats, ppl x1.200" in str(stored.metadata["eval_summary"])
    assert vectors.describe_range(stored) == f"recommended -1..+1 (works on {tiny_dense.name})"
    for n in (2, 3):
        assert np.array_equal(stored.directions[n], original.directions[n])
    assert not list(tmp_path.glob(".*tmp"))  # written through a temp file and renamed

    evaluate.save(
        path,
        sweep_of([(-1, 0.2, 1.0), (0, 0, 1), (1, -0.3, 1.0)]),
        tiny_dense,
        store.fingerprint(tiny_dense.path),
        "2-3",
    )
    again = vectors.read(path)
    assert vectors.recommended_range(again) is None
    assert "recommended_min" not in again.metadata and again.metadata["eval_verdict"] == "no effect"
    assert vectors.describe_range(again).startswith("no recommended strength (no effect on")


def test_side_by_side_scoring_and_sampling_match_one_at_a_time(demo_model) -> None:
    """The eval's batched paths agree with one sequence at a time: log-probabilities within
    0.1 nats per token (llama.cpp's CPU kernels take other paths for other batch shapes:
    measured up to 0.07 on Gemma 3 270M, which can also flip a greedy near-tie a few tokens
    in), and sequences never see each other: four copies of one prompt decoded side by side
    continue identically, and each prompt's first greedy token is the one it gets alone."""
    from edge_steer.engine import Context, Sampler, SamplerSettings, continuations, scoring

    prompts = ["The river", "My week has been", "Seven small", "Bread rises because"]
    texts = [(demo_model.tokenize(p + " and then it was over."), 2) for p in prompts]
    greedy = SamplerSettings(temperature=0, repeat_penalty=1.0)

    def sample(ctx, token_lists):
        samplers = [Sampler(demo_model, greedy) for _ in token_lists]
        return continuations.sample_many(ctx, token_lists, samplers, 8)

    with Context(demo_model, n_ctx=512, n_seq=4) as ctx:
        together = scoring.score(ctx, texts)
        batched = sample(ctx, [t for t, _ in texts])
        copies = sample(ctx, [texts[0][0]] * 4)
    with Context(demo_model, n_ctx=512, n_seq=1) as ctx:
        alone = [scoring.score(ctx, [text])[0] for text in texts]
        first = [sample(ctx, [t])[0][0] for t, _ in texts]
    for a, b in zip(together, alone, strict=True):
        assert len(a) == len(b) > 0 and np.allclose(a, b, atol=0.1)
    assert [tokens[0] for tokens in batched] == first
    assert all(len(tokens) == 8 for tokens in batched) and all(c == copies[0] for c in copies)


def test_scored_entropy_is_that_of_the_whole_next_token_distribution(demo_model) -> None:
    """`score_and_entropy`'s entropies match -sum p log p of the full next-token distribution
    at each scored position (the same logits: to float32 rounding; read in another batch
    shape: at most positions, since llama.cpp's numbers shift with it), and its
    log-probabilities are `score`'s."""
    from edge_steer.engine import Context, scoring

    tokens = demo_model.tokenize("The river ran on past the mill and under the bridge.")
    with Context(demo_model, n_ctx=256, n_seq=1) as ctx:
        ((logps, entropies),) = scoring.score_and_entropy(ctx, [(tokens, 3)])
        plain = scoring.score(ctx, [(tokens, 3)])[0]
        probs = scoring.next_token_probs(ctx, [tokens[:i] for i in range(3, len(tokens))])
    p = probs.astype(np.float64)
    expected = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    assert np.array_equal(logps, plain) and len(entropies) == len(tokens) - 3
    assert np.median(np.abs(entropies - expected)) < 2e-3, (entropies, expected)
    assert entropies.std() > 0.1  # positions differ: not one number repeated
    logits = np.log(np.maximum(probs, 1e-30))  # float32 rows like llama.cpp's
    _, same_logits = scoring._log_probs(logits, np.zeros(len(logits), dtype=np.int64))
    exact = logits.astype(np.float64)
    exact = np.exp(exact - exact.max(axis=1, keepdims=True))
    exact /= exact.sum(axis=1, keepdims=True)
    assert np.allclose(same_logits, -(exact * np.log(exact)).sum(axis=1), atol=1e-5)


def test_sweep_samples_every_setting_together_and_reports_progress_once(demo_model) -> None:
    """A sweep samples its strengths and the persona baseline in one round of decodes
    (`sample_settings`), then measures each; its progress counts both kinds of part, only
    forward, and reaches the total once (the progress bar's done line)."""
    from edge_steer import dataset

    rows = random_rows(demo_model, {layer: 5.0 for layer in range(6, 11)})
    settings = evaluate.EvalSettings(
        strengths=(-1.0, 1.0), samples=2, sample_tokens=4, neutral_tokens=64
    )
    probes = dataset.load_builtin("happy").probes[:2]
    seen: list[tuple[int, int]] = []
    with evaluate.context(demo_model, 2) as ctx:
        result = evaluate.sweep(
            ctx,
            rows,
            (1, demo_model.n_layer - 1),
            probes,
            settings,
            personas=("Act extremely happy. ", "Act extremely sad. "),
            progress=lambda done, total: seen.append((done, total)),
        )
    done = [d for d, _ in seen]
    assert {total for _, total in seen} == {10}  # 3 strengths and 2 personas, 2 parts each
    assert done == sorted(done) and done[-1] == 10 and done.count(10) == 1
    assert done[-6] == 5  # every setting sampled before the first is measured
    points = result.points + result.baseline
    assert len(points) == 5 and all(p.degenerate is not None for p in points)


def test_refine_measures_half_of_a_strength_already_over_the_limit(demo_model) -> None:
    from edge_steer import dataset

    rows = random_rows(demo_model, {layer: 60.0 for layer in range(6, 11)})  # x1.8 at +1
    settings = evaluate.EvalSettings(strengths=(-0.05, 1.0), samples=0, neutral_tokens=64)
    probes = dataset.load_builtin("happy").probes[:4]
    sweeps = {}
    for refine in (False, True):
        with evaluate.context(demo_model, 2) as ctx:
            sweeps[refine] = evaluate.sweep(
                ctx, rows, (1, demo_model.n_layer - 1), probes, replace(settings, refine=refine)
            )
    plain, refined = sweeps[False], sweeps[True]
    assert plain.ppl_ratio(plain.points[-1]) > evaluate.MAX_PPL_RATIO  # +1 is over the limit
    assert plain.ppl_ratio(plain.points[0]) < evaluate.MAX_PPL_RATIO  # -0.05 is not
    assert [p.strength for p in refined.points] == [-0.05, 0, 0.5, 1]  # only +1 is halved
    assert refined.points[-1] == plain.points[-1]  # the same measurement, plus one point
    assert refined.ppl_ratio(refined.points[2]) < plain.ppl_ratio(plain.points[-1])


def test_context_methods_of_0_2_still_work_and_warn(demo_model) -> None:
    """The batch units left Context in 0.3 (issue 25); the old method names forward to them
    with a DeprecationWarning, and so does `Context.stats`."""
    from edge_steer.engine import Context, Sampler, SamplerSettings, scoring

    text = (demo_model.tokenize("The river ran on and on."), 2)
    with Context(demo_model, n_ctx=256, n_seq=2) as ctx:
        expected = scoring.score(ctx, [text])[0]
        with pytest.deprecated_call(match="scoring.score"):
            old = ctx.score([text])[0]
        pieces = ctx.generate(text[0], Sampler(demo_model, SamplerSettings(temperature=0)))
        "".join(pieces)
        with pytest.deprecated_call(match="generate"):
            assert ctx.stats is pieces.stats and pieces.stats.generated > 0
    assert np.array_equal(old, expected)
