"""The chat REPL as a person at a terminal uses it: a real pseudo-terminal, real keys (arrow
keys, Ctrl-C), real models; and as a script pipes it."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_steer import steering, vectors
from edge_steer.chat import ChatSession
from edge_steer.cli import repl
from edge_steer.engine import Context, SamplerSettings
from edge_steer.errors import EdgeSteerError


@dataclass
class Shown:
    """An item of `at_terminal`'s keys: wait until the terminal shows this text, however busy
    the machine (a fixed wait was too short under load)."""

    text: str
    seconds: float = 180


def at_terminal(model: Path, keys: list[str | float | Shown], home: Path) -> str:
    """Run `edge-steer chat` on a pseudo-terminal, typing each key string (a number waits
    that many seconds first); returns everything the terminal showed."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: chat, with the pseudo-terminal as its controlling terminal
        os.environ.update(EDGE_STEER_HOME=str(home), COLUMNS="100", TERM="xterm")
        command = ["chat", "--model", str(model), "-n", "6", "--temp", "0"]
        os.execv(sys.executable, [sys.executable, "-m", "edge_steer", *command])
    shown = bytearray()

    def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([terminal], [], [], 0.05)[0]:
                try:
                    shown.extend(os.read(terminal, 65536))
                except OSError:  # the child has gone
                    return

    for key in keys:
        if isinstance(key, Shown):
            end = time.monotonic() + key.seconds
            while key.text.encode() not in shown and time.monotonic() < end:
                read_for(0.1)
            continue
        if isinstance(key, float | int):
            read_for(key)
            continue
        read_for(2.5)  # until the prompt is drawn
        os.write(terminal, key.encode())
    read_for(5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, shown.decode(errors="replace")[-2000:]
    return shown.decode(errors="replace")


LEFT, UP, CTRL_C = "\x1b[D", "\x1b[A", "\x03"


def test_line_editing_history_set_save_and_load(tiny_dense_path, tmp_path) -> None:
    """Left arrows move inside the line (no `^[[D` typed in), Up recalls the last line, /set
    changes sampling, a failed command is one line, /save writes the conversation and /load
    brings it back after /clear."""
    saved, again = tmp_path / "talk.json", tmp_path / "again.json"
    keys = [
        f"hllo{LEFT * 3}e\r",
        f"{UP}\r",  # the same message again, from history
        "/set temperature 0.25\r",
        "/set top_k 7\r",
        "/set warmth 1\r",  # at a terminal, a failed command is a line and the chat goes on
        "/set\r",
        f"/save {saved}\r",
        "/clear\r",
        f"/load {saved}\r",
        f"/save {again}\r",
        "/bye\r",
    ]
    shown = at_terminal(tiny_dense_path, keys, tmp_path)
    assert "Traceback" not in shown
    conversation = json.loads(saved.read_text())
    assert [m["content"] for m in conversation["messages"][0::2]] == ["hello", "hello"]
    assert "temperature=0.25" in shown and "top_k=7" in shown and "unknown setting" in shown
    assert json.loads(again.read_text())["messages"] == conversation["messages"]
    assert "hello" in (tmp_path / "chat_history").read_text()


def test_ctrl_c_stops_training_and_keeps_the_conversation(chat_path, tmp_path) -> None:
    """Ctrl-C while /vector trains a built-in concept: no traceback, no vector, no bar left
    behind, the conversation as it was, and the chat goes on."""
    saved = tmp_path / "talk.json"
    keys = [
        "Say hi.\r",
        4.0,
        "/vector lazy 1\r",
        Shown("training 'lazy'"),
        1.0,  # inside training's first stage (about 20 s on 2 cores)
        CTRL_C,
        Shown("[stopped]"),
        "/vectors\r",
        f"/save {saved}\r",
        "/bye\r",
    ]
    shown = at_terminal(chat_path, keys, tmp_path)
    assert "training 'lazy'" in shown and "[stopped]" in shown, shown[-2000:]
    assert "Traceback" not in shown and "Exception ignored" not in shown
    after = shown[shown.index("/vectors") :]
    assert "vectors: none" in after and "━" not in after  # the bar went with its step
    conversation = json.loads(saved.read_text())
    assert conversation["vectors"] == {} and len(conversation["messages"]) == 2
    assert conversation["model_file"] == str(chat_path)  # the --model to go on with it
    assert not list((tmp_path / "vectors").rglob("lazy*.gguf"))


def piped_chat(model: Path, script: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edge_steer", "chat", "--model", str(model), "-n", "4"]
    return subprocess.run(command, input=script, capture_output=True, text=True, timeout=120)


def test_load_names_the_model_a_chat_was_saved_with(tiny_dense_path, tmp_path) -> None:
    saved = tmp_path / "talk.json"
    talk = {"model": "Other 7B", "model_file": "/models/other.gguf", "messages": []}
    saved.write_text(json.dumps(talk))
    result = piped_chat(tiny_dense_path, f"/load {saved}\n")
    assert result.returncode == 0, result.stderr
    assert "saved with Other 7B (/models/other.gguf); it goes on with" in result.stderr


def test_help_lists_every_command_and_a_script_stops_at_its_first_failure(tiny_dense_path):
    """Piped in, the chat is a script: a failed command ends it with one line and exit 2,
    as `python < script` does, since its next lines would run under a steering or history
    it did not ask for."""
    result = piped_chat(tiny_dense_path, "/help\n/set warmth 1\nhello\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for command in ("/vector", "/vectors", "/system", "/set", "/clear", "/save", "/load"):
        assert command in result.stderr
    for word in ("/bye", "/quit", "/exit", "Ctrl-D"):
        assert word in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: unknown setting 'warmth'")
    assert not result.stdout.strip()  # no reply to the line after it
    unknown = piped_chat(tiny_dense_path, "/vectros\n")
    assert unknown.returncode == 2 and "unknown command /vectros" in unknown.stderr


def test_bad_commands_are_one_line_each_and_change_nothing(tiny_dense, tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": 1}]}')
    deep, huge, nul, nan, text_strength = (tmp_path / f"{n}.json" for n in range(5))
    deep.write_text("[" * 100_000)
    message = {"role": "user", "content": "x" + " " * 200_000 + "x"}
    huge.write_text(json.dumps({"messages": [message]}))
    nul.write_text(json.dumps({"messages": [{"role": "user", "content": "a\0b"}]}))
    nan.write_text('{"messages": [], "vectors": {"x": NaN}}')
    text_strength.write_text('{"messages": [], "vectors": {"x": "1"}}')
    cases = [
        ("/set temperature 9", "temperature 9.0 is out of range"),
        ("/set warmth 1", "unknown setting"),
        ("/set seed lots", "seed"),
        (f"/load {bad}", "bad message"),
        (f"/load {tmp_path / 'missing.json'}", "no file"),
        (f"/save {tmp_path}/no/such/folder/\0x", "cannot save"),
        ("/vector lazy 1 2", "usage: /vector NAME [STRENGTH]"),
        ("/vector lazy:1 2", "usage: /vector NAME [STRENGTH]"),
        ("/vector lazy 1_0", "bad vector spec 'lazy:1_0'"),
        ("/clear please", "/clear takes nothing after it"),
        ("/system be\0nice", "the system prompt holds a NUL character"),
        ("/system " + "word " * 300, "tokens, more than half the context (256)"),
        ("/set n 1_0", "max_tokens takes a whole number, not '1_0'"),
        ("/set top_k " + "1" * 5000, "top_k takes a whole number, not '111"),
        (f"/save {tmp_path}", "is a folder: pass the path of a file to write"),
        ("/save /dev/null", "/dev/null is not a regular file"),  # was replaced, as root
        ("/load /dev/zero", "/dev/zero is not a regular file"),  # was read until killed
        (f"/load {tmp_path}", "is a folder"),
        (f"/load {deep}", "RecursionError"),  # was a traceback
        (f"/load {huge}", "the message is at least"),  # was: failed, and wiped the session
        (f"/load {nul}", "NUL character"),
        (f"/load {nan}", "strength nan of 'x': use a finite number"),
        (f"/load {text_strength}", "strength '1' of 'x': use a number"),
    ]
    with Context(tiny_dense, n_ctx=256) as ctx:
        session = ChatSession(ctx, steering.build(tiny_dense, [], None), SamplerSettings())
        "".join(session.reply("hello"))
        before = session.saved()
        for line, words in cases:
            with pytest.raises(EdgeSteerError, match=re.escape(words)):
                repl._command(session, line)
            assert session.saved() == before, line


def test_load_brings_back_the_vectors_of_a_saved_conversation(tiny_dense_path, tmp_path):
    vector = vectors.ControlVector({2: vectors.np.ones(64, vectors.np.float32)})
    path = vectors.write(vector, tmp_path / "v.gguf")
    saved = tmp_path / "talk.json"
    first = piped_chat(tiny_dense_path, f"/vector {path} 0.5\nhello\n/save {saved}\n")
    assert first.returncode == 0, first.stderr
    assert json.loads(saved.read_text())["vectors"] == {str(path): 0.5}
    second = piped_chat(tiny_dense_path, f"/load {saved}\n/vectors\n")
    assert f"{path}:+0.5" in second.stderr.split("loaded 2 messages")[1], second.stderr
    assert "no measured range: `edge-steer eval` finds one" in second.stderr  # was nothing


@pytest.mark.parametrize(
    ("script", "words"),
    [
        ('"""\nhello\nworld\n', 'the input ended inside a message continued with """'),
        ("hello \\\n", "the input ended inside a message continued with \\"),
        ("/bye now\n", "/bye takes nothing after it"),
        (" /vectros\n", "unknown command /vectros"),  # a leading space: still a command
    ],
)
def test_a_script_that_ends_mid_message_or_misspells_fails(tiny_dense_path, script, words):
    """Was: the open message was dropped with exit 0; `/bye now` an unknown command."""
    result = piped_chat(tiny_dense_path, script)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not result.stdout.strip()


def test_a_block_in_triple_quotes_is_a_message_even_when_it_starts_with_a_slash(
    tiny_dense_path,
):
    """Was: a pasted `/vector happy 1` (or `/bye`) inside \"\"\" ran as a command."""
    result = piped_chat(tiny_dense_path, '"""\n/bye\n"""\n/vectors\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "vectors: none" in result.stderr  # replied, then went on


def test_an_empty_one_shot_message_is_refused(tiny_dense_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "chat", "--model", str(tiny_dense_path), "-p", " "],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "-p is empty" in result.stderr, result.stderr


def test_a_full_context_keeps_a_conversation_that_starts_with_a_user_message(tiny_dense):
    """Was: re-evaluating a conversation that ends in a reply (/vector, /load) could keep
    only that reply, which templates such as Mistral's refuse."""
    with Context(tiny_dense, n_ctx=128) as ctx:
        session = ChatSession(ctx, steering.build(tiny_dense, [], None), SamplerSettings())
        session.max_tokens = 16
        for turn in range(12):
            words = 12 if turn == 11 else 4  # the last turn alone takes over half the context
            session.messages += [
                {"role": "user", "content": f"question {turn} " + "word " * words},
                {"role": "assistant", "content": f"answer {turn} " + "word " * words},
            ]
        tokens, _ = session.prompt()
        kept = session.conversation()
        assert session.forgotten == 22 and [m["role"] for m in kept] == ["user", "assistant"]
        assert 64 < len(tokens) < 128


def test_a_tab_a_random_seed_and_a_quoted_file_read_as_typed(tiny_dense_path, tmp_path):
    """Was: "unknown command /vector<TAB>...", `seed=None` after /set seed random, and a
    file named with its quotes."""
    path = vectors.write(vectors.ControlVector({2: np.ones(64, np.float32)}), tmp_path / "v.gguf")
    saved = tmp_path / "my chat.json"
    script = f'/set seed random\n/set\n/vector\t{path} 0.5\n/vectors\n/save "{saved}"\n'
    result = piped_chat(tiny_dense_path, script + f"/load '{saved}'\n")
    assert result.returncode == 0, result.stderr
    assert "seed=random" in result.stderr and f"{path}:+0.5 · layers all" in result.stderr
    assert json.loads(saved.read_text())["vectors"] == {str(path): 0.5}
