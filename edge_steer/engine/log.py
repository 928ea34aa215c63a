"""llama.cpp's log: kept out of the terminal, remembered for error messages, and read back
for what a load or a context allocated (and where)."""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from collections import deque
from collections.abc import Iterator, Sequence

import llama_cpp as ll

from ..constants import VERBOSE_ENV, env

LOG_TAIL: deque[str] = deque(maxlen=40)
_VERBOSE = env(VERBOSE_ENV) not in ("", "0")
_recording: list[str] | None = None  # every line while a model or context is made

OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
ASSIGNED = re.compile(r"\w+: layer +\d+ assigned to device (\S+),")
MODEL_BUFFER = re.compile(r"\w+: +(\S+) model buffer size = +([\d.]+) MiB")
CONTEXT_BUFFER = re.compile(r"\w+: +(\S+ +(?:KV|output|compute)) buffer size = +([\d.]+) MiB")


@ll.llama_log_callback
def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """Keep llama.cpp's chatter out of the terminal, but remember it for error messages."""
    line = (text or b"").decode(errors="replace")
    LOG_TAIL.append(line)
    if _recording is not None:
        _recording.append(line)
    if _VERBOSE:
        print(line, end="", file=sys.stderr)


ll.llama_log_set(_on_log, None)  # _on_log is module-level, so the callback stays alive
ll.llama_backend_init()


@contextlib.contextmanager
def recorded() -> Iterator[list[str]]:
    """Every line llama.cpp logs inside the block (how much it allocated, and where)."""
    global _recording
    LOG_TAIL.clear()
    lines: list[str] = []
    _recording = lines
    try:
        yield lines
    finally:
        _recording = None


def buffer_sizes(log: Sequence[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Bytes per buffer named by `pattern`'s first group, from llama.cpp's "= N MiB" lines."""
    sizes: dict[str, int] = {}
    for match in filter(None, (pattern.match(line) for line in log)):
        name = " ".join(match[1].split())
        sizes[name] = sizes.get(name, 0) + round(float(match[2]) * (1 << 20))
    return sizes


def last_error() -> str:
    """The line of llama.cpp's recent log that best explains a failure."""
    lines = [line.strip() for line in LOG_TAIL if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or ["unknown error"])[-1]
