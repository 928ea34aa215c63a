"""The worker's `--cache`, kept whole across stops.

llama.cpp's RPC server writes each big tensor a client sends to a file named by its hash,
in place (no temp file), and on a later load reads whatever file has that name, with no size
check. A worker stopped while writing one left it cut short, and every later load read it as
the tensor: wrong text, exit 0. A write in flight is the file written last, so when a
session ends, the files written in its last moments go (they are sent again next time). A
marker file covers a worker killed outright, whose end nobody saw.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

MARKER = ".edge-steer-session"  # holds the session's start, in ns, while a server runs
WRITE_SLACK_NS = 2_000_000_000  # a file written this close to the end may be cut short


def open_session(cache: Path) -> None:
    """Before the server starts: tidy what a session killed outright left, then mark this
    one as running."""
    marker = cache / MARKER
    with contextlib.suppress(OSError, ValueError):
        started = int(marker.read_text())
        written = [p for p in _tensor_files(cache) if p.stat().st_mtime_ns >= started]
        if written:  # its end is unknown: the last file written is the suspect
            _drop([max(written, key=lambda p: p.stat().st_mtime_ns)])
    marker.write_text(str(time.time_ns()))


def close_session(cache: Path) -> None:
    """After the server stopped, however it stopped: drop the files written as it ended."""
    marker = cache / MARKER
    with contextlib.suppress(OSError, ValueError):
        started = int(marker.read_text())
        ended = time.time_ns()
        _drop(
            p
            for p in _tensor_files(cache)
            if p.stat().st_mtime_ns >= max(started, ended - WRITE_SLACK_NS)
        )
    with contextlib.suppress(OSError):
        marker.unlink()


def _tensor_files(cache: Path) -> list[Path]:
    """The server's files: 16 hex digits, its hash of the tensor."""
    return [p for p in cache.iterdir() if len(p.name) == 16 and _is_hex(p.name) and p.is_file()]


def _is_hex(name: str) -> bool:
    return all(c in "0123456789abcdef" for c in name)


def _drop(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
