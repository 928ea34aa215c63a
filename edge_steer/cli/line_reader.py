"""Reading the chat's input: line editing and history on a terminal, plain lines from a pipe.

On a terminal prompt_toolkit gives what readline users expect (arrow keys, Ctrl-A/E/W/R,
history across sessions in `$EDGE_STEER_HOME/chat_history`); piped in, lines are read as
they are and no prompts are printed, so a script's replies are all that reaches stdout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from ..errors import BadInput
from .console import out

Read = Callable[[bool], str]  # read(continuing) -> one line; EOFError at the end


def is_script() -> bool:
    """Input piped in (or from a file): a script, not a person at a terminal."""
    return not sys.stdin.isatty()


def line_reader() -> Read:
    """The reader for this terminal (or pipe)."""
    if is_script():
        return _piped
    if not sys.stdout.isatty():  # `chat > file`: prompts stay off the file, as input() does
        return lambda continuing: input()
    return _editing_reader()


def _piped(_continuing: bool) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _editing_reader() -> Read:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.history import FileHistory

    from .. import store

    history = store.home() / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(history=FileHistory(str(history)))
    first = FormattedText([("bold ansigreen", ">>> ")])
    more = FormattedText([("ansibrightblack", "... ")])

    def read(continuing: bool) -> str:
        out.file.flush()
        try:
            return session.prompt(more if continuing else first)
        except asyncio.CancelledError:  # Ctrl-C as prompt_toolkit starts or stops
            raise KeyboardInterrupt from None

    return read


def read_message(read: Read) -> tuple[str, bool]:
    """One message: a line, lines ending in a backslash, or lines between two \"\"\" lines;
    and whether it was such a block, which is always a message (a pasted path or line of
    code may start with /), never a command."""
    first = read(False)
    if first.strip() == '"""':
        lines = []
        while (line := _more(read, '"""')).strip() != '"""':
            lines.append(line)
        return "\n".join(lines), True
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(_more(read, "\\"))
    return "\n".join(lines), len(lines) > 1


def _more(read: Read, opened: str) -> str:
    """The next line of a message still open: the end of input there is a mistake."""
    try:
        return read(True)
    except EOFError:
        closing = 'a """ line' if opened == '"""' else "a line without it"
        raise BadInput(
            f"the input ended inside a message continued with {opened}: end it with {closing}"
        ) from None
