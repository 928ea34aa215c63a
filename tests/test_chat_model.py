"""The chat demo (SmolLM2-135M-Instruct, llama architecture like Mistral's GGUFs): a real
chat in the model's own format, and vectors trained on it that steer its replies."""

from __future__ import annotations

import json

import numpy as np
from test_cli import run

from edge_steer import dataset, evaluate, train, vectors
from edge_steer.engine import Context


def test_demo_chat_is_an_instruct_model_that_ends_its_turn(chat_path) -> None:
    result = run(
        "chat", "-m", "demo-chat", "-p", "Name three colours.", "-n", "200", "--json", "--temp", "0"
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["text"] and reply["generated_tokens"] < 200  # it ended its turn itself
    assert "User:" not in reply["text"] and "Assistant:" not in reply["text"]


def test_happy_trained_on_the_chat_model_moves_its_probes(chat_model) -> None:
    pairs = dataset.contrast_pairs(dataset.load_builtin("happy"), chat_model, limit=64)
    vector = train.train(chat_model, pairs, train.TrainOptions(), name="happy")
    assert vector.metadata["chosen_by"] == "validation"
    rows = vectors.combine([(vector, 1.0)], chat_model.n_layer, chat_model.n_embd)
    probes = dataset.load_builtin("happy").probes
    neutral = " ".join(dataset.neutral_text().split()[:300])
    margins, ppl = {}, {}
    with Context(chat_model, n_ctx=512) as ctx:
        for strength in (-2, -1, 0, 1, 2):
            ctx.set_steering(rows * np.float32(strength) if strength else None)
            margins[strength] = evaluate.probe_margin(ctx, probes)
            ppl[strength] = evaluate.perplexity(ctx, neutral)
    effects = [margins[s] - margins[0] for s in (-2, -1, 0, 1, 2)]
    assert effects == sorted(effects), f"not monotonic: {effects}"
    assert effects[3] > 0.5 and effects[1] < -0.5, effects
    assert ppl[1] / ppl[0] <= 1.25 and ppl[-1] / ppl[0] <= 1.25, ppl
