"""Tiny llama-architecture GGUF models for tests.

Tests need real GGUF files to exercise llama.cpp mechanics (layer counts,
MoE experts, tensor buffer overrides, control vectors), but real models are
gigabytes. These files are a few MB, load in milliseconds and run decode on
CPU. Weights are random (deterministic per seed), so output is gibberish;
only mechanics are meaningful.

The tokenizer is a real byte-level BPE ("gpt2") vocabulary whose merges are
learned at generation time from a short embedded English text, so arbitrary
UTF-8 text tokenizes and detokenizes losslessly.

Usage as a dev tool::

    python tools/tiny_models.py OUTDIR
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np

__all__ = ["Hparams", "TensorSpec", "add_hparams", "add_tokenizer", "layout", "write_tiny_model"]

# --- shapes -----------------------------------------------------------------

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2  # GQA, like Mistral/Mixtral
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 128
N_CTX_TRAIN = 32768  # as Mistral 7B v0.2+ and Mixtral
ROPE_FREQ_BASE = 1e6
RMS_EPS = 1e-5
N_EXPERT = 8
N_EXPERT_USED = 2

# --- tokenizer --------------------------------------------------------------

# Special tokens first, Mistral-style ids: <unk>=0, <s>=1, </s>=2.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TARGET_VOCAB = 512

# "gpt-2" selects llama.cpp's standard GPT-2 pre-tokenizer regex.
TOKENIZER_PRE = "gpt-2"

# Approximation of the GPT-2 split regex with stdlib `re` (no \p{L}); only used
# to learn merges, so small differences from llama.cpp's splitter are harmless.
_PRETOKENIZE = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
)

# Mistral-style chat template; a system message is prepended to the first
# user turn (joined by "\n") because Mistral has no system role. This matches
# what llama.cpp's built-in llama2/mistral fallback (llama_chat_apply_template,
# which does not run Jinja) produces for this template, apart from the BOS.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Training text for the BPE merges (written for this file).
_CORPUS = """\
The little robot woke up early in the morning and looked out of the window.
The sun was shining over the hills, and the birds were singing in the trees.
It wanted to walk to the river, because the river was the place where the
other machines met to talk about the weather, the news and their work.

On the way, the robot met an old farmer who was working in his field. The
farmer said: "Good morning! Where are you going on such a beautiful day?"
The robot answered that it was going to the river to meet its friends. The
farmer smiled and gave it three red apples and a small bottle of water.

When the robot reached the river, the other machines were already there.
They were happy to see it, and they talked for hours about the things they
had seen: the mountains in the north, the long roads in the south, the
quiet forests in the west and the busy cities by the sea in the east.

In the evening, the sky turned orange and then dark blue. The robot thanked
its friends, said goodbye, and walked back home under the stars. It thought
about the day and decided that tomorrow it would write a story about the
river, the farmer and the apples, so that it would never forget them.

Questions and answers: What is the capital of France? The capital of France
is Paris. How many days are there in a week? There are 7 days in a week, and
there are 12 months, 52 weeks and 365 days in a normal year. Please explain
your answer step by step, and be kind, honest and helpful to the user.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char mapping (llama.cpp
    decodes BPE token text with exactly this table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Deterministic byte-level BPE training; ties broken lexicographically so
    the vocabulary (and thus the file) is reproducible."""
    b2u = _bytes_to_unicode()
    words = Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in _PRETOKENIZE.findall(text)
    )
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best, best_count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best_count < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def _build_vocab(n_vocab: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """Return (tokens, token_types, merges) for the gguf tokenizer keys. With `n_vocab`, pad
    with unused `[control_N]` tokens (as Mistral v0.3 reserves them) to exactly that size, so
    full-size stand-ins get a real model's vocabulary width and output-layer shape."""
    byte_tokens = list(_bytes_to_unicode().values())
    n_merges = TARGET_VOCAB - len(SPECIAL_TOKENS) - len(byte_tokens)
    merges = _learn_merges(_CORPUS, n_merges)
    tokens = [*SPECIAL_TOKENS, *byte_tokens, *(a + b for a, b in merges)]
    assert len(set(tokens)) == len(tokens), "duplicate token text"
    types = [int(gguf.TokenType.UNKNOWN), *[int(gguf.TokenType.CONTROL)] * 4]
    types += [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(SPECIAL_TOKENS))
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab {n_vocab}: the tokenizer needs at least {len(tokens)}")
        pad = n_vocab - len(tokens)
        tokens += [f"[control_{i}]" for i in range(pad)]
        types += [int(gguf.TokenType.UNUSED)] * pad
    return tokens, types, [f"{a} {b}" for a, b in merges]


def add_tokenizer(w: gguf.GGUFWriter, n_vocab: int | None = None) -> int:
    """Write the byte-level BPE tokenizer and Mistral chat template into `w`; return the
    vocabulary size (the learned one, or `n_vocab` when padded to it)."""
    tokens, types, merges = _build_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    add_special_tokens(w)
    return len(tokens)


def add_special_tokens(w: gguf.GGUFWriter) -> None:
    """<unk>, <s> and </s> at Mistral's ids, BOS added and EOS not, and the chat template:
    what every tokenizer of these models shares, whatever its vocabulary."""
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def vocab_size() -> int:
    """The learned (unpadded) vocabulary size."""
    return len(_build_vocab()[0])


@dataclass(frozen=True)
class Hparams:
    """The llama-architecture hyperparameters a GGUF header carries."""

    n_vocab: int
    n_layer: int
    n_embd: int = N_EMBD
    n_ff: int = N_FF
    n_head: int = N_HEAD
    n_head_kv: int = N_HEAD_KV
    n_ctx_train: int = N_CTX_TRAIN
    n_expert: int = 0
    n_expert_used: int = 0


def add_hparams(w: gguf.GGUFWriter, name: str, file_type: int, hp: Hparams) -> None:
    """Write the general and llama.* keys llama.cpp reads to build the graph."""
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx_train)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(hp.n_embd // hp.n_head)
    w.add_rope_freq_base(ROPE_FREQ_BASE)
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)


# --- weights ----------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One weight of a llama-architecture GGUF: its name, numpy shape (reverse of ggml's ne:
    a ggml {n_in, n_out} matrix is a numpy (n_out, n_in) array) and the spread of its random
    values (1/sqrt(fan_in) keeps every block's output O(1); pre-norms do the rest)."""

    name: str
    shape: tuple[int, ...]
    std: float
    kind: str  # "norm" (ones, F32), "router" (F32) or "matrix"


def layout(hp: Hparams) -> list[TensorSpec]:
    """Every tensor llama.cpp's llama architecture loads, in the order GGUF files list them;
    merged `ffn_*_exps` expert tensors when `hp.n_expert`."""
    e, f, head_dim = hp.n_embd, hp.n_ff, hp.n_embd // hp.n_head
    s_embd, s_ff = e**-0.5, f**-0.5

    def mat(name: str, *shape: int, std: float) -> TensorSpec:
        return TensorSpec(name, shape, std, "matrix")

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, (e,), 1.0, "norm")

    out = [mat("token_embd.weight", hp.n_vocab, e, std=1.0)]
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        out += [
            norm(p + "attn_norm.weight"),
            mat(p + "attn_q.weight", hp.n_head * head_dim, e, std=s_embd),
            mat(p + "attn_k.weight", hp.n_head_kv * head_dim, e, std=s_embd),
            mat(p + "attn_v.weight", hp.n_head_kv * head_dim, e, std=s_embd),
            mat(p + "attn_output.weight", e, hp.n_head * head_dim, std=s_embd),
            norm(p + "ffn_norm.weight"),
        ]
        if hp.n_expert:
            n = hp.n_expert
            out += [
                # Router: ggml {n_embd, n_expert}, F32 like real Mixtral GGUFs.
                TensorSpec(p + "ffn_gate_inp.weight", (n, e), 1.0, "router"),
                mat(p + "ffn_gate_exps.weight", n, f, e, std=s_embd),
                mat(p + "ffn_up_exps.weight", n, f, e, std=s_embd),
                mat(p + "ffn_down_exps.weight", n, e, f, std=s_ff),
            ]
        else:
            out += [
                mat(p + "ffn_gate.weight", f, e, std=s_embd),
                mat(p + "ffn_up.weight", f, e, std=s_embd),
                mat(p + "ffn_down.weight", e, f, std=s_ff),
            ]
    # Larger output scale so logits are clearly non-uniform.
    out += [norm("output_norm.weight"), mat("output.weight", hp.n_vocab, e, std=3.0 * s_embd)]
    return out


def _tensors(rng: np.random.Generator, hp: Hparams) -> list[tuple[str, np.ndarray]]:
    """Random F16 weights (F32 norms and router), deterministic per `rng`."""
    out = []
    for t in layout(hp):
        if t.kind == "norm":
            data = np.ones(t.shape, dtype=np.float32)
        elif t.kind == "router":
            data = rng.standard_normal(t.shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(t.shape, dtype=np.float32) * t.std).astype(np.float16)
        out.append((t.name, data))
    return out


# --- writer -----------------------------------------------------------------


def write_tiny_model(
    path: str | os.PathLike[str], *, moe: bool = False, n_layer: int = 6, seed: int = 0
) -> Path:
    """Write a tiny Mistral-shaped (or Mixtral-shaped if ``moe``) GGUF to
    ``path`` atomically and return its path. Same arguments give a
    byte-identical file, so tests can cache it."""
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_vocab = vocab_size()

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp_name, "llama")
        hp = Hparams(
            n_vocab,
            n_layer,
            n_expert=N_EXPERT if moe else 0,
            n_expert_used=N_EXPERT_USED if moe else 0,
        )
        add_hparams(
            w, "tiny-mixtral" if moe else "tiny-mistral", int(gguf.LlamaFileType.MOSTLY_F16), hp
        )
        add_tokenizer(w)

        rng = np.random.default_rng(seed)
        for name, data in _tensors(rng, hp):
            w.add_tensor(name, data)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; match a normal file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> None:
    """Dev entry point: write both tiny models into OUTDIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, moe in (("tiny-mistral.gguf", False), ("tiny-mixtral.gguf", True)):
        p = write_tiny_model(args.outdir / name, moe=moe, n_layer=args.n_layer, seed=args.seed)
        print(f"{p}\t{p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
