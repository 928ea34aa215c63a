"""ctypes bindings for the few ggml functions llama-cpp-python does not bind.

Reading hidden states in the eval callback needs a tensor's name, shape and bytes. These live
in the ggml libraries shipped in llama_cpp's `lib/` folder, next to libllama.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from pathlib import Path

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0
MAX_DIMS = 4


class TensorHead(ctypes.Structure):
    """The stable first fields of `struct ggml_tensor` (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * MAX_DIMS),
        ("nb", ctypes.c_size_t * MAX_DIMS),
    ]


def _lib_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def _load(stem: str) -> ctypes.CDLL | None:
    names = {"win32": [f"{stem}.dll", f"lib{stem}.dll"], "darwin": [f"lib{stem}.dylib"]}
    for name in names.get(sys.platform, [f"lib{stem}.so"]):
        path = _lib_dir() / name
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


@cache
def _symbol(name: str, argtypes: tuple, restype: object) -> ctypes._CFuncPtr:
    """Find `name` in whichever ggml library exports it (the split differs between builds)."""
    for stem in ("ggml-base", "ggml", "ggml-cpu", "llama"):
        lib = _load(stem)
        if lib is not None and hasattr(lib, name):
            func = getattr(lib, name)
            func.argtypes = list(argtypes)
            func.restype = restype
            return func
    raise RuntimeError(f"ggml symbol {name} not found in {_lib_dir()}")


def tensor_name(tensor: int) -> bytes:
    return _symbol("ggml_get_name", (ctypes.c_void_p,), ctypes.c_char_p)(tensor) or b""


def tensor_rows(tensor: int, rows: list[int] | None = None) -> np.ndarray:
    """Copy an F32 2-D tensor (ne0 = width, ne1 = rows) from any backend into a numpy array."""
    head = TensorHead.from_address(tensor)
    if head.type != GGML_TYPE_F32:
        raise RuntimeError(f"expected an F32 tensor, got ggml type {head.type}")
    width, n_rows, row_stride = head.ne[0], head.ne[1], head.nb[1]
    get = _symbol(
        "ggml_backend_tensor_get",
        (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t),
        None,
    )
    wanted = range(n_rows) if rows is None else rows
    out = np.empty((len(wanted), width), dtype=np.float32)
    for i, row in enumerate(wanted):
        get(tensor, out[i].ctypes.data, row * row_stride, width * 4)
    return out
