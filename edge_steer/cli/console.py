"""The two consoles every command writes to: results on stdout, everything else on stderr."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

from ..constants import COLUMNS_ENV, env

PIPED_WIDTH = 1000  # wide enough that no table row wraps


def _width(stream: TextIO) -> int | None:
    """Piped output keeps whole rows (`| grep`, `> file`), as `ollama list` does: rich would
    squeeze tables into 80 columns. A terminal, or a COLUMNS the user set, decides itself."""
    if env(COLUMNS_ENV) or stream.isatty():
        return None
    return PIPED_WIDTH


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))
