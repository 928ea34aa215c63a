"""Small file helpers every module shares: atomic writes, path-like names, sizes for people."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BadInput, DoesNotFit, EdgeSteerError


def write_atomically(
    path: str | Path,
    write: Callable[[Path], object],
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Call `write(temp_path)` in the target's folder, then rename it over `path`: readers
    never see a half-written file, and a failed write leaves any old file as it was.
    `check(temp_path)` reads it back first: writers that buffer in C (numpy's `tofile`, so
    gguf-py) can lose the end of a file on a full disk without an error. A failed write is
    one line: DoesNotFit when the disk is full, BadInput otherwise. A symlink is written
    through (the link stays); a device, pipe or folder at `path` is refused, never replaced
    (/dev/null was, by root)."""
    path = _target(Path(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        _check_written(path, Path(tmp), check)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; keep the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _target(path: Path) -> Path:
    """The file a write to `path` replaces: a link's target; never a device or folder."""
    try:
        if path.is_symlink():
            path = path.resolve(strict=False)
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise BadInput(f"{str(path)[:200]} is {what}: pass the path of a file to write")
    except RuntimeError:  # a loop of links
        raise BadInput(f"{str(path)[:200]} is a link that leads nowhere: pass a file") from None
    except OSError as exc:  # a name too long
        raise _write_error(path, exc) from None
    return path


def check_writable(path: Path) -> None:
    """An output file whose folder exists, or can be made, and can be written: checked
    before minutes of work, not after."""
    if path.is_dir():
        raise BadInput(f"output {path} is a folder: name a file in it")
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    try:  # a real file, not os.access: root passes that test even on /sys and /proc
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise BadInput(f"cannot write {path}: {folder} is not a writable folder") from None


def _check_written(path: Path, tmp: Path, check: Callable[[Path], object] | None) -> None:
    if check is None:
        return
    try:
        check(tmp)
    except EdgeSteerError as exc:
        raise DoesNotFit(
            f"{path} was not written whole (is the disk full?): free some space or write elsewhere"
        ) from exc


def _write_error(path: Path, exc: OSError) -> EdgeSteerError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DoesNotFit(f"no space left to write {path}: free some space or write elsewhere")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # making folders: one of them is a file
        file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if file is not None:
            return BadInput(f"cannot write {path}: {file} is a file, not a folder")
    reason = exc.strerror or str(exc)
    return BadInput(f"cannot write {path} ({reason}): pass a path in a folder you can write to")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def looks_like_path(name: str) -> bool:
    """A --model or --vector value meant as a file rather than a name."""
    if name.endswith(".gguf") or os.sep in name or "/" in name:
        return True
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte: not a file
        return False


def size_text(size: int, *, decimal: bool = False) -> str:
    """Bytes for people, to one decimal: GiB/MiB/KiB as llama.cpp reports memory, or with
    `decimal` GB/MB/kB as the Hugging Face Hub shows file sizes."""
    base, suffix = (1000, "B") if decimal else (1024, "iB")
    for power, unit in ((3, "G"), (2, "M"), (1, "k" if decimal else "K")):
        if size >= base**power / 10:
            return f"{size / base**power:.1f} {unit}{suffix}"
    return f"{size} B"
