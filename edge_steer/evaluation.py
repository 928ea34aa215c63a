"""The use case "evaluate vector X on model M": read (or train) the vector, sweep strengths over
held-out probes, optionally measure the persona as a prompt and steered chat replies, store
the recommended range in the vector, and return it all as one typed `EvalReport`.

`evaluate.py` holds the measurements themselves; front ends (`edge-steer eval`) parse options
and render the report (`EvalReport.to_json` is what `--json` prints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import chateval, dataset, evaluate, library, runtime, steering, store, vectors
from .dataset import Probe
from .engine import Model
from .errors import BadInput
from .vectors import ControlVector, Key

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _quiet(_what: str, _done: int, _total: int) -> None:
    pass


MAX_SAMPLES = 64  # sampled continuations per strength, side by side (the default is 8)
MAX_SAMPLE_TOKENS = 512


@dataclass(frozen=True)
class EvalOptions:
    """What to measure. `strengths` defaults to evaluate.DEFAULT_STRENGTHS refined around
    the perplexity limit; `probes` defaults to the built-in concept's held-out probes."""

    strengths: tuple[float, ...] | None = None
    layers: str | None = None  # "A-B" blocks to steer; None: the vector's own
    probes: Sequence[Probe] | None = None
    baseline: bool = False  # also measure the persona as a prompt instead
    personas: str | None = None  # "POSITIVE,NEGATIVE" for custom concepts
    samples: int = 8
    sample_tokens: int = 32
    seed: int = 0
    save: bool = True  # store the recommended range in the vector's file
    retrain: bool = False
    chat: bool = False  # also steer chat replies (instruct models)
    chat_replies: int | None = None  # per question and strength; None: chateval.REPLIES
    threads: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.samples <= MAX_SAMPLES and 1 <= self.sample_tokens <= MAX_SAMPLE_TOKENS):
            raise BadInput(
                f"--samples must be 0 to {MAX_SAMPLES} and --sample-tokens 1 to "
                f"{MAX_SAMPLE_TOKENS} (every sample is decoded side by side in one context)"
            )
        if self.chat_replies is not None:
            if not self.chat:
                raise BadInput("--chat-replies needs --chat: add --chat, or leave it out")
            chateval.check_replies(self.chat_replies)
        if self.personas and not (self.baseline or self.chat):
            raise BadInput(
                "--personas names the personas that --baseline and --chat use: add one of "
                "them, or leave --personas out"
            )
        strengths = self.strengths or ()
        if self.save and strengths and not (min(strengths) < 0 < max(strengths)):
            raise BadInput(
                "--strengths on one side of 0 cannot judge the other side, so their result "
                "is not stored: add strengths on both sides, or pass --no-save"
            )


@dataclass(frozen=True)
class PointReport:
    """One strength: probe effect (nats), perplexity on neutral text and their ratio to
    unsteered, and how many samples degenerated."""

    strength: float
    effect: float
    margin: float
    perplexity: float
    ppl_ratio: float
    effect_per_cost: float | None
    degenerate: float | None  # None: nothing sampled (--samples 0)
    sample: str
    in_range: bool | None = None  # in the recommended range (None for baseline points)
    persona: str | None = None  # baseline points: the persona word and its prompt
    prompt: str | None = None

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        if self.persona is None:
            del data["persona"], data["prompt"]
        if self.in_range is None:
            del data["in_range"]
        return data


@dataclass(frozen=True)
class EvalReport:
    """Everything `edge-steer eval` measured for one vector on one model."""

    model: str
    model_name: str
    vector: str
    calibration: dict[str, object]  # budget and scale from training, None when uncalibrated
    concept: str
    layers: list[int] | None
    probes: int
    points: list[PointReport]
    baseline: list[PointReport]
    recommended: list[float] | None
    recommended_at_sweep_edge: list[bool] | None
    verdict: str
    saved: str | None
    chat: list[chateval.ChatPoint] | None
    sweep: evaluate.Sweep = field(repr=False)  # the raw measurements, for charts and plots
    plot: str | None = None  # set by a front end that wrote one
    max_ppl_ratio: float = evaluate.MAX_PPL_RATIO
    min_effect: float = evaluate.MIN_EFFECT

    def to_json(self) -> dict[str, object]:
        """The report as `edge-steer eval --json` prints it."""
        return {
            "model": self.model,
            "model_name": self.model_name,
            "vector": self.vector,
            "calibration": self.calibration,
            "concept": self.concept,
            "layers": self.layers,
            "probes": self.probes,
            "points": [p.to_json() for p in self.points],
            "baseline": [p.to_json() for p in self.baseline],
            "recommended": self.recommended,
            "recommended_at_sweep_edge": self.recommended_at_sweep_edge,
            "verdict": self.verdict,
            "max_ppl_ratio": self.max_ppl_ratio,
            "min_effect": self.min_effect,
            "saved": self.saved,
            "plot": self.plot,
            "chat": None if self.chat is None else [_rounded(asdict(p)) for p in self.chat],
        }


def _rounded(point: dict[str, object]) -> dict[str, object]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}


def vector_name(spec: str) -> str:
    """The vector a spec names; a strength is refused (the sweep sets strengths)."""
    name, _ = vectors.parse_spec(spec)
    if name != spec.strip():
        raise BadInput(f"give the vector without a strength ({name}): --strengths sets them")
    return name


def evaluate_vector(
    model: Model, vector: str, options: EvalOptions, *, on_progress: Progress = _quiet
) -> EvalReport:
    """Evaluate vector `vector` (a name, a stored vector or a built-in concept, trained on
    first use) on `model`. Checks what it can before any long step: the spec, the probes,
    and with `chat` that the model has a chat template."""
    name = vector_name(vector)
    if options.retrain:
        library.check_retrain([name])
    if options.chat:
        chateval.require_chat(model)
    span = steering.parse_layers(options.layers, model.n_layer)
    path = runtime.vector_file(
        model, name, retrain=options.retrain, on_progress=on_progress, threads=options.threads
    )
    read = vectors.read(path)
    vectors.check_fits(read, model.n_layer, model.n_embd, str(path))
    steering.check_in_layers(span, name, read)  # else it measured nothing, and stored that
    fingerprint = store.fingerprint(model.path)  # now: the file may go while the sweep runs
    concept = str(read.metadata.get(Key.CONCEPT) or path.stem)
    probes = options.probes or _builtin_probes(concept)
    _check_probe_lengths(model, probes)
    words, prefixes = (None, None)
    if options.baseline:
        words, prefixes = _personas(model, concept, options.personas)
    definition = _definition(concept, options.personas, "--chat") if options.chat else None
    rows = vectors.combine([(read, 1.0)], model.n_layer, model.n_embd)
    steered = (rows, span or (1, model.n_layer - 1))
    result = _sweep(model, steered, probes, options, prefixes, concept, on_progress)
    if options.save:
        evaluate.save(path, result, model, fingerprint, f"{span[0]}-{span[1]}" if span else "all")
    chat = None
    if definition is not None:
        chat = _chat(model, steered, definition, options, result, on_progress)
    report = _report(result, model, read, path, concept, span, words, prefixes, len(probes))
    return replace(report, chat=chat, saved=str(path) if options.save else None)


Steered = tuple[np.ndarray, tuple[int, int]]  # summed rows and the blocks they steer
Persona = tuple[str, str]  # (positive, negative): persona words, or their prompt texts


def _sweep(
    model: Model,
    steered: Steered,
    probes: Sequence[Probe],
    options: EvalOptions,
    prefixes: Persona | None,
    concept: str,
    on_progress: Progress,
) -> evaluate.Sweep:
    settings = evaluate.EvalSettings(
        strengths=options.strengths or evaluate.parse_strengths(evaluate.DEFAULT_STRENGTHS),
        samples=options.samples,
        sample_tokens=options.sample_tokens,
        sampler=replace(evaluate.SAMPLING, seed=options.seed),
        refine=options.strengths is None,
    )
    label = f"evaluating {concept!r} on {model.name}"
    with evaluate.context(model, options.threads) as ctx:
        return evaluate.sweep(
            ctx,
            *steered,
            probes,
            settings,
            personas=prefixes,
            progress=lambda done, total: on_progress(label, done, total),
        )


def _chat(
    model: Model,
    steered: Steered,
    definition: dataset.Concept,
    options: EvalOptions,
    result: evaluate.Sweep,
    on_progress: Progress,
) -> list[chateval.ChatPoint]:
    """`chateval.chat_sweep` at the probe sweep's strengths."""
    label = f"chat replies under {definition.name!r}"
    return chateval.chat_sweep(
        model,
        *steered,
        definition,
        [p.strength for p in result.points],
        seed=options.seed,
        replies=options.chat_replies or chateval.REPLIES,
        threads=options.threads,
        progress=lambda done, total: on_progress(label, done, total),
    )


def _check_probe_lengths(model: Model, probes: Sequence[Probe]) -> None:
    """Before the sweep: a probe is scored in one batch of the evaluation's context (one too
    long failed there, as "cannot score 5002 tokens from position 5001")."""
    limit = evaluate.EVAL_CTX
    for number, probe in enumerate(probes, start=1):
        ending = max(probe.positive, probe.negative, key=len)
        count = model.fewest_tokens((probe.prompt + ending).encode(), limit)
        if count <= limit:
            count = len(model.tokenize(probe.prompt + ending))
        if count > limit:
            raise BadInput(
                f"probe {number} ({probe.prompt[:40]!r}...) is {count} tokens or more with its "
                f"longer ending, where a probe takes at most {limit}: shorten it"
            )


def _builtin_probes(concept: str) -> list[Probe]:
    if concept.lower() not in dataset.builtin_names():
        raise BadInput(
            f"no probes for concept {concept!r}: pass --probes FILE.jsonl with one "
            '{"prompt": ..., "positive": ..., "negative": ...} per line'
        )
    return list(dataset.load_builtin(concept).probes)


def _personas(model: Model, concept: str, personas: str | None) -> tuple[Persona, Persona]:
    """(positive, negative) persona words and their prompt texts, as used in training."""
    definition = _definition(concept, personas, "--baseline")
    words = (definition.positive[0], definition.negative[0])
    return words, dataset.persona_prefixes(definition, model)[0]


def _definition(concept: str, personas: str | None, flag: str) -> dataset.Concept:
    """The concept's persona words: --personas, or the built-in concept's."""
    if personas:
        positive, _, negative = personas.partition(",")
        return dataset.from_personas(concept, positive, negative)
    if concept.lower() in dataset.builtin_names():
        return dataset.load_builtin(concept)
    raise BadInput(
        f"{flag} needs persona words for the custom concept {concept!r}: "
        "add --personas 'POSITIVE,NEGATIVE', e.g. --personas 'sarcastic,sincere'"
    )


def _report(
    result: evaluate.Sweep,
    model: Model,
    vector: ControlVector,
    path: Path,
    concept: str,
    span: tuple[int, int] | None,
    words: Persona | None,
    prefixes: Persona | None,
    n_probes: int,
) -> EvalReport:
    recommended = evaluate.recommend(result)
    baseline = [
        replace(_point(result, p), persona=word, prompt=prefix)
        for p, word, prefix in zip(result.baseline, words or (), prefixes or (), strict=False)
    ]
    return EvalReport(
        model=str(model.path),
        model_name=model.name,
        vector=str(path),
        calibration={
            "budget": vector.metadata.get(Key.CALIBRATION_BUDGET),
            "entropy_budget": vector.metadata.get(Key.CALIBRATION_ENTROPY_BUDGET),
            "scale": vector.metadata.get(Key.CALIBRATION_SCALE),
        },
        concept=concept,
        layers=list(span) if span else None,
        probes=n_probes,
        points=[
            replace(_point(result, p), in_range=_in_range(p.strength, recommended))
            for p in result.points
        ],
        baseline=baseline,
        recommended=list(recommended) if recommended else None,
        recommended_at_sweep_edge=(
            list(evaluate.at_sweep_edge(result, recommended)) if recommended else None
        ),
        verdict=evaluate.verdict(result),
        saved=None,
        chat=None,
        sweep=result,
    )


def _point(result: evaluate.Sweep, p: evaluate.Point) -> PointReport:
    per_cost = result.effect_per_cost(p)
    return PointReport(
        strength=p.strength,
        effect=round(result.effect(p), 4),
        margin=round(p.margin, 4),
        perplexity=round(p.perplexity, 4),
        ppl_ratio=round(result.ppl_ratio(p), 4),
        effect_per_cost=None if per_cost is None else round(per_cost, 2),
        degenerate=p.degenerate,
        sample=p.sample,
    )


def _in_range(strength: float, span: tuple[float, float] | None) -> bool:
    return span is not None and span[0] <= strength <= span[1]
