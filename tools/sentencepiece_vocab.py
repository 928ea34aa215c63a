"""Read the vocabulary of a SentencePiece `.model` file (pieces, scores, types), no library.

A stand-in's training and prompt speed depend on how many tokens a prompt becomes, and the
byte-level BPE of tools/tiny_models.py makes edge-steer's training prompts 2.7x longer than a
real tokenizer does. Mistral's own tokenizers ship in PyPI's `mistral-common` wheel
(`mistral_common/data/mistral_instruct_tokenizer_240323.model.v3` is Mistral 7B v0.3's,
`tokenizer.model.v1` Mixtral 8x7B's); this reads one so a stand-in tokenizes as the real
model does. The file is a protobuf ModelProto whose field 1 repeats SentencePiece messages
{1: piece, 2: score, 3: type}; the types are numbered as GGUF's token types are.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NORMAL = 1  # SentencePiece's default type, and GGUF's


@dataclass(frozen=True)
class Vocab:
    pieces: list[str]
    scores: list[float]
    types: list[int]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes | float]]:
    """(field number, value) of one protobuf message: varints, bytes, or 32-bit floats."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield number, value
        elif wire == 2:
            size, at = _varint(data, at)
            yield number, data[at : at + size]
            at += size
        elif wire == 5:
            yield number, struct.unpack_from("<f", data, at)[0]
            at += 4
        elif wire == 1:
            at += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read(path: Path) -> Vocab:
    """The vocabulary of the SentencePiece model at `path`, in id order."""
    vocab = Vocab([], [], [])
    for number, value in _fields(path.read_bytes()):
        if number != 1 or not isinstance(value, bytes):
            continue
        fields = dict(_fields(value))
        piece = fields.get(1, b"")
        vocab.pieces.append(piece.decode("utf-8") if isinstance(piece, bytes) else "")
        vocab.scores.append(float(fields.get(2, 0.0)))  # type: ignore[arg-type]
        vocab.types.append(int(fields.get(3, NORMAL)))  # type: ignore[arg-type]
    if not vocab.pieces:
        raise ValueError(f"{path}: no SentencePiece pieces found (not a .model file?)")
    return vocab
