"""Contrast pairs -> hidden states -> per-block directions -> sign -> scale -> calibrated
strength -> ControlVector.

Everything runs on the GGUF being steered (quantized, any backend), through the engine's
capture API: the state read from `l_out-N` (output of block N) becomes `direction.N`.

Scaling rule ("separation"): each unit direction u_N is scaled by the mean projected gap
between positive and negative prompts at that block, m_N = mean_i((pos_i - neg_i) . u_N),
times GAIN / (number of steered blocks). Residual norms grow ~1000x through a model's depth,
but so does m_N, so strength 1.0 is the same kind of push at every block and in every model:
in total, about GAIN times the contrast the model itself draws between the two personas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import calibrate, dataset, machine, vectors
from .engine import Context, Model, hidden
from .errors import BadInput
from .vectors import ControlVector, Key

METHODS = ("pca-diff", "pca-center", "mean-diff")
DEFAULT_METHOD = "mean-diff"  # docs/training.md "Blocks and method"
GAIN = 1.0
SEQUENCES = 64  # prompts decoded side by side in one llama_decode
MAX_PROMPT_TOKENS = 2048  # per training prompt (built-in ones take some 30-80)
DEFAULT_SPAN = (0.1, 0.85)  # fractions of depth: the steered blocks unless --layers

Progress = Callable[[str, int, int], None]  # (stage, done, total), as each stage goes
STAGES = ("reading prompts", "calibrating")


@dataclass(frozen=True)
class TrainOptions:
    method: str = DEFAULT_METHOD
    layers: tuple[int, int] | None = None  # steered blocks; None: default_layers()
    batch: int = 512
    threads: int | None = None
    budget: float | None = calibrate.BUDGET  # perplexity ratio at +/-1; None: no calibration


def default_layers(n_layer: int) -> tuple[int, int]:
    """Blocks from 10% to 85% of the depth (Gemma 3 270M: 2-14 of 0-17; SmolLM2 135M: 3-25 of
    0-29; Mistral 7B: 3-26 of 0-31). Spread over many blocks, a push of a given fluency cost
    moves behaviour further than on a third of them (docs/training.md "Blocks and method")."""
    return span_blocks(n_layer, DEFAULT_SPAN)


def span_blocks(n_layer: int, span: tuple[float, float]) -> tuple[int, int]:
    """Blocks from span[0] to span[1] of the depth (block 0 cannot be steered)."""
    first = max(1, round(n_layer * span[0]))
    return first, min(n_layer - 1, max(first, round(n_layer * span[1]) - 1))


def hidden_states(
    model: Model,
    prompts: Sequence[str],
    options: TrainOptions,
    progress: Callable[[int, int], None] | None = None,
    steering: np.ndarray | None = None,
) -> np.ndarray:
    """(n_prompts, n_layer, n_embd) states at each prompt's last token, many per decode;
    blocks past the deepest one `options` may steer are not computed (left zero).

    Prompts that share a persona instruction decode it once (`engine.hidden.capture_last`).
    `steering` (rows by block) is applied while reading, to train on top of other vectors.
    """
    tokens = [model.tokenize(p, parse_special=True) for p in prompts]
    _check_lengths(model, prompts, tokens)
    batch = max(options.batch, max(len(t) for t in tokens))
    with Context(  # cells for a full batch of prefixes and one of what follows them
        model,
        n_ctx=2 * batch,
        n_batch=batch,
        n_seq=SEQUENCES,
        threads=options.threads,
        capture=True,
    ) as ctx:
        ctx.set_steering(steering)
        return hidden.capture_last(ctx, tokens, through=deepest(model, options), progress=progress)


def _check_lengths(model: Model, prompts: Sequence[str], tokens: list[list[int]]) -> None:
    """Training reads one state per prompt, with the whole prompt in one decode: past
    MAX_PROMPT_TOKENS its attention buffers outgrow a laptop (and past the model's own
    context its positions mean nothing), so a long prompt is refused before any work."""
    limit = min(MAX_PROMPT_TOKENS, model.n_ctx_train or MAX_PROMPT_TOKENS)
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    if len(tokens[longest]) > limit:
        raise BadInput(
            f"a training prompt is {len(tokens[longest])} tokens ({prompts[longest][:40]!r}...), "
            f"where training takes at most {limit}: shorten the pairs or persona words"
        )


def deepest(model: Model, options: TrainOptions) -> int:
    """The deepest block training reads: the last steered one."""
    return (options.layers or default_layers(model.n_layer))[1]


def unit_directions(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    """(n_layer, n_embd) unit vectors, signed so positives project above negatives."""
    if method not in METHODS:
        raise BadInput(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    diffs = (pos - neg).astype(np.float64)
    units = np.zeros(pos.shape[1:], dtype=np.float64)
    for layer in range(pos.shape[1]):
        units[layer] = _direction(diffs[:, layer], pos[:, layer], neg[:, layer], method)
        votes = np.sign(diffs[:, layer] @ units[layer])
        if votes.sum() < 0:  # majority of pairs must project positive-above-negative
            units[layer] = -units[layer]
    return units.astype(np.float32)


def _direction(diffs: np.ndarray, pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    if method == "mean-diff":
        vec = diffs.mean(axis=0)
    elif method == "pca-diff":  # about the origin: centring would discard the shared shift
        vec = _first_component(diffs)
    else:  # pca-center: members centred on their own pair's midpoint
        mid = (pos + neg) / 2
        vec = _first_component(np.concatenate([pos - mid, neg - mid]).astype(np.float64))
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else vec


def _first_component(data: np.ndarray) -> np.ndarray:
    if not np.any(data):
        return data[0]
    _, _, vt = np.linalg.svd(data, full_matrices=False)
    return vt[0]


def separations(pos: np.ndarray, neg: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Mean projected positive-minus-negative gap per block (the scaling rule's input)."""
    gaps = np.einsum("pld,ld->l", (pos - neg).astype(np.float64), units) / len(pos)
    return gaps.astype(np.float32)


def train(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    options: TrainOptions,
    *,
    name: str,
    progress: Progress | None = None,
) -> ControlVector:
    """Train one control vector; it holds only the steered blocks, already scaled."""
    _check_pairs(pairs, name)
    check_options(options, model.n_layer)
    report = progress or _quiet
    prompts = [p for pair in pairs for p in pair]
    states = hidden_states(model, prompts, options, lambda *done: report(STAGES[0], *done))
    return finish(model, states[0::2], states[1::2], options, name=name, progress=report)


def _check_pairs(pairs: object, name: str) -> None:
    """Pairs as the library's callers may give them: two non-empty, different texts each."""
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence):
        raise BadInput(f"pairs for {name!r}: give a list of (positive, negative) text pairs")
    for number, pair in enumerate(pairs, start=1):
        texts = isinstance(pair, tuple | list) and len(pair) == 2
        if not texts or not all(isinstance(t, str) and t.strip() for t in pair):
            raise BadInput(f"pair {number} of {name!r} is not two non-empty texts: {pair!r:.80}")
        dataset.check_contrast(pair[0], pair[1], f"pair {number} of {name!r}")
    if len(pairs) < 2:
        raise BadInput(f"need at least 2 contrast pairs to train {name!r}, got {len(pairs)}")


def check_options(options: TrainOptions, n_layer: int) -> None:
    """TrainOptions made in code, checked as the CLI checks its flags: a batch of 0 aborted
    the process in llama.cpp, blocks out of range failed deep inside."""
    if options.method not in METHODS:
        raise BadInput(f"unknown method {options.method!r}: use one of {', '.join(METHODS)}")
    if isinstance(options.batch, bool) or not isinstance(options.batch, int) or options.batch < 1:
        raise BadInput(f"batch {options.batch!r}: use a whole number of tokens, 1 or more")
    if options.threads is not None:
        if isinstance(options.threads, bool) or not isinstance(options.threads, int):
            raise BadInput(f"threads {options.threads!r}: use a whole number, or None")
        machine.check_thread_count(options.threads)
    if options.layers is not None:
        first, last = options.layers
        if not 1 <= first <= last <= n_layer - 1:
            raise BadInput(
                f"layers {first}-{last}: use blocks first <= last within the model's steerable "
                f"blocks 1-{n_layer - 1}"
            )


def _quiet(*_args: object) -> None:
    pass


def finish(
    model: Model,
    pos: np.ndarray,
    neg: np.ndarray,
    options: TrainOptions,
    *,
    name: str,
    progress: Progress = _quiet,
) -> ControlVector:
    """Everything after reading the states: direct, then calibrate."""
    vector = from_states(model, pos, neg, options, name=name)
    return calibrated(model, vector, options, lambda *n: progress(STAGES[1], *n))


def calibrated(
    model: Model,
    vector: ControlVector,
    options: TrainOptions,
    progress: Callable[[int, int], None] | None = None,
) -> ControlVector:
    """The vector scaled so that +/-1 costs `options.budget` in perplexity, or on a chat model
    the entropy budget if that binds first (calibrate.py); the file holds the scaled
    directions, so llama.cpp's --control-vector-scaled F:1.0 means what --vector F:1.0 means."""
    if options.budget is None:
        return vector
    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    span = (vector.layers[0], vector.layers[-1])
    budget = calibrate.budget_for(model, options.budget)
    found = calibrate.calibrate(
        model, rows, span, budget=budget, threads=options.threads, progress=progress
    )
    result = vector.scaled(found.scale)
    result.metadata.update(found.metadata())
    return result


def from_states(
    model: Model, pos: np.ndarray, neg: np.ndarray, options: TrainOptions, *, name: str
) -> ControlVector:
    """The vector from paired states: direction.N comes from l_out-N, for the steered blocks."""
    first, last = options.layers or default_layers(model.n_layer)
    method = options.method
    units = unit_directions(pos, neg, method)
    gaps = separations(pos, neg, units)
    blocks = range(first, last + 1)
    if not np.any(gaps[first : last + 1]):
        raise BadInput(
            f"{name!r}: both sides give the same hidden states in blocks {first}-{last}, "
            "so there is no direction to steer by: make the two sides contrast"
        )
    scale = GAIN / len(blocks)
    return ControlVector(
        {n: units[n] * gaps[n] * np.float32(scale) for n in blocks},
        model.architecture,
        {
            Key.CONCEPT: name,
            Key.METHOD: method,
            Key.SCALE_RULE: "separation",
            Key.SCALE_GAIN: GAIN,
            Key.SCALE_BLOCKS: len(blocks),
            Key.SEPARATIONS: ",".join(f"{g:.6g}" for g in gaps),
            Key.LAYER_FIRST: first,
            Key.LAYER_LAST: last,
            Key.PAIRS: len(pos),
            Key.MODEL_NAME: model.name,
        },
    )
