"""The `llm` plugin as an `llm` user meets it: the real `llm` command, a fresh llm home, the
chat demo model, steered replies, `-c` conversations, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_steer import gguffile, vectors

pytest.importorskip("llm")
LLM = str(Path(sys.executable).parent / "llm")


@pytest.fixture
def run_llm(tmp_path, chat_path):
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path / "llm"), "COLUMNS": "200"}
    env["EDGE_STEER_HOME"] = str(tmp_path / "edge-steer")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [LLM, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )

    return run


def strong_vector(chat_path: Path, folder: Path) -> Path:
    """A random direction on the middle blocks, big enough to change a greedy reply."""
    header = gguffile.read_header(chat_path)
    n_layer, n_embd = header.arch_int("block_count"), header.arch_int("embedding_length")
    rng = np.random.default_rng(0)
    directions = {n: rng.standard_normal(n_embd).astype(np.float32) * 4 for n in range(8, 20)}
    assert n_layer and n_layer > 20
    return vectors.write(vectors.ControlVector(directions, "llama"), folder / "strong.gguf")


def test_llm_lists_and_runs_steered_models_with_conversations(run_llm, chat_path, tmp_path):
    assert "edge-steer/demo-chat" in run_llm("models").stdout
    ask = ["-m", "edge-steer/demo-chat", "-o", "temperature", "0", "-o", "max_tokens", "24"]
    plain = run_llm("prompt", *ask, "My name is Ada. Say hello.")
    assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr
    first = json.loads(run_llm("logs", "-n", "1", "--json").stdout)[0]
    steered = run_llm(
        "prompt",
        *ask,
        "-o",
        "vector",
        f"{strong_vector(chat_path, tmp_path)}:1",
        "My name is Ada. Say hello.",
    )
    assert steered.returncode == 0 and steered.stdout.strip() != plain.stdout.strip()
    more = run_llm("prompt", "-c", "-o", "max_tokens", "8", "What is my name?")
    assert more.returncode == 0, more.stderr
    follow = json.loads(run_llm("logs", "-n", "1", "--json").stdout)[0]
    # the continuation carried the earlier turns: more prompt tokens than the first question
    assert follow["input_tokens"] > first["input_tokens"] + 10, (first, follow)
    assert follow["model"] == "edge-steer/demo-chat"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["-o", "vector", "happy:50"], "too strong"),
        (["-o", "vector", "nosuch:1"], "unknown vector 'nosuch'"),
        (["-o", "temperature", "5"], "temperature 5.0 is out of range"),
    ],
)
def test_bad_options_are_llm_errors_not_tracebacks(run_llm, options, words) -> None:
    result = run_llm("prompt", "-m", "edge-steer/demo-chat", *options, "hi")
    assert result.returncode == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("Error:")
