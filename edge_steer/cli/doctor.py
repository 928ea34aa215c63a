"""`edge-steer doctor`: what this machine and its llama.cpp build can run, and how to get a
GPU build when only the CPU backend is compiled in."""

from __future__ import annotations

import typer
from rich.markup import escape

from ..files import size_text
from .options import JsonOpt, RpcOpt, clean_errors, out, print_json


def register(app: typer.Typer) -> None:
    app.command()(doctor)


@clean_errors
def doctor(as_json: JsonOpt = False, rpc: RpcOpt = None) -> None:
    """Show the llama.cpp build, devices and memory, RPC workers, and which models fit."""
    from ..doctor import full_report

    info = full_report(rpc)
    if as_json:
        print_json(info)
    else:
        _render(info)
    if any(worker["error"] for worker in info["rpc"].get("workers", [])):
        raise typer.Exit(1)  # a worker named in --rpc could not be asked: scripts can tell


def _render(info: dict) -> None:
    from rich.table import Table

    size = size_text
    build = info["build"]
    gpu = ", ".join(build["gpu_backends"]) or "none compiled in"
    out.print(
        f"[bold]build[/]    llama-cpp-python {build['llama_cpp_python']}; "
        f"backends {', '.join(build['backends'])}; GPU: {gpu}"
    )
    cpu = info["cpu"]
    out.print(
        f"[bold]cpu[/]      {cpu['cores']} cores, {cpu['threads']} threads by default; "
        f"{' '.join(cpu['features'])}"
    )
    if cpu["amx_unused"]:
        out.print(
            "         AMX kernels left unused: they crash in this llama.cpp (issue 20824); "
            "weights keep the AVX layouts"
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
            out.print(f"  {worker['endpoint']}: [red]{escape(worker['error'])}[/]", highlight=False)
        for d in worker["devices"]:
            out.print(
                f"  {worker['endpoint']}: {d['name']} {size_text(d['free'])} free of "
                f"{size_text(d['total'])}",
                highlight=False,
            )
