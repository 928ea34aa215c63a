"""Control vectors: per-block directions plus metadata, llama.cpp's GGUF format, arithmetic.

File format (what llama.cpp's `--control-vector` loader reads): `general.architecture =
controlvector`, one F32 1-D tensor `direction.N` per steered block, N >= 1, added to the output
of block N. llama.cpp ignores the metadata, so every check on it happens here.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .errors import UserError

ARCH = "controlvector"
MAX_FILE_BYTES = 512 * 1024 * 1024
META_PREFIX = "edge_steer."


@dataclass
class ControlVector:
    """Directions keyed by block index N (added after block N) and free-form metadata."""

    directions: dict[int, np.ndarray]
    model_hint: str = ""
    metadata: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def scaled(self, factor: float) -> ControlVector:
        return ControlVector(
            {n: d * np.float32(factor) for n, d in self.directions.items()},
            self.model_hint,
            dict(self.metadata),
        )


def check_file(path: Path) -> None:
    """The checks every reader shares before it opens a file."""
    if not path.is_file():
        raise UserError(f"control vector file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{path} is over {MAX_FILE_BYTES >> 20} MiB: too big for a control vector")


def read(path: str | Path) -> ControlVector:
    """Read and validate a control-vector GGUF; any defect is a one-line UserError."""
    path = Path(path)
    check_file(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic): pass a .gguf control vector")
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        tensors = [
            (t.name, int(t.tensor_type), list(t.shape), np.array(t.data)) for t in reader.tensors
        ]
    except Exception as exc:  # gguf raises many types on damaged files
        raise UserError(
            f"{path} is a damaged GGUF file ({type(exc).__name__}): write or download it again"
        ) from None
    if fields.get("general.architecture") != ARCH:
        raise UserError(
            f"{path} is a GGUF model, not a control vector "
            f"(general.architecture = {fields.get('general.architecture')!r})"
        )
    return ControlVector(
        validate(_directions(path, tensors), str(path)),
        str(fields.get(f"{ARCH}.model_hint", "")),
        _metadata(fields),
    )


def _metadata(fields: Mapping[str, object]) -> dict[str, str | int | float]:
    """Our `edge_steer.*` keys, plus other tools' extra `controlvector.*` keys (repeng's
    `controlvector.method`), so a conversion carries them over."""
    theirs = {f"{ARCH}.model_hint", f"{ARCH}.layer_count"}
    meta = {
        key[len(ARCH) + 1 :]: value
        for key, value in fields.items()
        if key.startswith(f"{ARCH}.") and key not in theirs and isinstance(value, str | int | float)
    }
    for key, value in fields.items():
        if key.startswith(META_PREFIX) and isinstance(value, str | int | float):
            meta[key[len(META_PREFIX) :]] = value
    return meta


def _field_value(f: gguf.ReaderField) -> object:
    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    return f.parts[f.data[0]].tolist()[0]


def _directions(path: Path, tensors: list) -> dict[int, np.ndarray]:
    """GGUF-specific checks: tensor names, types, shapes and duplicates."""
    directions: dict[int, np.ndarray] = {}
    for name, ttype, shape, data in tensors:
        prefix, _, index = name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise UserError(f"{path}: unexpected tensor {name!r} (want direction.N)")
        layer = int(index)
        if layer in directions:
            raise UserError(f"{path}: direction.{layer} appears twice")
        if ttype != gguf.GGMLQuantizationType.F32 or len(shape) != 1:
            raise UserError(f"{path}: {name} must be a 1-D F32 tensor")
        directions[layer] = data.astype(np.float32).reshape(-1)
    return directions


def validate(directions: Mapping[int, np.ndarray], source: str) -> dict[int, np.ndarray]:
    """The checks every reader shares: blocks >= 1, 1-D, finite, one width, not empty."""
    checked: dict[int, np.ndarray] = {}
    for layer in sorted(directions):
        vec = np.asarray(directions[layer])
        if layer < 1:
            raise UserError(
                f"{source}: direction.{layer} is invalid: llama.cpp steers blocks 1 and up"
            )
        if vec.ndim != 1:
            raise UserError(f"{source}: direction.{layer} must be 1-D, not shape {vec.shape}")
        if not np.isfinite(vec).all():
            raise UserError(f"{source}: direction.{layer} contains NaN or Inf")
        if checked and len(vec) != len(next(iter(checked.values()))):
            raise UserError(
                f"{source}: direction.{layer} has length {len(vec)}, unlike the other layers"
            )
        checked[layer] = vec.astype(np.float32, copy=False)
    if not checked:
        raise UserError(f"{source}: no direction.N tensors: not a usable control vector")
    return checked


def write(vector: ControlVector, path: str | Path) -> Path:
    """Write a llama.cpp control-vector GGUF atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", vector.model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
        for key, value in sorted(vector.metadata.items()):
            _add_meta(writer, META_PREFIX + key, value)
        for layer in vector.layers:
            writer.add_tensor(
                f"direction.{layer}", np.asarray(vector.directions[layer], np.float32)
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _add_meta(writer: gguf.GGUFWriter, key: str, value: str | int | float) -> None:
    if isinstance(value, int):
        writer.add_int64(key, int(value))
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_string(key, str(value))


def check_fits(vector: ControlVector, n_layer: int, n_embd: int, source: str) -> None:
    """A vector fits a model when its width matches and every layer is steerable."""
    if vector.n_embd != n_embd:
        raise UserError(
            f"{source} has n_embd {vector.n_embd} but the model has {n_embd}: "
            "it was made for another model; train or convert one for this model"
        )
    bad = [n for n in vector.layers if n >= n_layer]
    if bad:
        raise UserError(
            f"{source} has direction.{bad[0]} but the model's blocks are 0..{n_layer - 1}"
        )


def combine(weighted: Iterable[tuple[ControlVector, float]], n_layer: int, n_embd: int):
    """Sum vectors times strengths into one (n_layer, n_embd) array indexed by block."""
    rows = np.zeros((n_layer, n_embd), dtype=np.float32)
    for vector, strength in weighted:
        for layer, direction in vector.directions.items():
            rows[layer] += np.float32(strength) * direction
    return rows


def parse_spec(spec: str) -> tuple[str, float]:
    """`NAME_OR_PATH[:STRENGTH]` -> (name, strength); strength defaults to 1.0."""
    text = spec.strip()
    drive = text[:2] if re.match(r"^[A-Za-z]:[\\/]", text) else ""  # C:\\vec.gguf on Windows
    parts = text[len(drive) :].split(":")
    name, strength = drive + parts[0], parts[1] if len(parts) == 2 else "1.0"
    try:
        value = float(strength)
    except ValueError:
        value = math.nan
    if len(parts) > 2 or not parts[0] or not math.isfinite(value):
        raise UserError(
            f"bad vector spec {spec!r}: use NAME_OR_PATH[:STRENGTH], e.g. lazy:-1.0 or happy"
        )
    return name, value


def parse_specs(specs: Iterable[str]) -> list[tuple[str, float]]:
    """Repeatable and comma-separated: ['lazy:-1,happy:0.5', 'x.gguf'] -> three pairs."""
    return [parse_spec(part) for spec in specs for part in spec.split(",") if part.strip()]


def describe(weighted: Mapping[str, float]) -> str:
    return ", ".join(f"{name}:{strength:+g}" for name, strength in weighted.items()) or "none"


def parse_mix(expression: str) -> list[tuple[str, float]]:
    """`"happy*0.5 + lazy*-1 - sad"` -> [(happy, 0.5), (lazy, -1.0), (sad, -1.0)].

    Terms are joined by ` + ` or ` - ` (spaces around the operator, so names may contain
    hyphens); a term is NAME, -NAME, WEIGHT*NAME or NAME*WEIGHT."""
    pieces = re.split(r"\s+([+-])\s+", f" + {expression.strip()}")
    terms: list[tuple[str, float]] = []
    for sign, term in zip(pieces[1::2], pieces[2::2], strict=True):
        weight = -1.0 if sign == "-" else 1.0
        if term.startswith("-"):
            weight, term = -weight, term[1:]
        names = []
        for part in term.split("*"):
            try:
                weight *= float(part)
            except ValueError:
                names.append(part.strip())
        if len(names) != 1 or not re.fullmatch(r"\S+", names[0]) or not math.isfinite(weight):
            raise UserError(
                f"bad mix term {term!r} in {expression!r}: use NAME*WEIGHT joined by ' + ', "
                'e.g. "happy*0.5 + lazy*-1"'
            )
        terms.append((names[0], weight))
    return terms


def mix(weighted: Iterable[tuple[str, ControlVector, float]]) -> ControlVector:
    """The weighted sum of vectors made for one model; a file of their union of blocks."""
    weighted = list(weighted)
    _check_same_model(weighted)
    directions: dict[int, np.ndarray] = {}
    for _, vector, weight in weighted:
        for layer, direction in vector.directions.items():
            directions[layer] = directions.get(layer, 0) + np.float32(weight) * direction
    layers = sorted(directions)
    metadata: dict[str, str | int | float] = {
        "source": " + ".join(f"{name}*{weight:g}" for name, _, weight in weighted),
        "method": "mix",
        "layer_first": layers[0],
        "layer_last": layers[-1],
    }
    fingerprints = {v.metadata.get("model_fingerprint") for _, v, _ in weighted} - {None}
    if fingerprints:
        metadata["model_fingerprint"] = fingerprints.pop()
    hint = next((v.model_hint for _, v, _ in weighted if v.model_hint), "")
    return ControlVector({n: directions[n] for n in layers}, hint, metadata)


def _check_same_model(weighted: list[tuple[str, ControlVector, float]]) -> None:
    first_name, first, _ = weighted[0]
    for name, vector, _ in weighted[1:]:
        if vector.n_embd != first.n_embd:
            raise UserError(
                f"{name} has n_embd {vector.n_embd} but {first_name} has {first.n_embd}: "
                "mix vectors made for one model"
            )
        theirs, ours = (v.metadata.get("model_fingerprint") for v in (vector, first))
        if theirs and ours and theirs != ours:
            raise UserError(
                f"{name} and {first_name} were trained on different model files: "
                "mix vectors made for one model (pass --model to pick its copies)"
            )
