"""`edge-steer serve` as users meet it: a real server process on loopback, driven by the
official `openai` client and plain HTTP, on the demo model."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edge_steer.prefixes import common_length  # noqa: E402
from tools.server_process import health, running_server, server_process  # noqa: E402

PROMPT = "The best thing about mornings is"
SPECS = [{}, {"happy": 1.0}, {"happy": -1.0, "wobble": 0.8}, {"wobble": -1.5}]


@pytest.fixture(scope="module")
def wobble(demo_model) -> Path:
    """A stored vector for the demo model that no built-in concept gives: a fixed random
    direction in blocks 6-12, big enough to change greedy text."""
    from edge_steer import store, vectors

    rng = np.random.default_rng(7)
    directions = {}
    for layer in range(6, 13):
        unit = rng.standard_normal(demo_model.n_embd).astype(np.float32)
        directions[layer] = unit / np.linalg.norm(unit) * 40.0
    vector = vectors.ControlVector(directions, metadata={"concept": "wobble"})
    return vectors.write(vector, store.model_vectors_dir(demo_model.path) / "wobble.gguf")


@pytest.fixture(scope="module")
def alien():
    """A stored vector made for another model (64 wide): requests must not get it."""
    from edge_steer import store, vectors

    vector = vectors.ControlVector({1: np.ones(64, dtype=np.float32)}, metadata={"concept": "x"})
    other = store.vectors_dir() / "0123456789abcdef"
    path = vectors.write(vector, other / "alien.gguf")
    vectors.write(vector, other / "honest.gguf")  # a built-in concept, trained elsewhere
    yield path
    shutil.rmtree(other)


@pytest.fixture(scope="module")
def served(demo_path, wobble, alien):
    args = ["--model", "demo", "--parallel", "4", "--preset", "cheerful=happy:1"]
    with server_process(args) as process:
        yield process


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _complete(client, steering=None, cache_prompt=True, **kwargs):
    extra = {"steering": steering} if steering is not None else {}
    args = {"model": "demo", "prompt": PROMPT, "max_tokens": 24, "temperature": 0} | kwargs
    return client.completions.create(extra_body=extra | {"cache_prompt": cache_prompt}, **args)


def test_health_and_models(server, client):
    status, body = health(server)
    assert status == 200 and body["lanes"] == 4
    assert body["ctx_per_lane"] == 4096 and body["batch"] == 512 and body["batch_invariant"]
    models = {m.id: m.model_extra["steering"] for m in client.models.list()}
    assert models == {"demo": {}, "cheerful": {"happy": 1.0}}
    assert client.models.retrieve("cheerful").model_extra["steering"] == {"happy": 1.0}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_vectors_lists_what_fits(server):
    with urllib.request.urlopen(f"{server}/v1/vectors") as response:
        listed = {v["id"]: v for v in json.load(response)["data"]}
    assert {"happy", "wobble"} <= set(listed)
    assert listed["happy"]["calibrated"] and listed["happy"]["trained"]
    low, high = listed["happy"]["recommended"]
    assert low < 0 < high
    wobble = listed["wobble"]  # never evaluated: the calibrated ±1, not ±2 (past eval's limit)
    assert not wobble["evaluated"] and wobble["recommended"] == [-1.0, 1.0]


def test_completion_usage_and_finish(client):
    reply = _complete(client)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens == len(client_tokens(client, PROMPT))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert reply.model_extra["steering"] == {}


def client_tokens(_client, text: str) -> list[int]:
    from edge_steer import model_files
    from edge_steer.engine import Model

    with Model(model_files.resolve_model("demo")) as model:
        return model.tokenize(text)


def test_streaming_equals_whole_and_reports_usage(client):
    whole = _complete(client).choices[0].text
    chunks = list(
        client.completions.create(
            model="demo",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_chat_streaming_and_stop(client):
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and text
    stop = text.strip().split()[2]  # a word the answer really contains
    stopped = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    chunks = list(stopped)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert stop not in streamed and text.startswith(streamed)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client):
    runs = [_complete(client, temperature=1.0, seed=s).choices[0].text for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_steering_by_field_suffix_and_preset_agree(client):
    unsteered = _complete(client).choices[0].text
    by_field = _complete(client, {"happy": 1.0})
    by_spec = _complete(client, "happy:1")
    by_suffix = _complete(client, model="demo+happy:1")
    by_preset = _complete(client, model="cheerful")
    texts = {r.choices[0].text for r in (by_field, by_spec, by_suffix, by_preset)}
    assert len(texts) == 1 and unsteered not in texts
    for reply in (by_field, by_spec, by_suffix, by_preset):
        assert reply.model_extra["steering"] == {"happy": 1.0}
    # the body field overrides the preset, name by name
    assert _complete(client, {"happy": 0}, model="cheerful").choices[0].text == unsteered


def _cli_generate(demo_path: Path, spec: dict[str, float]) -> str:
    vectors = [f"--vector={name}:{strength}" for name, strength in spec.items()]
    command = ["edge-steer", "generate", "--model", str(demo_path), "-p", PROMPT]
    command += ["-n", "24", "--temp", "0", "--json", *vectors]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["text"]


def test_concurrent_requests_equal_each_alone(client):
    """4 greedy requests at once under 4 steerings (unsteered among them), so that every
    decode mixes steerings, then 8 at once: each gets exactly the tokens it gets alone.
    Lanes share each llama_decode, and the weights are not repacked with --parallel > 1, so
    a row's numbers do not depend on the rows beside it."""
    exact = {"cache_prompt": False}  # a reused prefix may flip near-ties, as in llama-server
    alone = [_complete(client, spec, **exact).choices[0].text for spec in SPECS]
    assert len(set(alone)) == len(SPECS)  # the specs really differ
    with ThreadPoolExecutor(len(SPECS)) as pool:
        replies = list(pool.map(lambda spec: _complete(client, spec, **exact), SPECS))
    assert [r.choices[0].text for r in replies] == alone
    assert [r.model_extra["steering"] for r in replies] == SPECS
    with ThreadPoolExecutor(2 * len(SPECS)) as pool:  # more requests than lanes
        twice = list(pool.map(lambda spec: _complete(client, spec, **exact), SPECS * 2))
    assert [r.choices[0].text for r in twice] == alone * 2


def test_eight_lanes_reply_as_alone(demo_path, wobble):
    """With 8 lanes a decode holds 8 rows, where ggml's tiled kernel for K-quant weights
    would take over from its one-row kernel (22 of 32 greedy replies parted from their
    replies alone before `ggml.one_row_kernels`): 8 requests at once under 8 steerings still
    get exactly their tokens alone."""
    more = [{"happy": 0.5}, {"wobble": 0.7}, {"happy": -0.5, "wobble": -0.7}, {"happy": 1.5}]
    specs = SPECS + more
    args = ["--model", "demo", "--parallel", "8", "--ctx", "512", "--preset", "cheerful=happy:1"]
    exact = {"cache_prompt": False}
    with server_process(args) as process:
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0)
        alone = [_complete(client, spec, **exact).choices[0].text for spec in specs]
        with ThreadPoolExecutor(len(specs)) as pool:
            together = list(pool.map(lambda spec: _complete(client, spec, **exact), specs))
    assert len(set(alone)) == len(specs)  # the specs really differ
    assert [r.choices[0].text for r in together] == alone


BAD_REQUESTS = [
    ({"model": "gpt-4"}, 404, "model_not_found"),
    ({"steering": {"nope": 1}}, 400, "unknown_vector"),
    ({"steering": {"formal": 1}}, 400, "unknown_vector"),  # built-in, untrained, no --allow-train
    ({"steering": {"alien": 1}}, 400, "vector_for_another_model"),
    # was "made for another model": a built-in concept is untrained here, whoever has it
    ({"steering": {"honest": 1}}, 400, "unknown_vector"),
    ({"steering": {"happy": 1e9}}, 400, "invalid_steering"),
    ({"steering": {"happy": "strong"}}, 400, "invalid_steering"),
    ({"steering": {"/etc/passwd": 1}}, 400, "unknown_vector"),  # not a name: not stored
    ({"steering": {"../happy": 1}}, 400, "unknown_vector"),
    ({"model": "demo+happy:x"}, 400, "invalid_steering"),
    ({"n": 2}, 400, None),
    ({"logit_bias": {"15": 100}}, 400, None),
    ({"max_tokens": 0}, 400, None),
    ({"temperature": -1}, 400, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ({"prompt": "word " * 5000}, 400, "context_length_exceeded"),
    ({"prompt": ""}, 400, None),
]


@pytest.mark.parametrize(("change", "status", "code"), BAD_REQUESTS)
def test_bad_requests_are_4xx_and_the_server_keeps_serving(client, change, status, code):
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 2} | change
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(
            **{k: v for k, v in body.items() if k != "steering"},
            extra_body={"steering": body.get("steering", {})},
        )
    assert caught.value.status_code == status
    error = caught.value.body
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    assert _complete(client, max_tokens=2).choices[0].finish_reason == "length"


def _post(url: str, body: object, headers: dict[str, str] | None = None):
    """(status, JSON body, headers) of a raw POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | (headers or {})
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers


def test_malformed_json_and_messages(server):
    assert _post(f"{server}/v1/completions", b"{not json")[0] == 400
    status, body, _ = _post(f"{server}/v1/chat/completions", {"model": "demo", "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    many = [{"role": "user", "content": "a"}] * 5000  # more messages than a lane has tokens
    status, body, _ = _post(f"{server}/v1/chat/completions", {"model": "demo", "messages": many})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["message"].startswith("5000 messages cannot fit")  # before tokenizing
    status, body, _ = _post(f"{server}/v1/completions", {"model": 5, "prompt": "hi"})
    assert status == 400 and "`model` must be a model's name" in body["error"]["message"]
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    json_mode = chat | {"response_format": {"type": "json_object"}}  # never silently ignored
    status, body, _ = _post(f"{server}/v1/chat/completions", json_mode)
    assert status == 400 and body["error"]["param"] == "response_format"
    text_mode = chat | {"response_format": {"type": "text"}}
    assert _post(f"{server}/v1/chat/completions", text_mode)[0] == 200


def test_a_client_that_disconnects_frees_its_lane(served, server, client):
    """...and leaves its log line: 499, as nginx logs a client gone before its answer."""
    stream = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=3000, temperature=0.8, stream=True
    )
    next(iter(stream))
    assert health(server)[1]["busy"] == 1
    stream.close()
    _wait_idle(server)
    assert health(server)[1]["busy"] == 0
    # the same without streaming: the client gives up waiting for the whole answer (seed 1
    # samples 400 tokens with no end of text, so the answer cannot come within the timeout;
    # unseeded, an early end of text now and then answered it in time)
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 3000, "temperature": 0.8, "seed": 1}
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(server).netloc, timeout=2)
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()
    _wait_idle(server)
    assert health(server)[1]["busy"] == 0
    gone = [line for line in served.output().splitlines() if " 499 " in line]
    assert len(gone) == 2 and all("the client went away after" in line for line in gone)
    assert gone[0].endswith(" · streamed") and not gone[1].endswith(" · streamed")


def _wait_idle(url: str, seconds: float = 10, key: str | None = None) -> None:
    deadline = time.monotonic() + seconds
    while health(url, key)[1]["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)


def test_repacked_lanes_stay_with_their_own_steering(demo_path):
    """--repack with 4 lanes: llama.cpp's faster layouts, as llama-server. Batched replies
    may part from their replies alone at a greedy near-tie, but never take another
    request's steering: each is closest to its own, and the start-up line says so."""
    args = ["--model", "demo", "--parallel", "4", "--repack", "--ctx", "1024"]
    with server_process(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        exact = {"cache_prompt": False}
        alone = [_complete(client, spec, **exact).choices[0].text for spec in SPECS]
        with ThreadPoolExecutor(len(SPECS)) as pool:
            replies = list(pool.map(lambda spec: _complete(client, spec, **exact), SPECS))
        assert not health(server.url)[1]["batch_invariant"]
        assert "may differ from its reply alone" in server.output()
    for reply, own in zip(replies, alone, strict=True):
        text = reply.choices[0].text
        shared = [common_length(text, other) for other in alone]
        # no other reply is closer (alone, several steerings may share their first words)
        assert shared[alone.index(own)] == max(shared) and text[:8] == own[:8]


def test_allow_train_queue_and_api_key(demo_path):
    """--allow-train trains a built-in on first use; a full queue is 503 with Retry-After;
    --api-key is required."""
    args = ["--model", "demo", "--parallel", "1", "--queue", "0", "--api-key", "k1"]
    args += ["--allow-train"]
    with running_server(args) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": "bearer k1"})
        with urllib.request.urlopen(request) as response:  # an auth scheme ignores case
            assert response.status == 200
        lines = _stream_lines(url, {"formal": 1.0}, "k1")  # trains `formal` first
        training = [line for line in lines if line.startswith(": training 'formal': ")]
        stages = {line.split(": ")[2].rsplit(" ", 1)[0] for line in training}
        assert stages == {"reading prompts", "calibrating"}, training
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        assert lines.index(training[-1]) < first_data and lines[-1] == "data: [DONE]"
        trained = _complete(client, {"formal": 1.0}, max_tokens=4)
        assert trained.model_extra["steering"] == {"formal": 1.0}
        long = client.completions.create(model="demo", prompt=PROMPT, max_tokens=3000, stream=True)
        next(iter(long))  # the only lane is now generating, and nothing may wait
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 1}
        status, error, headers = _post(
            f"{url}/v1/completions", body, {"Authorization": "Bearer k1"}
        )
        long.close()
        assert status == 503 and error["error"]["code"] == "server_busy"
        assert int(headers["Retry-After"]) > 0
        _wait_idle(url, key="k1")  # the closed stream's lane frees itself
        assert client.completions.create(**body).choices[0].finish_reason == "length"
        # one lane: llama.cpp's repacked kernels, exactly as `edge-steer generate` decodes
        assert _complete(client, {}, cache_prompt=False).choices[0].text == _cli_generate(
            demo_path, {}
        )


def _stream_lines(url: str, steering: dict[str, float], key: str) -> list[str]:
    """The non-empty lines of a raw streamed completion (SSE comments included)."""
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body | {"steering": steering}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return [line for line in response.read().decode().splitlines() if line]


def test_every_request_waiting_on_a_training_hears_of_it(demo_path):
    """Two streams name one untrained built-in at once: the trainer takes one, the other
    waits behind it. Both get the training's progress as SSE comments (the second sat
    silent for the whole training, which a proxy's read timeout may not wait out)."""
    args = ["--model", "demo", "--parallel", "2", "--allow-train"]
    with running_server(args) as url, ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: _stream_lines(url, {"concise": 1}, "-"), range(2)))
    for lines in both:
        assert any(line.startswith(": training 'concise': ") for line in lines), lines
        assert lines[-1] == "data: [DONE]"


def test_a_damaged_stored_vector_is_422(client, wobble):
    broken = wobble.with_name("broken.gguf")
    broken.write_bytes(wobble.read_bytes()[:100])  # truncated
    try:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            _complete(client, {"broken": 1.0}, max_tokens=2)
        assert caught.value.body["code"] == "damaged_vector"
    finally:
        broken.unlink()
    assert _complete(client, max_tokens=2).choices[0].finish_reason == "length"


def _streamed(client, steering: dict[str, float], model: str) -> str:
    """The text of a streamed completion, through the openai client."""
    chunks = _complete(client, steering, model=model, max_tokens=8, stream=True)
    return "".join(chunk.choices[0].text for chunk in chunks)


def test_a_stream_keeps_streaming_while_another_request_trains(demo_path, tmp_path):
    """--allow-train: a request that names a built-in concept not trained yet waits for its
    training off the engine thread, while a stream on the other lane keeps producing tokens
    (before, every lane stood still until training ended); /health counts it as training."""
    import os
    import threading

    env = {**os.environ, "EDGE_STEER_HOME": str(tmp_path)}  # nothing trained for the model yet
    args = ["--model", str(demo_path), "--parallel", "2", "--allow-train"]
    with running_server(args, env=env) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        arrivals: list[float] = []
        stop = threading.Event()

        def stream() -> None:
            pieces = client.completions.create(
                model=demo_path.stem, prompt=PROMPT, max_tokens=3000, temperature=0, stream=True
            )
            for _ in pieces:
                arrivals.append(time.monotonic())
                if stop.is_set():
                    break
            pieces.close()

        streaming = threading.Thread(target=stream)
        streaming.start()
        while not arrivals:
            time.sleep(0.05)
        start = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            trained = pool.submit(_streamed, client, {"lazy": 1.0}, demo_path.stem)
            seen_training = False
            while not (seen_training or trained.done()):
                seen_training = health(url)[1]["training"] == 1
                time.sleep(0.2)
            reply = trained.result(timeout=300)
        end = time.monotonic()
        stop.set()
        streaming.join(timeout=60)
    assert reply and seen_training  # the client read past the training comments
    during = [t for t in arrivals if start <= t <= end]
    gaps = np.diff([start, *during, end])
    assert len(during) > 20 and gaps.max() < (end - start) / 3, (len(during), gaps.max())
