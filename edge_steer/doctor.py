"""The doctor report: what this machine and its llama.cpp build can run, as JSON-ready data
(`edge-steer doctor` renders it; tools and tests read it). Heavy imports stay inside the
functions: the report is asked for from a CLI that must start fast."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def full_report(rpc: str | None = None) -> dict:
    """Build, CPU, memory, devices, RPC workers (`rpc`: "host:port,..."; None reads
    $EDGE_STEER_RPC) and where each catalog model runs here."""
    from . import catalog

    info: dict[str, Any] = {"rpc": rpc_report(rpc)}
    info.update(report())  # after the workers registered: their devices and memory count
    info["models"] = model_fits(catalog.entries(), info["ram"]["available"], info["vram_free"])
    return info


def rpc_report(given: str | None) -> dict:
    """Whether the build has RPC (else the rebuild command), and each worker's devices with
    free and total memory, or why it could not be asked."""
    from . import machine, rpc
    from .errors import EdgeSteerError

    supported = rpc.supported()
    workers = []
    for endpoint in rpc.parse_endpoints(given) if supported else []:
        entry: dict = {"endpoint": str(endpoint), "devices": [], "error": None}
        try:
            rpc.connect(str(endpoint))
        except EdgeSteerError as exc:
            entry["error"] = str(exc)
        else:
            entry["devices"] = [
                vars(d) for d in machine.devices([str(endpoint)]) if d.description == str(endpoint)
            ]
        workers.append(entry)
    return {
        "supported": supported,
        "rebuild_command": None if supported else rpc.rebuild_command(),
        "workers": workers,
    }


def report() -> dict:
    """Build, CPU, memory and devices as one JSON-ready dict."""
    import platform
    from importlib.metadata import version

    from . import ggml, machine

    backends = machine.backends()
    gpu_backends = machine.gpu_backends()  # registered RPC workers are listed under rpc
    command = None
    if not gpu_backends:
        command = machine.gpu_build_command(platform.system(), platform.machine())
    return {
        "build": {
            "llama_cpp_python": version("llama-cpp-python"),
            "backends": list(backends),
            "gpu_backends": gpu_backends,
        },
        "cpu": {
            "cores": machine.cpu_cores(),
            "threads": machine.math_cores(),
            "features": machine.cpu_features(),
            "amx_unused": ggml.drop_amx_buffer(),  # its kernels crash: see there
        },
        "ram": {"total": machine.total_ram(), "available": machine.available_ram()},
        "devices": [vars(d) for d in machine.devices()],
        "vram_free": machine.free_vram(),
        "gpu_build_command": command,
    }


def model_fits(entries: Iterable, available_ram: int, vram_free: int) -> list[dict]:
    """Where each catalog build runs here: 'gpu' (all of it in free VRAM), 'gpu+cpu' (split,
    e.g. experts in RAM), 'cpu', or 'no': the same test `pull` applies before downloading."""
    from . import catalog

    rows = []
    for entry in entries:
        needed = entry.ram_needed()
        if vram_free and needed <= vram_free:
            where = "gpu"
        elif catalog.fits(entry, available_ram, vram_free):
            where = "gpu+cpu" if vram_free else "cpu"
        else:
            where = "no"
        name = catalog.short_name(entry)
        rows.append({"name": name, "size": entry.size, "needed": needed, "runs_on": where})
    return rows
