"""`edge-steer serve` against careless and hostile clients (issue 22): bounded work on the
event loop, a 4xx in OpenAI's shape for every client mistake, Host/Origin/Content-Type
checks, read timeouts, a clean shutdown, one log line per refused request. A real server
process on loopback with the demo model; raw sockets where a client misbehaves below HTTP."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_steer.chat import until_stop  # noqa: E402
from edge_steer.server import guard  # noqa: E402
from tools.server_process import ServerProcess, health, server_process  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stored(demo_model) -> Iterator[list[str]]:
    """Two stored vectors for the demo model, so that steering can name more than one."""
    from edge_steer import store, vectors

    names, rng = ["w1", "w2"], np.random.default_rng(3)
    paths = []
    for name in names:
        directions = {6: rng.standard_normal(demo_model.n_embd).astype(np.float32)}
        vector = vectors.ControlVector(directions, metadata={"concept": name})
        paths.append(
            vectors.write(vector, store.model_vectors_dir(demo_model.path) / f"{name}.gguf")
        )
    yield names
    for path in paths:
        path.unlink()


@pytest.fixture(scope="module")
def filed(demo_path, stored, tmp_path_factory) -> str:
    """A preset's vector given as a file path with capitals (a preset may name files)."""
    from edge_steer import store

    path = tmp_path_factory.mktemp("Vecs") / "W2.gguf"
    shutil.copyfile(store.model_vectors_dir(demo_path) / "w2.gguf", path)
    return str(path)


@pytest.fixture(scope="module")
def server(demo_path, stored, filed) -> Iterator[ServerProcess]:
    args = ["--model", "demo", "--parallel", "2", "--preset", "strong=w1:6"]
    with server_process([*args, "--preset", f"filed={filed}:1"]) as running:
        yield running


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _request(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | object = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict | str]:
    """(status, JSON body or text) of one request; POSTs are JSON unless `headers` say."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    given = JSON if method == "POST" else {}
    connection = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=timeout)
    try:
        connection.request(method, path, data, given | (headers or {}))
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    if response.getheader("content-type", "").startswith("application/json"):
        return response.status, json.loads(text)
    return response.status, text


def _assert_error(status: int, body: dict | str, expected: int, code: str | None = None) -> None:
    """An answer in OpenAI's error shape with the expected status (and code)."""
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def _raw(server: ServerProcess, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent `head` (request line and headers, CRLF-joined) and `body`."""
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the response on `sock` (read until the server closes)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            if length and len(rest) >= int(length.group(1)):
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


# -- 1: no unbounded work on the event loop ----------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    head = "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    declared = _raw(server, head + f"Content-Length: {20 * 1024 * 1024}\n\n", b'{"model"')
    _assert_error(*_answer(declared), 413, "request_too_large")
    chunked = _raw(server, head + "Transfer-Encoding: chunked\n\n")
    chunk = b"x" * (1024 * 1024)
    for _ in range(20):  # the server reads no more than 4 MiB of it
        chunked.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    chunked.sendall(b"0\r\n\r\n")
    _assert_error(*_answer(chunked), 413, "request_too_large")
    assert health(server.url)[0] == 200


def test_health_answers_while_a_big_prompt_is_checked(server):
    prompt = "word " * (guard.MAX_BODY // 5 - 100)  # just under the limit: ~800k tokens
    body = {"model": "demo", "prompt": prompt, "max_tokens": 1}
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(_request, server, "POST", "/v1/completions", body)
        waits = []
        while not big.done():
            start = time.monotonic()
            assert health(server.url)[0] == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.05)
        _assert_error(*big.result(), 400, "context_length_exceeded")
    assert waits and max(waits) < 2.0, waits


# -- 2: stop strings ------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["x" * 257, ["a", "x" * 300_000]])
def test_long_stop_strings_are_400_at_once(server, stop):
    start = time.monotonic()
    status, body = _request(
        server, "POST", "/v1/completions", {"model": "demo", "prompt": "Hi", "stop": stop}
    )
    _assert_error(status, body, 400)
    assert body["error"]["param"] == "stop" and time.monotonic() - start < 5


def test_stop_matching_is_linear():
    stops = tuple("x" * 255 + end for end in "abcd")  # each almost matches all the time
    pieces = iter(["xx"] * 50_000 + ["xb", "never sent"])
    start = time.monotonic()
    passed = list(until_stop(pieces, stops))
    assert time.monotonic() - start < 3  # quadratic: minutes
    assert "".join(passed) == "x" * (100_002 - 256)


# -- 3: every client mistake is a 4xx in OpenAI's shape ---------------------------------------

BIG = "1" + "0" * 400  # an integer no float holds
MISTAKES = [
    ('{"model": "demo", "prompt": "a\\ud800b"}', "prompt"),
    ('{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
    ('{"model": "demo", "prompt": "Hi", "stop": ["\\udfff"]}', "stop"),
    ('{"model": "de\\ud800mo", "prompt": "Hi"}', "model"),
    ('{"model": "demo", "prompt": "Hi", "steering": {"\\ud800": 1}}', "steering"),
    ('{"model": "demo", "prompt": "Hi", "x": ' + "[" * 1000 + "]" * 1000 + "}", None),
    ('{"model": "demo", "prompt": "Hi", "x": ' + '{"a":' * 1000 + "1" + "}" * 1001, None),
    ('{"model": "demo", "prompt": "Hi", "temperature": ' + BIG + "}", "temperature"),
    ('{"model": "demo", "prompt": "Hi", "top_k": ' + BIG + "}", "top_k"),
    ('{"model": "demo", "prompt": "Hi", "steering": {"happy": ' + BIG + "}}", "steering"),
    ('{"model": "demo", "prompt": "Hi", "max_tokens": ' + "9" * 5001 + "}", None),
    ('{"model": "demo", "prompt": "Hi", "steering": {"' + "a" * 300 + '": 1}}', "steering"),
    ('{"model": "demo+' + "a" * 300 + ':1", "prompt": "Hi"}', "model"),
    ('{"model": "demo", "messages": [{"role": "user", "content": [{"text": 1}]}]}', None),
    (
        '{"model": "demo", "messages": [{"role": "user", "content": [PART]}]}'.replace(
            "PART", '{"type": "text", "text": 1}'
        ),
        None,
    ),
    ("\xff\xfe{", None),
]


@pytest.mark.parametrize(("raw", "param"), MISTAKES)
def test_client_mistakes_are_4xx_json(server, raw, param):
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, body = _request(server, "POST", path, raw.encode("latin-1"))
        assert 400 <= status < 500, (status, body)
        _assert_error(status, body, status)
        if param and path == "/v1/completions":
            assert body["error"]["param"] == param


def test_max_tokens_beyond_the_context_is_capped(server):
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 10**300, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body), JSON)
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # frees the lane


# -- 5: Host, Origin, Content-Type; /health under --api-key ------------------------------


def test_host_must_be_this_server(server):
    port = _port(server)
    for host in (
        "127.0.0.1",
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "localhost",
        f"[::1]:{port}",
    ):
        assert _request(server, "GET", "/health", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "localhost:1", "", "user@localhost"):
        status, body = _request(server, "GET", "/v1/models", headers={"Host": host})
        _assert_error(status, body, 403, "forbidden_host")
    no_host = _raw(server, "GET /health HTTP/1.0\n\n")  # HTTP/1.0 may leave Host out
    _assert_error(*_answer(no_host), 403, "forbidden_host")


def test_origin_must_be_this_server(server):
    port = _port(server)
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 1}
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
        assert _request(server, "POST", "/v1/completions", body, {"Origin": origin})[0] == 200
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", "file://"):
        status, reply = _request(server, "POST", "/v1/completions", body, {"Origin": origin})
        _assert_error(status, reply, 403, "forbidden_origin")


def test_posts_must_be_json(server):
    body = json.dumps({"model": "demo", "prompt": "Hi", "max_tokens": 1}).encode()
    for media_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "",
    ):
        status, reply = _request(
            server, "POST", "/v1/completions", body, {"Content-Type": media_type}
        )
        _assert_error(status, reply, 415, "unsupported_media_type")
    utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert _request(server, "POST", "/v1/completions", body, utf8)[0] == 200


def test_allow_host_and_health_under_api_key(demo_path):
    with server_process(
        ["--model", "demo", "--allow-host", "Proxy.Example", "--api-key", "k"]
    ) as other:
        status, body = _request(other, "GET", "/health", headers={"Host": "proxy.example:443"})
        assert status == 200 and body == {"status": "ok"}  # nothing more without the key
        status, body = _request(other, "GET", "/health", headers={"Authorization": "Bearer k"})
        assert status == 200 and body["lanes"] == 1
        status, body = _request(other, "GET", "/health", headers={"Host": "evil.example"})
        _assert_error(status, body, 403, "forbidden_host")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", ""], "--host is empty (that listens on every interface)"),  # it did
        (["--api-key", ""], "--api-key must be printable ASCII"),  # switched checking off
        (["--api-key", " k "], "--api-key must be printable ASCII"),  # no client could match
        (["--allow-host", "http://proxy.example"], "is not a host name"),
        (["--allow-host", "proxy.example:80"], "is not a host name"),
        (["--preset", "a=w1:11"], "preset 'a': steering w1:11 is too strong"),  # every use 400
        (["--preset", "x=w1:1", "--preset", "x=w1:2"], "preset 'x' is given twice"),
        (["--preset", "demo=w1:1"], "preset 'demo' has the model's own name"),
        (["--preset", "a b=w1:1"], "bad preset 'a b=w1:1'"),
        (["--parallel", "0"], "--parallel 0 is out of range: use 1 to"),
        (["--queue", "-1"], "--queue -1 is out of range"),
        # was accepted, and listed as steering by /v1/models
        (["--preset", "a=w1:1", "--layers", "7-9"], "preset 'a': layers 7-9 hold none of w1's"),
    ],
)
def test_startup_refuses_what_would_open_or_lock_the_server(demo_path, stored, args, words):
    from test_cli import assert_clean_error

    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "serve", "-m", "demo", "--port", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_error(result, words)


def test_a_vector_outside_the_servers_layers_is_refused(demo_path, stored):
    """Was: a 200 whose reply was the unsteered one, as if steered."""
    with server_process(["--model", "demo", "--layers", "7-9"]) as other:
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 1, "steering": {"w1": 1}}
        status, reply = _request(other, "POST", "/v1/completions", body)
        _assert_error(status, reply, 400, "vector_outside_layers")
        assert "steers blocks 6, none of them within this server's --layers 7-9" in str(reply)
        off = body | {"steering": {"w1": 0}}
        assert _request(other, "POST", "/v1/completions", off)[0] == 200


def test_a_concept_trained_on_first_use_outside_the_layers_is_refused(tiny_dense_path, tmp_path):
    """--allow-train: a concept trained for a request is checked against --layers once its
    blocks are known (was: a 200 with the unsteered reply)."""
    import os

    env = {**os.environ, "EDGE_STEER_HOME": str(tmp_path)}  # nothing trained yet
    args = ["--model", str(tiny_dense_path), "--allow-train", "--layers", "5-5"]
    with server_process(args, env=env) as other:
        body = {"model": tiny_dense_path.stem, "prompt": "Hi", "max_tokens": 1}
        body["steering"] = {"happy": 1}
        status, reply = _request(other, "POST", "/v1/completions", body)
        _assert_error(status, reply, 400, "vector_outside_layers")
        assert "steers blocks 1-4, none of them within this server's --layers 5-5" in str(reply)


def test_which_hosts_are_checked():
    assert guard.allowed_hosts("127.0.0.1", []) == guard.LOOPBACK_NAMES
    assert guard.allowed_hosts("127.0.0.1", ["*"]) is None
    assert guard.allowed_hosts("0.0.0.0", []) is None  # documented: no check off loopback
    assert guard.allowed_hosts("0.0.0.0", ["[FD00::1]"]) == guard.LOOPBACK_NAMES | {"fd00::1"}


# -- 6: timeouts, aborted uploads, vector names, one cap on steering ------------------------


def test_slow_headers_and_slow_bodies_time_out(server):
    def slow_headers() -> float:
        """Seconds until the server closes a connection that sends a header a second."""
        start = time.monotonic()
        with _raw(server, "GET /health HTTP/1.1\n") as sock:
            sock.settimeout(1)
            while time.monotonic() - start < guard.HEADER_SECONDS + 10:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:  # a reset, a broken pipe
                    break
        return time.monotonic() - start

    def slow_body() -> tuple[float, tuple[int, dict]]:
        start = time.monotonic()
        head = "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
        sock = _raw(server, head + "Content-Length: 100\n\n", b"{")
        answer = _answer(sock)
        return time.monotonic() - start, answer

    with ThreadPoolExecutor(2) as pool:
        headers, body = pool.submit(slow_headers), pool.submit(slow_body)
        assert guard.HEADER_SECONDS - 1 < headers.result() < guard.HEADER_SECONDS + 5
        seconds, answer = body.result()
    assert guard.BODY_SECONDS - 1 < seconds < guard.BODY_SECONDS + 5
    _assert_error(*answer, 408, "request_timeout")


def test_an_aborted_upload_leaves_no_traceback(server):
    before = len(server.output())
    head = "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    with _raw(server, head + "Content-Length: 1000\n\n", b'{"model": "demo"'):
        time.sleep(0.5)
    time.sleep(1)
    assert health(server.url)[0] == 200
    assert "Traceback" not in server.output()[before:]


def test_a_file_in_the_working_directory_is_no_vector(server):
    assert Path("pyproject.toml").is_file()  # the server runs here too
    answers = []
    for name in ("pyproject.toml", "nosuchfile", "../pyproject.toml", "a" * 300):
        body = {"model": "demo", "prompt": "Hi", "steering": {name: 1}}
        status, reply = _request(server, "POST", "/v1/completions", body)
        _assert_error(status, reply, 400, "unknown_vector")
        answers.append(re.sub(r"'[^']*'", "NAME", reply["error"]["message"]))
    assert len(set(answers)) == 1, answers


def test_one_cap_on_all_steering_together(server, stored):
    w1, w2 = stored
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 1}
    assert (
        _request(server, "POST", "/v1/completions", body | {"steering": {w1: 5, w2: -5}})[0] == 200
    )
    for change in (
        {"steering": {w1: 6, w2: -6}},
        {"model": f"demo+{w1}:6", "steering": {w2: 6}},
        {"model": f"strong+{w2}:5"},  # preset strong=w1:6
    ):
        status, reply = _request(server, "POST", "/v1/completions", body | change)
        _assert_error(status, reply, 400, "invalid_steering")


# -- 3 again: generated garbage over every field of both endpoints -------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put into a generated body as it is (what json.dumps cannot write)."""

    text: str


SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.text(max_size=12) | st.tuples(st.text(max_size=4), SURROGATES).map("".join)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3000)
    | st.integers(-(10**400), 10**400)
    | st.floats()
    | TEXT
    | st.sampled_from(
        [Raw("9" * 5001), Raw("[" * 2000 + "]" * 2000), Raw('{"a":' * 40 + "1" + "}" * 40)]
    )
)
VALUES = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=10,
)
NAMES = st.sampled_from(["happy", "w1", "nope", "pyproject.toml", "../x", "a" * 300, ""]) | TEXT
FIELD_VALUES = {
    "model": st.sampled_from(
        ["demo", "strong", "demo+happy:1", "demo+w1:2,w2:-1", "demo+x:", "gpt-4"]
    ),
    "prompt": st.sampled_from(["Hi", "", " "]) | st.lists(st.integers(-5, 300_000), max_size=4),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])
                | VALUES
            },
            optional={"content": TEXT | VALUES},
        ),
        max_size=3,
    ),
    "steering": st.dictionaries(NAMES, VALUES | st.floats(-12, 12), max_size=3) | TEXT,
    "stop": st.lists(TEXT, max_size=6) | TEXT,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": VALUES}),
}
FIELDS = [
    *FIELD_VALUES,
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stream",
    "cache_prompt",
    "n",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "functions",
]
BASES = {
    "/v1/completions": {"model": "demo", "prompt": "Hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]},
}


@st.composite
def garbage(draw) -> tuple[str, bytes]:
    """(endpoint, body): an almost valid body with garbage in some fields, or pure garbage."""
    path = draw(st.sampled_from(sorted(BASES)))
    shape = draw(st.sampled_from(["fields", "fields", "fields", "value", "bytes"]))
    if shape == "bytes":
        return path, draw(st.binary(max_size=40))
    if shape == "value":
        return path, _dump(draw(VALUES))
    body = dict(BASES[path])
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[name] = draw(FIELD_VALUES.get(name, VALUES) | VALUES)
    body |= draw(st.dictionaries(TEXT, VALUES, max_size=2))
    return path, _dump(_quick(body))


def _quick(body: dict) -> dict:
    """At most 2 tokens for whatever body may be valid, so that each example is quick."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if (value is None and name == "max_tokens") or (isinstance(value, int) and value > 2):
            body[name] = 2
    return body


def _dump(value: object) -> bytes:
    raws: list[str] = []

    def mark(item: object) -> object:
        if isinstance(item, Raw):
            raws.append(item.text)
            return f"\0raw{len(raws) - 1}\0"
        if isinstance(item, dict):
            return {key: mark(part) for key, part in item.items()}
        if isinstance(item, list):
            return [mark(part) for part in item]
        return item

    text = json.dumps(mark(value))
    return re.sub(r'"\\u0000raw(\d+)\\u0000"', lambda m: raws[int(m.group(1))], text).encode()


def test_generated_garbage_never_breaks_the_server(server):
    before = len(server.output())
    refused = []

    @settings(
        derandomize=True,
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(garbage())
    def one(request: tuple[str, bytes]) -> None:
        path, body = request
        status, reply = _request(server, "POST", path, body)
        assert status < 500, (status, reply, body[:300])
        if status >= 400:
            _assert_error(status, reply, status)
            refused.append(status)
        elif isinstance(reply, str):  # a stream
            assert reply.rstrip().endswith("data: [DONE]"), reply[-300:]
        else:
            assert reply["choices"], reply

    one()
    assert refused  # the garbage was refused, mostly
    assert health(server.url)[0] == 200
    body = {"model": "demo", "prompt": "The best thing about mornings is", "max_tokens": 4}
    status, reply = _request(server, "POST", "/v1/completions", body | {"temperature": 0})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    log = server.output()[before:]
    assert "Traceback" not in log
    answered = [line for line in log.splitlines() if " 200 " in line and " · steering " in line]
    assert len(log.splitlines()) - len(answered) <= len(refused), log[-2000:]
    # one line per answer too, as llama-server logs them: model, steering, tokens, time
    assert "POST /v1/completions 200 demo · steering none · " in answered[-1], answered[-1]
    assert "+ 4 completion tokens" in answered[-1] and answered[-1].endswith(" s · length")


# -- 4: shutdown -----------------------------------------------------------------------------


def test_shutdown_answers_every_open_request(demo_path):
    with server_process(["--model", "demo", "--parallel", "2", "--queue", "4"]) as other:
        body = {
            "model": "demo",
            "prompt": "Once upon a time",
            "max_tokens": 3000,
            "temperature": 0.8,
        }
        stream = http.client.HTTPConnection("127.0.0.1", _port(other), timeout=30)
        stream.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), JSON)
        streamed = stream.getresponse()
        first = streamed.readline()
        assert first.startswith(b"data: ")
        with ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(_request, other, "POST", "/v1/completions", body) for _ in range(2)
            ]
            expected = {"status": "ok", "lanes": 2, "busy": 2, "queued": 1, "training": 0}
            expected |= {"ctx_per_lane": 4096, "batch": 512, "batch_invariant": True}
            deadline = time.monotonic() + 10
            while health(other.url)[1] != expected and time.monotonic() < deadline:
                time.sleep(0.1)
            assert health(other.url)[1] == expected
            start = time.monotonic()
            other.process.send_signal(signal.SIGTERM)
            rest = streamed.read().decode()
            answers = [future.result() for future in waiting]
        other.process.wait(timeout=15)
        seconds = time.monotonic() - start
        log = other.output()
    events = [line.removeprefix("data: ") for line in rest.splitlines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and error["message"] == "the server is shutting down"
    for status, reply in answers:
        _assert_error(status, reply, 503, "shutting_down")
    assert seconds < 10
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(demo_path):
    """Was: uvicorn skipped the app's shutdown on a forced quit, asyncio.run cancelled it, and
    the log ended in an 'ERROR: Traceback ... CancelledError'."""
    with server_process(["--model", "demo"]) as other:
        other.process.send_signal(signal.SIGINT)
        time.sleep(0.01)
        other.process.send_signal(signal.SIGINT)
        assert other.process.wait(timeout=15) in (0, 130)  # 130 when the quit was forced
        log = other.output()
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_serves_on_ipv6_loopback(demo_path):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    with server_process(["--model", "demo"], host="::1") as other:
        assert health(other.url)[1]["status"] == "ok"
        log = other.output()
    assert f"listening on {other.url} " in log  # http://[::1]:PORT, a URL a browser takes


# -- a hostile client's sweep: what it found ------------------------------------------------


def test_text_far_past_the_context_is_refused_before_tokenizing(server):
    """Was: 3.9 MB of spaces took llama.cpp's tokenizer 20 s (quadratic), a client's leaving
    stopped nothing, and eight such requests held the worker threads for minutes."""
    start = time.monotonic()
    for body in (
        {"model": "demo", "prompt": " " * 3_900_000, "max_tokens": 1},
        {"model": "demo", "messages": [{"role": "user", "content": " " * 3_900_000}]},
    ):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        status, reply = _request(server, "POST", path, body)
        _assert_error(status, reply, 400, "context_length_exceeded")
        assert "the prompt is at least" in reply["error"]["message"]
    assert time.monotonic() - start < 5


def _steering_of(server: ServerProcess, change: dict) -> dict | str:
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 1} | change
    status, reply = _request(server, "POST", "/v1/completions", body)
    assert status == 200, reply
    return reply["steering"]


def test_names_ignore_case_when_a_request_overrides_a_preset(server, stored):
    w1, _ = stored
    assert _steering_of(server, {"model": "strong"}) == {w1: 6.0}
    assert _steering_of(server, {"model": "strong", "steering": {w1.upper(): 0}}) == {}
    assert _steering_of(server, {"model": "strong", "steering": {w1.upper(): -1}}) == {w1: -1.0}
    assert _steering_of(server, {"steering": f"{w1}:1,{w1.upper()}:0.5"}) == {w1: 1.5}


def test_a_request_switches_off_a_preset_file_by_its_path(server, filed):
    # a path is matched as written (files may differ by case alone): it was lower-cased
    assert _steering_of(server, {"model": "filed"}) == {filed: 1.0}
    assert _steering_of(server, {"model": "filed", "steering": {filed: 0}}) == {}


def test_a_zero_must_name_a_vector_too(server, stored, filed):
    """Was a 200 that still steered: `{"w1x": 0}` (a typo switching a preset off) and
    names no store holds, paths included, passed unchecked at strength 0."""
    w1, w2 = stored
    for off in ({"w1x": 0}, {"../../etc/passwd": 0}, {"nosuch": 0}):
        body = {"model": "strong", "prompt": "Hi", "max_tokens": 1, "steering": off}
        status, reply = _request(server, "POST", "/v1/completions", body)
        _assert_error(status, reply, 400, "unknown_vector")
    assert _steering_of(server, {"model": "strong", "steering": {w2: 0}}) == {w1: 6.0}
    assert _steering_of(server, {"model": f"filed+{filed}:0"}) == {}


BAD_FIELDS = [
    ({"seed": 4294967295}, "seed"),  # llama.cpp's "random"
    ({"seed": 2**32}, "seed"),  # was seed 0
    ({"n": True}, "n"),
    ({"top_logprobs": 5}, "top_logprobs"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options"),
    ({"model": "demo+w1:1_0"}, "model"),  # was strength 10
    ({"model": "demo+w1:\u0661"}, "model"),  # an Arabic-Indic one: was 1.0
]


@pytest.mark.parametrize(("change", "param"), BAD_FIELDS)
def test_fields_of_the_wrong_kind_are_refused(server, stored, change, param):
    body = json.dumps({"model": "demo", "prompt": "Hi", "max_tokens": 1} | change)
    status, reply = _request(server, "POST", "/v1/completions", body.encode())
    _assert_error(status, reply, 400)
    assert reply["error"]["param"] == param
    assert "PATH" not in reply["error"]["message"]  # the server takes no paths


def test_chat_content_that_a_template_would_cut_is_refused(server):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Hi\u0000 and a long question the template would cut"},
    ]
    body = {"model": "demo", "messages": messages, "max_tokens": 1}
    status, reply = _request(server, "POST", "/v1/chat/completions", body)
    _assert_error(status, reply, 400)
    assert reply["error"]["param"] == "messages[2]" and "NUL" in reply["error"]["message"]
    part = {"role": "user", "content": [{"type": "text"}]}  # was read as ""
    status, reply = _request(server, "POST", "/v1/chat/completions", body | {"messages": [part]})
    _assert_error(status, reply, 400)


def test_what_the_server_does_not_speak_is_named(server, stored):
    gzipped = {"Content-Encoding": "gzip"}
    status, reply = _request(server, "POST", "/v1/completions", b"\x1f\x8b", gzipped)
    _assert_error(status, reply, 415, "unsupported_media_type")
    assert "Content-Encoding: gzip" in reply["error"]["message"]
    paths = ["/v1/embeddings", "/v1/chat/completions/"]  # was a 307 nobody logged
    for path in [*paths, "/v1/models/", "/v1/models/demo/"]:  # were "unknown model ''"
        get = path.startswith("/v1/models")  # a retrieve of a model
        body = None if get else {"model": "demo", "input": "Hi"}
        status, reply = _request(server, "GET" if get else "POST", path, body)
        _assert_error(status, reply, 404, "http_404")
        assert "/v1/chat/completions, /v1/completions" in reply["error"]["message"]
    status, reply = _request(server, "POST", "/v1/completions", {"model": "+w1:1", "prompt": "a"})
    _assert_error(status, reply, 404, "model_not_found")
    assert "no model before '+'" in reply["error"]["message"]
    status, entry = _request(server, "GET", f"/v1/models/demo+{stored[0]}:0.5")
    assert status == 200 and entry["steering"] == {stored[0]: 0.5}, entry
    _assert_error(*_request(server, "GET", "/v1/models/demo+nope:1"), 400, "unknown_vector")


WORDED = [  # each answer names what is wrong (was a message about something else)
    ({"prompt": [99999999]}, "token id 99999999 is not in this model's vocabulary"),
    ({"prompt": [-1]}, "token id -1 is not in this model's vocabulary"),
    ({"prompt": [1] * 4096}, "needs room for at least one more to generate"),
    ({"tool_choice": "required"}, "`tool_choice` is not supported"),
    ({"modalities": ["text", "audio"]}, "`modalities` is not supported"),
    ({"audio": {"voice": "x"}}, "`audio` is not supported"),
]


@pytest.mark.parametrize(("change", "words"), WORDED)
def test_errors_name_the_problem(server, change, words):
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 1} | change
    status, reply = _request(server, "POST", "/v1/completions", body)
    _assert_error(status, reply, 400)
    assert words in reply["error"]["message"], reply
    assistant = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    chat = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}, assistant]}
    status, reply = _request(server, "POST", "/v1/chat/completions", chat)
    _assert_error(status, reply, 400)
    assert "tool calls are not supported" in reply["error"]["message"]


def test_a_damaged_vector_is_named_not_located(server, stored, demo_path):
    from edge_steer import store

    broken = store.model_vectors_dir(demo_path) / "broken.gguf"
    broken.write_bytes((store.model_vectors_dir(demo_path) / "w1.gguf").read_bytes()[:100])
    try:
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 1, "steering": {"broken": 1}}
        status, reply = _request(server, "POST", "/v1/completions", body)
    finally:
        broken.unlink()
    _assert_error(status, reply, 422, "damaged_vector")
    assert reply["error"]["message"].startswith("stored vector 'broken'")
    assert str(broken.parent) not in reply["error"]["message"]  # the server's file system


def test_the_log_has_no_traceback(server):
    """Last: nothing any test sent made the server print a traceback."""
    assert "Traceback" not in server.output()
