"""`edge-steer doctor`: what this machine and its llama.cpp build can run, and how to get a
GPU build when only the CPU backend is compiled in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import typer

from ..files import size_text
from .options import JsonOpt, RpcOpt, clean_errors, out, print_json


def rpc_report(given: str | None) -> dict:
    """Whether the build has RPC (else the rebuild command), and each worker's devices with
    free and total memory, or why it could not be asked."""
    from .. import machine, rpc
    from ..errors import EdgeSteerError

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

    from .. import machine

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
        "cpu": {"cores": machine.cpu_cores(), "features": machine.cpu_features()},
        "ram": {"total": machine.total_ram(), "available": machine.available_ram()},
        "devices": [vars(d) for d in machine.devices()],
        "vram_free": machine.free_vram(),
        "gpu_build_command": command,
    }


def model_fits(entries: Iterable, available_ram: int, vram_free: int) -> list[dict]:
    """Where each catalog build runs here: 'gpu' (all of it in free VRAM), 'gpu+cpu' (split,
    e.g. experts in RAM), 'cpu', or 'no': the same test `pull` applies before downloading."""
    from .. import catalog

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


def register(app: typer.Typer) -> None:
    app.command()(doctor)


@clean_errors
def doctor(as_json: JsonOpt = False, rpc: RpcOpt = None) -> None:
    """Show the llama.cpp build, devices and memory, RPC workers, and which models fit."""
    from .. import catalog

    info: dict[str, Any] = {"rpc": rpc_report(rpc or "")}
    info.update(report())  # after the workers registered: their devices and memory count
    info["models"] = model_fits(catalog.entries(), info["ram"]["available"], info["vram_free"])
    if as_json:
        print_json(info)
        return
    _render(info)


def _render(info: dict) -> None:
    from rich.table import Table

    size = size_text
    build = info["build"]
    gpu = ", ".join(build["gpu_backends"]) or "none compiled in"
    out.print(
        f"[bold]build[/]    llama-cpp-python {build['llama_cpp_python']}; "
        f"backends {', '.join(build['backends'])}; GPU: {gpu}"
    )
    out.print(
        f"[bold]cpu[/]      {info['cpu']['cores']} cores; {' '.join(info['cpu']['features'])}"
    )
    ram, vram = info["ram"], info["vram_free"]
    out.print(
        f"[bold]memory[/]   {size(ram['total'])} RAM, {size(ram['available'])} available; "
        + (f"{size(vram)} free on GPUs and RPC workers" if vram else "no GPU memory")
    )
    devices = Table("device", "type", "description", "free", "total", box=None)
    for d in info["devices"]:
        devices.add_row(d["name"], d["kind"], d["description"], size(d["free"]), size(d["total"]))
    out.print(devices)
    _render_rpc(info["rpc"])
    if info["gpu_build_command"]:
        out.print("[bold]GPU build[/] (only the CPU backend is compiled in):")
        out.print(info["gpu_build_command"], markup=False)
    if info["models"]:
        table = Table("model", "file", "needs", "runs on", box=None)
        for m in info["models"]:
            file = size_text(m["size"], decimal=True)  # files as the Hub sizes them
            table.add_row(m["name"], file, size(m["needed"]), m["runs_on"])
        out.print(table)


def _render_rpc(info: dict) -> None:
    if not info["supported"]:
        out.print("[bold]rpc[/]      not in this build; rebuild llama-cpp-python with:")
        out.print(info["rebuild_command"], markup=False)
        return
    out.print(
        "[bold]rpc[/]      built in; "
        + (f"{len(info['workers'])} worker(s) from --rpc" if info["workers"] else "no --rpc given")
    )
    for worker in info["workers"]:
        if worker["error"]:
            out.print(f"  {worker['endpoint']}: [red]{worker['error']}[/]", highlight=False)
        for d in worker["devices"]:
            out.print(
                f"  {worker['endpoint']}: {d['name']} {size_text(d['free'])} free of "
                f"{size_text(d['total'])}",
                highlight=False,
            )
