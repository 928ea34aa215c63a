"""What this machine has: RAM, disk, cores, and the llama.cpp backends and devices it can use."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .constants import MAX_THREADS, VRAM_ENV, env
from .errors import BadInput


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * (1024 if fields[-1] == "kB" else 1)
    return values


def total_ram() -> int:
    """Physical memory in bytes."""
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_ram() -> int:
    """Memory a new process can use without swapping, in bytes (page cache counts as free)."""
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return total_ram()


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(_allowed_cpus()) or os.cpu_count() or 1


def check_thread_count(threads: int) -> None:
    """--threads (or threads=) within ggml's limit: every command, the worker and training."""
    if not 1 <= threads <= MAX_THREADS:
        raise BadInput(
            f"--threads {threads} is out of range: use 1 to {MAX_THREADS} "
            f"(leave it out for {math_cores()}, one per physical core here)"
        )


def math_cores(sysfs: Path = Path("/sys/devices")) -> int:
    """How many threads llama.cpp should compute with: the physical cores this process may
    run on, not their SMT twins, and on hybrid chips only the performance cores (llama.cpp's
    own default). Each step waits for its slowest thread, so a thread sharing a core with
    another, or on an efficiency core, slows every token down instead of speeding it up."""
    macos = _sysctl_int("hw.perflevel0.physicalcpu") or _sysctl_int("hw.physicalcpu")
    if macos:
        return macos
    cpus = _allowed_cpus()
    performance = _cpu_list(sysfs / "cpu_core" / "cpus")  # Intel hybrid: its P-cores
    cpus = (cpus & performance) or cpus
    cores = {
        _read(sysfs / "system" / "cpu" / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        for cpu in cpus
    }
    if not cpus or None in cores:
        return cpu_cores()
    return len(cores)


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_list(path: Path) -> set[int]:
    """A sysfs CPU list such as '0-7,16' as a set; empty where the file is missing."""
    cpus: set[int] = set()
    for part in (_read(path) or "").split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _sysctl_int(name: str) -> int | None:
    """A macOS sysctl integer (the number of performance cores, say); None elsewhere."""
    if not sys.platform.startswith("darwin"):
        return None
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    libc = ctypes.CDLL(None)
    if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0):
        return None
    return value.value if value.value > 0 else None


# -- backends and devices ------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A ggml backend device: 'cpu', 'gpu' (discrete or Apple), 'igpu', 'accel'."""

    name: str
    description: str
    kind: str
    free: int
    total: int


def devices(rpc: Sequence[str] | None = None) -> list[Device]:
    """Every device the installed llama.cpp build can use, with free and total memory (of RPC
    workers' devices only for the workers in `rpc`; None: all)."""
    from . import ggml

    return [Device(*found) for found in ggml.devices(rpc)]


def gpus() -> list[Device]:
    """This machine's devices llama.cpp offloads layers to: discrete GPUs, else integrated
    ones (RPC workers' devices are not this machine's: see `offload_devices`)."""
    found = [d for d in devices(rpc=()) if not is_rpc(d.name)]
    return [d for d in found if d.kind == "gpu"] or [d for d in found if d.kind == "igpu"]


def is_rpc(name: str) -> bool:
    """An RPC worker's device (RPC0, RPC1, ...), as ggml names them."""
    return name.startswith("RPC")


def rpc_servers() -> list[str]:
    """RPC workers registered in this process (none unless llama.cpp is already loaded)."""
    import sys

    loaded = sys.modules.get(f"{__package__}.ggml")
    return list(loaded.RPC_SERVERS) if loaded else []


def offload_devices(rpc: Sequence[str] = ()) -> list[Device]:
    """Where layers may go: this machine's GPUs, then the devices of the RPC workers `rpc`
    (host:port, registered beforehand), in the order llama.cpp fills them."""
    remote = [d for d in devices(rpc) if is_rpc(d.name) and d.description in rpc]
    return gpus() + remote


def backends() -> dict[str, dict[str, str]]:
    """Compiled-in backends (CPU, CUDA, Metal, ...) and the feature flags each reports."""
    from . import ggml

    return ggml.backends()


NOT_GPU_BACKENDS = {"CPU", "BLAS", "RPC"}  # backends that put no weights on a local GPU


def gpu_backends() -> list[str]:
    """Compiled-in backends that put weights on a local GPU (CUDA, Metal, Vulkan, ...).
    Not llama_supports_gpu_offload(), which is also true for a CPU build with RPC."""
    return [
        name for name in backends() if name not in NOT_GPU_BACKENDS and not name.startswith("RPC[")
    ]  # RPC[host:port]: a registered worker


def cpu_features() -> list[str]:
    """CPU features this llama.cpp build uses (AVX2, NEON, ...), as its CPU backend says."""
    flags = backends().get("CPU", {})
    return [name if value == "1" else f"{name}={value}" for name, value in flags.items()]


def free_vram(rpc: Sequence[str] = ()) -> int:
    """Bytes free on the offload devices together: GPUs, and the devices of the RPC workers
    `rpc` (llama.cpp splits layers by free memory); 0 without any. $EDGE_STEER_VRAM (e.g.
    10GiB) overrides it."""
    if budget := env(VRAM_ENV):
        return parse_size(budget, VRAM_ENV)
    if not gpu_backend_libraries() and not rpc:
        return 0  # a CPU-only build: no need to load llama.cpp to know (models list stays fast)
    return sum(d.free for d in offload_devices(rpc))


CPU_ONLY_LIBRARIES = {"ggml", "ggml-base", "ggml-cpu", "ggml-rpc", "ggml-blas", "llama", "mtmd"}


def gpu_backend_libraries() -> list[str]:
    """The ggml backend libraries next to libllama that can drive a GPU (ggml-cuda,
    ggml-metal, ggml-vulkan, ...): every backend is a library of its own. Unknown layout:
    assume there may be one."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return ["unknown"]
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not folder.is_dir():
        return ["unknown"]
    stems = {p.name.split(".")[0].removeprefix("lib") for p in folder.iterdir()}
    return sorted(s for s in stems if s.startswith("ggml") and s not in CPU_ONLY_LIBRARIES)


def parse_size(text: str, what: str) -> int:
    """'10GiB', '512MiB', '10G' or plain bytes -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise BadInput(f"{what}={text!r} is not a size: write e.g. 10GiB, 512MiB or bytes")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def gpu_build_command(system: str, machine: str) -> str:
    """The pip line that rebuilds llama-cpp-python with GPU support: Metal on Apple Silicon,
    CUDA elsewhere (NVIDIA; docs/install.md names Vulkan for other GPUs). Same version as
    installed."""
    from importlib.metadata import version

    flag = "-DGGML_METAL=on" if (system, machine) == ("Darwin", "arm64") else "-DGGML_CUDA=on"
    return (
        f'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir '
        f"llama-cpp-python=={version('llama-cpp-python')}"
    )


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise BadInput(f"--port {port}: use 1-65535")


def check_can_listen(host: str, port: int) -> None:
    """Refuse, before a server says it listens, a port it could not listen on: out of range,
    taken, or on a host that is no address of this machine."""
    check_port(port)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            fix = (
                "pass another --port, or stop what uses it"
                if exc.errno == errno.EADDRINUSE
                else "pass another --host (an address of this machine) or --port"
            )
            raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror}): {fix}") from None
