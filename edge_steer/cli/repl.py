"""The interactive chat loop: messages, multi-line input, and slash commands."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from ..errors import BadInput, EdgeSteerError, NotFound
from .line_reader import is_script, line_reader, read_message
from .options import err, note_full_context, print_error, stream
from .progress import StepProgress

Command = Callable[..., None]  # (session, rest of the line)

MORE_HELP = """End a line with \\ to continue it, or wrap several lines in triple quotes (\"\"\").
Arrow keys edit the line; Up and Ctrl-R recall earlier ones. Ctrl-C stops a reply or a
vector's training (the conversation stays as it was); Ctrl-D or /bye leaves."""


def repl(session, progress: StepProgress) -> None:
    """Read messages and slash commands until /bye or Ctrl-D. At a terminal a failed
    command or message is one red line and the chat goes on; a script piped in stops at its
    first failure with its exit code, as `python < script` does, since its next lines would
    run under a steering or history it did not ask for."""
    from .. import vectors

    read, script = line_reader(), is_script()
    err.print(
        f"[dim]{escape(session.ctx.model.name)} · vectors: "
        f"{escape(vectors.describe(session.steering.strengths()))} · /help for commands[/]"
    )
    while True:
        try:
            line, block = _next_message(read, script)
        except EOFError:
            err.print()
            return
        try:
            command = not block and line.strip().startswith("/")
            if command and line.split()[0] in LEAVE:
                _leave(line)
                return
            if command:
                _command(session, line.strip())
            elif line.strip():
                _reply(session, line)
        except EdgeSteerError as exc:
            if script:
                raise
            print_error(exc)
        except KeyboardInterrupt:
            progress.close()
            err.print("\n[dim]\\[stopped][/]")
        finally:
            progress.close()  # a step cut short takes its bar with it


def _next_message(read, script: bool) -> tuple[str, bool]:
    """The next message (see `read_message`); Ctrl-C at the prompt starts it over, and a
    message the input leaves open is an error there (EOFError at the end of input)."""
    while True:
        try:
            return read_message(read)
        except KeyboardInterrupt:
            err.print("[dim](/bye or Ctrl-D to leave)[/]")
        except BadInput as exc:
            if script:
                raise
            print_error(exc)


def _leave(line: str) -> None:
    if len(line.split()) > 1:
        raise BadInput(f"{line.split()[0]} takes nothing after it: send it alone to leave")


def _reply(session, line: str) -> None:
    forgotten = session.forgotten
    stream(session.reply(line), quiet=False)
    note_full_context(session.last_stats, session.ctx.n_ctx)
    _note_forgotten(session, forgotten)


def _note_forgotten(session, before: int) -> None:
    """Say so when the context has just had to drop the conversation's earliest turns."""
    if session.forgotten > before:
        err.print(
            f"[dim](the context is full: the model no longer sees the {session.forgotten} "
            "earliest messages; /save keeps them all)[/]"
        )


def _command(session, line: str) -> None:
    word, *after = line.split(maxsplit=1)  # a tab after the command, as a space
    rest = after[0] if after else ""
    command = COMMANDS.get(word)
    if command is None:
        raise BadInput(f"unknown command {word[:40]}: /help lists them")
    handler, usage, _ = command
    if rest.strip() and " " not in usage:  # /clear please: no, not without asking
        raise BadInput(f"{word} takes nothing after it: send {usage} alone")
    handler(session, rest.strip())


def _help(_session, _rest: str) -> None:
    for usage, what in [(usage, what) for _, usage, what in COMMANDS.values()] + [LEAVE_HELP]:
        err.print(f"[bold]{escape(usage):<24}[/]{escape(what)}")
    err.print(MORE_HELP, markup=False)


def _vectors(session, _rest: str) -> None:
    from .. import vectors

    layers = session.steering.layers
    span = f"{layers[0]}-{layers[1]}" if layers else "all"
    strengths = vectors.describe(session.steering.strengths())
    err.print(f"vectors: {strengths} · layers {span}", markup=False)
    for name, (vector, _) in session.steering.active.items():
        note = vectors.describe_range(vector) or "no measured range: `edge-steer eval` finds one"
        err.print(f"  {name}: {note}", markup=False)


def _vector(session, rest: str) -> None:
    from .. import vectors

    parts = rest.split()
    if not 1 <= len(parts) <= 2 or (len(parts) == 2 and ":" in parts[0]):
        raise BadInput("usage: /vector NAME [STRENGTH] (e.g. /vector lazy -0.5; 0 removes it)")
    name, strength = vectors.parse_spec(":".join(parts))  # NAME STRENGTH, NAME:STRENGTH, NAME
    start, forgotten = time.perf_counter(), session.forgotten
    session.set_vector(name, strength)
    err.print(
        f"[dim]vectors: {escape(vectors.describe(session.steering.strengths()))} "
        f"(history re-evaluated in {time.perf_counter() - start:.2f}s)[/]"
    )
    _note_forgotten(session, forgotten)


def _system(session, rest: str) -> None:
    session.set_system(rest)
    err.print("[dim]system prompt " + ("set" if rest else "cleared") + "[/]")


def _clear(session, _rest: str) -> None:
    session.clear()
    err.print("[dim]conversation cleared[/]")


def _save(session, rest: str) -> None:
    from ..files import write_atomically

    path = Path(_file_name(rest) or time.strftime("chat-%Y%m%d-%H%M%S.json")).expanduser()
    text = json.dumps(session.saved(), indent=2, ensure_ascii=False) + "\n"
    try:
        replacing = path.is_file()
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = getattr(exc, "strerror", None) or str(exc)[:200]
        raise BadInput(f"cannot save to {str(path)[:200]}: {reason}") from None
    done = f"saved {len(session.messages)} messages to {escape(str(path))}"
    err.print(
        f"[dim]{done}{' (it replaced the file there)' if replacing else ''}[/]", highlight=False
    )


def _file_name(text: str) -> str:
    """A file name as a shell user types it: "my chat.json" in quotes is my chat.json."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _load(session, rest: str) -> None:
    from .. import vectors

    if not rest:
        raise BadInput("usage: /load FILE (a conversation written by /save)")
    path = Path(_file_name(rest)).expanduser()
    data = _read_saved(path)
    session.restore(data)
    err.print(
        f"[dim]loaded {len(session.messages)} messages from {escape(str(path))} · vectors: "
        f"{escape(vectors.describe(session.steering.strengths()))}[/]",
        highlight=False,
    )
    saved_with, saved_file = data.get("model"), data.get("model_file")
    if isinstance(saved_with, str) and saved_with != session.ctx.model.name:
        now = session.ctx.model.name
        where = f" ({saved_file})" if isinstance(saved_file, str) else ""
        err.print(
            f"[dim](saved with {escape(saved_with + where)}; it goes on with {escape(now)})[/]"
        )
    _note_forgotten(session, 0)


MAX_SAVED = 64 * 1024 * 1024  # bytes; a conversation that fills a 128k context is ~1 MB


def _read_saved(path: Path) -> dict:
    """The JSON /save wrote, read from a regular file of a sane size."""
    try:
        found = path.stat()
    except (OSError, ValueError):  # missing, a NUL or an over-long name
        raise NotFound(f"no file {str(path)[:200]}: give the path /save printed") from None
    if not stat.S_ISREG(found.st_mode):
        what = "a folder" if stat.S_ISDIR(found.st_mode) else "not a regular file"
        raise BadInput(f"{path} is {what}: give the file /save wrote")
    if found.st_size > MAX_SAVED:
        raise BadInput(f"{path} is over {MAX_SAVED >> 20} MiB: not a conversation /save wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8 or JSON, nested too deep
        reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {str(exc)[:200]}"
        raise BadInput(f"cannot read {path} as a saved conversation: {reason}") from None
    if not isinstance(data, dict):
        raise BadInput("not a saved conversation: expected a JSON object with 'messages'")
    return data


# /set NAME VALUE: the sampler's settings (engine.SamplerSettings) and the reply length
SETTING_ALIASES = {"temp": "temperature", "n": "max_tokens"}


def _set(session, rest: str) -> None:
    from ..engine import out_of_range, range_text

    if not rest:
        shown = dataclasses.asdict(session.settings) | {"max_tokens": session.max_tokens}
        shown["seed"] = "random" if shown["seed"] is None else shown["seed"]  # not "None"
        err.print("  ".join(f"{k}={v}" for k, v in shown.items()), markup=False)
        return
    parts = rest.split()
    if len(parts) != 2:
        raise BadInput("usage: /set NAME VALUE (e.g. /set temperature 0.2); /set shows them")
    name = parts[0].lower().replace("-", "_")
    name = SETTING_ALIASES.get(name, name)
    value = _setting_value(name, parts[1], session)
    if name == "max_tokens":
        session.max_tokens = value
    else:
        settings = dataclasses.replace(session.settings, **{name: value})
        if out_of_range(settings):
            raise BadInput(f"{name} {value} is out of range: use {range_text(name)}")
        session.settings = settings
    err.print(f"[dim]{name} = {'random' if value is None else value}[/]")


def _setting_value(name: str, text: str, session) -> int | float | None:
    """`text` parsed as setting `name` wants it: a count, a number, or a seed (or `random`)."""
    from ..engine import SamplerSettings, takes_whole_number
    from ..vectors import parse_number, parse_whole

    fields = {f.name: f for f in dataclasses.fields(SamplerSettings)}
    if name not in fields and name != "max_tokens":
        known = ", ".join([*fields, "max_tokens"])
        raise BadInput(f"unknown setting {name!r}: use one of {known}")
    if name == "seed" and text.lower() in ("random", "none"):
        return None
    whole = name == "max_tokens" or takes_whole_number(name)
    value = parse_whole(text) if whole else parse_number(text)
    if value is None:
        raise BadInput(f"{name} takes a {'whole ' if whole else ''}number, not {text[:40]!r}")
    if name == "max_tokens" and value < 1:
        raise BadInput("max_tokens is out of range: use 1 or more")
    return value


LEAVE = ("/bye", "/quit", "/exit")
LEAVE_HELP = ("/bye", "leave (also /quit, /exit, Ctrl-D)")
COMMANDS: dict[str, tuple[Command, str, str]] = {  # word: (handler, usage, what it does)
    "/vector": (
        _vector,
        "/vector NAME [STRENGTH]",
        "set a vector live (1 if left out; 0 removes it)",
    ),
    "/vectors": (_vectors, "/vectors", "show the active vectors and their measured ranges"),
    "/system": (_system, "/system TEXT", "set the system prompt (no TEXT clears it)"),
    "/set": (_set, "/set [NAME VALUE]", "show or change sampling: temperature, seed, ..."),
    "/clear": (_clear, "/clear", "forget the conversation"),
    "/save": (_save, "/save [FILE]", "write the conversation, vectors included, as JSON"),
    "/load": (_load, "/load FILE", "go on with a conversation /save wrote"),
    "/help": (_help, "/help", "this help"),
}
