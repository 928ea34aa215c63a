"""The CLI as a user runs it: real processes, real models, clean errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_steer import training, vectors


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_steer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_clean_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_dense_path):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.gguf").write_text("not a model at all")
    data = tiny_dense_path.read_bytes()
    (folder / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    wide = vectors.ControlVector({1: np.ones(32, np.float32)})
    vectors.write(wide, folder / "wide.gguf")
    nan = np.ones(64, np.float32)
    nan[3] = np.nan
    path = folder / "nan.gguf"
    vectors.write(vectors.ControlVector({1: nan}), path)
    vectors.write(vectors.ControlVector({1: np.ones(64, np.float32)}), folder / "first.gguf")
    vectors.write(vectors.ControlVector({1: np.zeros(64, np.float32)}), folder / "zero.gguf")
    for odd in ("c:d.gguf", "e,f.gguf"):
        vectors.write(vectors.ControlVector({1: np.ones(64, np.float32)}), folder / odd)
    (folder / "mix.npz").write_bytes(b"PK\x03\x04")  # what `vectors mix -o x.npz` writes
    return folder


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "missing.gguf"], "model file not found"),
        (["--model", ""], "--model is empty"),  # was the default model, from the network
        (["--model", "{bad}/text.gguf"], "not a GGUF file"),
        (["--model", "{bad}/truncated.gguf"], "truncated"),
        (["--model", "{bad}"], "is a folder, not a model file"),
        (["--vector", "{bad}"], "is a folder, not a control vector"),
        (["--vector", "{bad}/wide.gguf"], "n_embd 32 but the model has 64"),
        (["--vector", "{bad}/nan.gguf"], "NaN"),
        (["--vector", "lazy:abc"], "bad vector spec 'lazy:abc'"),
        (["--vector", ":1"], "bad vector spec ':1'"),
        (["--vector", "lazy:1:2"], "bad vector spec 'lazy:1:2'"),
        (["--vector", "nosuchvector"], "built-in concept (trained on first use: concise,"),
        (["--layers", "2-40"], "outside the model's steerable blocks 1-5"),
        (["--layers", "x"], "bad layer range"),
        (["--vector", "{bad}/first.gguf", "--layers", "2-4"], "hold none of {bad}/first.gguf"),
        (["--vector", "{bad}/first.gguf", "--retrain"], "--retrain trains built-in concepts"),
        (["--vector", "{bad}/mix.npz"], "is not a GGUF control vector, which steering"),
        (["--vector", os.devnull], "is not a regular file"),  # was "file not found"
        (["--vector", "{bad}/zero.gguf"], "holds only zeros, which steer nothing"),  # it ran
        # were "bad vector spec" and "file not found: e"
        (["--vector", "{bad}/c:d.gguf"], "a file whose name holds ':' cannot be given here"),
        (["--vector", "{bad}/e,f.gguf:0.5"], "a file whose name holds ',' cannot be given"),
    ],
)
def test_bad_input_is_one_clean_line(args, words, bad_files, tiny_dense_path) -> None:
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    model = [] if "--model" in args else ["--model", str(tiny_dense_path)]
    words = words.replace("{bad}", str(bad_files))
    assert_clean_error(run("chat", *model, *args, "-p", "hi", "-n", "4"), words)


def test_generate_json(tiny_dense_path) -> None:
    result = run(*f"generate --model {tiny_dense_path} -p Hello -n 8 --temp 0 --json".split())
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["generated_tokens"] > 0 and data["prompt"] == "Hello"


def test_chat_prompt_with_vectors_on_the_demo_model(demo_path, tmp_path) -> None:
    rng = np.random.default_rng(0)
    vec = vectors.ControlVector({n: rng.normal(size=640).astype(np.float32) for n in (3, 4)})
    path = vectors.write(vec, tmp_path / "v.gguf")
    result = run(*f"chat --model demo --vector {path}:0.5 -p Hi! -n 8 --seed 1 --json".split())
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["vectors"] == {str(path): 0.5} and data["generated_tokens"] > 0


def test_a_context_past_the_models_training_says_so(chat_path) -> None:
    """SmolLM2 was trained on 8192 tokens: llama.cpp runs a larger context without a word
    where anyone would see it; the CLI notes it, and is quiet up to the trained length."""
    args = f"generate --model {chat_path} -p Hi -n 1 --threads 1 --ctx".split()
    past = run(*args, "8193")
    assert past.returncode == 0 and "--ctx 8193 is past the 8192 tokens" in past.stderr
    assert "trained on" not in run(*args, "8192").stderr


def test_repl_slash_commands(tiny_dense_path, tmp_path) -> None:
    vec = vectors.ControlVector({2: np.ones(64, np.float32)})
    path = vectors.write(vec, tmp_path / "v.gguf")
    saved = tmp_path / "talk.json"
    script = f"hello\n/vector {path} 0.5\n/vectors\n/clear\n/vector {path} abc\n/save {saved}\n"
    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "chat", "--model", str(tiny_dense_path), "-n", "4"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"{path}:+0.5" in result.stderr and "history re-evaluated" in result.stderr
    assert "conversation cleared" in result.stderr
    # a script stops at its first failed command: what follows is not run
    assert result.returncode == 2 and "bad vector spec" in result.stderr.splitlines()[-1]
    assert not saved.exists() and "Traceback" not in result.stderr


def test_dash_h_is_help_everywhere() -> None:
    """-h as in llama.cpp's tools: on the app, a command and a subcommand."""
    for args in (["-h"], ["chat", "-h"], ["vectors", "rm", "-h"]):
        result = run(*args)
        assert result.returncode == 0 and "Usage: edge-steer" in result.stdout, args


def piped(stdin: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edge_steer", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


def test_prompts_come_as_an_argument_from_p_or_piped_in(tiny_dense_path) -> None:
    """generate: `generate TEXT`, `-p TEXT`, `-p -` and a pipe all give the same greedy text;
    nothing at all is a one-line error. chat: piped lines are messages, answered without
    `>>>` prompts in stdout; --json needs -p."""
    model = ["--model", str(tiny_dense_path), "-n", "4", "--temp", "0"]
    texts = {
        piped("", "generate", "Hello there", *model).stdout,
        piped("", "generate", "-p", "Hello there", *model).stdout,
        piped("Hello there\n", "generate", "-p", "-", *model).stdout,
        piped("Hello there\n", "generate", *model).stdout,
    }
    assert len(texts) == 1 and texts.pop().strip()
    assert_clean_error(piped("", "generate", *model), "the prompt read from stdin is empty")
    assert_clean_error(piped("", "generate", "a", "-p", "b", *model), "not both")
    chat = piped("Hello\n/vectors\n", "chat", *model)
    assert chat.returncode == 0 and ">>>" not in chat.stdout and "vectors: none" in chat.stderr
    assert_clean_error(piped("", "chat", "--json", *model), "-p -")


def test_list_commands_answer_to_the_names_people_type() -> None:
    """`edge-steer list`, `models ls` and `vectors ls` as in ollama and Unix; `models info`
    of a model that is not downloaded says so."""
    catalog = run("models", "list").stdout
    assert "mistral" in catalog and run("list").stdout == catalog == run("models", "ls").stdout
    assert run("vectors", "ls").returncode == 0
    info = run("models", "info", "mistral").stdout
    assert "path: not downloaded" in info and "None" not in info
    assert_clean_error(run("models", "rm", "./mine.gguf"), "delete your own file ./mine.gguf")


def test_piped_tables_keep_whole_rows() -> None:
    """`edge-steer models list | grep mixtral` finds whole rows: rich squeezed tables into 80
    columns when stdout was not a terminal, wrapping the model names; COLUMNS still rules."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    command = [sys.executable, "-m", "edge_steer", "models", "list"]
    rows = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env).stdout
    assert any(
        "mixtral:q4_k_m" in row and "Mixtral 8x7B Instruct v0.1 (46.7B, 12.9B active)" in row
        for row in rows.splitlines()
    ), rows
    narrow = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "60"}
    ).stdout
    assert max(len(row) for row in narrow.splitlines()) <= 60


def test_ctrl_c_while_training_exits_130_at_once_without_a_traceback(demo_path) -> None:
    """Ctrl-C during capture (llama.cpp calling back into Python for every graph node): the
    decode ends early, then the command stops with 130 and no traceback or ctypes noise."""
    import signal
    import time

    command = [sys.executable, "-m", "edge_steer", "train", "lazy", "--model", str(demo_path)]
    command += ["--limit", "640"]  # every pair: a capture long enough to be inside of
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EDGE_STEER_HOME": str(demo_path.parent / "ctrl-c-home")},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal has it
    )
    time.sleep(4)  # loaded, and capturing (about a minute of it on 2 cores)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_training_progress_names_each_stage_in_a_log(tiny_dense_path, tmp_path) -> None:
    """stderr not a terminal (a log, CI): a plain line per tenth of each stage and a line as
    each ends, no bar and no blank lines."""
    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "train", "happy", "--model", str(tiny_dense_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EDGE_STEER_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for stage in training.STAGES:
        assert any(line.startswith(f"{stage}: done in ") for line in lines), result.stderr
    assert "calibrating: 1/" in result.stderr and "━" not in result.stderr
    assert all(line.strip() for line in lines), result.stderr


def complete(words: str) -> list[str]:
    """What bash completion offers for the last of `words` (`--install-completion`'s hook)."""
    env = {**os.environ, "_EDGE_STEER_COMPLETE": "complete_bash", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - 1)
    command = [sys.executable, "-m", "edge_steer"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_shell_completion_offers_commands_models_and_vectors() -> None:
    assert complete("edge-steer ch") == ["chat"]
    assert "demo-chat" in complete("edge-steer chat --model demo")
    assert complete("edge-steer chat --vector ha") == ["happy"]
    assert complete("edge-steer generate -v lazy:-1,ha") == ["lazy:-1,happy"]


def test_a_reply_is_printed_as_the_model_wrote_it(capsys) -> None:
    """Not read as markup or emoji codes (":smile:" was printed as an emoji), nor escaped as
    a file's labels are."""
    from edge_steer.cli.options import stream

    pieces = ["a :smile: [bold]b[/]", " \x1b[1mc"]
    assert stream(pieces, quiet=False) == "".join(pieces)
    assert capsys.readouterr().out == "".join(pieces) + "\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("args", [["--version"], ["--help"], ["generate", "-n", "64", "Hi"]])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(args, tiny_dense_path) -> None:
    """Was: rich's traceback of `OSError: [Errno 28] No space left on device`."""
    if args[0] == "generate":
        args = [*args, "-m", str(tiny_dense_path)]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "edge_steer", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr == "error: cannot write the output: No space left on device\n"


def test_closed_streams_and_a_zero_width_terminal(tiny_dense_path) -> None:
    """A closed stream is None in Python (every .isatty() raised); COLUMNS=0 made rich
    print nothing at all, errors included."""
    generate = f"{sys.executable} -m edge_steer generate -m {tiny_dense_path} -n 4 Hi"
    for redirect in ("<&-", ">&-", "2>&-"):
        result = subprocess.run(
            f"{generate} {redirect}", shell=True, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, redirect
        assert result.stdout.strip() or redirect == ">&-", redirect
    narrow = {**os.environ, "COLUMNS": "0"}
    result = subprocess.run(
        [*generate.split(), "--top-k", "-1"], capture_output=True, text=True, env=narrow
    )
    assert result.returncode == 2 and "--top-k" in result.stderr
    result = subprocess.run(generate.split(), capture_output=True, text=True, env=narrow)
    assert result.returncode == 0 and result.stdout.strip()


def test_an_answer_cut_off_by_the_context_says_so(tiny_dense_path) -> None:
    """Was: it looked finished; --json had no reason either."""
    args = ["generate", "-m", str(tiny_dense_path), "--temp", "0", "--json", "Hello"]
    cut = run(*args, "-c", "16", "-n", "100")
    assert json.loads(cut.stdout)["stop_reason"] == "context"
    assert "stopped: the context (16 tokens) is full; raise --ctx" in cut.stderr
    whole = run(*args, "-n", "3")
    assert json.loads(whole.stdout)["stop_reason"] == "length" and "stopped" not in whole.stderr
