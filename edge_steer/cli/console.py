"""The two consoles every command writes to: results on stdout, everything else on stderr;
and what makes them safe: repaired streams, file text shown inert, write failures named."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
import unicodedata
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from ..constants import COLUMNS_ENV, env, unset_env

PIPED_WIDTH = 1000  # wide enough that no table row wraps
# what writing a stream can fail with: no space, an I/O error, a closed or oversized file
WRITE_ERRORS = {errno.ENOSPC, errno.EIO, errno.EBADF, errno.EFBIG, errno.EDQUOT}
NARROWEST = 20  # COLUMNS below this is a slip (COLUMNS=0 made rich print nothing at all)


def _repair_streams() -> None:
    """What a shell may hand over: a closed stream (`<&-`, `>&-`) is None in Python, and
    every `.isatty()` or `.write()` would raise, so it reads as /dev/null; text the encoding
    cannot hold (PYTHONIOENCODING=ascii) prints as escapes, as stderr does, not a traceback."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 (open for the process)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    columns = env(COLUMNS_ENV)
    if columns.isdigit() and int(columns) < NARROWEST:
        unset_env(COLUMNS_ENV)  # rich and typer would keep to it: the terminal decides


def _width(stream: TextIO) -> int | None:
    """Piped output keeps whole rows (`| grep`, `> file`), as `ollama list` does: rich would
    squeeze tables into 80 columns. A terminal, or a COLUMNS the user set, decides itself."""
    if env(COLUMNS_ENV) or stream.isatty():
        return None
    return PIPED_WIDTH


def inert(text: str, *, lines: bool = True) -> str:
    """Control characters as escapes (`\\x1b`), newlines and tabs too unless `lines`: names and
    metadata come from GGUF files anyone can write, and an escape sequence in a vector's
    concept could clear the screen, retitle the window or fake output."""
    if text.isprintable():
        return text
    kept = "\n\t" if lines else ""
    return "".join(
        c.encode("unicode_escape").decode()
        if unicodedata.category(c) == "Cc" and c not in kept
        else c
        for c in text
    )


class _InertConsole(Console):
    """A rich Console that shows the text it is given, never runs it (see `inert`): every str
    that rich prints, in a table cell or a status line alike, passes through render_str."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(inert(text), **kwargs)


_repair_streams()
# emoji=False: ":smile:" in a file name or a model's reply stays as written
out = _InertConsole(highlight=False, emoji=False, soft_wrap=True, width=_width(sys.stdout))
err = _InertConsole(
    stderr=True, highlight=False, emoji=False, soft_wrap=True, width=_width(sys.stderr)
)


def output_failed(exc: OSError) -> bool:
    """Say so in one line when the output could not be written (`> /dev/full`, a full disk),
    and point stdout at /dev/null so that Python's last flush stays quiet; False when `exc`
    is no such error (a file's error names its file)."""
    if exc.filename is not None or exc.errno not in WRITE_ERRORS:
        return False
    with contextlib.suppress(OSError, ValueError):  # stdout may have no descriptor
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with contextlib.suppress(OSError):  # stderr may be the stream that failed
        err.print(f"[bold red]error:[/] cannot write the output: {exc.strerror}")
    return True
