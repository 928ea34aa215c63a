"""Which weights llama.cpp's CPU backend re-lays out at load (its CPU_REPACK buffer), told
from the GGUF header and the build's CPU features before anything loads; and so whether to
read the file rather than memory-map it.

A repacked weight is copied out of the file into a new buffer. With the file memory-mapped,
the source pages it was copied from stay mapped and resident too, so the process holds those
weights twice (llama.cpp issue 16761: 8.3 GB resident for a 4.4 GB Mistral Q4_K_M). Reading
the file instead (llama.cpp's --no-mmap) holds them once. Where little is repacked, or the
model is small, mapping stays: the page cache then serves the next command without reading the
file again.

The rules are ggml-cpu's `ggml_repack_get_optimal_repack_type` (llama.cpp b8xxx, as
vendored by llama-cpp-python 0.3.36): a type is repacked on the CPUs named here when its
row count is a multiple of the interleave. Only weights used in matrix products qualify, so
never the token embeddings (llama.cpp reads rows of those).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from . import gguffile

Q4_0, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4 = 2, 8, 10, 12, 13, 14, 20, 39
READ_SHARE = 0.1  # read (no mmap) when at least this share of the file would be held twice
READ_MIN_BYTES = 512 << 20  # ... and at least this much: a small model maps, and starts fast

# (features the build must have, {ggml type: row multiple}); the first rule that covers a
# tensor's type decides, as in ggml
_RULES: tuple[tuple[frozenset[str], dict[int, int]], ...] = (
    (frozenset({"AVX2"}), {Q4_0: 8, Q4_K: 8, IQ4_NL: 8, MXFP4: 8}),
    (frozenset({"AVX512"}), {Q2_K: 8}),
    (frozenset({"NEON", "MATMUL_INT8"}), {Q4_0: 4, Q4_K: 8, Q5_K: 8, Q6_K: 8, Q8_0: 4}),
    (
        frozenset({"NEON", "DOTPROD"}),
        {Q4_0: 4, Q4_K: 8, Q5_K: 8, Q6_K: 8, IQ4_NL: 4, MXFP4: 4, Q8_0: 4},
    ),
)


def is_repacked(tensor: gguffile.Tensor, features: Iterable[str]) -> bool:
    """Whether the CPU backend of a build with `features` repacks this weight."""
    have = set(features)
    if "REPACK" not in have or tensor.name.startswith("token_embd.") or len(tensor.shape) < 2:
        return False
    for needs, types in _RULES:
        if needs <= have and tensor.type in types:
            return tensor.shape[1] % types[tensor.type] == 0
    return False


def repacked_bytes(
    header: gguffile.Header, features: Iterable[str], on_cpu: Callable[[str], bool]
) -> int:
    """File bytes of the weights that stay in CPU memory (`on_cpu(name)`) and get repacked."""
    have = list(features)
    return sum(t.n_bytes for t in header.tensors if on_cpu(t.name) and is_repacked(t, have))


def should_map(header: gguffile.Header, repacked: int) -> bool:
    """Map the file unless at least READ_SHARE of its bytes, and READ_MIN_BYTES, would be
    held twice. Reading costs start-up on every command (0.5 s for a 253 MB file), which
    only pays where the doubled memory would matter: a 7B model, not a demo model."""
    return repacked < max(READ_SHARE * header.file_size, READ_MIN_BYTES)
