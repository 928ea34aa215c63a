"""Control vectors from other tools' files, and out again as GGUF or npz.

Every tool numbers layers its own way, so the numbering is explicit here:
- `block` (llama.cpp, repeng, edge-steer): key N is added to the output of block N
  (0-based), which is llama.cpp's `direction.N`.
- `hidden-states` (Hugging Face `output_hidden_states`): index 0 is the embeddings and index
  N is the output of block N-1, so key N becomes `direction.N-1`.
- `shift` is added after that. llama.cpp's cvector-generator writes the state it read after
  block N as `direction.N+1`; `--shift -1` puts each direction back where it was measured.
Whatever could not be detected is said in the notes `load` returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import files, gguffile, store, vectors
from .errors import BadInput, DamagedFile, EdgeSteerError

if TYPE_CHECKING:
    from .model_files import Shape

LAYER_BASES = ("block", "hidden-states")
OUTPUT_SUFFIXES = (".gguf", ".npz")
MAX_BLOCK = 4096  # far past any model's depth (Mixtral has 32 blocks, the largest ~200)
NPZ_META_KEY = "__edge_steer__"  # JSON: model hint, metadata, numbering (our own npz files)


@dataclass
class Source:
    """What a reader found: arrays by the file's own layer keys, and what it knows of them."""

    arrays: dict[int, np.ndarray]
    model_hint: str = ""
    metadata: dict[str, str | int | float] = field(default_factory=dict)
    layer_base: str | None = None  # None: the file does not say
    tool: str = ""
    notes: list[str] = field(default_factory=list)
    usual_shift: int = 0  # what files from this tool usually need
    measured_here: bool = True  # its calibration and eval keys are edge-steer's own


def load(
    path: str | Path, *, layer_base: str | None = None, shift: int = 0, n_layer: int | None = None
) -> tuple[vectors.ControlVector, list[str]]:
    """Read any supported file as a validated ControlVector numbered by block, plus notes
    saying what was detected and what was assumed. `n_layer` (the target model's) helps
    recognise a full hidden-states array."""
    path = Path(path)
    vectors.check_file(path)
    if layer_base is not None and layer_base not in LAYER_BASES:
        raise BadInput(f"bad --layer-base {layer_base!r}: use block or hidden-states")
    try:
        source = _reader(path)(path)
    except (OSError, RecursionError) as exc:  # unreadable (/proc/self/mem), nested past limit
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise DamagedFile(f"cannot read {path} ({reason}): pass a vector file") from None
    base = layer_base or source.layer_base or _guess_base(source, n_layer)
    if source.usual_shift and not shift and base == "block":
        source.notes.append(
            f"files from {source.tool} usually need --shift {source.usual_shift}: "
            "it stores the state read after block N as direction.N+1"
        )
    directions = _renumber(source, base, shift)
    metadata = dict(source.metadata)
    if not metadata:  # a foreign file: remember where it came from
        metadata[vectors.Key.SOURCE] = f"{path.name} ({source.tool})"
    vector = vectors.ControlVector(
        vectors.validate(directions, str(path)), source.model_hint, metadata
    )
    if shift or base != (source.layer_base or base):
        _note_moved(vector, source.notes)
    elif not source.measured_here and vectors.forget_measurements(vector):
        source.notes.append(
            "ignored the file's calibration and eval results, which edge-steer did not measure: "
            "run `edge-steer eval` on the result for a recommended range"
        )
    return vector, source.notes


def _note_moved(vector: vectors.ControlVector, notes: list[str]) -> None:
    if vectors.forget_measurements(vector):
        notes.append(
            "dropped the file's calibration and eval results, which measured its old blocks: "
            "run `edge-steer eval` on the result for a recommended range"
        )


@dataclass(frozen=True)
class Relabel:
    """What a conversion may change besides numbering: the blocks kept ("A-B"), the model
    hint, and where the vector came from and how it was made."""

    layers: str | None = None
    model_hint: str | None = None
    source: str | None = None
    method: str | None = None
    scale_rule: str | None = None


ARCHITECTURE = store.NAME_PATTERN  # llama, gemma3, qwen2moe: spelled as vector names are


def check_relabel(relabel: Relabel) -> None:
    """Labels go into the file's metadata and onto `vectors list`'s rows: an architecture
    name, and single lines of text (a pasted newline broke the listings)."""
    hint = relabel.model_hint
    if hint and not ARCHITECTURE.fullmatch(hint):
        raise BadInput(
            f"--model-hint {hint!r} is not an architecture name: use the model's "
            "general.architecture, such as llama or gemma3"
        )
    texts = {
        "--source": relabel.source,
        "--method": relabel.method,
        "--scale-rule": relabel.scale_rule,
    }
    for flag, text in texts.items():
        if text is not None and not text.isprintable():
            raise BadInput(f"{flag} {text!r} is not one line of text: leave out what breaks it")


def convert(
    path: str | Path,
    *,
    layer_base: str | None = None,
    shift: int = 0,
    shape: Shape | None = None,
    relabel: Relabel = Relabel(),
) -> tuple[vectors.ControlVector, list[str]]:
    """`edge-steer vectors convert`: `load`, keep the blocks asked for, relabel, and check
    the result against the target model's `shape` when one is given."""
    check_relabel(relabel)
    n_layer = shape.n_layer if shape else None
    vector, notes = load(path, layer_base=layer_base, shift=shift, n_layer=n_layer)
    if relabel.layers is not None:
        before = len(vector.directions)
        _keep_layers(vector, relabel.layers, n_layer or max(vector.layers) + 1)
        if len(vector.directions) < before:
            _note_moved(vector, notes)
    if relabel.model_hint is not None:
        vector.model_hint = relabel.model_hint
    given = {
        vectors.Key.SOURCE: relabel.source,
        vectors.Key.METHOD: relabel.method,
        vectors.Key.SCALE_RULE: relabel.scale_rule,
    }
    vector.metadata.update({key: value for key, value in given.items() if value is not None})
    if shape:
        vectors.check_fits(vector, shape.n_layer, shape.n_embd, str(path))
        vector.model_hint = vector.model_hint or shape.architecture
    return vector, notes


def _keep_layers(vector: vectors.ControlVector, layers: str, n_layer: int) -> None:
    from .steering import parse_layers  # here: it loads llama.cpp

    span = parse_layers(layers, n_layer)
    assert span is not None
    first, last = span
    kept = {n: d for n, d in vector.directions.items() if first <= n <= last}
    if not kept:
        raise BadInput(
            f"no directions in blocks {layers}: the file has {vectors.block_span(vector.layers)}"
        )
    vector.directions = kept
    vector.metadata.update({vectors.Key.LAYER_FIRST: first, vectors.Key.LAYER_LAST: last})


def _reader(path: Path) -> Callable[[Path], Source]:
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:4] == gguffile.MAGIC:
        return _read_gguf
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip; the second, an empty one
        return _read_npz
    if magic[:6] == b"\x93NUMPY":
        return _read_npy
    if path.suffix == ".safetensors":
        return _read_safetensors
    if path.suffix == ".json":
        return _read_json
    *others, last = vectors.CONVERTIBLE
    raise BadInput(f"{path}: unknown format: convert reads .gguf, {', '.join(others)} and {last}")


def _guess_base(source: Source, n_layer: int | None) -> str:
    rows = max(source.arrays, default=0) + 1
    if source.tool.endswith("array") and n_layer is not None and rows == n_layer + 1:
        source.notes.append(
            f"the array has {rows} rows, one more than the model's {n_layer} blocks: "
            "read as hidden states (row 0 = embeddings); pass --layer-base block if not"
        )
        return "hidden-states"
    source.notes.append(
        "assumed --layer-base block (key N is added after block N, as in llama.cpp); "
        "pass --layer-base hidden-states if key N indexes Hugging Face hidden_states"
    )
    return "block"


def _renumber(source: Source, base: str, shift: int) -> dict[int, np.ndarray]:
    offset = shift - (1 if base == "hidden-states" else 0)
    directions, dropped, zero = {}, [], 0
    for key, array in sorted(source.arrays.items()):
        block = key + offset
        if np.isfinite(array).all() and not np.any(array):  # NaN/Inf are left to `validate`
            zero += 1
        elif block < 1:
            dropped.append(key)
        elif block > MAX_BLOCK:
            raise BadInput(
                f"key {key} lands on block {block}: no model has that many (at most "
                f"{MAX_BLOCK}); check the file's numbering and --shift"
            )
        else:
            directions[block] = array
    if dropped and not directions:
        keys = f"{dropped[0]}-{dropped[-1]}" if len(dropped) > 1 else str(dropped[0])
        given = f"with --shift {shift}, " if shift else ""
        raise BadInput(
            f"{given}every direction (key {keys}) lands before block 1, which llama.cpp "
            f"cannot steer: --shift {1 - dropped[0] + shift - offset} keeps them all"
        )
    if zero:
        source.notes.append(f"skipped {zero} all-zero direction(s)")
    if dropped:
        source.notes.append(
            f"dropped key(s) {', '.join(map(str, dropped))}: they land before block 1, "
            "which llama.cpp cannot steer"
        )
    return directions


# --- readers ------------------------------------------------------------------------------


def _read_gguf(path: Path) -> Source:
    vector = vectors.read(path)
    source = Source(dict(vector.directions), vector.model_hint, vector.metadata, tool="GGUF")
    header = gguffile.read_header(path)  # cached: the read above parsed it already
    if any(key.startswith(vectors.META_PREFIX) for key in header.fields):
        source.layer_base, source.tool = "block", "edge-steer GGUF"
    elif header.types.get(f"{vectors.ARCH}.layer_count") == gguffile.INT32:
        source.tool, source.usual_shift = "llama.cpp's cvector-generator", -1
        source.notes.append("looks like llama.cpp cvector-generator output (INT32 layer_count)")
    return source


def _read_npz(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as exc:
        raise BadInput(f"{path}: {_pickle_hint(exc)}") from None
    except Exception as exc:  # zipfile/numpy raise many types on damaged files
        raise DamagedFile(f"{path} is a damaged .npz file ({type(exc).__name__})") from None
    if NPZ_META_KEY in arrays:
        return _own_npz(path, arrays)
    return _keyed_arrays(path, arrays, "npz")


def _own_npz(path: Path, arrays: dict[str, np.ndarray]) -> Source:
    damaged = DamagedFile(f"{path}: damaged {NPZ_META_KEY} entry: write the file again")
    try:
        meta = json.loads(str(arrays.pop(NPZ_META_KEY)))
    except json.JSONDecodeError:
        raise damaged from None
    if not isinstance(meta, dict) or meta.get("layer_base", "block") not in LAYER_BASES:
        raise damaged
    source = _keyed_arrays(path, arrays, "edge-steer npz")
    _take_labels(source, path, meta)
    source.layer_base = meta.get("layer_base", "block")
    source.notes.clear()
    return source


def _take_labels(source: Source, path: Path, doc: dict) -> None:
    """A file's model_hint and metadata, as checked as the flags that set them: a newline
    in either broke `vectors list` rows. A hint that names no architecture is dropped."""
    hint, metadata = doc.get("model_hint") or "", doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DamagedFile(f"{path}: its metadata is not an object of names and values")
    if isinstance(hint, str) and ARCHITECTURE.fullmatch(hint):
        source.model_hint = hint
    elif hint:
        source.notes.append(f"ignored model_hint {str(hint)[:60]!r}, no architecture name")
    kept = {k: v for k, v in metadata.items() if _plain_label(k, v)}
    if dropped := sorted(str(k)[:40] for k in metadata.keys() - kept.keys()):
        source.notes.append(f"ignored metadata that is not one line of text or a number: {dropped}")
    source.metadata = kept


def _plain_label(key: object, value: object) -> bool:
    text = isinstance(value, str) and value.isprintable()
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(key, str) and key.isprintable() and (text or number)


def _read_npy(path: Path) -> Source:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise BadInput(f"{path}: {_pickle_hint(exc)}") from None
    except Exception as exc:
        raise DamagedFile(f"{path} is a damaged .npy file ({type(exc).__name__})") from None
    return _rows(path, array, "npy array")


def _pickle_hint(exc: ValueError) -> str:
    if "pickle" in str(exc):
        return (
            "holds pickled Python objects, which are unsafe to load: save plain arrays, "
            "e.g. np.savez(path, **{'direction.N': array}) or one layers x n_embd array"
        )
    return f"unreadable ({exc})"


def _read_safetensors(path: Path) -> Source:
    """The safetensors layout: u64 header size, a JSON header, then raw little-endian data."""
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = header.pop("__metadata__", None) or {}
        arrays = {}
        for name, info in header.items():
            if info["dtype"] not in dtypes:
                want = "F32, F16, BF16 or F64"
                raise BadInput(f"{path}: tensor {name} is {info['dtype']}: want {want}")
            start, end = (8 + size + int(i) for i in info["data_offsets"])
            raw = np.frombuffer(data[start:end], dtypes[info["dtype"]])
            if info["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = raw.astype(np.float32).reshape(info["shape"])
    except BadInput:
        raise  # a ValueError too: not to be taken for damage below
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedFile(f"{path} is a damaged safetensors file ({type(exc).__name__})") from None
    source = _keyed_arrays(path, arrays, "safetensors")
    hint = meta.get("model_hint") if isinstance(meta, dict) else None
    _take_labels(source, path, {"model_hint": hint})
    return source


def _read_json(path: Path) -> Source:
    """`{"directions": {"N": [...]}, "model_hint": ..., "layer_base": ...}`, a bare
    `{"N": [...]}` mapping, or a list of rows."""
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFile(f"{path} is not valid JSON ({exc})") from None
    wrapped = isinstance(doc, dict) and "directions" in doc
    body = doc["directions"] if wrapped else doc
    try:
        if isinstance(body, list):
            source = _rows(path, np.array(body, dtype=np.float32), "JSON array")
        elif isinstance(body, dict):
            arrays = {k: np.array(v, dtype=np.float32) for k, v in body.items()}
            source = _keyed_arrays(path, arrays, "JSON")
        else:
            raise ValueError("not a list or an object")
    except (ValueError, TypeError) as exc:
        raise DamagedFile(f"{path}: directions must be lists of numbers ({exc})") from None
    if wrapped:
        _take_labels(source, path, doc)
        source.measured_here = False  # a range in a JSON file was measured by nobody we know
        source.layer_base = doc.get("layer_base")
        if source.layer_base not in (None, *LAYER_BASES):
            raise DamagedFile(
                f"{path}: unknown layer_base {source.layer_base!r}: use block or hidden-states"
            )
    return source


def _keyed_arrays(path: Path, arrays: dict[str, np.ndarray], tool: str) -> Source:
    """Named arrays -> layer keys; one 2-D array named without a layer number (`directions`,
    or np.savez's `arr_0`) is read as rows."""
    if len(arrays) == 1:
        ((name, array),) = arrays.items()
        if array.ndim == 2 and (name == "arr_0" or not re.search(r"\d", name)):
            return _rows(path, array, f"{tool} array")
    keyed: dict[int, np.ndarray] = {}
    for name, array in arrays.items():
        key = _layer_number(name)
        if key is None:
            raise DamagedFile(f"{path}: cannot tell the layer of {name!r}: name it direction.N")
        if key in keyed:
            raise DamagedFile(f"{path}: layer {key} appears twice ({name!r})")
        keyed[key] = _one_row(path, name, array)
    return Source(keyed, tool=tool)


def _layer_number(name: str) -> int | None:
    """`direction.3`, `model.layers.3.mlp`, `gpt2.h.3`, `layer_3`, `3` -> 3; None where no one
    block number is clear: `direction.3.5`, `direction.-3` (was read as 5 and 3)."""
    numeric = [part for part in re.split(r"[./:]", name) if re.fullmatch(r"\s*-?\d+\s*", part)]
    if numeric:
        return int(numeric[0]) if len(numeric) == 1 and numeric[0].strip().isdigit() else None
    runs = re.findall(r"\d+", name)
    return int(runs[0]) if len(runs) == 1 else None


def _one_row(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise DamagedFile(f"{path}: {name} is {array.dtype}, not floating point")
    squeezed = array.reshape(-1) if array.ndim == 2 and array.shape[0] == 1 else array
    if squeezed.ndim != 1:
        raise DamagedFile(f"{path}: {name} must be 1-D, not shape {array.shape}")
    return squeezed.astype(np.float32)


def _rows(path: Path, array: np.ndarray, tool: str) -> Source:
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DamagedFile(
            f"{path}: want a layers x n_embd float array, not {array.dtype} shape {array.shape}"
        )
    return Source({i: row.astype(np.float32) for i, row in enumerate(array)}, tool=tool)


# --- writers ------------------------------------------------------------------------------


def check_output(path: str | Path) -> Path:
    """An output file name we can write: checked before minutes of training, not after."""
    given, path = str(path), Path(path).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:  # x.GGUF too, as models are taken
        raise BadInput(f"unsupported output {given!r}: use a .gguf or .npz file name")
    files.check_writable(path)
    _check_not_a_model(given, path)
    return path


def _check_not_a_model(given: str, path: Path) -> None:
    """`-o mistral.gguf` would replace a 4 GB download with a 100 KB vector, atomically."""
    try:
        architecture = gguffile.read_header(path).architecture
    except EdgeSteerError:  # missing, or not a GGUF: nothing to protect
        return
    if architecture != vectors.ARCH:
        raise BadInput(
            f"{given} is a GGUF model ({architecture}), which a vector would replace: "
            "write the vector to another file name"
        )


def save(vector: vectors.ControlVector, path: str | Path) -> Path:
    """Write GGUF (llama.cpp's format) or our npz, by the output's suffix, atomically."""
    path = check_output(path)
    if path.suffix.lower() == ".gguf":
        return vectors.write(vector, path)
    return _write_npz(vector, path)


def _write_npz(vector: vectors.ControlVector, path: Path) -> Path:
    meta = {"layer_base": "block", "model_hint": vector.model_hint, "metadata": vector.metadata}
    arrays = {f"direction.{n}": vector.directions[n] for n in vector.layers}
    arrays[NPZ_META_KEY] = np.array(json.dumps(meta))

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle

    return files.write_atomically(path, write_to)
