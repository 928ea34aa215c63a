"""Full-size stand-ins for Mistral 7B v0.3 and Mixtral 8x7B: random weights, real layout.

Speed and memory do not depend on the weights' values, so a GGUF with the exact tensor names,
shapes, ggml quant types and metadata of a real file measures load time, RSS, prompt and
generation speed and expert offload exactly, without downloading it. Each tensor gets the
type llama.cpp's quantizer (src/llama-quant.cpp, llama-cpp-python 0.3.36) gives it for the
file's ftype. Quant blocks are random bytes with fp16 scales set so that each weight matrix
has a 1/sqrt(fan_in) spread and (via dmin, where the block type has one) zero mean:
activations stay finite through all 32 blocks.
The tokenizer is tools/tiny_models.py's byte-level BPE, padded to the real vocabulary size,
or with `--tokenizer` the real model's own SentencePiece vocabulary (tools/sentencepiece_vocab.py
says where to find it): prompts then become as many tokens as on the real model, which is what
training and prompt-speed figures need.

Files stream to disk tensor by tensor in chunks (never the whole file in memory), under a
temporary name renamed when complete, so an existing file is complete and reused at once.

    python tools/standins.py {mistral-q4_0,mistral-q4_k_m,mixtral-q2_k,mixtral-q4_k_m} [--out DIR]
        [--tokenizer mistral_common/data/mistral_instruct_tokenizer_240323.model.v3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import sentencepiece_vocab
from tools.tiny_models import (
    Hparams,
    TensorSpec,
    add_hparams,
    add_special_tokens,
    add_tokenizer,
    layout,
)

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
VERSION = 1  # in file names: bump when the bytes a spec produces change
DEFAULT_OUT = Path.home() / ".cache" / "edge-steer-standins"
CHUNK = 64 << 20  # bytes of quant blocks generated and written at a time
DISK_MARGIN = 1 << 30  # left free on the disk after writing
NO_ROOM = 3  # exit status when the disk is short (edge-steer's DoesNotFit status)

# Where the fp16 scales sit in each block type (ggml-common.h): d, then dmin or None.
SCALE_OFFSETS: dict[Q, tuple[int, int | None]] = {
    Q.Q4_0: (0, None),
    Q.Q8_0: (0, None),
    Q.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    Q.Q3_K: (108, None),  # hmask[32], qs[64], scales[12], d
    Q.Q4_K: (0, 2),  # d, dmin, scales[12], qs[128]
    Q.Q5_K: (0, 2),  # d, dmin, scales[12], qh[32], qs[128]
    Q.Q6_K: (208, None),  # ql[128], qh[64], scales[16], d
}


@dataclass(frozen=True)
class Spec:
    """One real GGUF to stand in for: shapes, ftype and the catalog entry it matches."""

    key: str
    title: str
    catalog: str  # catalog name of the real file
    ftype: FT
    hp: Hparams

    def filename(self, tokenizer: Path | None = None) -> str:
        """With a real tokenizer the file differs, and so does its name."""
        return f"{self.key}.standin-v{VERSION}{'-sp' if tokenizer else ''}.gguf"


MISTRAL = Hparams(
    n_vocab=32768, n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_ctx_train=32768
)
MIXTRAL = replace(MISTRAL, n_vocab=32000, n_expert=8, n_expert_used=2)
MISTRAL_V03, MIXTRAL_V01 = "Mistral-7B-Instruct-v0.3", "Mixtral-8x7B-Instruct-v0.1"
SPECS = {
    s.key: s
    for s in (
        Spec("mistral-q4_0", MISTRAL_V03, "mistral:q4_0", FT.MOSTLY_Q4_0, MISTRAL),
        Spec("mistral-q4_k_m", MISTRAL_V03, "mistral:q4_k_m", FT.MOSTLY_Q4_K_M, MISTRAL),
        Spec("mixtral-q2_k", MIXTRAL_V01, "mixtral:q2_k", FT.MOSTLY_Q2_K, MIXTRAL),
        Spec("mixtral-q4_k_m", MIXTRAL_V01, "mixtral:q4_k_m", FT.MOSTLY_Q4_K_M, MIXTRAL),
    )
}
DEFAULT_TYPE = {FT.MOSTLY_Q4_0: Q.Q4_0, FT.MOSTLY_Q4_K_M: Q.Q4_K, FT.MOSTLY_Q2_K: Q.Q2_K}


# --- which quant type each tensor gets -------------------------------------------------------


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_type(ftype: FT, t: TensorSpec, hp: Hparams) -> Q:
    """The ggml type llama.cpp's quantizer picks for tensor `t` of a `ftype` llama model
    (llama_tensor_get_type_impl, for the ftypes of SPECS; no imatrix, no overrides)."""
    if t.kind != "matrix":
        return Q.F32  # norms and the MoE router are never quantized
    default = DEFAULT_TYPE[ftype]
    role = t.name.split(".")[-2].removesuffix("_exps")
    layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
    moe8 = hp.n_expert == 8
    if role == "output":
        return Q.Q6_K
    if role == "attn_v":
        qt = default
        if ftype == FT.MOSTLY_Q2_K:
            qt = Q.Q4_K if hp.n_head // hp.n_head_kv >= 4 else Q.Q3_K
        elif ftype == FT.MOSTLY_Q4_K_M and _more_bits(layer, hp.n_layer):
            qt = Q.Q6_K
        return Q.Q8_0 if moe8 else qt
    if role == "attn_k":
        return Q.Q8_0 if moe8 else default
    if role == "ffn_down":
        if ftype == FT.MOSTLY_Q2_K:
            return Q.Q3_K
        if ftype == FT.MOSTLY_Q4_K_M and _more_bits(layer, hp.n_layer):
            return Q.Q6_K
        return default
    if role == "attn_output":
        if moe8 and ftype in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q4_K_M):
            return Q.Q5_K
        if not moe8 and ftype == FT.MOSTLY_Q2_K:
            return Q.Q3_K
    return default  # token_embd, attn_q, ffn_gate, ffn_up


@dataclass(frozen=True)
class Planned:
    """One tensor as it will be written."""

    spec: TensorSpec
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        row = self.spec.shape[-1]  # ggml quantizes rows: ne[0] must be whole blocks
        if row % block:
            kind = self.qtype.name
            raise ValueError(f"{self.spec.name}: rows of {row} are not whole {kind} blocks")
        return int(np.prod(self.spec.shape)) // block * size


def plan(spec: Spec) -> list[Planned]:
    """Every tensor of `spec` with its quant type."""
    return [Planned(t, quant_type(spec.ftype, t, spec.hp)) for t in layout(spec.hp)]


def data_size(spec: Spec, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    """Bytes of tensor data (with alignment padding): the file minus its header."""
    return sum(-(-p.nbytes // alignment) * alignment for p in plan(spec))


# --- random but valid quant blocks ------------------------------------------------------------


@cache
def _unit_scales(qtype: Q) -> tuple[float, float]:
    """(std at d=1, dmin/d giving zero mean) of random blocks of `qtype`, measured by
    dequantizing a sample with gguf-py's reference code."""
    dmin_at = SCALE_OFFSETS[qtype][1]
    rng = np.random.default_rng(1234)
    blocks = _random_blocks(rng, qtype, 4096)

    def values(d: float, dmin: float) -> np.ndarray:
        b = blocks.copy()
        _set_scales(b, qtype, d, dmin)
        return gguf.quants.dequantize(b.reshape(-1), qtype).astype(np.float64)

    ratio = 0.0
    if dmin_at is not None:
        ratio = -values(1.0, 0.0).mean() / values(0.0, 1.0).mean()
    return float(values(1.0, ratio).std()), float(ratio)


def _random_blocks(rng: np.random.Generator, qtype: Q, n: int) -> np.ndarray:
    """`n` blocks of random bytes (random_raw: 4x faster than Generator.bytes)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.bit_generator.random_raw(-(-n * size // 8)).view(np.uint8)
    return raw[: n * size].reshape(n, size)


def _set_scales(blocks: np.ndarray, qtype: Q, d: float, dmin: float) -> None:
    d_at, dmin_at = SCALE_OFFSETS[qtype]
    blocks[:, d_at : d_at + 2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    if dmin_at is not None:
        blocks[:, dmin_at : dmin_at + 2] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)


def scales_for(qtype: Q, std: float) -> tuple[float, float]:
    """(d, dmin) giving `qtype` blocks of random codes spread `std` and, if the type has a
    dmin, zero mean (Q4_0's codes -8..7 keep a -0.5 d offset)."""
    unit, ratio = _unit_scales(qtype)
    d = std / unit
    return d, d * ratio


def quant_chunks(rng: np.random.Generator, p: Planned) -> Iterator[memoryview]:
    """The tensor's bytes, CHUNK at a time."""
    t = p.spec
    if p.qtype == Q.F32:
        if t.kind == "norm":
            data = np.ones(t.shape, dtype=np.float32)
        else:
            data = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(t.std)
        yield memoryview(data.tobytes())
        return
    size = gguf.GGML_QUANT_SIZES[p.qtype][1]
    n_blocks, per_chunk = p.nbytes // size, max(CHUNK // size, 1)
    d, dmin = scales_for(p.qtype, t.std)
    for start in range(0, n_blocks, per_chunk):
        blocks = _random_blocks(rng, p.qtype, min(per_chunk, n_blocks - start))
        _set_scales(blocks, p.qtype, d, dmin)
        yield memoryview(blocks).cast("B")


# --- the file ---------------------------------------------------------------------------------


class NoRoom(Exception):
    """The disk cannot hold the file."""


def write(
    spec: Spec, out: Path = DEFAULT_OUT, seed: int = 0, tokenizer: Path | None = None
) -> Path:
    """Write `spec`'s stand-in into `out` (or reuse a complete one) and return its path;
    `tokenizer`: a SentencePiece .model to use instead of the byte-level BPE.
    Raises NoRoom when the disk lacks its size plus a margin."""
    path = Path(out) / spec.filename(tokenizer)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    need = data_size(spec) + DISK_MARGIN
    free = _free_disk(path.parent)
    if free < need:
        raise NoRoom(
            f"{spec.key}: needs {need / 1e9:.1f} GB of free disk in {path.parent}, "
            f"{free / 1e9:.1f} GB free"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_file(spec, Path(tmp), np.random.default_rng(seed), tokenizer)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_file(spec: Spec, tmp: Path, rng: np.random.Generator, tokenizer: Path | None) -> None:
    """Header, KV and tensor infos through gguf.GGUFWriter, then the data streamed after it."""
    tensors = plan(spec)
    w = gguf.GGUFWriter(tmp, "llama")
    add_hparams(w, f"{spec.title} stand-in (random weights)", int(spec.ftype), spec.hp)
    if tokenizer:
        add_sentencepiece_tokenizer(w, tokenizer, spec.hp.n_vocab)
    else:
        add_tokenizer(w, spec.hp.n_vocab)
    for p in tensors:
        w.add_tensor_info(p.spec.name, p.spec.shape, np.dtype(np.float32), p.nbytes, p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout: BinaryIO = w.fout[0]
    w.write_padding(fout, fout.tell())
    for p in tensors:
        for chunk in quant_chunks(rng, p):
            fout.write(chunk)
        w.write_padding(fout, p.nbytes)
    w.close()


def add_sentencepiece_tokenizer(w: gguf.GGUFWriter, model: Path, n_vocab: int) -> None:
    """The real model's SentencePiece vocabulary (llama.cpp's "llama" tokenizer) and the
    Mistral chat template; its size must be the stand-in's."""
    vocab = sentencepiece_vocab.read(model)
    if len(vocab.pieces) != n_vocab:
        raise SystemExit(f"{model}: {len(vocab.pieces)} tokens, the stand-in needs {n_vocab}")
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    add_special_tokens(w)


def _free_disk(folder: Path) -> int:
    from edge_steer import machine

    return machine.free_disk(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SPECS), nargs="+")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="the real model's SentencePiece .model")
    args = parser.parse_args(argv)
    for key in args.model:
        try:
            path = write(SPECS[key], args.out, args.seed, args.tokenizer)
        except NoRoom as e:
            print(f"skipped: {e}", file=sys.stderr)
            return NO_ROOM
        print(f"{path}\t{path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
