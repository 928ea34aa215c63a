"""Where vectors live on disk, and the identity of a model file they are keyed by.

Layout: `$EDGE_STEER_HOME/vectors/<model-fingerprint>/<name>.gguf` for vectors made for one
model, and `$EDGE_STEER_HOME/vectors/<name>.gguf` for vectors you drop in by hand.
`EDGE_STEER_HOME` defaults to `$XDG_CACHE_HOME/edge-steer` (`~/.cache/edge-steer`).
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

from . import dataset, files
from .constants import HOME_ENV, env
from .errors import BadInput, NotFound

SAMPLE_BYTES = 1 << 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SAMPLES = 8


def home() -> Path:
    if given := env(HOME_ENV):
        path = Path(given).expanduser()
        if path.exists() and not path.is_dir():
            raise BadInput(f"{HOME_ENV}={given} is not a folder: point it at one, or unset it")
        return path
    cache = env("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "edge-steer"


def check_writable(path: Path) -> None:
    """A file the store is about to write (a trained vector, the demo's copy), checked
    before the work that makes it; the fix names EDGE_STEER_HOME, as no path was given."""
    try:
        files.check_writable(path)
    except BadInput:
        raise BadInput(
            f"cannot write the store at {home()}: point {HOME_ENV} at a folder you can write to"
        ) from None


def vectors_dir() -> Path:
    return home() / "vectors"


def fingerprint(model_path: str | Path) -> str:
    """A content fingerprint of a GGUF file, cheap even for 26 GB models.

    Hashes the size, the first MiB (header and metadata) and evenly spaced 1 MiB samples of
    the tensor data: a renamed or moved file keeps its identity, a re-quantized one does not.
    """
    try:
        stat = Path(model_path).resolve().stat()
    except FileNotFoundError:
        if str(model_path) in _last_seen:  # deleted since it loaded: its weights still are
            return _last_seen[str(model_path)]
        raise
    found = _fingerprint(str(Path(model_path).resolve()), stat.st_size, stat.st_mtime_ns)
    _last_seen[str(model_path)] = found
    return found


_last_seen: dict[str, str] = {}  # model path as given -> its fingerprint when last read


@cache
def _fingerprint(path: str, size: int, _mtime_ns: int) -> str:
    """Keyed by size and mtime too, so a file rewritten in place is hashed again."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLES + 1):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // SAMPLES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def model_vectors_dir(model_path: str | Path) -> Path:
    return vectors_dir() / fingerprint(model_path)


def check_name(name: str) -> str:
    """`name` if it can name a stored vector (letters, digits, `_`, `-`, `.`; at most 64,
    starting with a letter or digit), else BadInput. Checked before any file is looked at,
    so a name never reaches the file system as a path, and an over-long one never fails
    there."""
    if not NAME_PATTERN.fullmatch(name) or name.endswith(".gguf"):
        shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
        raise BadInput(
            f"bad vector name {shown!r}: use up to 64 letters, digits, '_', '-' or '.', starting "
            "with a letter or digit, e.g. lazy or my-style"
        )
    return name


def check_name_or_path(name: str) -> str:
    """A --vector SPEC's name: a file path as given, else a name `check_name` accepts."""
    return name if files.looks_like_path(name) else check_name(name)


def resolve_vector(name: str, model_path: str | Path | None) -> Path:
    """A SPEC name -> a file: a path as given, else the model's store, else the shared store."""
    if files.looks_like_path(name):
        from . import vectors  # numpy: not before llama.cpp (test_structure)

        path = Path(name).expanduser()
        vectors.check_file(path)
        return path
    check_name(name)  # before it becomes part of a path
    found = stored_vector(name, model_path)
    if found is None:
        places = " or ".join(map(str, _places(model_path)))
        raise NotFound(
            f"unknown vector {name!r}: no {name}.gguf in {places}; use a built-in concept "
            f"(trained on first use: {', '.join(dataset.builtin_names())}), a .gguf path, "
            "or put the file there"
        )
    return found


def stored_vector(name: str, model_path: str | Path | None) -> Path | None:
    """The store's file for a checked name (`check_name`), whatever its case: the model's
    own, else a shared one; never a path outside the store."""
    for place in _places(model_path):
        if found := vector_in(place, name):
            return found
    return None


def vector_in(folder: Path, name: str) -> Path | None:
    """`folder`'s file for a checked name: spelled as given, else in any case."""
    if (folder / f"{name}.gguf").is_file():
        return folder / f"{name}.gguf"
    return min((p for p in folder.glob("*.gguf") if is_named(p, name)), default=None)


def is_named(path: Path, name: str) -> bool:
    """Whether a vector file carries `name`: names ignore case (see `file_name`)."""
    return path.stem.lower() == name.lower()


def file_name(name: str) -> str:
    """The file a checked name is stored as. Names ignore case (`Happy` is `happy`), as they
    would on a case-insensitive disk (macOS, Windows) anyway, so one name is one vector."""
    return f"{check_name(name).lower()}.gguf"


def _places(model_path: str | Path | None) -> list[Path]:
    places = [vectors_dir()]
    if model_path is not None:
        places.insert(0, model_vectors_dir(model_path))
    return places


def stored_vectors() -> list[Path]:
    """Every vector file in the store: the shared ones, then those made for one model."""
    root = vectors_dir()
    return sorted(root.glob("*.gguf")) + sorted(root.glob("*/*.gguf"))


def find_vectors(name: str, model_path: str | Path | None = None) -> list[Path]:
    """Files a name can mean: a path as given; with a model, its one lookup; else every
    stored vector of that name, whichever model it was made for."""
    if files.looks_like_path(name) or model_path is not None:
        return [resolve_vector(name, model_path)]
    found = [p for p in stored_vectors() if is_named(p, name)]
    if not found:
        raise NotFound(
            f"no stored vector named {name!r} in {vectors_dir()}: "
            "`edge-steer vectors list` shows them; or pass a .gguf path"
        )
    return found


def is_stored(path: Path) -> bool:
    """Whether the entry `path` lies in the store (a link there is, wherever it leads:
    deleting it deletes the link, not its target)."""
    return (path.parent.resolve() / path.name).is_relative_to(vectors_dir().resolve())
