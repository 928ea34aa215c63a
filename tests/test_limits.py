"""What llama.cpp would assert on, and what a careless user types, is checked first: a one-line
error and exit 2 (or 3 for memory), never an abort, a traceback or a silent no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_clean_error, piped, run

from edge_steer import convert, library, store, vectors
from edge_steer.engine import Context
from edge_steer.errors import BadInput

LONG_PROMPT = " ".join(["word"] * 150)


def test_context_sizes_are_what_llama_cpp_made(tiny_dense) -> None:
    """llama.cpp caps the batch at the context and pads the KV cache to 256 cells: Python
    must believe the batch llama.cpp has, and the context that was asked for."""
    with Context(tiny_dense, n_ctx=100, threads=1) as ctx:
        assert (ctx.n_ctx, ctx.n_batch, ctx.batch.capacity) == (100, 100, 100)
        tokens = list(range(1, 100))
        assert ctx.ingest(tokens) == 99  # a full batch, one llama_decode
        with pytest.raises(BadInput, match="the prompt is 101 tokens but the context holds 100"):
            ctx.ingest(list(range(1, 102)))


def test_generate_with_a_small_context_refuses_a_long_prompt(demo_path) -> None:
    """Was: GGML_ASSERT(n_tokens_all <= cparams.n_batch), exit 134."""
    result = run("generate", "-m", "demo", "--ctx", "100", "-p", LONG_PROMPT, "-n", "2")
    assert_clean_error(result, "the prompt is 151 tokens but the context holds 100")


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(demo_path) -> None:
    """Was: 3 MB of spaces took llama.cpp's tokenizer 12 s to count before the refusal."""
    text = "x" + " " * 3_000_000 + "x"
    assert_clean_error(piped(text, "generate", "-m", "demo", "-p", "-"), "the prompt is at least")
    assert_clean_error(piped(text, "chat", "-m", "demo", "-p", "-"), "the message is at least")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-p", ""], "the prompt is empty"),  # generated from nothing
        (["-p", "hi", "--retrain"], "--retrain trains the --vector concepts again, and none"),
        (["-p", "hi", "--layers", "5-10"], "--layers picks the blocks that --vector steers"),
        (["-p", "hi", "--vector", ",,"], "--vector ',,' names no vector"),
    ],
)
def test_generate_refuses_what_it_would_ignore(demo_path, args, words) -> None:
    assert_clean_error(run("generate", "-m", "demo", "-n", "2", *args), words)


def test_generate_with_a_small_context_still_generates(demo_path) -> None:
    prompt = " ".join(["word"] * 60)
    result = run("generate", "-m", "demo", "--ctx", "100", "-p", prompt, "-n", "4", "--temp", "0")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--threads", "0"], "--threads 0 is out of range"),
        (["--threads", "-1"], "--threads -1 is out of range"),
        (["--threads", "1000"], "--threads 1000 is out of range"),
        (["-n", "-1"], "--max-tokens -1 is out of range"),
        (["-n", "0"], "--max-tokens 0 is out of range"),
        (["--temp", "-1"], "--temp -1.0 is out of range"),
        (["--temp", "nan"], "--temp nan is out of range"),
        (["--temp", "inf"], "--temp inf is out of range"),
        (["--top-p", "2"], "--top-p 2.0 is out of range"),
        (["--top-k", "-5"], "--top-k -5 is out of range"),
        (["--min-p", "-1"], "--min-p -1.0 is out of range"),
        (["--repeat-penalty", "nan"], "--repeat-penalty nan is out of range"),
        (["--repeat-last-n", "-5"], "--repeat-last-n -5 is out of range"),
        (["--ctx", "1000000000"], "--ctx 1000000000 is out of range"),
        (["--ctx", "8"], "--ctx 8 is out of range"),
        (["-v", "happy:1e308"], "too strong"),
        (["-v", "happy:50"], "too strong"),
        (["-v", ",".join(f"v{i}:0.5" for i in range(40))], "too strong"),
        (["-v", "x" * 300], "bad vector name 'xxxxxxxx"),
        (["-v", "x" * 300 + ":1"], "bad vector name"),
        (["-v", "happy:1_0"], "bad vector spec 'happy:1_0'"),  # was strength 10
        (["--seed", "4294967295"], "--seed 4294967295 is out of range: use -1 to 4294967294"),
        (["--seed", str(2**40)], "--seed 1099511627776 is out of range"),  # was 0
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_options_are_one_clean_line(command, args, words, tiny_dense_path) -> None:
    result = run(command, "--model", str(tiny_dense_path), "-p", "hi", *args)
    assert_clean_error(result, words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port 70000: use 1-65535"),
        (["--port", "0"], "--port 0: use 1-65535"),
        (["--parallel", "1000"], "--parallel 1000 is out of range: use 1 to 256"),
        (["--preset", "x=nosuch:1"], "unknown vector 'nosuch'"),
        (["--layers", "99-100"], "outside the model's steerable blocks"),
        (["--host", "999.1.1.1", "--api-key", "k"], "pass another --host"),
    ],
)
def test_serve_checks_what_it_can_before_it_says_listening(args, words, tiny_dense_path):
    result = run("serve", "--model", str(tiny_dense_path), "--port", "18797", *args)
    assert_clean_error(result, words)


def test_a_huge_context_that_cannot_fit_is_refused_at_once(demo_path) -> None:
    """Was: 64 s of allocating, then std::bad_alloc. Within --ctx's range, but the demo
    model's KV cache for it is some 300 GB."""
    for model in ("demo", str(demo_path)):  # the catalog's fit check, and a file's
        result = run("generate", "--model", model, "-p", "hi", "--ctx", "16000000")
        assert result.returncode == 3, result.stderr
        assert "16000000-token context" in result.stderr and "smaller --ctx" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["-p", "--system"])
def test_invalid_utf8_is_one_clean_line(option, tiny_dense_path) -> None:
    """Bytes that are not UTF-8 arrive as lone surrogates: was a UnicodeEncodeError."""
    args = [
        b"chat",
        b"--model",
        os.fsencode(tiny_dense_path),
        b"-n",
        b"2",
        option.encode(),
        b"caf\xe9 \xff",
    ]
    if option == "--system":
        args += [b"-p", b"hi"]
    result = subprocess.run(
        [sys.executable.encode(), b"-m", b"edge_steer", *args],
        capture_output=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "not valid UTF-8" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_long_names_never_reach_the_file_system(tiny_dense) -> None:
    with pytest.raises(BadInput, match="bad vector name"):
        store.resolve_vector("x" * 300, tiny_dense.path)
    with pytest.raises(BadInput, match="bad vector name"):
        library.store_vector(tiny_dense, "a/b", vectors.ControlVector({1: np.ones(64)}))


def test_total_steering_is_capped() -> None:
    vectors.check_strengths({"a": 6.0, "b": -4.0})
    huge = [{"a": float("inf")}, {"a": 1e308, "b": 1e308}, {"a": 10**400}, {"a": float("nan")}]
    for too_much in [{"a": 6.0, "b": -4.5}, *huge]:
        with pytest.raises(BadInput, match="too strong"):
            vectors.check_strengths(too_much)


def test_train_checks_its_output_before_training(demo_path, tiny_dense_path, tmp_path) -> None:
    """Was: trained, overwrote the stored vector, then failed on `-o x.txt`."""
    from edge_steer.engine import Model

    model_copy = tmp_path / "model.gguf"
    shutil.copyfile(tiny_dense_path, model_copy)

    with Model(demo_path) as model:
        stored = library.stored_path(model, "happy")
    before = stored.read_bytes() if stored.exists() else None
    (tmp_path / "folder.gguf").mkdir()
    for output, words in [
        (tmp_path / "x.txt", "x.txt': use a .gguf or .npz"),
        ("", "unsupported output ''"),  # was silently no copy
        (tmp_path / "folder.gguf", "is a folder"),
        (tmp_path / "file" / "below" / "v.gguf", "not a writable folder"),
        (Path("/proc/nope/v.gguf"), "not a writable folder"),  # os.access says yes to root
        (model_copy, "is a GGUF model (llama), which a vector would replace"),  # it did
    ]:
        if "below" in str(output):
            (tmp_path / "file").write_text("a file, not a folder")
        result = run("train", "happy", "-m", "demo", "--limit", "2", "-o", str(output))
        assert_clean_error(result, words)
    result = run(
        "train", "mine", "-m", "demo", "--pairs", "p.jsonl", "--limit", "2", "--seed", "-1"
    )
    assert_clean_error(result, "--seed -1: use 0 or more")  # was numpy's traceback
    result = run("train", "mine", "-m", "demo", "--pairs", "")
    assert_clean_error(result, "--pairs is empty: name a file")  # was "unknown concept"
    assert (stored.read_bytes() if stored.exists() else None) == before


def test_check_output_accepts_new_folders(tmp_path) -> None:
    assert convert.check_output(tmp_path / "new" / "v.npz") == tmp_path / "new" / "v.npz"


def test_serve_with_a_small_context_answers_400_not_abort(demo_path) -> None:
    """Was: the same GGML_ASSERT killed the server and every stream on it."""
    openai = pytest.importorskip("openai")
    from tools.server_process import running_server

    with running_server(["--model", "demo", "--ctx", "100"]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="context of 100 needs room"):
            client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=2)
        prompt = " ".join(["word"] * 90)  # one 91-token batch: within llama.cpp's 100
        done = client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0)
        assert done.usage.prompt_tokens == 91 and done.choices[0].finish_reason == "length"
