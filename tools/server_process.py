"""Run `edge-steer serve` as a real process on a free loopback port (tests, load tests)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str, key: str | None = None) -> tuple[int, dict]:
    """(status, body) of GET /health (its details under --api-key need the `key`); (0, {})
    while nothing listens."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        request = urllib.request.Request(f"{url}/health", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


@dataclass
class ServerProcess:
    """A running `edge-steer serve`: its base URL, its process, and what it has printed."""

    url: str
    process: subprocess.Popen
    log: IO[str]

    def output(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        self.log.seek(0)  # the server appends (O_APPEND), whatever the offset
        return self.log.read()


@contextlib.contextmanager
def server_process(
    args: Sequence[str],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    program: Sequence[str] | None = None,
    host: str | None = None,
) -> Iterator[ServerProcess]:
    """Start `edge-steer serve ARGS --port P` (or `program ARGS --port P`: llama-server, an
    older edge-steer), on `host` when given (else its default, 127.0.0.1), and wait for
    /health 200; stop it with Ctrl-C (SIGINT) afterwards, as a user would, unless it has
    already stopped."""
    port = free_port()
    program = program or [shutil.which("edge-steer") or "edge-steer", "serve"]
    command = [*program, *args, "--port", str(port), *(["--host", host] if host else [])]
    log = tempfile.TemporaryFile("a+")  # noqa: SIM115 (closed below); a pipe could fill up
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    name = f"[{host}]" if host and ":" in host else host or "127.0.0.1"  # IPv6 in brackets
    server = ServerProcess(f"http://{name}:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while health(server.url)[0] != 200:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {process.returncode}: {server.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[0]} not ready after {timeout:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def running_server(
    args: Sequence[str], *, timeout: float = 300, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`server_process`, when only its base URL matters."""
    with server_process(args, timeout=timeout, env=env) as server:
        yield server.url
