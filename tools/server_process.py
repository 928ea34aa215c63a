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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> tuple[int, dict]:
    """(status, body) of GET /health; (0, {}) while nothing listens."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


@contextlib.contextmanager
def running_server(
    args: Sequence[str], *, timeout: float = 300, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start `edge-steer serve ARGS --port P`, wait for /health 200, yield its base URL;
    stop it with Ctrl-C (SIGINT) afterwards, as a user would."""
    port = free_port()
    command = [shutil.which("edge-steer") or "edge-steer", "serve", *args, "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below); a pipe could fill up
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while health(url)[0] != 200:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"edge-steer serve exited {process.returncode}: {log.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"edge-steer serve not ready after {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
