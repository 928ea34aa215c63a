"""`edge-steer pull` and `edge-steer models ...`: fetch catalog models, list, inspect, remove."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import BadInput, NotFound
from ..files import looks_like_path, size_text
from .options import JsonOpt, clean_errors, err, model_file, out

models_app = typer.Typer(
    no_args_is_help=True, help="The model catalog: what can be pulled, and what is downloaded."
)
NameArg = Annotated[
    str,
    typer.Argument(help="Catalog name (mistral:q4_k_m, demo), hf:OWNER/REPO/FILE.gguf or a path."),
]
SpecArg = Annotated[str, typer.Argument(help="Catalog name, or hf:OWNER/REPO/FILE.gguf.")]
OfflineOpt = Annotated[
    bool, typer.Option("--offline", help="Use only the local cache (as HF_HUB_OFFLINE=1 does).")
]


ForceOpt = Annotated[
    bool, typer.Option("--force", help="Go ahead even if RAM or disk looks too small.")
]


@clean_errors
def pull(name: SpecArg, offline: OfflineOpt = False, force: ForceOpt = False) -> None:
    """Download a model (catalog name or hf:REPO/FILE) into the Hugging Face cache, verified."""
    if not name.strip():
        raise BadInput("no model named: give a catalog name (edge-steer models list) or hf:...")
    out.print(str(model_file(name, force=force, offline=offline)), markup=False)  # for $(...)


def _describe_file(spec: str) -> dict:
    """An hf:REPO/FILE outside the catalog: what its download recorded."""
    from .. import download

    src = download.source(spec)
    path = download.cached_path(src)
    seen = download.recorded(path) if path else None
    return {
        "name": src.name,
        "source": src.name,
        "revision": src.revision,
        "size": seen["size"] if seen else None,
        "size_exact": seen is not None,
        "sha256": seen["sha256"] if seen else None,
        "downloaded": path is not None,
        "path": str(path) if path else None,
    }


def _describe_local(path: Path) -> dict:
    """A GGUF file of one's own: what its header says."""
    from .. import model_files

    if not path.is_file():
        raise NotFound(f"no file {path}: give the path of a .gguf model")
    shape = model_files.model_shape(path)
    return {
        "name": path.name,
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "architecture": shape.architecture,
        "blocks": shape.n_layer,
        "n_embd": shape.n_embd,
    }


def _describe(entry) -> dict:
    """A catalog entry; once downloaded, with the file's own size and sha256."""
    from .. import catalog, download, machine

    src = download.source(entry.name)
    path = download.cached_path(src)
    if path and download.size_problem(src, path.resolve().stat().st_size):
        path = None  # cut short or another file: `pull` fetches it again
    seen = download.recorded(path) if path and not entry.pypi else None
    return {
        "name": catalog.short_name(entry),
        "title": entry.title,
        "quant": entry.quant,
        "source": f"pypi:{entry.pypi}" if entry.pypi else f"hf:{entry.repo}/{entry.file}",
        "revision": entry.revision,
        "size": seen["size"] if seen else entry.size,
        "size_exact": bool(seen) or entry.size_exact,
        "sha256": seen["sha256"] if seen else entry.sha256,
        "arch": entry.arch,
        "params_b": entry.params_b,
        "active_params_b": entry.active_params_b,
        "context": entry.context,
        "ram_needed": entry.ram_needed(),
        "fits": catalog.fit_problem(
            entry, available_ram=machine.available_ram(), free_vram=machine.free_vram()
        )
        is None,
        "downloaded": path is not None,
        "path": str(path) if path else None,
        "note": entry.note,
    }


def _size(info: dict) -> str:
    return ("" if info["size_exact"] else "~") + size_text(info["size"], decimal=True)


@models_app.command("list")
@clean_errors
def list_models(as_json: JsonOpt = False) -> None:
    """The catalog: sizes, RAM needed at 4096 tokens of context, what fits and what is here."""
    from .. import catalog, model_files

    rows = [_describe(e) for e in catalog.entries()]
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "model", "size", "RAM", "fits", "downloaded", box=None)
    for r in rows:
        active = f", {r['active_params_b']}B active" if r["active_params_b"] else ""
        table.add_row(
            r["name"],
            f"{r['title']} ({r['params_b']}B{active})",
            _size(r),
            size_text(r["ram_needed"]),
            "yes" if r["fits"] else "no",
            "yes" if r["downloaded"] else "",
        )
    out.print(table)
    default = model_files.default_model()
    err.print(f"[dim]default {default} · ~ size not pinned, checked at download[/]")


@models_app.command("info")
@clean_errors
def info(name: NameArg, as_json: JsonOpt = False) -> None:
    """Everything the catalog knows about one model file, and whether it is downloaded."""

    from .. import catalog

    if name.startswith("hf:"):
        data = _describe_file(name)
    elif looks_like_path(name):
        data = _describe_local(Path(name).expanduser())
    else:
        data = _describe(catalog.lookup(name))
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        if value is None:
            value = "not downloaded" if key == "path" else "-"
        elif key in ("size", "ram_needed"):
            value = f"{value} bytes ({size_text(value, decimal=key == 'size')})"
        out.print(f"[bold]{key}[/]: {escape(str(value))}")


@models_app.command("rm")
@clean_errors
def rm(name: SpecArg) -> None:
    """Delete a downloaded model file from the cache."""
    from .. import download

    if looks_like_path(name) and not name.startswith(download.HF_PREFIX):
        raise BadInput(
            f"models rm deletes downloads (a catalog name or hf:REPO/FILE.gguf): delete your "
            f"own file {name} yourself"
        )
    src = download.source(name)
    if not download.remove(src):
        err.print(f"[dim]{escape(src.name)} is not downloaded[/]")
        return
    out.print(f"removed {src.name}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    models_app.command("ls", hidden=True)(list_models)  # the names people type (ollama list)
    app.command("list", hidden=True)(list_models)
    app.add_typer(models_app, name="models")
