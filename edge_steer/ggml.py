"""ctypes bindings for the few ggml functions llama-cpp-python does not bind.

Reading hidden states in the eval callback needs a tensor's name, shape and bytes; keeping
experts in CPU memory needs the CPU buffer type; `doctor` needs the backend device registry.
They live in the ggml libraries shipped in llama_cpp's `lib/` folder, next to libllama.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from . import constants

GGML_TYPE_F32 = 0
GGML_OP_NONE, GGML_OP_ADD = 0, 2  # enum ggml_op
MAX_DIMS, MAX_OP_PARAMS, MAX_SRC, MAX_NAME = 4, 64, 10, 64  # GGML_MAX_* of ggml.h


class Tensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h) up to its name: the shape the eval callbacks read, and
    the operands per-row steering repoints. `check_layout` proves it on a live tensor."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * MAX_DIMS),
        ("nb", ctypes.c_size_t * MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
    ]


def check_layout(tensor: int) -> None:
    """Raise unless `Tensor` lays out this ggml's tensors: ggml's own accessors for the name
    and the data must find them where `Tensor` says they are."""
    name_at = _symbol("ggml_get_name", (ctypes.c_void_p,), ctypes.c_void_p)(tensor)
    data_at = _symbol("ggml_get_data", (ctypes.c_void_p,), ctypes.c_void_p)(tensor)
    mine = Tensor.from_address(tensor)
    if name_at != tensor + Tensor.name.offset or data_at != mine.data:
        raise RuntimeError("this ggml's struct ggml_tensor is not the one edge-steer knows")


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class DeviceRows:
    """An F32 tensor of up to `capacity` rows of `width` floats in a buffer of type `buft`
    (a block's device: CPU, CUDA, Metal...), owned here; `write` sets its rows. Call `close`
    once no graph can read it."""

    def __init__(self, buft: int, width: int, capacity: int):
        size = _symbol("ggml_tensor_overhead", (), ctypes.c_size_t)()
        init = _symbol("ggml_init", (_InitParams,), ctypes.c_void_p)
        self._ctx = init(_InitParams(size, None, True))
        if not self._ctx:
            raise RuntimeError("ggml_init failed")
        new_2d = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        self.tensor = _symbol("ggml_new_tensor_2d", new_2d, ctypes.c_void_p)(
            self._ctx, GGML_TYPE_F32, width, capacity
        )
        alloc = _symbol(
            "ggml_backend_alloc_ctx_tensors_from_buft",
            (ctypes.c_void_p, ctypes.c_void_p),
            ctypes.c_void_p,
        )
        self._buffer = alloc(self._ctx, buft)
        if not self._buffer:
            self.close()
            raise RuntimeError(f"could not allocate {capacity} rows of {width} floats")
        self.capacity = capacity

    def write(self, rows: np.ndarray) -> None:
        """Make the tensor `rows` (n, width) on its device, as float32."""
        head = Tensor.from_address(self.tensor)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or not 0 < len(rows) <= self.capacity or rows.shape[1] != head.ne[0]:
            raise RuntimeError(f"{rows.shape} rows where {self.capacity} of {head.ne[0]} fit")
        head.ne[1] = len(rows)
        head.nb[2] = head.nb[3] = head.nb[1] * len(rows)
        tensor_set(self.tensor, rows.ctypes.data_as(ctypes.c_void_p), rows.nbytes)

    def close(self) -> None:
        if self._buffer:
            _symbol("ggml_backend_buffer_free", (ctypes.c_void_p,), None)(self._buffer)
            self._buffer = None
        if self._ctx:
            _symbol("ggml_free", (ctypes.c_void_p,), None)(self._ctx)
            self._ctx = None


def buffer_type(buffer: int) -> int:
    """The type of a backend buffer (which device and memory kind it is)."""
    return _symbol("ggml_backend_buffer_get_type", (ctypes.c_void_p,), ctypes.c_void_p)(buffer)


def _lib_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def _load(stem: str) -> ctypes.CDLL | None:
    """The copy of lib<stem> that libllama already uses.

    Wheels hold real copies (libggml-base.so, .so.0, .so.0.25.3), not symlinks, so loading
    another name maps a second instance with its own registry and its own CPU buffer type
    (llama.cpp compares that pointer). RTLD_NOLOAD finds the mapped one without loading.
    """
    candidates = sorted(_lib_dir().glob(f"*{stem}.*"))
    candidates = [p for p in candidates if p.name.split(".")[0] in (stem, f"lib{stem}")]
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is not None:
        for path in candidates:
            try:
                return ctypes.CDLL(str(path), mode=noload)
            except OSError:
                continue
    return ctypes.CDLL(str(candidates[0])) if candidates else None


@cache
def _symbol(name: str, argtypes: tuple, restype: object) -> ctypes._CFunctionType:
    """Find `name` in whichever ggml library exports it (the split differs between builds)."""
    for stem in ("ggml-base", "ggml", "ggml-cpu", "llama"):
        lib = _load(stem)
        if lib is not None and hasattr(lib, name):
            func: Any = lib[name]  # a function object of its own: attribute access shares one
            func.argtypes = list(argtypes)
            func.restype = restype
            return func
    raise RuntimeError(f"ggml symbol {name} not found in {_lib_dir()}")


BLOCK_OUTPUT = b"l_out-"  # llama.cpp's name for block il's output: l_out-<il>


def block_output_reader() -> Callable[[int], int]:
    """For eval callbacks, which ask it of every graph node: the block whose output a node
    is (`l_out-<il>`, after its control vector), or -1 for any other node."""
    name_of = _symbol("ggml_get_name", (ctypes.c_void_p,), ctypes.c_char_p)  # bound once
    skip = len(BLOCK_OUTPUT)

    def block_output(tensor: int) -> int:
        name = name_of(tensor) or b""
        return int(name[skip:]) if name.startswith(BLOCK_OUTPUT) else -1

    return block_output


_COPY = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)  # tensor, host, at, n


def tensor_get(tensor: int, into: int | ctypes.c_void_p, nbytes: int, offset: int = 0) -> None:
    """Copy `nbytes` of a tensor (on any backend) from byte `offset` into host memory."""
    _symbol("ggml_backend_tensor_get", _COPY, None)(tensor, into, offset, nbytes)


def tensor_set(tensor: int, data: ctypes.c_void_p, nbytes: int) -> None:
    """Write `nbytes` from host memory over the start of a tensor (on any backend)."""
    _symbol("ggml_backend_tensor_set", _COPY, None)(tensor, data, 0, nbytes)


def tensor_rows(tensor: int, rows: list[int] | None = None) -> np.ndarray:
    """Copy an F32 2-D tensor (ne0 = width, ne1 = rows) from any backend into a numpy array."""
    head = Tensor.from_address(tensor)
    if head.type != GGML_TYPE_F32:
        raise RuntimeError(f"expected an F32 tensor, got ggml type {head.type}")
    width, n_rows, row_stride = head.ne[0], head.ne[1], head.nb[1]
    wanted = range(n_rows) if rows is None else rows
    out = np.empty((len(wanted), width), dtype=np.float32)
    for i, row in enumerate(wanted):
        tensor_get(tensor, out[i].ctypes.data, width * 4, row * row_stride)
    return out


def cpu_buffer_type() -> int:
    """ggml's CPU buffer type: the `buft` of a tensor override that keeps weights in RAM."""
    return _symbol("ggml_backend_cpu_buffer_type", (), ctypes.c_void_p)()


DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")  # enum ggml_backend_dev_type

GGML_BACKEND_DEVICE_TYPE_CPU = 0
AMX_BUFFER = b"AMX"  # ggml-cpu's buffer type for Intel AMX re-laid-out weights


@cache
def drop_amx_buffer() -> bool:
    """Take the AMX buffer type out of the CPU device's extra buffer types, so no weight is
    laid out for llama.cpp's AMX kernels; True if it was there.

    Those kernels crash on Sapphire Rapids class Xeons (a SIGSEGV at the first matrix
    product: the tile configuration they load is invalid; llama.cpp issue 20824, fix open as
    PR 26954, not in llama-cpp-python 0.3.36). llama.cpp offers no switch for it short of
    `use_extra_bufts=False`, which would also drop the CPU_REPACK layouts every AVX2 and
    NEON CPU gains from. The list llama.cpp reads at each model load is the NULL-terminated
    array `ggml_backend_dev_get_extra_bufts` returns (static, built once): shifting the
    later entries over AMX's keeps CPU_REPACK and everything else exactly as before."""
    _ensure_backends()
    by_type = _symbol("ggml_backend_dev_by_type", (ctypes.c_int,), ctypes.c_void_p)
    cpu = by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    reg = _symbol("ggml_backend_dev_backend_reg", (ctypes.c_void_p,), ctypes.c_void_p)(cpu)
    address = _proc_address(reg, "ggml_backend_dev_get_extra_bufts") if reg else None
    get_extra_t = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
    array = get_extra_t(address)(cpu) if address else None
    if not array:  # no such function, or a NULL list
        return False
    name_of = _symbol("ggml_backend_buft_name", (ctypes.c_void_p,), ctypes.c_char_p)
    entries = list(itertools.takewhile(bool, (array[i] for i in itertools.count())))
    kept = [buft for buft in entries if name_of(buft) != AMX_BUFFER]
    for i, buft in enumerate(kept + [None] * (len(entries) + 1 - len(kept))):
        array[i] = buft  # as many entries as before, the last still NULL
    return len(kept) < len(entries)


def one_row_kernels() -> None:
    """Make llama.cpp's CPU matrix products give a row the same numbers whatever rows share
    its decode. From 8 rows on, ggml multiplies K-quant weights (Q4_K, Q6_K, ...) in plain
    layouts through a tiled kernel that rounds otherwise than its kernel for fewer rows:
    with it, 22 of 32 greedy replies of `serve --parallel 8` on the demo model parted from
    the replies they got alone. ggml reads the switch once, at its first such product, so
    this comes before any decode. Costs about a fifth of prompt speed on plain layouts
    (624 against 502 tokens/s on the demo model, 2 cores); repacked ones never take it."""
    constants.set_env(constants.TILED_MATMUL_ENV, "0")


def devices(rpc: Sequence[str] | None = None) -> list[tuple[str, str, str, int, int]]:
    """(name, description, type, free bytes, total bytes) of every device ggml registered.

    Asking an RPC device (RPC0: description host:port) for its memory connects to its worker,
    and llama.cpp aborts the process if the worker is gone: only those whose endpoint is in
    `rpc` (None: all) are asked; the others report 0 bytes."""
    _ensure_backends()
    get = _symbol("ggml_backend_dev_get", (ctypes.c_size_t,), ctypes.c_void_p)
    text = {
        field: _symbol(f"ggml_backend_dev_{field}", (ctypes.c_void_p,), ctypes.c_char_p)
        for field in ("name", "description")
    }
    kind = _symbol("ggml_backend_dev_type", (ctypes.c_void_p,), ctypes.c_int)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    memory = _symbol("ggml_backend_dev_memory", (ctypes.c_void_p, size_p, size_p), None)
    found = []
    for i in range(_symbol("ggml_backend_dev_count", (), ctypes.c_size_t)()):
        dev = get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        names = [(text[f](dev) or b"").decode(errors="replace") for f in ("name", "description")]
        if rpc is None or not names[0].startswith("RPC") or names[1] in rpc:
            memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind_name = DEVICE_TYPES[k] if 0 <= (k := kind(dev)) < len(DEVICE_TYPES) else "unknown"
        found.append((names[0], names[1], kind_name, free.value, total.value))
    return found


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def backends() -> dict[str, dict[str, str]]:
    """Each registered backend (CPU, CUDA, Metal, ...) with the feature flags it reports
    (CPU: AVX2 = 1, NEON = 1, ...; CUDA: ARCHS = ...)."""
    _ensure_backends()
    reg_get = _symbol("ggml_backend_reg_get", (ctypes.c_size_t,), ctypes.c_void_p)
    reg_name = _symbol("ggml_backend_reg_name", (ctypes.c_void_p,), ctypes.c_char_p)
    get_features_t = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)
    found = {}
    for i in range(_symbol("ggml_backend_reg_count", (), ctypes.c_size_t)()):
        reg = reg_get(i)
        features: dict[str, str] = {}
        address = _proc_address(reg, "ggml_backend_get_features")
        if address:
            array, i = get_features_t(address)(reg), 0
            while array[i].name:  # NULL-terminated
                features[array[i].name.decode()] = (array[i].value or b"").decode()
                i += 1
        found[(reg_name(reg) or b"?").decode()] = features
    return found


def _proc_address(reg: int, name: str) -> int | None:
    """A function a backend exports through its registry (not to the dynamic linker)."""
    proc = _symbol(
        "ggml_backend_reg_get_proc_address", (ctypes.c_void_p, ctypes.c_char_p), ctypes.c_void_p
    )
    return proc(reg, name.encode()) or None


def _ensure_backends() -> None:
    """Builds with dynamically loaded backends register nothing until asked to load them."""
    if _symbol("ggml_backend_reg_count", (), ctypes.c_size_t)() == 0:
        _symbol("ggml_backend_load_all", (), None)()


# -- RPC backend (llama-cpp-python built with -DGGML_RPC=on) ---------------------------------

# RPC_PROTO_MAJOR/MINOR_VERSION of ggml-rpc.h in the llama.cpp each llama-cpp-python vendors;
# the worker's HELLO must match it. Versions missing here are left to llama.cpp's own check.
RPC_PROTOCOL = {"0.3.36": (7, 0)}
RPC_SERVERS: list[str] = []  # endpoints registered in this process (llama.cpp keeps them all)
_ADD_SERVER_T = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER_T = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p
)
ABORT_CALLBACK_T = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _rpc_proc(name: str) -> int | None:
    """The address of an RPC backend function, found through ggml's backend registry (the
    RPC library exports nothing the dynamic linker can promise across builds)."""
    _ensure_backends()
    by_name = _symbol("ggml_backend_reg_by_name", (ctypes.c_char_p,), ctypes.c_void_p)
    reg = by_name(b"RPC")
    return _proc_address(reg, name) if reg else None


def has_rpc() -> bool:
    """Whether this llama.cpp build has the RPC backend compiled in."""
    return _rpc_proc("ggml_backend_rpc_add_server") is not None


def rpc_add_server(endpoint: str) -> bool:
    """Ask `endpoint` for its devices and register them with ggml, so that llama.cpp offloads
    to them like GPUs. False if the worker reports no device. The worker must answer: an
    unreachable one makes llama.cpp abort the process."""
    address = _rpc_proc("ggml_backend_rpc_add_server")
    if address is None:
        raise RuntimeError("this llama.cpp build has no RPC backend")
    reg = _ADD_SERVER_T(address)(endpoint.encode())
    if not reg:
        return False
    if endpoint not in RPC_SERVERS:  # registering twice would list its devices twice
        _symbol("ggml_backend_register", (ctypes.c_void_p,), None)(reg)
        RPC_SERVERS.append(endpoint)
    return True


def device_by_name(name: str) -> int | None:
    _ensure_backends()
    return _symbol("ggml_backend_dev_by_name", (ctypes.c_char_p,), ctypes.c_void_p)(name.encode())


def rpc_start_server(endpoint: str, cache_dir: str | None, threads: int, names: list[str]) -> None:
    """Serve `endpoint` with the named devices until the process ends; returns only when
    llama.cpp could not start (bad endpoint, port taken, a device that will not open)."""
    address = _rpc_proc("ggml_backend_rpc_start_server")
    if address is None:
        raise RuntimeError("this llama.cpp build has no RPC backend")
    found = [device_by_name(name) for name in names]
    devices = (ctypes.c_void_p * len(found))(*found)  # referenced for the whole call
    cache = cache_dir.encode() if cache_dir else None
    _START_SERVER_T(address)(endpoint.encode(), cache, threads, len(found), devices)


def set_abort_callback(callback: ctypes._CFunctionType | None) -> None:
    """Run `callback(message)` before ggml aborts the process (a GGML_ABORT anywhere). The
    caller keeps the callback object referenced for as long as it is installed."""
    _symbol("ggml_set_abort_callback", (ABORT_CALLBACK_T,), ctypes.c_void_p)(callback)
