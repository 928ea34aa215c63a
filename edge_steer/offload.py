"""How to split a model between GPU and CPU memory (layers, MoE experts) so that it fits,
planned from the GGUF header before llama.cpp loads anything."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import gguffile, machine, repack
from .errors import BadInput, DamagedFile, DoesNotFit
from .files import size_text

EXPERT_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # the pattern of llama.cpp's --cpu-moe
RESERVE = 512 << 20  # GPU runtime, cuBLAS workspace, fragmentation: what `auto` leaves free
_EXPERT = re.compile(EXPERT_REGEX)
_BLOCK = re.compile(r"blk\.(\d+)\.")


def first_offloaded(n_layer: int, gpu_layers: int) -> int:
    """The first block llama.cpp puts on the GPU for `gpu_layers` (n_gpu_layers): the output
    layer counts as one, then the blocks from the last one down."""
    return max(n_layer - (gpu_layers - 1), 0)


@dataclass(frozen=True)
class Weights:
    """A GGUF's weight bytes by where llama.cpp can place them, read before loading it.

    llama.cpp offloads `n_gpu_layers` from the top: the output layer counts as one, then the
    blocks from the last one down. Token embeddings always stay in CPU memory.
    """

    blocks: tuple[int, ...]  # non-expert bytes of each block
    experts: tuple[int, ...]  # expert bytes of each block
    output: int  # output norm and head (with tied embeddings, llama.cpp's copy of them)
    kv_per_token: int  # F16 K and V cache bytes per token, all blocks
    n_vocab: int
    n_head: int

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def is_moe(self) -> bool:
        return any(self.experts)

    def on_gpu(self, gpu_layers: int, moe_layers: int) -> int:
        """Weight bytes on the GPU with `gpu_layers` offloaded and the experts of the first
        `moe_layers` blocks kept in CPU memory."""
        if gpu_layers <= 0:
            return 0
        first = first_offloaded(self.n_layer, gpu_layers)
        return self.output + sum(
            self.blocks[i] + (self.experts[i] if i >= moe_layers else 0)
            for i in range(first, self.n_layer)
        )

    def context(self, n_ctx: int, n_ubatch: int = 512) -> int:
        """GPU bytes a context needs besides the weights: the KV cache, an estimate of the
        compute buffer (F32 logits and attention scores of one micro-batch), and RESERVE."""
        compute = 4 * n_ubatch * (self.n_vocab + self.n_head * n_ctx)
        return self.kv_per_token * n_ctx + compute + RESERVE


def read_weights(header: gguffile.Header) -> Weights:
    """Sizes and shapes from a GGUF header (no weights are read)."""
    arch = header.architecture or "llama"
    n_layer = header.arch_int("block_count")
    if n_layer is None or not 1 <= n_layer <= len(header.tensors):
        raise DamagedFile(
            f"{header.path}: no {arch}.block_count in its metadata: cannot plan offloading"
        )
    blocks, experts = [0] * n_layer, [0] * n_layer
    output = embeddings = n_vocab = 0
    tied = True
    for tensor in header.tensors:
        size, block = tensor.n_bytes, _BLOCK.match(tensor.name)
        if block:
            if int(block.group(1)) < n_layer:  # extra (MTP) blocks are not loaded by default
                (experts if _EXPERT.search(tensor.name) else blocks)[int(block.group(1))] += size
        elif tensor.name.startswith("token_embd."):
            embeddings += size
            n_vocab = max(n_vocab, tensor.shape[-1])
        else:
            output += size
            tied &= tensor.name != "output.weight"

    def meta(key: str, default: object) -> object:
        return header.get(f"{arch}.{key}", default)

    per_layer = _per_layer(meta("attention.head_count", 1), n_layer)
    n_embd = header.arch_int("embedding_length") or 0
    k = meta("attention.key_length", n_embd // max(max(per_layer), 1))
    v = meta("attention.value_length", k)
    kv_heads = _per_layer(meta("attention.head_count_kv", per_layer), n_layer)
    return Weights(
        blocks=tuple(blocks),
        experts=tuple(experts),
        output=output + (embeddings if tied else 0),
        kv_per_token=2 * (int(k) + int(v)) * sum(kv_heads),  # type: ignore[call-overload]
        n_vocab=n_vocab,
        n_head=max(per_layer),
    )


def _per_layer(value: object, n_layer: int) -> list[int]:
    """A head count that GGUF stores either once or per layer."""
    if isinstance(value, list) and len(value) == n_layer:
        return [int(v) for v in value]
    return [int(value) if isinstance(value, int) else 1] * n_layer


def expert_patterns(moe_layers: int, n_layer: int) -> list[str]:
    """llama.cpp tensor-name regexes for the experts of blocks 0 .. moe_layers-1."""
    if moe_layers >= n_layer:
        return [EXPERT_REGEX]
    return [rf"blk\.{i}{EXPERT_REGEX}" for i in range(moe_layers)]


def plan_moe_offload(
    weights: Weights, free: int, context: int, gpu_layers: int | None = None
) -> int | None:
    """Fewest blocks (from the first) whose experts must stay in CPU memory so that the rest
    of `gpu_layers` (default: all) and the context fit in `free` GPU bytes; None if even all
    experts on the CPU are not enough."""
    layers = weights.n_layer + 1 if gpu_layers is None else gpu_layers
    for moe_layers in range(weights.n_layer + 1):
        if weights.on_gpu(layers, moe_layers) + context <= free:
            return moe_layers
    return None


def plan_gpu_layers(weights: Weights, free: int, context: int, moe_layers: int = 0) -> int:
    """Most layers (the output layer, then blocks from the last) that fit with the context."""
    for layers in range(weights.n_layer + 1, 0, -1):
        if weights.on_gpu(layers, moe_layers) + context <= free:
            return layers
    return 0


def parse_gpu_layers(text: str | None) -> int | str | None:
    """--gpu-layers N|all|auto -> int, 'all' or 'auto' (None: not given, which means auto).
    -1 is llama.cpp's spelling of all."""
    if text is not None and text.strip() == "-1":
        return "all"
    return _parse_count("--gpu-layers", text, ("all", "auto"))


def parse_moe_offload(text: str | None) -> int | str | None:
    """--moe-offload none|all|N|auto -> int (none = 0), 'all' or 'auto' (None: not given)."""
    value = _parse_count("--moe-offload", text, ("none", "all", "auto"))
    return 0 if value == "none" else value


def _parse_count(option: str, text: str | None, words: tuple[str, ...]) -> int | str | None:
    if text is None:
        return None
    value = text.strip().lower()
    if value in words:
        return value
    if value.isdigit():
        return int(value)
    raise BadInput(f"{option} {text}: use {', '.join(words)} or a number of layers (0 or more)")


@dataclass(frozen=True)
class Offload:
    """Where the weights go (what engine.Model takes), and what `auto` chose, for the user."""

    gpu_layers: int  # llama.cpp's n_gpu_layers: the output layer counts as one
    moe_layers: int  # blocks, from the first, whose experts stay in CPU memory
    cpu_tensors: tuple[str, ...]  # tensor-name regexes kept in CPU memory
    gpu_bytes: int  # estimated weight bytes on the GPU
    notes: tuple[str, ...] = ()
    mmap: bool = True  # map the file (False: read it, as llama.cpp would repack much of it)

    def on_cpu(self, name: str, n_layer: int) -> bool:
        """Whether weight `name` stays in CPU memory under this plan."""
        if self.gpu_bytes == 0:
            return True
        block = _BLOCK.match(name)
        if block is None:
            return name.startswith("token_embd.")  # the output layer is offloaded first
        index = int(block.group(1))
        if _EXPERT.search(name) and index < self.moe_layers:
            return True
        return index < first_offloaded(n_layer, self.gpu_layers)


def plan_offload(
    weights: Weights,
    gpu_option: str | None,
    moe_option: str | None,
    *,
    free: int,
    context: int,
    where: str = "GPU",
) -> Offload:
    """Resolve --gpu-layers and --moe-offload for one model and `free` GPU bytes (0: no GPU).

    With both on auto, a MoE model gets all layers on the GPU and the experts of as few
    leading blocks in CPU memory as make the rest fit; if even all experts on the CPU are not
    enough, as many layers as fit. Options not given (None) act as auto but stay quiet on
    CPU-only machines, where there is nothing to decide.
    """
    gpu, moe = parse_gpu_layers(gpu_option), parse_moe_offload(moe_option)
    _check_counts(weights, gpu, moe)
    top, n = weights.n_layer + 1, weights.n_layer
    fixed_moe = n if moe == "all" else moe if isinstance(moe, int) else None
    if free <= 0:
        return _cpu_only(weights, gpu, moe, fixed_moe or 0)
    if gpu in (None, "auto"):
        moe_layers = _auto_moe(weights, free, context, None) if fixed_moe is None else fixed_moe
        layers = plan_gpu_layers(weights, free, context, moe_layers)
        if layers == 0 and fixed_moe is None:
            moe_layers = 0  # nothing on the GPU: no experts to keep off it
    else:
        layers = top if gpu == "all" else int(gpu)
        moe_layers = _auto_moe(weights, free, context, layers) if fixed_moe is None else fixed_moe
    notes = _notes(weights, gpu, moe, layers, moe_layers, free, context, where)
    return _offload(weights, layers, moe_layers, notes, gpu_bytes=True)


def _notes(weights: Weights, gpu, moe, layers, moe_layers, free, context, where: str):
    """One line per choice `auto` made, and a warning when fixed counts will not fit;
    `where` names the offload devices (GPU, or GPU/RPC with workers)."""
    used, top = weights.on_gpu(layers, moe_layers), weights.n_layer + 1
    gpu_text, free_text = size_text(used), size_text(free)
    notes = []
    if moe in (None, "auto") and weights.is_moe:
        split = f"{_experts(moe_layers, weights.n_layer)} on CPU, {gpu_text} on {where}"
        notes.append(f"moe-offload auto: {split if layers else f'no layers on {where}: none'}")
    elif moe == "auto":
        notes.append("moe-offload auto: not a mixture-of-experts model: nothing to offload")
    if gpu in (None, "auto"):
        notes.append(
            f"gpu-layers auto: {layers} of {top} layers on {where} ({gpu_text} of weights "
            f"+ {size_text(context)} for the context; {free_text} free)"
        )
    elif layers and used + context > free:
        notes.append(
            f"--gpu-layers {gpu}: about {size_text(used + context)} needed on {where} but "
            f"{free_text} is free; llama.cpp may fail to allocate: try --gpu-layers auto"
        )
    return tuple(notes)


def _auto_moe(weights: Weights, free: int, context: int, gpu_layers: int | None) -> int:
    """plan_moe_offload, with all experts on the CPU when nothing fits (0 for dense models)."""
    if not weights.is_moe:
        return 0
    found = plan_moe_offload(weights, free, context, gpu_layers)
    return weights.n_layer if found is None else found


def _check_counts(weights: Weights, gpu: int | str | None, moe: int | str | None) -> None:
    top, n = weights.n_layer + 1, weights.n_layer
    if isinstance(gpu, int) and gpu > top:
        raise BadInput(
            f"--gpu-layers {gpu}: the model has {top} layers to offload ({n} blocks + output): "
            f"use 0-{top}, all or auto"
        )
    if isinstance(moe, int) and moe > n:
        raise BadInput(f"--moe-offload {moe}: the model has {n} layers: use 0-{n}, none or all")
    if moe not in (None, "auto", 0) and not weights.is_moe:
        raise BadInput(
            f"--moe-offload {moe}: the model has no expert tensors (not a mixture of experts): "
            "leave the option out"
        )


def _cpu_only(weights: Weights, gpu: int | str | None, moe: int | str | None, moe_layers: int):
    notes = []
    if gpu == "auto":
        notes.append("gpu-layers auto: no GPU found (CPU-only build): all layers on CPU")
    elif gpu not in (None, 0):
        notes.append(f"--gpu-layers {gpu}: no GPU found (CPU-only build): ignored")
    if moe == "auto":
        notes.append("moe-offload auto: no GPU found (CPU-only build): nothing to offload")
    layers = weights.n_layer + 1 if gpu == "all" else gpu if isinstance(gpu, int) else 0
    return _offload(weights, layers, moe_layers, tuple(notes), gpu_bytes=False)


def _offload(weights: Weights, layers: int, moe_layers: int, notes, *, gpu_bytes: bool):
    return Offload(
        gpu_layers=layers,
        moe_layers=moe_layers,
        cpu_tensors=tuple(expert_patterns(moe_layers, weights.n_layer)),
        gpu_bytes=weights.on_gpu(layers, moe_layers) if gpu_bytes else 0,
        notes=notes,
    )


def check_kv_fits(kv_bytes: int, n_ctx: int, room: int) -> None:
    if kv_bytes > room:
        raise DoesNotFit(
            f"a {n_ctx}-token context needs {size_text(kv_bytes)} of KV cache, more than the "
            f"{size_text(room)} of free memory here: use a smaller --ctx (or --force)"
        )


def _experts(moe_layers: int, n_layer: int) -> str:
    if moe_layers == 0:
        return "no experts"
    if moe_layers == n_layer:
        return f"experts of all {n_layer} layers"
    return f"experts of the first {moe_layers} of {n_layer} layers"


def plan_model(
    path: Path,
    gpu_option: str | None,
    moe_option: str | None,
    n_ctx: int,
    rpc: Sequence[str] = (),
    force: bool = False,
) -> Offload:
    """plan_offload for a GGUF file, the free memory of this machine's GPUs and of the RPC
    workers `rpc` (host:port), and an n_ctx-token context, whose KV cache must fit in memory
    at all (unless `force`): llama.cpp would spend a minute allocating, then abort."""
    header = gguffile.read_header(path)
    weights = read_weights(header)
    if not force:
        room = machine.available_ram() + machine.free_vram(rpc)
        check_kv_fits(weights.kv_per_token * n_ctx, n_ctx, room)
    plan = plan_offload(
        weights,
        gpu_option,
        moe_option,
        free=machine.free_vram(rpc),
        context=weights.context(n_ctx),
        where="GPU/RPC" if rpc else "GPU",
    )
    on_cpu = functools.partial(plan.on_cpu, n_layer=weights.n_layer)
    repacked = repack.repacked_bytes(header, machine.cpu_features(), on_cpu)
    return dataclasses.replace(plan, mmap=repack.should_map(header, repacked))
