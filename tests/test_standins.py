"""tools/standins.py: full-size stand-ins for Mistral 7B and Mixtral 8x7B.

By default the generator runs on scaled-down shapes (same code path, same quant types, a few
MB each) and the full-size layouts are checked by arithmetic against the catalog's sizes.
Writing a real full-size file (4-17 GB) is opt-in: EDGE_STEER_FULL_STANDINS=1.
"""

from __future__ import annotations

import os
from dataclasses import replace

import gguf
import numpy as np
import pytest

from edge_steer import catalog, gguffile, machine, offload, repack, runtime
from edge_steer.engine import Context, Model
from tools import standins
from tools.tiny_models import Hparams

Q = gguf.GGMLQuantizationType
# K-quants need rows of 256; n_head_kv 1 of 4 heads keeps GQA 4, as in the real models; 8
# blocks make llama.cpp's use_more_bits rule pick both types.
SMALL = Hparams(n_vocab=1024, n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1)


def small(key: str) -> standins.Spec:
    spec = standins.SPECS[key]
    hp = replace(SMALL, n_expert=spec.hp.n_expert, n_expert_used=spec.hp.n_expert_used)
    return replace(spec, key=f"{key}-small", hp=hp)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("standins")


@pytest.mark.parametrize("key", ["mistral-q4_0", "mistral-q4_k_m", "mixtral-q2_k"])
def test_small_standin_loads_with_the_planned_layout(key, small_dir):
    spec = small(key)
    path = standins.write(spec, small_dir)
    header = gguffile.read_header(path)
    planned = [
        (p.spec.name, tuple(reversed(p.spec.shape)), int(p.qtype)) for p in standins.plan(spec)
    ]
    assert [(t.name, t.shape, t.type) for t in header.tensors] == planned
    assert header.get("general.file_type") == int(spec.ftype)
    assert header.file_size == path.stat().st_size
    with Model(path) as model, Context(model, n_ctx=256, n_batch=64, threads=2) as ctx:
        assert model.n_vocab == SMALL.n_vocab
        assert model.tokenize("Hello world", add_special=False)  # a real tokenizer
        ctx.ingest(model.tokenize("The weather today is"))
        logits = ctx.logits()
        assert np.isfinite(logits).all() and logits.std() > 0
    assert standins.write(spec, small_dir) == path  # a complete file is reused


@pytest.mark.parametrize("key", ["mistral-q4_0", "mistral-q4_k_m", "mixtral-q2_k"])
def test_repack_rules_predict_the_bytes_llama_cpp_repacks(key, small_dir):
    # the rule table against llama.cpp's own CPU_REPACK buffer, on whatever CPU runs this
    path = standins.write(small(key), small_dir)
    header = gguffile.read_header(path)
    predicted = repack.repacked_bytes(header, machine.cpu_features(), lambda _name: True)
    with Model(path) as model:
        assert predicted == pytest.approx(model.buffers.get("CPU_REPACK", 0), abs=32 << 10)


def test_no_weight_takes_the_amx_layouts(small_dir):
    # llama.cpp's AMX kernels crash on Sapphire Rapids class CPUs (ggml.drop_amx_buffer):
    # Q4_K and Q6_K weights, which they would take, stay in CPU_REPACK and plain buffers
    path = standins.write(small("mistral-q4_k_m"), small_dir)
    with Model(path) as model, Context(model, n_ctx=256, n_batch=64, threads=2) as ctx:
        assert "AMX" not in model.buffers
        ctx.ingest(model.tokenize("The weather today is"))  # AMX's crash came here
        assert np.isfinite(ctx.logits()).all()


def test_a_mostly_repacked_model_is_read_once_not_mapped(small_dir, monkeypatch):
    path = standins.write(small("mistral-q4_0"), small_dir)
    header = gguffile.read_header(path)
    repacked = repack.repacked_bytes(header, machine.cpu_features(), lambda _name: True)
    if not repacked:
        pytest.skip("this CPU's llama.cpp build repacks no Q4_0 weights")
    assert offload.plan_model(path, None, None, 256).mmap is True  # small: maps, starts fast
    monkeypatch.setattr(repack, "READ_MIN_BYTES", 0)  # as if it were 7B
    assert offload.plan_model(path, None, None, 256).mmap is False
    with runtime.load_model(str(path), ctx=256) as model:
        # llama.cpp's "CPU" buffer is read from the file; "CPU_Mapped" would be the mapping
        assert "CPU_Mapped" not in model.buffers and "CPU" in model.buffers
        assert model.buffers["CPU"] + model.buffers["CPU_REPACK"] < 1.05 * header.file_size
    q2k = standins.write(small("mixtral-q2_k"), small_dir)
    assert offload.plan_model(q2k, None, None, 256).mmap is ("AVX512" not in machine.cpu_features())


def test_quant_blocks_are_finite_with_small_mean_and_the_asked_spread():
    rng = np.random.default_rng(0)
    for qtype in standins.SCALE_OFFSETS:
        d, dmin = standins.scales_for(qtype, 0.01)
        blocks = standins._random_blocks(rng, qtype, 2048)
        standins._set_scales(blocks, qtype, d, dmin)
        values = gguf.quants.dequantize(blocks.reshape(-1), qtype)
        assert np.isfinite(values).all(), qtype.name
        # Q4_0 codes -8..7 have mean -0.5 d: a small offset that the format itself has
        assert abs(values.mean()) < 0.0015 and 0.009 < values.std() < 0.011, qtype.name


def types_of(key: str) -> dict[str, str]:
    return {p.spec.name: p.qtype.name for p in standins.plan(standins.SPECS[key])}


def test_full_size_types_follow_llama_cpp_quantizer_rules():
    # llama-quant.cpp: output Q6_K; Q4_K_M gives attn_v and ffn_down Q6_K where use_more_bits
    # (first and last 4 of 32 blocks, and every third between); 8-expert models get Q8_0 K/V
    # and Q5_K attn_output; Q2_K puts ffn_down at Q3_K; routers and norms stay F32.
    q4km = types_of("mistral-q4_k_m")
    assert q4km["token_embd.weight"] == "Q4_K" and q4km["output.weight"] == "Q6_K"
    more = [i for i in range(32) if q4km[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert all(
        q4km[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K") for i in range(32)
    )
    assert set(types_of("mistral-q4_0").values()) == {"Q4_0", "Q6_K", "F32"}
    q2k = types_of("mixtral-q2_k")
    assert (q2k["blk.5.ffn_gate_exps.weight"], q2k["blk.5.ffn_down_exps.weight"]) == (
        "Q2_K",
        "Q3_K",
    )
    assert (q2k["blk.5.attn_k.weight"], q2k["blk.5.attn_v.weight"]) == ("Q8_0", "Q8_0")
    assert q2k["blk.5.attn_output.weight"] == "Q5_K" and q2k["blk.5.ffn_gate_inp.weight"] == "F32"


@pytest.mark.parametrize("key", sorted(standins.SPECS))
def test_full_size_matches_the_catalog_file_size(key):
    spec = standins.SPECS[key]
    entry = catalog.lookup(spec.catalog)
    # the header (tokenizer) is under 2 MB; estimated catalog sizes get a few percent
    tolerance = 0.001 if entry.size_exact else 0.05
    assert standins.data_size(spec) == pytest.approx(entry.size, rel=tolerance)


def test_no_room_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(standins, "_free_disk", lambda _folder: 10**9)
    with pytest.raises(standins.NoRoom, match=r"needs 18\.\d GB of free disk"):
        standins.write(standins.SPECS["mixtral-q2_k"], tmp_path)
    assert not list(tmp_path.iterdir())
    assert standins.main(["mixtral-q2_k", "--out", str(tmp_path)]) == standins.NO_ROOM


@pytest.mark.skipif(
    os.environ.get("EDGE_STEER_FULL_STANDINS") != "1",
    reason="writes a 4 GB file: set EDGE_STEER_FULL_STANDINS=1",
)
def test_full_size_mistral_q4_0_loads():
    spec = standins.SPECS["mistral-q4_0"]
    need = standins.data_size(spec) + standins.DISK_MARGIN
    missing = not (standins.DEFAULT_OUT / spec.filename()).exists()
    if missing and machine.free_disk(standins.DEFAULT_OUT) < need:
        pytest.skip("not enough free disk for a 4 GB stand-in")
    path = standins.write(spec)
    with Model(path) as model, Context(model, n_ctx=512, n_batch=64) as ctx:
        assert (model.n_layer, model.n_embd, model.n_vocab) == (32, 4096, 32768)
        ctx.ingest(model.tokenize("Hello"))
        assert np.isfinite(ctx.logits()).all()


def _proto_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (sizes here stay below 2**14: two varint bytes)."""
    size = len(payload)
    head = bytes([size]) if size < 128 else bytes([size & 0x7F | 0x80, size >> 7])
    return bytes([number << 3 | 2]) + head + payload


def _sentencepiece_model(pieces: list[tuple[str, float, int]]) -> bytes:
    """A ModelProto holding `pieces` (piece, score, type), as sentencepiece writes them."""
    out = b""
    for piece, score, kind in pieces:
        body = _proto_field(1, piece.encode()) + b"\x15" + np.float32(score).tobytes()
        out += _proto_field(1, body + bytes([3 << 3, kind]))
    return out


def test_a_sentencepiece_vocabulary_tokenizes_as_llama_does(small_dir, tmp_path) -> None:
    """--tokenizer: the stand-in carries the real model's vocabulary (a SentencePiece .model,
    here a small one written by hand) and llama.cpp tokenizes with it."""
    from tools import sentencepiece_vocab

    special = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    byte_pieces = [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    # llama.cpp's SentencePiece tokenizer merges pairs into pieces that exist: every prefix
    words = ["▁", *"helowrd", *(w[:n] for w in ("▁hello", "▁world") for n in range(2, 7))]
    normal = [(w, -float(i), 1) for i, w in enumerate(words)]
    filler = [(f"▁x{i}", -100.0 - i, 1) for i in range(SMALL.n_vocab - 259 - len(words))]
    model_file = tmp_path / "tokenizer.model"
    model_file.write_bytes(_sentencepiece_model(special + byte_pieces + normal + filler))
    vocab = sentencepiece_vocab.read(model_file)
    assert len(vocab.pieces) == SMALL.n_vocab and vocab.types[:4] == [2, 3, 3, 6]
    path = standins.write(small("mistral-q4_0"), small_dir, tokenizer=model_file)
    assert path.name.endswith("-sp.gguf")
    with Model(path) as model:
        tokens = model.tokenize("hello world")
        assert tokens == [1, vocab.pieces.index("▁hello"), vocab.pieces.index("▁world")]
        assert model.detokenize(tokens).strip() == "hello world"
