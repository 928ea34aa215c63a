"""The chat demo (SmolLM2-135M-Instruct, llama architecture like Mistral's GGUFs): a real
chat in the model's own format, and vectors trained on it that steer its replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_steers_probes_monotonically, calibration_fluency
from test_cli import run

from edge_steer import calibrate, dataset, evaluation, steering, training, vectors
from edge_steer.chat import ChatSession
from edge_steer.engine import Context, SamplerSettings
from edge_steer.errors import BadInput

GREEDY = SamplerSettings(temperature=0)


def test_demo_chat_is_an_instruct_model_that_ends_its_turn(chat_path) -> None:
    result = run(
        "chat", "-m", "demo-chat", "-p", "Name three colours.", "-n", "200", "--json", "--temp", "0"
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["text"] and reply["generated_tokens"] < 200  # it ended its turn itself
    assert "User:" not in reply["text"] and "Assistant:" not in reply["text"]


def test_a_hand_written_template_in_a_prompt_is_read_as_its_special_tokens(chat_model) -> None:
    """As llama-cli and llama-server read a prompt: `<|im_start|>` is one special token, not
    its characters, so a completion prompt can carry the model's own chat template."""
    prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    result = run("generate", "-m", "demo-chat", "-p", prompt, "-n", "60", "--json", "--temp", "0")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["prompt_tokens"] == len(chat_model.tokenize(prompt, parse_special=True))
    assert reply["prompt_tokens"] < len(chat_model.tokenize(prompt)) - 6  # 3 specials, ~7 each
    assert reply["generated_tokens"] < 60  # in its own template, the model ends its turn


def test_a_character_cut_by_max_tokens_is_dropped_not_shown_as_a_replacement(chat_model):
    """SmolLM2 writes 🎉 as byte tokens; stopping between them gave a trailing U+FFFD."""
    from edge_steer.engine import Sampler

    prompt = chat_model.tokenize("🎉🎉🎉🎉")
    texts, tails = [], []
    for n in range(1, 9):
        with Context(chat_model, n_ctx=64) as ctx:
            texts.append("".join(ctx.generate(prompt, Sampler(chat_model, GREEDY), max_tokens=n)))
            generated = b"".join(chat_model.piece(t) for t in ctx.tokens[len(prompt) :])
        tails.append(generated.decode(errors="replace").endswith("\ufffd"))
        assert texts[-1] == generated.decode(errors="ignore"), n
    assert any(tails) and not any("\ufffd" in text for text in texts)  # a cut really happened


def test_a_full_context_drops_the_earliest_whole_turns_and_keeps_the_system_prompt(
    chat_model,
) -> None:
    """As ollama and llama-cli go on when a chat outgrows the context: the earliest turns
    leave the prompt, whole (the kept ones start with a user message), down to half the
    context so that the next turns fit again; the system prompt stays, /save keeps every
    message, and a message that alone does not fit is refused and not kept."""
    long = " ".join(["Tell me more about the weather in spring."] * 8)  # ~80 tokens
    with Context(chat_model, n_ctx=512) as ctx:
        session = ChatSession(ctx, steering.build(chat_model, [], None), GREEDY, "Be brief.", 24)
        sizes = []
        for turn in range(8):
            "".join(session.reply(f"{turn}: {long}"))
            sizes.append((session.forgotten, session.last_stats.prompt_tokens))
        assert len(session.messages) == 16 and session.forgotten % 2 == 0
        seen = session.conversation()
        assert seen[0] == {"role": "system", "content": "Be brief."}
        assert seen[1]["role"] == "user" and seen[1] == session.messages[session.forgotten]
        drops = [i for i in range(1, 8) if sizes[i][0] > sizes[i - 1][0]]
        assert drops and drops[0] >= 3  # only once the context had filled up
        for i in drops:  # each drop re-evaluated a prompt of at most half the context
            assert sizes[i][1] <= ctx.n_ctx // 2 < sizes[i][1] + 160
        assert len(drops) < len(sizes) - drops[0]  # not a re-evaluation every turn after
        with pytest.raises(BadInput, match=r"the message is \d+ tokens with the system prompt"):
            "".join(session.reply(" ".join(["spring"] * 600)))
        assert len(session.messages) == 16


def test_eval_chat_of_a_custom_concept_needs_its_personas_before_any_measuring(
    chat_model, tmp_path
) -> None:
    """Was: the whole probe sweep ran first (minutes on a 7B), then --chat failed."""
    rng = np.random.default_rng(0)
    directions = {n: rng.normal(size=chat_model.n_embd).astype(np.float32) for n in (8, 9)}
    vector = vectors.ControlVector(directions, "llama", {"concept": "sarcastic"})
    path = vectors.write(vector, tmp_path / "sarcastic.gguf")
    probes = [dataset.Probe("I think that", " is great.", " is awful.")] * 2
    options = evaluation.EvalOptions(strengths=(-1, 1), probes=probes, chat=True, save=False)
    measured = []
    with pytest.raises(BadInput, match="--chat needs persona words for the custom concept"):
        evaluation.evaluate_vector(
            chat_model, str(path), options, on_progress=lambda *step: measured.append(step)
        )
    assert not measured


def test_happy_trained_on_the_chat_model_moves_its_probes(chat_model) -> None:
    pairs = dataset.contrast_pairs(dataset.load_builtin("happy"), chat_model, limit=64)
    vector = training.train(chat_model, pairs, training.TrainOptions(), name="happy")
    assert_steers_probes_monotonically(chat_model, vector, "happy")


def test_on_a_chat_model_plus_and_minus_one_also_keep_within_the_entropy_budget(
    chat_model,
) -> None:
    """SmolLM2's `honest` flattens the next-token distributions at -1 before it reaches the
    perplexity budget (docs/training.md, step 7): calibrated, the worse sign adds the entropy
    budget (within the search's tolerance), and perplexity stays under its own budget."""
    pairs = dataset.contrast_pairs(dataset.load_builtin("honest"), chat_model)
    vector = training.train(chat_model, pairs, training.TrainOptions(), name="honest")
    assert float(vector.metadata["calibration_entropy_budget"]) == calibrate.ENTROPY_BUDGET
    measured = calibration_fluency(chat_model, vector)
    (ppl, flat), signs = measured[0.0], (1.0, -1.0)
    rises = [measured[s][1] - flat for s in signs]
    ratios = [measured[s][0] / ppl for s in signs]
    assert 0.85 * calibrate.ENTROPY_BUDGET <= max(rises) <= 1.1 * calibrate.ENTROPY_BUDGET
    assert max(ratios) < calibrate.BUDGET, (ratios, rises)


def run_long(*args: str) -> subprocess.CompletedProcess:
    """`run`, for a command that trains a vector first (minutes on a loaded machine)."""
    command = [sys.executable, "-m", "edge_steer", *args]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def test_eval_chat_measures_steered_replies(chat_path, tmp_path) -> None:
    """Replies to everyday questions under happy:±1 read more like the happy (sad)
    persona-prompted model's own, and loop no more than unsteered ones; the plot shows
    them under the probe sweep."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "chat.png"
    result = run_long(
        "eval",
        "happy",
        "-m",
        "demo-chat",
        "--chat",
        "--strengths",
        "-1,1",
        "--samples",
        "2",
        "--no-save",
        "--json",
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    chat = {p["strength"]: p for p in json.loads(result.stdout)["chat"]}
    assert chat[-1.0]["persona"] < chat[0.0]["persona"] < chat[1.0]["persona"], chat
    loops = {s: round(p["degenerate"] * p["replies"]) for s, p in chat.items()}  # (rounded)
    assert max(loops[-1.0], loops[1.0]) <= loops[0.0] + 1, chat  # at most one more than unsteered
    assert all(p["tokens"] > 0 and p["sample"] for p in chat.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_chat_needs_an_instruct_model(demo_path) -> None:
    result = run(
        "eval",
        "happy",
        "-m",
        "demo",
        "--chat",
        "--strengths",
        "-1,1",
        "--samples",
        "1",
        "--no-save",
    )
    assert result.returncode == 2 and "no chat template" in result.stderr, result.stderr
