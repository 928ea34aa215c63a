"""Small file helpers every module shares: atomic writes, path-like names, sizes for people."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp_path)` in the target's folder, then rename it over `path`: readers
    never see a half-written file, and a failed write leaves any old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; keep the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
