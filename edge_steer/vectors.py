"""Control vectors: per-block directions plus metadata, llama.cpp's GGUF format, arithmetic.

File format (what llama.cpp's `--control-vector` loader reads): `general.architecture =
controlvector`, one F32 1-D tensor `direction.N` per steered block, N >= 1, added to the output
of block N. llama.cpp ignores the metadata, so every check on it happens here.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, gguffile
from .errors import BadInput, DamagedFile, NotFound

ARCH = "controlvector"
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_VALUE = 1e12  # far above any residual stream (~1e4); larger means flipped exponent bits
META_PREFIX = "edge_steer."
MAX_STRENGTH = 10.0  # all vectors together: ±1 clearly steered, ±2 strong, past ±5 gibberish


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


CONVERTIBLE = (".npz", ".npy", ".safetensors", ".json")  # what `vectors convert` reads too


def check_file(path: Path) -> None:
    """The checks every reader shares before it opens a file."""
    if path.is_dir():
        raise BadInput(f"{path} is a folder, not a control vector: give a .gguf file in it")
    if path.exists() and not path.is_file():  # /dev/null, a pipe
        raise BadInput(f"{path} is not a regular file: give a control vector file")
    if not path.is_file():
        raise NotFound(f"control vector file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise BadInput(f"{path} is over {MAX_FILE_BYTES >> 20} MiB: too big for a control vector")


class Key:
    """The metadata keys edge-steer writes and reads (stored as `edge_steer.<key>`), spelled
    here once, as gguf-py's `Keys` are: a typo is an AttributeError, not a silently missing
    value. Files made elsewhere may carry other keys; they are kept as they are."""

    CONCEPT = "concept"
    METHOD = "method"
    SOURCE = "source"
    MODEL_NAME = "model_name"
    MODEL_FINGERPRINT = "model_fingerprint"
    LAYER_FIRST = "layer_first"
    LAYER_LAST = "layer_last"
    PAIRS = "pairs"
    SCALE_RULE = "scale_rule"
    SCALE_GAIN = "scale_gain"
    SCALE_BLOCKS = "scale_blocks"
    SEPARATIONS = "separations"
    CALIBRATION_BUDGET = "calibration_budget"
    CALIBRATION_ENTROPY_BUDGET = "calibration_entropy_budget"
    CALIBRATION_SCALE = "calibration_scale"
    CALIBRATION_REFERENCE_PPL = "calibration_reference_ppl"
    CALIBRATION_POINTS = "calibration_points"
    CALIBRATION_TOKENS = "calibration_tokens"
    RECOMMENDED_MIN = "recommended_min"
    RECOMMENDED_MAX = "recommended_max"
    EVAL_VERDICT = "eval_verdict"
    EVAL_SUMMARY = "eval_summary"
    EVAL_LAYERS = "eval_layers"
    EVAL_MODEL = "eval_model"
    EVAL_MODEL_NAME = "eval_model_name"


EVAL_KEYS = (  # what `eval` measured: `evaluate.save` rewrites them; `vectors info` shows them
    Key.RECOMMENDED_MIN,
    Key.RECOMMENDED_MAX,
    Key.EVAL_VERDICT,
    Key.EVAL_SUMMARY,
    Key.EVAL_LAYERS,
    Key.EVAL_MODEL,
    Key.EVAL_MODEL_NAME,
)
MEASURED_KEYS = (  # measurements of these very blocks: stale once a vector's blocks change
    Key.SEPARATIONS,
    Key.CALIBRATION_BUDGET,
    Key.CALIBRATION_ENTROPY_BUDGET,
    Key.CALIBRATION_SCALE,
    Key.CALIBRATION_REFERENCE_PPL,
    Key.CALIBRATION_POINTS,
    Key.CALIBRATION_TOKENS,
    *EVAL_KEYS,
)


def forget_measurements(vector: ControlVector) -> bool:
    """Drop what training's calibration and `eval` measured (after the blocks changed, ±1
    no longer means the calibrated strength). Whether there was anything to drop."""
    stale = [k for k in vector.metadata if k in MEASURED_KEYS]
    for key in stale:
        del vector.metadata[key]
    if vector.metadata.get(Key.SCALE_RULE) == "calibrated":
        del vector.metadata[Key.SCALE_RULE]
    return bool(stale)


def is_calibrated(vector: ControlVector) -> bool:
    """Whether ±1 was calibrated to the fluency budget: the calibration's own record, not a
    label that converting or mixing could set."""
    return Key.CALIBRATION_SCALE in vector.metadata


def read(path: str | Path) -> ControlVector:
    """Read and validate a control-vector GGUF; any defect is a one-line DamagedFile."""
    if not isinstance(path, str | os.PathLike):
        raise BadInput(f"path={path!r:.60}: use the path of a .gguf control vector")
    path = Path(path)
    check_file(path)
    if path.suffix.lower() in CONVERTIBLE:  # what `convert`, `mix` and `train -o` may write
        raise BadInput(
            f"{path} is not a GGUF control vector, which steering (and llama.cpp) reads: "
            f"convert it with `edge-steer vectors convert {path} -o {path.with_suffix('.gguf')}`"
        )
    header = read_header(path)
    if header.architecture != ARCH:
        raise BadInput(
            f"{path} is a GGUF model, not a control vector "
            f"(general.architecture = {header.architecture!r})"
        )
    return ControlVector(
        validate(_directions(header), str(path)),
        str(header.get(f"{ARCH}.model_hint", "")),
        _metadata(header.fields),
    )


def read_header(path: Path) -> gguffile.Header:
    """The GGUF header of a vector file, with our one-line error for anything else."""
    try:
        return gguffile.read_header(path)
    except DamagedFile as exc:
        raise DamagedFile(f"{exc}: write or download the vector again") from None


def _metadata(fields: Mapping[str, object]) -> dict[str, str | int | float]:
    """Our `edge_steer.*` keys, plus other tools' extra `controlvector.*` keys (repeng's
    `controlvector.method`), so a conversion carries them over."""
    theirs = {f"{ARCH}.model_hint", f"{ARCH}.layer_count"}
    meta = {
        key[len(ARCH) + 1 :]: value
        for key, value in fields.items()
        if key.startswith(f"{ARCH}.") and key not in theirs and _plain(value)
    }
    for key, value in fields.items():
        if key.startswith(META_PREFIX) and _plain(value):
            meta[key[len(META_PREFIX) :]] = value  # type: ignore[assignment]
    return meta  # type: ignore[return-value]


def _plain(value: object) -> bool:
    """A metadata value we carry: a string or a finite number (not a bool or an array)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, str | int) or (isinstance(value, float) and math.isfinite(value))


def _directions(header: gguffile.Header) -> dict[int, np.ndarray]:
    """GGUF-specific checks: tensor names, types, shapes and duplicates."""
    directions: dict[int, np.ndarray] = {}
    for tensor in header.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise DamagedFile(
                f"{header.path}: unexpected tensor {tensor.name!r} (want direction.N)"
            )
        layer = int(index)
        if layer in directions:
            raise DamagedFile(f"{header.path}: direction.{layer} appears twice")
        if tensor.type != gguffile.F32 or len(tensor.shape) != 1:
            raise DamagedFile(f"{header.path}: {tensor.name} must be a 1-D F32 tensor")
        directions[layer] = gguffile.read_f32(header, tensor)
    return directions


def validate(directions: Mapping[int, np.ndarray], source: str) -> dict[int, np.ndarray]:
    """The checks every reader shares: blocks >= 1, 1-D, finite, one width, not empty."""
    checked: dict[int, np.ndarray] = {}
    for layer in sorted(directions):
        vec = np.asarray(directions[layer])
        if layer < 1:
            raise DamagedFile(
                f"{source}: direction.{layer} is invalid: llama.cpp steers blocks 1 and up"
            )
        if vec.ndim != 1:
            raise DamagedFile(f"{source}: direction.{layer} must be 1-D, not shape {vec.shape}")
        if not np.isfinite(vec).all():
            raise DamagedFile(f"{source}: direction.{layer} contains NaN or Inf: a damaged file")
        if np.abs(vec).max(initial=0.0) > MAX_VALUE:
            raise DamagedFile(
                f"{source}: direction.{layer} holds values over {MAX_VALUE:g}: a damaged file"
            )
        if checked and len(vec) != len(next(iter(checked.values()))):
            raise DamagedFile(
                f"{source}: direction.{layer} has length {len(vec)}, unlike the other layers"
            )
        checked[layer] = vec.astype(np.float32, copy=False)
    if not checked:
        raise DamagedFile(f"{source}: no direction.N tensors: not a usable control vector")
    return checked


def write(vector: ControlVector, path: str | Path) -> Path:
    """Write a llama.cpp control-vector GGUF atomically (temp file, then rename)."""
    import gguf  # only writers need gguf-py; reading uses our own header reader

    def write_to(tmp: Path) -> None:
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

    return files.write_atomically(path, write_to, check=gguffile.read_header)  # all there?


def _add_meta(writer, key: str, value: str | int | float) -> None:
    if isinstance(value, int):
        writer.add_int64(key, int(value))
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_string(key, str(value))


def check_fits(vector: ControlVector, n_layer: int, n_embd: int, source: str) -> None:
    """A vector fits a model when its width matches and every layer is steerable."""
    if vector.n_embd != n_embd:
        raise BadInput(
            f"{source} has n_embd {vector.n_embd} but the model has {n_embd}: "
            "it was made for another model; train or convert one for this model"
        )
    bad = [n for n in vector.layers if n >= n_layer]
    if bad:
        raise BadInput(
            f"{source} has direction.{bad[0]} but the model's blocks are 0..{n_layer - 1}"
        )


def combine(weighted: Iterable[tuple[ControlVector, float]], n_layer: int, n_embd: int):
    """Sum vectors times strengths into one (n_layer, n_embd) array indexed by block."""
    rows = np.zeros((n_layer, n_embd), dtype=np.float32)
    for vector, strength in weighted:
        for layer, direction in vector.directions.items():
            rows[layer] += np.float32(strength) * direction
    return rows


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def parse_number(text: str) -> float | None:
    """A strength or weight as people write it (`-1`, `0.5`, `2e-1`), else None. Python's
    float() also takes `1_0` (10: a typo at the strongest setting), other scripts' digits
    and `nan`."""
    text = text.strip()
    return float(text) if NUMBER.fullmatch(text) else None


WHOLE = re.compile(r"[+-]?\d+", re.ASCII)


def parse_whole(text: str) -> int | None:
    """A count or a seed as people write it (`12`, `-1`), else None: not `1_2`, other
    scripts' digits, or more digits than int() reads (4300)."""
    text = text.strip()
    if not WHOLE.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # past Python's limit on digits
        return None


def parse_spec(spec: str) -> tuple[str, float]:
    """`NAME_OR_PATH[:STRENGTH]` -> (name, strength); strength defaults to 1.0."""
    text = spec.strip()
    drive = text[:2] if re.match(r"^[A-Za-z]:[\\/]", text) else ""  # C:\\vec.gguf on Windows
    parts = text[len(drive) :].split(":")
    name, strength = drive + parts[0], parts[1] if len(parts) == 2 else "1.0"
    value = parse_number(strength)
    if len(parts) > 2 or not parts[0] or value is None or not math.isfinite(value):
        raise BadInput(
            f"bad vector spec {spec!r}: use NAME_OR_PATH[:STRENGTH], e.g. lazy:-1.0 or happy"
        )
    return name, value


def check_strength(name: object, strength: object) -> None:
    """A vector's name and strength as a script gives them: a str and a finite number."""
    if not isinstance(name, str):
        raise BadInput(f"vector name {name!r}: use a str such as 'happy'")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):  # numpy's too
        raise BadInput(f"strength {strength!r} of {name!r}: use a number such as 0.8")
    try:
        value = float(strength)
    except OverflowError:  # an int past any float: 10**400
        raise BadInput(f"strength of {name!r} is too strong: use a number such as 0.8") from None
    if not math.isfinite(value):
        raise BadInput(f"strength {value!r} of {name!r}: use a finite number such as 0.8")


def check_strengths(strengths: Mapping[str, float]) -> None:
    """Strengths steer only within one cap on their total size (sum of |strength|), so no
    number of vectors adds up to gibberish or overflow; BadInput beyond it."""
    total = sum(map(_size, strengths.values()))  # inf once any is huge: never an overflow
    if not total <= MAX_STRENGTH:  # NaN too
        given = ", ".join(f"{n}:{_signed(s):g}" for n, s in list(strengths.items())[:4])
        raise BadInput(
            f"steering {given}{'...' if len(strengths) > 4 else ''} is too strong: the "
            f"strengths' sizes add up to {total:g}, at most {MAX_STRENGTH:g} is allowed "
            "(±1 is clearly steered, ±2 strong)"
        )


def _size(strength: float) -> float:
    try:
        return abs(float(strength))
    except OverflowError:  # an int too large for a float (JSON allows any)
        return math.inf


def _signed(strength: float) -> float:
    """`strength` as a float to show, keeping its sign even where it overflows."""
    return -_size(strength) if strength < 0 else _size(strength)


def parse_specs(specs: Iterable[str]) -> list[tuple[str, float]]:
    """Repeatable and comma-separated: ['lazy:-1,happy:0.5', 'x.gguf'] -> three pairs."""
    return [parse_spec(part) for spec in specs for part in spec.split(",") if part.strip()]


def spec_strengths(specs: Iterable[str]) -> dict[str, float]:
    """Specs -> {name: strength}, merged as `merge_strengths` merges."""
    return merge_strengths(parse_specs(specs))


def merge_strengths(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(name, strength) pairs -> {name: strength}; a name given twice adds up (happy:1,
    happy:0.5 = happy:1.5), in any case: names ignore case (as the store does), paths do
    not (`name_key`)."""
    totals: dict[str, float] = {}
    for name, strength in pairs:
        key = name_key(name)
        totals[key] = totals.get(key, 0.0) + strength
    return totals


def name_key(name: str) -> str:
    """A vector name as specs are merged by: names ignore case (as the store does), paths
    do not (files may differ by case alone)."""
    return name if files.looks_like_path(name) else name.lower()


def identity(name: str) -> str:
    """Which vector a name means, as one steering keys its vectors: `name_key`, with a path
    as its absolute file (`./v.gguf` is `v.gguf`; as /save writes it)."""
    key = name_key(name)
    return str(Path(key).expanduser().absolute()) if files.looks_like_path(key) else key


def block_span(layers: list[int]) -> str:
    """Blocks for people: `4-12` when they run without a gap, else `4,6,9`."""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


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
            number = parse_number(part)
            if number is None:
                names.append(part.strip())
            else:
                weight *= number
        if len(names) != 1 or not re.fullmatch(r"\S+", names[0]) or not math.isfinite(weight):
            raise BadInput(
                f"bad mix term {term!r} in {expression!r}: use NAME*WEIGHT joined by ' + ', "
                'e.g. "happy*0.5 + lazy*-1"'
            )
        terms.append((names[0], weight))
    if not sum(abs(weight) for _, weight in terms) <= MAX_STRENGTH:
        raise BadInput(
            f"mix {expression!r} is too strong: its weights' sizes add up to more than "
            f"{MAX_STRENGTH:g}: use smaller weights, and a strength when you steer with it (NAME:2)"
        )
    return terms


def mix(weighted: Iterable[tuple[str, ControlVector, float]]) -> ControlVector:
    """The weighted sum of vectors made for one model; a file of their union of blocks."""
    weighted = list(weighted)
    _check_same_model(weighted)
    directions: dict[int, np.ndarray] = {}
    for _, vector, weight in weighted:
        for layer, direction in vector.directions.items():
            directions[layer] = directions.get(layer, 0) + np.float32(weight) * direction
    layers = sorted(n for n, direction in directions.items() if np.any(direction))
    if not layers:
        raise BadInput("the mix cancels out (every direction sums to zero): it would steer nothing")
    metadata: dict[str, str | int | float] = {
        Key.SOURCE: " + ".join(f"{name}*{weight:g}" for name, _, weight in weighted),
        Key.METHOD: "mix",
        Key.LAYER_FIRST: layers[0],
        Key.LAYER_LAST: layers[-1],
    }
    fingerprints = {v.metadata.get(Key.MODEL_FINGERPRINT) for _, v, _ in weighted}
    if fingerprint := next((f for f in fingerprints if f is not None), None):
        metadata[Key.MODEL_FINGERPRINT] = fingerprint
    concepts = {v.metadata.get(Key.CONCEPT) for _, v, _ in weighted}
    concept = concepts.pop() if len(concepts) == 1 else None
    if concept is not None and all(w > 0 for _, _, w in weighted):
        metadata[Key.CONCEPT] = concept  # still that concept: `eval` finds its probes
    hint = next((v.model_hint for _, v, _ in weighted if v.model_hint), "")
    return ControlVector({n: directions[n] for n in layers}, hint, metadata)


def _check_same_model(weighted: list[tuple[str, ControlVector, float]]) -> None:
    first_name, first, _ = weighted[0]
    for name, vector, _ in weighted[1:]:
        if vector.n_embd != first.n_embd:
            raise BadInput(
                f"{name} has n_embd {vector.n_embd} but {first_name} has {first.n_embd}: "
                "mix vectors made for one model"
            )
        theirs, ours = (v.metadata.get(Key.MODEL_FINGERPRINT) for v in (vector, first))
        if theirs and ours and theirs != ours:
            raise BadInput(
                f"{name} and {first_name} were trained on different model files: "
                "mix vectors made for one model (pass --model to pick its copies)"
            )


def recommended_range(vector: ControlVector) -> tuple[float, float] | None:
    """The strength range `edge-steer eval` stored in this vector, if any."""
    low, high = (vector.metadata.get(k) for k in (Key.RECOMMENDED_MIN, Key.RECOMMENDED_MAX))
    if isinstance(low, int | float) and isinstance(high, int | float):
        return float(low), float(high)
    return None


def describe_range(vector: ControlVector) -> str:
    """'recommended -1.5..+2 (works on Gemma 3 270M)', or '' for a vector never evaluated."""
    verdict_text = vector.metadata.get(Key.EVAL_VERDICT)
    if verdict_text is None:
        return ""
    where = vector.metadata.get(Key.EVAL_MODEL_NAME, "its model")
    span = recommended_range(vector)
    if span is None:
        return f"no recommended strength ({verdict_text} on {where})"
    return f"recommended {span[0]:+g}..{span[1]:+g} ({verdict_text} on {where})"
