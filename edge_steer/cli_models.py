"""`edge-steer pull` and `edge-steer models ...`: fetch catalog models, list, inspect, remove."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import catalog, download, hardware, hub
from .cli import ForceOpt, JsonOpt, app, clean_errors, err, out

models_app = typer.Typer(
    no_args_is_help=True, help="The model catalog: what can be pulled, and what is downloaded."
)
NameArg = Annotated[
    str, typer.Argument(help="Catalog name (mistral:q4_k_m, mixtral:q3_k_m, demo).")
]
SpecArg = Annotated[str, typer.Argument(help="Catalog name, or hf:OWNER/REPO/FILE.gguf.")]
OfflineOpt = Annotated[
    bool, typer.Option("--offline", help="Use only the local cache (as HF_HUB_OFFLINE=1 does).")
]


class RichBar:
    """What huggingface_hub asks of its `tqdm_class` (keyword construction, update, close, a
    context manager), drawn by rich on stderr with size, speed and ETA."""

    def __init__(self, *_, total: int | None = None, initial: int = 0, desc: str = "", **__):
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self._task = self._progress.add_task(desc, total=total, completed=initial)
        self._progress.start()

    def update(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    @property
    def n(self) -> int:
        return int(self._progress.tasks[0].completed)

    @property
    def total(self) -> int | None:
        total = self._progress.tasks[0].total
        return None if total is None else int(total)

    @total.setter
    def total(self, value: int | None) -> None:
        self._progress.update(self._task, total=value)

    def ignore(self, *_, **__) -> None:
        """Xet downloads also report network bytes and speed text; the bar shows bytes written."""

    update_transfer = set_postfix_str = set_transfer_postfix_str = refresh = ignore

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> RichBar:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def resolve(
    model: str,
    *,
    offline: bool = False,
    force: bool = False,
    use_gpu: bool = True,
    ctx: int = catalog.DEFAULT_CTX,
) -> Path:
    """hub.resolve_model, telling the user on stderr what it downloads, with a progress bar."""
    return hub.resolve_model(
        model,
        offline=offline,
        force=force,
        use_gpu=use_gpu,
        ctx=ctx,
        say=lambda message: err.print(f"[dim]{escape(message)}[/]"),
        tqdm_class=RichBar,
    )


@clean_errors
def pull(name: SpecArg, offline: OfflineOpt = False, force: ForceOpt = False) -> None:
    """Download a model (catalog name or hf:REPO/FILE) into the Hugging Face cache, verified."""
    out.print(str(resolve(name, force=force, offline=offline)))


def _describe(entry: catalog.Entry) -> dict:
    path = download.cached_path(download.source(entry.name))
    return {
        "name": catalog.short_name(entry),
        "title": entry.title,
        "quant": entry.quant,
        "source": f"pypi:{entry.pypi}" if entry.pypi else f"hf:{entry.repo}/{entry.file}",
        "revision": entry.revision,
        "size": entry.size,
        "size_exact": entry.size_exact,
        "sha256": entry.sha256,
        "arch": entry.arch,
        "params_b": entry.params_b,
        "active_params_b": entry.active_params_b,
        "context": entry.context,
        "ram_needed": entry.ram_needed(),
        "fits": catalog.fit_problem(
            entry, available_ram=hardware.available_ram(), free_vram=hardware.free_vram()
        )
        is None,
        "downloaded": path is not None,
        "path": str(path) if path else None,
        "note": entry.note,
    }


def _size(info: dict) -> str:
    return ("" if info["size_exact"] else "~") + catalog.fmt(info["size"])


@models_app.command("list")
@clean_errors
def list_models(as_json: JsonOpt = False) -> None:
    """The catalog: sizes, RAM needed at 4096 tokens of context, what fits and what is here."""
    rows = [_describe(e) for e in catalog.entries()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "model", "size", "RAM", "fits", "downloaded", box=None)
    for r in rows:
        active = f", {r['active_params_b']}B active" if r["active_params_b"] else ""
        table.add_row(
            r["name"],
            f"{r['title']} ({r['params_b']}B{active})",
            _size(r),
            catalog.fmt(r["ram_needed"]),
            "yes" if r["fits"] else "no",
            "yes" if r["downloaded"] else "",
        )
    out.print(table)
    err.print(f"[dim]default {catalog.default_name()} · ~ size not pinned, checked at download[/]")


@models_app.command("info")
@clean_errors
def info(name: NameArg, as_json: JsonOpt = False) -> None:
    """Everything the catalog knows about one model file, and whether it is downloaded."""
    data = _describe(catalog.lookup(name))
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        if key in ("size", "ram_needed"):
            value = f"{value} bytes ({catalog.fmt(value)})"
        out.print(f"[bold]{key}[/]: {escape(str(value))}")


@models_app.command("rm")
@clean_errors
def rm(name: SpecArg) -> None:
    """Delete a downloaded model file from the cache."""
    src = download.source(name)
    if not download.remove(src):
        err.print(f"[dim]{src.name} is not downloaded[/]")
        return
    out.print(f"removed {src.name}")


app.command("pull")(pull)
app.add_typer(models_app, name="models")
