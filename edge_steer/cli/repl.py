"""The interactive chat loop: messages, multi-line input, and slash commands."""

from __future__ import annotations

import sys
import time

from ..errors import BadInput, EdgeSteerError
from .options import err, out, print_error, stream

HELP = """[bold]/vector NAME STRENGTH[/]  set a vector live (0 removes it); history is re-evaluated
[bold]/vectors[/]               show the active vectors
[bold]/system TEXT[/]           set the system prompt (empty clears it)
[bold]/clear[/]                 forget the conversation
[bold]/help[/]                  this help
[bold]/quit[/], /exit, /bye    leave (or Ctrl-D)
End a line with \\ to continue it, or wrap several lines in triple quotes (\"\"\").
Ctrl-C stops the current reply."""


def repl(session) -> None:
    """Read messages and slash commands until /quit or Ctrl-D."""
    from .. import vectors

    name = session.ctx.model.name
    err.print(
        f"[dim]{name} · vectors: {vectors.describe(session.steering.strengths())}"
        " · /help for commands[/]"
    )
    while True:
        try:
            line = _read_message()
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print("\n[dim](/quit or Ctrl-D to leave)[/]")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(session, line.strip()):
                return
            continue
        try:
            stream(session.reply(line), quiet=False)
        except KeyboardInterrupt:
            err.print("\n[dim][stopped][/]")


def _read_message() -> str:
    # piped in (a script of messages and commands): no prompts in the replies' stdout
    first_prompt, more = ("[bold green]>>> [/]", "[dim]... [/]") if sys.stdin.isatty() else ("", "")
    first = out.input(first_prompt)
    if first.strip() == '"""':
        lines = []
        while (line := out.input(more)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(out.input(more))
    return "\n".join(lines)


def _command(session, line: str) -> bool:
    """Run one slash command; True means leave."""
    from .. import evaluate, vectors

    word, _, rest = line.partition(" ")
    try:
        if word in ("/quit", "/exit", "/bye"):
            return True
        if word == "/help":
            err.print(HELP)
        elif word == "/vectors":
            layers = session.steering.layers
            span = f"{layers[0]}-{layers[1]}" if layers else "all"
            err.print(f"vectors: {vectors.describe(session.steering.strengths())} · layers {span}")
            for name, (vector, _) in session.steering.active.items():
                if note := evaluate.describe_range(vector):
                    err.print(f"  {name}: {note}", markup=False)
        elif word == "/vector":
            name, strength = _vector_args(rest)
            start = time.perf_counter()
            session.set_vector(name, strength)
            err.print(
                f"[dim]vectors: {vectors.describe(session.steering.strengths())} "
                f"(history re-evaluated in {time.perf_counter() - start:.2f}s)[/]"
            )
        elif word == "/system":
            session.set_system(rest.strip())
            err.print("[dim]system prompt " + ("set" if rest.strip() else "cleared") + "[/]")
        elif word == "/clear":
            session.clear()
            err.print("[dim]conversation cleared[/]")
        else:
            err.print(f"[red]unknown command {word}[/]: /help lists them")
    except EdgeSteerError as exc:
        print_error(exc)
    return False


def _vector_args(rest: str) -> tuple[str, float]:
    parts = rest.split()
    if len(parts) != 2:
        raise BadInput("usage: /vector NAME STRENGTH (e.g. /vector lazy -0.5; 0 removes it)")
    from .. import vectors

    return vectors.parse_spec(f"{parts[0]}:{parts[1]}")
