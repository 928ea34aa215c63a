"""The `llm` plugin, driven through llm's own CLI as a user runs it: real llama.cpp runs on the
SmolLM2 chat demo (`demo-chat`), llm's logs in a fresh LLM_USER_PATH."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge_steer import store, vectors
from edge_steer.engine import SamplerSettings

pytest.importorskip("llm")

MODEL = "edge-steer/demo-chat"
GREEDY = ("-o", "temperature", "0", "-o", "max_tokens", "24")


@pytest.fixture
def llm_env(tmp_path: Path, chat_path: Path) -> dict[str, str]:
    """llm's logs and keys in a fresh place; edge-steer's store is the session's (conftest)."""
    (tmp_path / "home").mkdir()
    return {**os.environ, "HOME": str(tmp_path / "home"), "LLM_USER_PATH": str(tmp_path / "llm")}


def llm_cli(env: dict[str, str], *args: str, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def logged(env: dict[str, str], count: int) -> list[dict]:
    """The last `count` responses in llm's log, oldest first."""
    result = llm_cli(env, "logs", "-n", str(count), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def mood(chat_path: Path, chat_model) -> str:
    """A stored vector for demo-chat (random directions, strong enough to change greedy
    replies): training a real concept would take the whole test's time budget."""
    rng = np.random.default_rng(7)
    directions = {}
    for block in range(8, 16):
        direction = rng.normal(size=chat_model.n_embd).astype(np.float32)
        directions[block] = 20 * direction / np.linalg.norm(direction)
    path = store.model_vectors_dir(chat_path) / "llm-test-mood.gguf"
    vectors.write(vectors.ControlVector(directions), path)
    return "llm-test-mood"


def test_llm_lists_every_catalog_model_with_its_options(llm_env) -> None:
    listed = llm_cli(llm_env, "models", "list", "--options", "-q", "edge-steer")
    assert listed.returncode == 0, listed.stderr
    assert f"edge-steer: {MODEL}\n" in listed.stdout
    assert "edge-steer/mistral:q4_k_m (aliases: edge-steer/mistral)" in listed.stdout
    assert "vector: str" in listed.stdout and "layers: str" in listed.stdout


def test_the_options_name_edge_steers_own_defaults() -> None:
    from edge_steer.llm_plugin import SAMPLING, SteeredModel

    fields = SteeredModel.Options.model_fields
    for name in SAMPLING[:-1]:  # the seed's default is none: random
        default = getattr(SamplerSettings(), name)
        assert f"(default {default:g})" in (fields[name].description or ""), name


def test_a_steered_reply_differs_from_the_plain_one_and_is_logged(llm_env, mood) -> None:
    prompt = "Tell me about your day."
    plain = llm_cli(llm_env, "-m", MODEL, *GREEDY, prompt)
    steered = llm_cli(llm_env, "-m", MODEL, *GREEDY, "-o", "vector", f"{mood}:2", prompt)
    assert plain.returncode == 0 and steered.returncode == 0, plain.stderr + steered.stderr
    assert plain.stdout.strip() and steered.stdout.strip()
    assert steered.stdout != plain.stdout
    first, second = logged(llm_env, 2)
    assert first["response_json"]["vectors"] == {}
    assert second["response_json"]["vectors"] == {mood: 2.0}
    assert second["options_json"] == {"temperature": 0.0, "max_tokens": 24, "vector": f"{mood}:2"}
    assert 0 < second["output_tokens"] <= 24 and second["input_tokens"] > 5


def test_continue_sends_the_conversation_so_far(llm_env) -> None:
    first = llm_cli(llm_env, "-m", MODEL, *GREEDY, "-s", "Be brief.", "My name is Ada. Hi!")
    second = llm_cli(llm_env, "-c", *GREEDY, "What is my name?")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    before, after = logged(llm_env, 2)
    assert before["conversation_id"] == after["conversation_id"]
    # the first prompt and its reply are in the second prompt's tokens
    assert after["input_tokens"] > before["input_tokens"] + before["output_tokens"]


def test_llm_chat_keeps_the_model_and_its_cache_between_turns(llm_env) -> None:
    result = llm_cli(llm_env, "chat", "-m", MODEL, *GREEDY, stdin="Hi!\nAnd then?\nquit\n")
    assert result.returncode == 0, result.stderr
    first, second = logged(llm_env, 2)
    details = json.loads(second["token_details"])
    assert details["cached_prompt_tokens"] >= first["input_tokens"]  # not read again


def test_llm_chat_goes_on_past_a_full_context(llm_env) -> None:
    """Once the conversation outgrows `-o ctx`, its earliest turns leave the prompt (down
    to half the context), as in edge-steer's own chat, instead of an error every turn."""
    long = " ".join(["Tell me more about the weather in spring."] * 8)  # ~80 tokens
    lines = "".join(f"{turn} {long}\n" for turn in range(5)) + "quit\n"
    result = llm_cli(llm_env, "chat", "-m", MODEL, *GREEDY, "-o", "ctx", "512", stdin=lines)
    assert result.returncode == 0 and "Error" not in result.stdout, result.stdout[-500:]
    sizes = [r["input_tokens"] for r in logged(llm_env, 5)]
    assert sizes[3] > sizes[4] and max(sizes) < 512 - 24 and sizes[4] <= 256, sizes


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("vector=happy:1:2", "bad vector spec"),
        ("vector=happy:20", "too strong"),
        ("vector=no-such-vector", "unknown vector 'no-such-vector'"),
        ("temperature=5", "out of range: use 0 to 2"),
        ("layers=20-40", "outside the model's steerable blocks 1-29"),  # known once loaded
        ("layers=5-3", "runs backwards: use 3-5"),
        ("max_tokens=1_0", "'1_0' is not a whole number"),  # was 10
        ("max_tokens=3.0", "'3.0' is not a whole number"),
        ("temperature=0_5", "'0_5' is not a number"),
        ("ctx=99999999999", "-o ctx 99999999999 is out of range"),  # said --ctx
    ],
)
def test_bad_options_are_one_clean_error(llm_env, option: str, words: str) -> None:
    name, _, value = option.partition("=")
    result = llm_cli(llm_env, "-m", MODEL, "-o", name, value, "Hi")
    assert result.returncode == 1 and result.stderr.startswith("Error: "), result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_llm_chat_with_a_bad_layer_range_is_one_line(llm_env) -> None:
    """Was: a traceback, since `llm chat` shows a failed turn's ModelError as one."""
    result = llm_cli(llm_env, "chat", "-m", MODEL, "-o", "layers", "abc", stdin="hi\nquit\n")
    assert "bad layer range 'abc'" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_prompts_from_several_threads_take_turns(chat_path, mood) -> None:
    """Was: every thread's prompt failed with `llama_decode failed`: they shared one
    context without taking turns."""
    import llm

    model = llm.get_model(MODEL)

    def reply(_: int) -> str:
        return model.prompt("Tell me about your day", temperature=0, max_tokens=16).text()

    alone = reply(0)
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(reply, range(3))) == [alone] * 3


def test_names_differing_in_case_are_one_vector_in_the_log(llm_env, mood) -> None:
    result = llm_cli(
        llm_env, "-m", MODEL, *GREEDY, "-o", "vector", f"{mood.upper()}:1,{mood}:1", "Hi"
    )
    assert result.returncode == 0, result.stderr
    assert logged(llm_env, 1)[0]["response_json"]["vectors"] == {mood: 2.0}


def test_only_the_plugin_imports_llm() -> None:
    """llm is an optional extra: edge-steer itself must work without it."""
    package = Path(__file__).resolve().parent.parent / "edge_steer"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "llm" or n.startswith("llm.") for n in names):
                importers.add(path.name)
    assert importers == {"llm_plugin.py"}
