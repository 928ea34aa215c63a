"""Read a GGUF file's metadata and tensor table without materialising its arrays.

`gguf.GGUFReader` turns every field into numpy views: on a 262k-token vocabulary that costs
~20 s of CPU per read. This reader walks the header once through a memory map, keeps scalar
fields and short numeric arrays, and for long arrays (vocabulary, scores, merges) records
only their type and length. Every size and offset is checked against the file, so a damaged
or truncated file is one `DamagedFile` error, never a crash or a huge allocation.

Layout (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, field count u64;
fields (key, type u32, value); tensor infos (name, n_dims u32, ne u64 x n_dims, type u32,
offset u64); padding to `general.alignment` (default 32); tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import DamagedFile, NotFound

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
KEEP_ARRAY = 4096  # numeric arrays up to this length are read (per-layer head counts, ...)
MAX_DIMS = 4
_U64 = struct.Struct("<Q")

# GGUF value types: id -> struct format (None: string, array)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
INT32, STRING, ARRAY = 5, 8, 9

# ggml tensor types: id -> (elements per block, bytes per block), from ggml's type traits
GGML_BLOCKS = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}
F32 = 0


@dataclass(frozen=True)
class LongArray:
    """A GGUF array field too long to keep (vocabulary, scores): its element type and length."""

    type: int
    length: int


@dataclass(frozen=True)
class Tensor:
    """One tensor-table entry. `shape` is ggml's order (ne0 first); `offset` is absolute."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class Header:
    """Metadata and tensor table of one GGUF file."""

    path: Path
    version: int
    fields: dict[str, object]
    types: dict[str, int]  # GGUF value type of each field (cvector-generator writes INT32)
    tensors: tuple[Tensor, ...]
    data_offset: int
    file_size: int

    def get(self, key: str, default: object = None) -> object:
        return self.fields.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_int(self, key: str) -> int | None:
        """`<architecture>.<key>` as an int, or None when absent or not a number."""
        value = self.fields.get(f"{self.architecture}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_gguf(path: str | Path) -> bool:
    """Whether the file starts with the GGUF magic (False for unreadable or short files)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | Path) -> Header:
    """The header of a GGUF file; cached per (path, size, mtime), so a model's checks, its
    offload plan and its shape share one read."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise NotFound(f"file not found: {path}") from None
    if not path.is_file():
        raise NotFound(f"not a file: {path}")
    return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _read_cached(path: str, size: int, _mtime_ns: int) -> Header:
    if not is_gguf(path):
        raise DamagedFile(f"{path} is not a GGUF file (bad magic)")
    if size < 24:
        raise DamagedFile(f"{path} is truncated ({size} bytes): too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return _Parser(Path(path), view).header()


class _Parser:
    """A cursor over the mapped header; every read is bounds-checked."""

    def __init__(self, path: Path, view: mmap.mmap):
        self.path, self.view, self.pos, self.size = path, view, 4, len(view)

    def fail(self, why: str) -> DamagedFile:
        return DamagedFile(f"{self.path} is truncated or damaged ({why})")

    def take(self, fmt: str) -> object:
        width = struct.calcsize("<" + fmt)
        if self.pos + width > self.size:
            raise self.fail(f"header ends early at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.view, self.pos)
        self.pos += width
        return value

    def skip(self, n_bytes: int) -> None:
        if n_bytes < 0 or self.pos + n_bytes > self.size:
            raise self.fail(f"header ends early at byte {self.pos}")
        self.pos += n_bytes

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings: a vocabulary of 262k tokens in about 30 ms, where a
        take() per string cost 0.3 s of every command's start-up."""
        view, pos, end, length_at = self.view, self.pos, self.size - 8, _U64.unpack_from
        for _ in range(count):
            if pos > end:
                raise self.fail(f"header ends early at byte {pos}")
            pos += 8 + length_at(view, pos)[0]
        self.skip(pos - self.pos)  # bounds-checked: the last string may run past the end

    def string(self) -> str:
        length = int(self.take("Q"))  # type: ignore[call-overload]
        start = self.pos
        self.skip(length)
        return bytes(self.view[start : self.pos]).decode("utf-8", errors="replace")

    def count(self, what: str, limit: int) -> int:
        value = int(self.take("Q"))  # type: ignore[call-overload]
        if value > limit:
            raise self.fail(f"{value} {what}")
        return value

    def header(self) -> Header:
        version = int(self.take("I"))  # type: ignore[call-overload]
        if version not in (2, 3):
            raise self.fail(f"GGUF version {version}; this reader knows versions 2 and 3")
        n_tensors = self.count("tensors", self.size // 24)
        n_fields = self.count("fields", self.size // 12)
        fields: dict[str, object] = {}
        types: dict[str, int] = {}
        for _ in range(n_fields):
            key = self.string()
            types[key] = int(self.take("I"))  # type: ignore[call-overload]
            fields[key] = self.value(types[key])
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment = {alignment!r}")
        data = -(-self.pos // alignment) * alignment
        tensors = tuple(self.tensor(data, *info) for info in infos)
        return Header(self.path, version, fields, types, tensors, data, self.size)

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise self.fail(f"unknown value type {kind}")
        item = int(self.take("I"))  # type: ignore[call-overload]
        length = self.count("array items", self.size)
        if item in _SCALARS:
            width = struct.calcsize("<" + _SCALARS[item])
            if length > KEEP_ARRAY:
                self.skip(width * length)
                return LongArray(item, length)
            start = self.pos
            self.skip(width * length)
            return list(struct.unpack_from(f"<{length}{_SCALARS[item]}", self.view, start))
        if item == STRING:
            strings = [self.string() for _ in range(min(length, KEEP_ARRAY))]
            self.skip_strings(length - len(strings))
            return strings if length <= KEEP_ARRAY else LongArray(item, length)
        raise self.fail(f"array of value type {item}")

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = int(self.take("I"))  # type: ignore[call-overload]
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(int(self.take("Q")) for _ in range(n_dims))  # type: ignore[call-overload]
        kind = int(self.take("I"))  # type: ignore[call-overload]
        return name, shape, kind, int(self.take("Q"))  # type: ignore[call-overload]

    def tensor(self, data: int, name: str, shape: tuple[int, ...], kind: int, offset: int):
        if kind not in GGML_BLOCKS:
            raise self.fail(f"tensor {name!r} has unknown ggml type {kind}")
        block, block_bytes = GGML_BLOCKS[kind]
        elements = 1
        for n in shape:
            elements *= n
        if elements % block or elements > self.size * block:
            raise self.fail(f"tensor {name!r} has shape {list(shape)}")
        n_bytes = elements // block * block_bytes
        start = data + offset
        if start + n_bytes > self.size:
            raise DamagedFile(
                f"{self.path} is truncated ({self.size} of {start + n_bytes} bytes): a damaged file"
            )
        return Tensor(name, shape, kind, start, n_bytes)


def read_f32(header: Header, tensor: Tensor):
    """A copy of an F32 tensor's data as a flat numpy array."""
    import numpy as np

    if tensor.type != F32:
        raise DamagedFile(f"{header.path}: {tensor.name} must be an F32 tensor")
    with open(header.path, "rb") as f:
        f.seek(tensor.offset)
        data = f.read(tensor.n_bytes)
    if len(data) != tensor.n_bytes:
        raise DamagedFile(f"{header.path} is truncated: download or write it again")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
