"""The Python API (`edge_steer.load`) used wrongly, as scripts, notebooks and servers do: a
closed object, two calls at once, values of the wrong kind. Each is a clear exception, never
a crash of the interpreter and never text corrupted by another call."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from edge_steer import runtime, steering
from edge_steer.errors import BadInput, NotFound

PROMPT = "The best thing about mornings is"

# each case in a child process: a regression would kill it (llama.cpp aborts or segfaults on
# freed memory), and must not take the test run with it
CASES = {
    "generate after close": "s.close(); s.generate('hi', max_tokens=4)",
    "set_vector after close": "s.close(); s.set_vector('x', 1)",
    "an open stream, then close": "g = s.stream(P, max_tokens=9); next(g); s.close(); list(g)",
    "the context closed": "s.context.close(); s.generate('hi', max_tokens=4)",
    "the model closed": "s.model.close(); s.generate('hi', max_tokens=4)",
    "close from another thread while a stream sits unread": (  # was: close never returned
        "g = s.stream(P, max_tokens=9); next(g); t = threading.Thread(target=s.close); "
        "t.start(); t.join(30); assert not t.is_alive(); list(g)"
    ),
    "close from another thread": (
        "t = threading.Thread(target=stream_slowly); t.start(); started.wait(); s.close(); "
        "t.join(); raise errors[0]"
    ),
}
CHILD = """
import sys, threading, time
from edge_steer import runtime
from edge_steer.errors import BadInput
P, errors, started = {prompt!r}, [], threading.Event()
def stream_slowly():
    try:
        for _ in s.stream(P, max_tokens=400):
            started.set()
            time.sleep(0.01)
    except BadInput as exc:
        errors.append(exc)
s = runtime.load({model!r}, ctx=512, threads=1)
try:
    {case}
except BadInput as exc:
    print("BadInput:", exc)
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_closed_object_raises_instead_of_crashing(case, tiny_dense_path) -> None:
    code = CHILD.format(prompt=PROMPT, model=str(tiny_dense_path), case=CASES[case])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("BadInput:") and "closed" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def steered(tiny_dense_path):
    with runtime.load(tiny_dense_path, ctx=512, threads=1) as loaded:
        yield loaded


def test_calls_take_turns_and_an_open_stream_is_not_overwritten(steered) -> None:
    """A second call from the thread whose stream is open is refused (it would overwrite
    the stream's KV cache: the stream went on as `<strong><em>...`); calls from several
    threads wait their turn and each gets its own text."""
    alone = steered.generate(PROMPT, max_tokens=12, temperature=0)
    stream = steered.stream(PROMPT, max_tokens=12, temperature=0)
    head = next(stream)
    for call in (
        lambda: steered.generate("Hello", max_tokens=4),
        lambda: steered.set_vector("x", 1),
    ):
        with pytest.raises(BadInput, match="a stream of this Steered is still open"):
            call()
    assert head + "".join(stream) == alone
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(steered.generate(PROMPT, max_tokens=12, temperature=0))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [alone] * 4


@pytest.mark.parametrize(
    ("prompt", "options", "words"),
    [
        (PROMPT, {"max_tokens": 0}, "max_tokens=0: use a whole number, 1 or more"),
        (PROMPT, {"max_tokens": "10"}, "max_tokens='10'"),
        (PROMPT, {"temperature": -1}, "temperature=-1 is out of range: use 0 to 2"),
        (PROMPT, {"temperature": float("nan")}, "temperature=nan is out of range"),
        (PROMPT, {"top_k": -5}, "top_k=-5 is out of range"),
        (PROMPT, {"top_k": 2.5}, "top_k=2.5: use a whole number"),
        (PROMPT, {"temperature": "hot"}, "temperature='hot': use a number"),
        (PROMPT, {"seed": "abc"}, "seed='abc': use a whole number"),
        (123, {}, "the prompt must be a str, not int"),
        (b"bytes", {}, "the prompt must be a str, not bytes"),
    ],
)
def test_generate_checks_its_arguments_as_the_cli_does(steered, prompt, options, words) -> None:
    """They ran (-1 and 0 gave '' silently; NaN sampled) or raised TypeError/AttributeError."""
    with pytest.raises(BadInput, match=words.replace("(", r"\(")):
        steered.generate(prompt, **options)


def test_functions_check_the_kinds_they_are_given(tiny_dense) -> None:
    """Was: AttributeError or TypeError from deep inside."""
    from edge_steer import vectors

    with pytest.raises(BadInput, match="model=None: use a Model from load_model"):
        runtime.open_context(None)  # type: ignore[arg-type]
    with pytest.raises(BadInput, match="steering='happy': use a Steering from steer"):
        runtime.open_context(tiny_dense, "happy")  # type: ignore[arg-type]
    with pytest.raises(BadInput, match=r"path=None: use the path of a \.gguf control vector"):
        vectors.read(None)  # type: ignore[arg-type]


def test_numpy_strengths_are_numbers(tiny_dense_path) -> None:
    """Was: np.float32(0.5) refused as no number (np.float64 passed, being a float)."""
    import numpy as np

    loaded = runtime.load(tiny_dense_path, ctx=512, threads=1)
    with pytest.raises(NotFound):  # checked as a number, then looked up
        loaded.set_vector("nosuch", np.float32(0.5))
    with pytest.raises(BadInput, match="strength nan of 'x'"):
        loaded.set_vector("x", np.float32("nan"))
    loaded.close()


def test_a_steering_for_another_model_is_refused(steered, demo_model) -> None:
    other = steering.build(demo_model, [], None)
    with pytest.raises(BadInput, match=r"this steering was built for .* build one for that model"):
        other.apply(steered.context)


def test_a_stream_closed_early_lets_the_next_call_start(steered) -> None:
    """Was: Generation had no close(); a stream left after `break` refused every call."""
    alone = steered.generate(PROMPT, max_tokens=12, temperature=0)
    stream = steered.stream(PROMPT, max_tokens=12, temperature=0)
    next(stream)
    stream.close()
    assert steered.generate(PROMPT, max_tokens=12, temperature=0) == alone


@pytest.mark.parametrize(
    ("name", "strength", "words"),
    [
        ("x", "0.5", "strength '0.5' of 'x': use a number"),
        ("x", True, "strength True of 'x': use a number"),
        ("x", None, "strength None of 'x'"),
        ("x", float("nan"), "strength nan of 'x': use a finite number"),
        (None, 1, "vector name None: use a str"),
        ("x", 10**400, "strength of 'x' is too strong"),  # was OverflowError
    ],
)
def test_set_vector_checks_its_arguments(steered, name, strength, words) -> None:
    """Was: '0.5' stored as a str (a TypeError later), nan 'too strong', None an AttributeError."""
    with pytest.raises(BadInput, match=re.escape(words)):
        steered.set_vector(name, strength)
    assert steered.steering.strengths() == {}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"ctx": "4096"}, "ctx='4096': use a whole number"),
        ({"ctx": 4096.5}, "ctx=4096.5: use a whole number"),
        ({"ctx": True}, "ctx=True: use a whole number"),
        ({"threads": "2"}, "threads='2': use a whole number"),
        ({"threads": True}, "threads=True: use a whole number"),
        ({"vectors": 123}, "vectors=123: use a str"),
        ({"vectors": ["x:1", 3]}, "vectors=['x:1', 3]: use a str"),
        ({"vectors": {"x": "1"}}, "strength '1' of 'x': use a number"),
        ({"vectors": {"happy,happy": 1.0}}, "vector name 'happy,happy': ','"),  # was 2.0
        ({"vectors": {"happy:2": 1.0}}, "vector name 'happy:2': ',' and ':' belong to specs"),
        ({"layers": 5}, "bad layer range 5"),
        ({"layers": "5-3"}, "layer range 5-3 runs backwards: use 3-5"),
        ({"rpc": 123}, "rpc=123: use a str such as 'host:50052'"),
    ],
)
def test_load_checks_its_arguments(tiny_dense_path, options, words) -> None:
    """Was: TypeError, AttributeError, or True read as one thread."""
    with pytest.raises(BadInput, match=re.escape(words)):
        runtime.load(tiny_dense_path, **{"ctx": 512, "threads": 1} | options)


def test_an_empty_model_name_is_refused_not_the_default() -> None:
    """Was: '' meant the default model, and a download of Mistral 7B began."""
    with pytest.raises(BadInput, match="model='': use a catalog name"):
        runtime.load("", offline=True)
