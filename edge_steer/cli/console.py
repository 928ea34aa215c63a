"""The two consoles every command writes to: results on stdout, everything else on stderr."""

from __future__ import annotations

import sys
import unicodedata
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from ..constants import COLUMNS_ENV, env

PIPED_WIDTH = 1000  # wide enough that no table row wraps


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


# emoji=False: ":smile:" in a file name or a model's reply stays as written
out = _InertConsole(highlight=False, emoji=False, soft_wrap=True, width=_width(sys.stdout))
err = _InertConsole(
    stderr=True, highlight=False, emoji=False, soft_wrap=True, width=_width(sys.stderr)
)
