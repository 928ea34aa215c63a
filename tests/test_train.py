"""Training on the GGUF itself: right block, right sign, deterministic, real effect on Gemma."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_steers_probes_monotonically, calibration_fluency

from edge_steer import calibrate, dataset, library, training, vectors
from edge_steer.engine import Model
from edge_steer.errors import BadInput

TEXTS = ["The river", "A small house", "Seven", "We went to", "Numbers are", "Tea or", "Up", "Go"]


@pytest.mark.parametrize("method", training.METHODS)
def test_direction_lands_on_the_block_it_was_read_from(tiny_dense, method) -> None:
    """Known by construction: positives are the negatives plus v added after block L."""
    layer, n_layer = 3, tiny_dense.n_layer
    v = np.random.default_rng(0).normal(size=tiny_dense.n_embd).astype(np.float32)
    push = np.zeros((n_layer, tiny_dense.n_embd), np.float32)
    push[layer] = v
    options = training.TrainOptions(method=method, layers=(1, n_layer - 1))
    neg = training.hidden_states(tiny_dense, TEXTS, options)
    pos = training.hidden_states(tiny_dense, TEXTS, options, steering=push)
    vec = training.from_states(tiny_dense, pos, neg, options, name="known")
    assert vec.layers == list(range(1, n_layer))
    for n in range(1, layer):
        assert not vec.directions[n].any()  # nothing differs before block L
    scale = training.GAIN / (n_layer - 1)
    assert np.allclose(vec.directions[layer], v * scale, rtol=1e-3, atol=1e-4)
    assert vec.metadata["layer_first"] == 1 and vec.metadata["method"] == method


def test_same_inputs_and_seed_give_the_same_file(tiny_dense, tmp_path) -> None:
    concept = dataset.from_personas("calm", "calm, quiet", "angry, loud")
    files = []
    for i in range(2):
        pairs = dataset.contrast_pairs(concept, tiny_dense, limit=24, seed=7)
        vec = training.train(tiny_dense, pairs, training.TrainOptions(), name="calm")
        files.append(vectors.write(vec, tmp_path / f"{i}.gguf").read_bytes())
    assert files[0] == files[1]


def test_moe_model_trains_unchanged(tiny_moe_path) -> None:
    with Model(tiny_moe_path) as moe:
        pairs = dataset.contrast_pairs(dataset.load_builtin("lazy"), moe, limit=16)
        vec = training.train(moe, pairs, training.TrainOptions(), name="lazy")
        span = training.default_layers(moe.n_layer)
    assert (vec.layers[0], vec.layers[-1]) == span
    assert vec.metadata["method"] == training.DEFAULT_METHOD
    assert all(np.isfinite(d).all() and d.any() for d in vec.directions.values())


@pytest.mark.parametrize(
    ("n_layer", "blocks"), [(18, (2, 14)), (30, (3, 25)), (32, (3, 26)), (2, (1, 1))]
)
def test_default_blocks_run_from_a_tenth_to_85_percent_of_the_depth(n_layer, blocks) -> None:
    """Gemma 3 270M, SmolLM2 135M, Mistral 7B, and a model too shallow for a span."""
    assert training.default_layers(n_layer) == blocks


def test_capture_stops_after_the_last_steered_block(tiny_dense) -> None:
    """Blocks past the span are never computed: their states stay zero."""
    options = training.TrainOptions(layers=(1, 2))
    states = training.hidden_states(tiny_dense, TEXTS, options)
    assert states[:, :3].any(axis=(0, 2)).all() and not states[:, 3:].any()


@pytest.fixture(scope="module")
def happy(demo_model):
    pairs = dataset.contrast_pairs(dataset.load_builtin("happy"), demo_model, limit=96)
    return training.train(demo_model, pairs, training.TrainOptions(), name="happy")


def test_sign_is_right_for_every_layer_on_held_out_pairs(demo_model, happy) -> None:
    concept = dataset.load_builtin("happy")
    seen = set(dataset.contrast_pairs(concept, demo_model, limit=96))
    held_out = [p for p in dataset.contrast_pairs(concept, demo_model, seed=1) if p not in seen]
    states = training.hidden_states(
        demo_model, [p for pair in held_out[:48] for p in pair], training.TrainOptions()
    )
    diffs = states[0::2] - states[1::2]
    for layer, direction in happy.directions.items():
        assert (diffs[:, layer] @ direction).mean() > 0, f"block {layer} points the wrong way"


def test_happy_vector_moves_held_out_probes_monotonically(demo_model, happy) -> None:
    assert_steers_probes_monotonically(demo_model, happy, "happy")


def test_chat_trains_on_first_use_then_reuses(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    monkeypatch.setenv("EDGE_STEER_HOME", str(tmp_path))
    args = [
        sys.executable,
        "-m",
        "edge_steer",
        "chat",
        "--model",
        "demo",
        "--vector",
        "happy:1.0",
        "-p",
        "How was your day?",
        "-n",
        "12",
        "--seed",
        "3",
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "training 'happy'" in first.stderr and first.stdout.strip()
    stored = list((tmp_path / "vectors").glob("*/happy.gguf"))
    assert len(stored) == 1
    stamp = stored[0].stat().st_mtime_ns
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "training" not in second.stderr
    assert stored[0].stat().st_mtime_ns == stamp


def test_a_first_use_trains_on_the_users_threads(tiny_dense_path, tmp_path, monkeypatch) -> None:
    """Was: `--threads 1` held for generation, but a concept trained on first use (chat,
    generate, eval, serve's presets and --allow-train) took every core."""
    from edge_steer import runtime
    from edge_steer.server.pool import VectorPool

    monkeypatch.setenv("EDGE_STEER_HOME", str(tmp_path))
    seen: list[int | None] = []
    real = training.train

    def recording(model, pairs, options, **kwargs):
        seen.append(options.threads)
        return real(model, pairs, options, **kwargs)

    monkeypatch.setattr(training, "train", recording)
    with runtime.load(str(tiny_dense_path), vectors="happy:1", threads=1) as steered:
        VectorPool(steered.model, allow_train=True, threads=1).train("lazy")
    assert seen == [1, 1]


def test_library_refuses_path_like_names(demo_model) -> None:
    from edge_steer.errors import BadInput

    with pytest.raises(BadInput, match="bad vector name"):
        library.train_and_store(demo_model, "a/b", [("x", "y")] * 2, training.TrainOptions())


def test_training_refuses_what_cannot_give_a_direction(tiny_dense, tmp_path) -> None:
    """A prompt past what training takes is refused before any decode (it took 206 s, or
    failed to allocate, before); sides that read the same states give no direction (it was
    stored as an all-zero "calibrated" vector); a concept of the user's own may not take a
    built-in name, under which it would be steered and evaluated as the built-in one."""
    from edge_steer.errors import BadInput

    limit = min(training.MAX_PROMPT_TOKENS, tiny_dense.n_ctx_train)
    long = " ".join(["pirate"] * (limit + 10))
    with pytest.raises(BadInput, match=rf"a training prompt is \d+ tokens .* at most {limit}"):
        pairs = [(long, "butler"), ("a", "b")]
        training.train(tiny_dense, pairs, training.TrainOptions(), name="x")
    states = np.random.default_rng(0).normal(size=(4, tiny_dense.n_layer, 64))
    with pytest.raises(BadInput, match="same hidden states"):
        training.from_states(tiny_dense, states, states, training.TrainOptions(), name="same")
    for source in ({"positive": "pirate", "negative": "butler"}, {"pairs_file": "p.jsonl"}):
        with pytest.raises(BadInput, match=r"'Happy' is a built-in concept: .* happy-mine"):
            library.contrast_pairs(tiny_dense, "Happy", **source)


def test_limit_and_seed_pick_from_a_pairs_file(tiny_dense, tmp_path) -> None:
    """--limit N takes a seeded sample of N of a file's pairs, in the file's order; without
    it every line is used."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"positive": "p{i}", "negative": "n{i}"}}\n' for i in range(20)))
    every = library.contrast_pairs(tiny_dense, "mine", pairs_file=str(path))
    assert len(every) == 20
    picks = [library.contrast_pairs(tiny_dense, "mine", pairs_file=str(path), limit=5, seed=s)
             for s in (1, 1, 2)]  # fmt: skip
    assert picks[0] == picks[1] != picks[2] and len(picks[0]) == 5
    assert picks[0] == sorted(picks[0], key=every.index)


def test_plus_and_minus_one_cost_the_calibrated_budget_on_gemma(demo_model, happy) -> None:
    """Measured again from the file's own directions, at both signs: the worse one costs
    BUDGET in calibration-text perplexity, within TOLERANCE (2%, the search's stopping rule;
    a search that runs out of steps may end a little further, so 4% is allowed here)."""
    assert happy.metadata["scale_rule"] == "calibrated"
    ppl = {sign: found[0] for sign, found in calibration_fluency(demo_model, happy).items()}
    worse = max(ppl[1.0], ppl[-1.0]) / ppl[0.0]
    assert abs(np.log(worse) - np.log(calibrate.BUDGET)) <= 0.04, (ppl, happy.metadata)
    assert float(happy.metadata["calibration_budget"]) == calibrate.BUDGET
    assert "calibration_entropy_budget" not in happy.metadata  # a base model: perplexity only
    points = str(happy.metadata["calibration_points"]).split(",")
    assert 1 <= len(points) <= calibrate.STEPS


@pytest.mark.parametrize("moe", [False, True])
def test_tiny_models_calibrate_too(tiny_dense_path, tiny_moe_path, moe) -> None:
    with Model(tiny_moe_path if moe else tiny_dense_path) as model:
        pairs = dataset.contrast_pairs(dataset.load_builtin("happy"), model, limit=24)
        plain = training.train(model, pairs, training.TrainOptions(budget=None), name="happy")
        vec = training.train(model, pairs, training.TrainOptions(), name="happy")
    factor = float(vec.metadata["calibration_scale"])
    assert np.isfinite(factor) and factor > 0
    for n in vec.layers:
        assert np.allclose(vec.directions[n], plain.directions[n] * factor, rtol=1e-5, atol=1e-7)
    assert "scale_rule" not in plain.metadata or plain.metadata["scale_rule"] == "separation"


def test_a_built_in_concept_steers_the_default_blocks_by_the_default_method(happy) -> None:
    first, last = training.default_layers(18)  # Gemma 3 270M: blocks 0-17
    assert (happy.metadata["layer_first"], happy.metadata["layer_last"]) == (first, last)
    assert happy.layers == list(range(first, last + 1))
    assert happy.metadata["method"] == training.DEFAULT_METHOD


def test_a_model_file_removed_while_training_still_stores_the_vector(
    tiny_dense_path, tmp_path
) -> None:
    """From a sweep: `models rm` during a long train ended in FileNotFoundError after the
    work, storing nothing: the fingerprint was read from the file at the end."""
    from edge_steer import store

    copy = Path(shutil.copy(tiny_dense_path, tmp_path / "gone.gguf"))
    with Model(copy) as model:
        expected = store.fingerprint(tiny_dense_path)  # the same bytes: the same fingerprint

        def remove_the_file(*_) -> None:
            copy.unlink(missing_ok=True)

        pairs = [(f"{t} yes", f"{t} no") for t in TEXTS]
        options = training.TrainOptions(threads=1)
        vector = library.train_vector(model, "gone", pairs, options, remove_the_file)
        path = library.store_vector(model, "gone", vector)
    assert not copy.exists() and path.parent.name == expected
    assert vectors.read(path).metadata["model_fingerprint"] == expected


@pytest.mark.parametrize("tolerance", [0.0, 1e9])  # every step taken / done after the first
def test_calibration_progress_ends_once(tiny_dense_path, monkeypatch, tolerance) -> None:
    """Progress climbs to STEPS/STEPS and reports it once: a search that took every step
    reported its end twice (a log showed `calibrating: done` again, "in 0.0s")."""
    monkeypatch.setattr(calibrate, "TOLERANCE", tolerance)
    reports: list[int] = []
    with Model(tiny_dense_path) as model:
        rows = np.random.default_rng(0).normal(size=(model.n_layer, model.n_embd)).astype("f4")
        calibrate.calibrate(
            model, rows, (1, model.n_layer - 1), budget=calibrate.budget_for(model),
            progress=lambda done, total: reports.append(done),
        )  # fmt: skip
    steps = calibrate.STEPS
    assert reports == ([0, 1, steps] if tolerance else list(range(steps + 1)))


PAIRS = [("I am so happy today.", "I am so sad today."), ("What a joyful day!", "What a sad day!")]


@pytest.mark.parametrize(
    ("pairs", "options", "words"),
    [
        (PAIRS, {"batch": 0}, "batch 0: use a whole number"),  # was SIGABRT in llama.cpp
        (PAIRS, {"layers": (0, 3)}, "layers 0-3: use blocks"),  # was numpy's ValueError
        (PAIRS, {"layers": (1, 99)}, "layers 1-99: use blocks"),  # was "no l_out"
        (PAIRS, {"layers": (4, 2)}, "layers 4-2: use blocks first <= last"),
        (PAIRS, {"threads": 0}, "threads 0 is out of range"),  # trained on all cores
        (PAIRS, {"method": "svd"}, "unknown method 'svd'"),
        ([(1, 2), (3, 4)], {}, "pair 1 of 'x' is not two non-empty texts"),  # AttributeError
        ("ab", {}, "give a list of (positive, negative) text pairs"),  # trained on "a", "b"
        ([("", ""), ("", "x")], {}, "pair 1 of 'x' is not two non-empty texts"),
        ([("a b", "a  b"), ("c", "d")], {}, "are the same text"),
    ],
)
def test_train_checks_what_code_gives_it(tiny_dense, pairs, options, words) -> None:
    """The library's callers get the CLI's one-line errors, before llama.cpp sees anything."""
    with pytest.raises(BadInput, match=re.escape(words)):
        training.train(tiny_dense, pairs, training.TrainOptions(**options), name="x")
