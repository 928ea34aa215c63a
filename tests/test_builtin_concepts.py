"""Every built-in concept on Gemma 3 270M: does its vector work, and which range is stored?

The expected outcomes are measured facts about this small model with the default training (128
pairs, blocks and method chosen on held-in pairs, calibrated strength), not wishes: the weaker
concepts are listed with the effect they really reach.
docs/results.md's table shows the same concepts over -2..2 with the full neutral text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_steer import dataset, evaluate, metrics, store, training, vectors

THREADS = 2
EXPECTED = {  # concept -> the smallest |effect| in nats at -1 and at +1, as measured (rounded
    # down by about 5%) with calibrated strength and the blocks and method chosen on held-in
    # pairs; every concept works both ways over -1, 0, +1. Measured on an AMD EPYC (2 threads)
    # with shared-prefix capture (docs/results.md)
    "concise": 1.9,  # -2.11 / +2.54
    "confident": 3.0,  # -3.32 / +4.41
    "creative": 3.7,  # -3.98 / +4.31: blocks 5-11 chosen (9-14 before, -4.80 / +5.02)
    "formal": 5.3,  # -5.83 / +5.63
    "happy": 4.5,  # -6.58 / +7.54
    "honest": 1.7,  # the weakest: -2.17 / +1.83
    "lazy": 3.1,  # -3.32 / +3.38
    "trippy": 2.9,  # -3.07 / +3.40: blocks 9-14 (5-11 before the choice's retry step)
}


@pytest.fixture(scope="module")
def trained(demo_model):
    """Vectors trained once per concept, on demand."""
    cache: dict[str, vectors.ControlVector] = {}

    def get(name: str) -> vectors.ControlVector:
        if name not in cache:
            pairs = dataset.contrast_pairs(dataset.load_builtin(name), demo_model, limit=128)
            options = training.TrainOptions(threads=THREADS)
            cache[name] = training.train(demo_model, pairs, options, name=name)
        return cache[name]

    return get


def sweep(model, vector, settings: evaluate.EvalSettings) -> evaluate.Sweep:
    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    probes = dataset.load_builtin(str(vector.metadata["concept"])).probes
    with evaluate.context(model, THREADS) as ctx:
        return evaluate.sweep(ctx, rows, (1, model.n_layer - 1), probes, settings)


def test_expectations_cover_every_builtin_concept() -> None:
    assert sorted(EXPECTED) == dataset.builtin_names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_concept_on_gemma(name, demo_model, trained, tmp_path) -> None:
    settings = evaluate.EvalSettings(strengths=(-1.0, 0.0, 1.0), samples=0, neutral_tokens=200)
    result = sweep(demo_model, trained(name), settings)
    effects = {p.strength: result.effect(p) for p in result.points}
    assert evaluate.verdict(result) == "works", effects
    assert evaluate.recommend(result) == (-1.0, 1.0), effects  # within x1.25 perplexity
    assert effects[-1.0] <= -EXPECTED[name] and effects[1.0] >= EXPECTED[name], effects
    path = vectors.write(trained(name), tmp_path / f"{name}.gguf")
    evaluate.save(path, result, demo_model, store.fingerprint(demo_model.path), "all")
    assert vectors.recommended_range(vectors.read(path)) == (-1.0, 1.0)


def test_absurd_strength_degenerates_and_falls_outside_the_range(demo_model, trained) -> None:
    settings = evaluate.EvalSettings(strengths=(0.0, 1.0, 32.0), samples=4, neutral_tokens=200)
    result = sweep(demo_model, trained("happy"), settings)
    zero, one, absurd = result.points
    # +1 adds at most one looping sample of four to the base model's own: Gemma 270M loops
    # now and then unsteered too (a dialogue opening filled with repeated "<strong>" tags; on
    # some CPUs a bullet list, "* evaporation\n* transpiration\n* ...")
    assert zero.degenerate < 1 and one.degenerate <= zero.degenerate + 0.25
    assert absurd.degenerate == 1.0, absurd.sample  # e.g. "exciting new season exciting new ..."
    assert result.ppl_ratio(absurd) > 10 * evaluate.MAX_PPL_RATIO
    assert evaluate.recommend(result) == (0.0, 1.0)


HELD_OUT = Path(__file__).parent / "data" / "heldout_neutral.txt"  # eval never reads this


@pytest.mark.parametrize("name", ["happy", "trippy"])
def test_recommended_range_holds_on_text_eval_never_saw(name, demo_model, trained) -> None:
    """`eval`'s default sweep recommends a range from its own neutral text; at the range's
    ends, perplexity on other text (a story, a dialogue, instructions, news, written for this
    test) must stay within the same limit."""
    settings = evaluate.EvalSettings(samples=0, refine=True)  # what `edge-steer eval` runs
    vector = trained(name)
    result = sweep(demo_model, vector, settings)
    span = evaluate.recommend(result)
    assert span is not None, [(p.strength, result.ppl_ratio(p)) for p in result.points]
    rows = vectors.combine([(vector, 1.0)], demo_model.n_layer, demo_model.n_embd)
    text = HELD_OUT.read_text(encoding="utf-8")
    with evaluate.context(demo_model, THREADS) as ctx:
        unsteered = metrics.perplexity(ctx, text)
        for end in span:
            ctx.set_steering(rows * np.float32(end), 1, demo_model.n_layer - 1)
            ratio = metrics.perplexity(ctx, text) / unsteered
            assert ratio <= evaluate.MAX_PPL_RATIO, (end, ratio, span)
