"""Steering on the real demo model (Gemma 3 270M): outputs change, vectors add, chat goes live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_rows

from edge_steer import steering, store, vectors
from edge_steer.chat import ChatSession, format_prompt
from edge_steer.engine import Context, Sampler, SamplerSettings
from edge_steer.errors import BadInput, NotFound

GREEDY = SamplerSettings(temperature=0)


def vector_file(model, path, layers: dict[int, float], seed: int) -> str:
    rows = random_rows(model, layers, seed)
    vec = vectors.ControlVector({n: rows[n] for n in layers}, model.architecture)
    return str(vectors.write(vec, path))


@pytest.fixture(scope="module")
def files(demo_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    big = {n: 1500.0 for n in range(4, 10)}  # hidden-state norms there are ~2000-7000
    return {
        "a": vector_file(demo_model, folder / "a.gguf", big, seed=1),
        "b": vector_file(demo_model, folder / "b.gguf", big, seed=2),
    }


def greedy_text(model, steer_specs: list[str], prompt: str, n: int = 24) -> str:
    with Context(model, n_ctx=256) as ctx:
        steering.build(model, steer_specs, None).apply(ctx)
        pieces = ctx.generate(model.tokenize(prompt), Sampler(model, GREEDY), max_tokens=n)
        return "".join(pieces)


def last_logits(model, steer: steering.Steering, tokens: list[int]) -> np.ndarray:
    with Context(model, n_ctx=256) as ctx:
        steer.apply(ctx)
        ctx.ingest(tokens)
        return ctx.logits()


def test_a_vector_changes_greedy_output(demo_model, files) -> None:
    prompt = "My favourite thing about weekends is"
    plain = greedy_text(demo_model, [], prompt)
    assert plain == greedy_text(demo_model, [], prompt)  # greedy is deterministic
    assert greedy_text(demo_model, [f"{files['a']}:1"], prompt) != plain


def test_two_vectors_combine_as_their_weighted_sum(demo_model, files, tmp_path) -> None:
    a, b = vectors.read(files["a"]), vectors.read(files["b"])
    mixed = vectors.ControlVector(
        {n: 0.5 * a.directions[n] - 1.0 * b.directions[n] for n in a.layers}, "gemma3"
    )
    vectors.write(mixed, tmp_path / "mixed.gguf")
    tokens = demo_model.tokenize("The meeting tomorrow will")
    pair = last_logits(
        demo_model, steering.build(demo_model, [f"{files['a']}:0.5,{files['b']}:-1"], None), tokens
    )
    single = last_logits(
        demo_model, steering.build(demo_model, [str(tmp_path / "mixed.gguf")], None), tokens
    )
    plain = last_logits(demo_model, steering.build(demo_model, [], None), tokens)
    assert np.allclose(pair, single, atol=1e-3)
    assert not np.allclose(pair, plain, atol=1e-1)


def test_names_resolve_in_the_store(demo_model, files) -> None:
    target = store.model_vectors_dir(demo_model.path) / "cheer.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(Path(files["a"]).read_bytes())
    steer = steering.build(demo_model, ["cheer:0.5"], "4-9")
    assert steer.strengths() == {"cheer": 0.5} and steer.layers == (4, 9)
    with pytest.raises(NotFound, match="unknown vector 'nope'"):
        steering.build(demo_model, ["nope"], None)
    with pytest.raises(BadInput, match="outside the model's steerable blocks 1-17"):
        steering.build(demo_model, [], "0-40")


def test_live_change_mid_chat_re_evaluates_history(demo_model, files) -> None:
    with Context(demo_model, n_ctx=512) as ctx:
        session = ChatSession(ctx, steering.build(demo_model, [], None), GREEDY, max_tokens=12)
        first = "".join(session.reply("Tell me about your day."))
        assert first and len(session.messages) == 2
        session.set_vector(files["a"], 1.0)
        history = format_prompt(demo_model, session.conversation())[0]
        assert ctx.tokens == history  # the whole conversation was decoded again
        live = ctx.logits()
    steered = steering.build(demo_model, [f"{files['a']}:1"], None)
    plain = steering.build(demo_model, [], None)
    assert np.array_equal(live, last_logits(demo_model, steered, history))
    assert not np.allclose(live, last_logits(demo_model, plain, history), atol=1e-1)


def test_chat_reuses_the_kv_cache_between_turns(demo_model) -> None:
    with Context(demo_model, n_ctx=512) as ctx:
        session = ChatSession(ctx, steering.build(demo_model, [], None), GREEDY, max_tokens=8)
        "".join(session.reply("Hi there."))
        "".join(session.reply("And then?"))
        whole = format_prompt(demo_model, session.conversation())[0]
        assert session.last_stats.prompt_tokens < len(whole) // 2


def test_runtime_load_steers_and_refuses_unknown_sampling_options(tiny_dense_path, tmp_path):
    from edge_steer import runtime

    rng = np.random.default_rng(3)
    path = vectors.write(
        vectors.ControlVector({2: rng.normal(size=64).astype(np.float32) * 40}), tmp_path / "v.gguf"
    )
    with runtime.load(tiny_dense_path, vectors={str(path): 1.0}, ctx=128) as steered:
        steered_text = steered.generate("Hello", max_tokens=8, temperature=0)
        steered.set_vector(str(path), 0)
        plain = steered.generate("Hello", max_tokens=8, temperature=0)
        with pytest.raises(BadInput, match="unknown sampling option 'temp'"):
            steered.generate("Hello", temp=0)
    assert steered_text != plain


def test_one_library_per_model_reads_each_vector_once(demo_model, files, tmp_path) -> None:
    """Every steering on a model draws on the model's one VectorLibrary: a vector is read
    once, shared, summed the same way as a Steering sums it, and re-read only when dropped
    (as `steer(..., retrain=True)` does)."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_steer import library

    shelf = library.for_model(demo_model)
    assert library.for_model(demo_model) is shelf
    shelf.drop(files["a"])
    first = steering.build(demo_model, [f"{files['a']}:1"], None)
    with ThreadPoolExecutor(4) as pool:  # concurrent lookups all get the one copy
        found = list(pool.map(lambda _: shelf.get(files["a"]), range(8)))
    assert all(v is first.active[files["a"]][0] for v in found)
    np.testing.assert_array_equal(shelf.rows({files["a"]: 1.0}), first.rows())
    assert shelf.missing([files["a"], "never-read"]) == ["never-read"]
    shelf.drop(files["a"])
    again = steering.build(demo_model, [f"{files['a']}:1"], None)
    assert again.active[files["a"]][0] is not first.active[files["a"]][0]
    other = vectors.ControlVector({1: np.ones(7, np.float32)}, demo_model.architecture)
    with pytest.raises(BadInput, match=r"n_embd|embedding|size"):
        shelf.add("wrong-shape", other)  # nothing that does not fit is ever kept
    assert shelf.missing(["wrong-shape"]) == ["wrong-shape"]


def test_a_vector_is_one_entry_however_it_is_spelled(tiny_dense, tmp_path, monkeypatch) -> None:
    """Was: `/vector HAPPY 0` left happy on, `./v.gguf` and `v.gguf` stacked as two, and
    /save kept one of them; `~/v.gguf` was saved as a folder named `~`."""
    from edge_steer import library

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EDGE_STEER_HOME", str(tmp_path / "store"))  # "mine" stays in here
    path = vectors.write(vectors.ControlVector({2: np.ones(64, np.float32)}), tmp_path / "v.gguf")
    library.store_vector(tiny_dense, "mine", vectors.ControlVector({3: np.ones(64, np.float32)}))
    steered = steering.build(tiny_dense, ["./v.gguf:0.25,v.gguf:0.5", "MINE:1"], None)
    assert steered.strengths() == {"./v.gguf": 0.75, "mine": 1.0}  # a spec's repeats add up
    steered.set(str(path), 1.0)
    steered.set("MINE", 0.5)
    assert steered.strengths() == {"./v.gguf": 1.0, "mine": 0.5}
    steered.set("~/v.gguf", 0)
    steered.set("Mine", 0)
    assert steered.strengths() == {}
    session = ChatSession(Context(tiny_dense, n_ctx=64), steered, SamplerSettings())
    session.set_vector("~/v.gguf", 0.5)
    assert session.saved()["vectors"] == {str(path): 0.5}
