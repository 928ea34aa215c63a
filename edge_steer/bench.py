"""`edge-steer bench`: the speed of steering, of the engine and of training, in one run.

In the style of llama-bench: `ppN` (prompt processing of N tokens) and `tgN` (generating N
tokens) in tokens/s, mean +/- sd over repetitions, for the engine with no vector, with one and
with three vectors, and for a bare `llama_decode` loop on the same context (the engine's
overhead). Then training a vector: wall time, and hidden-state capture tokens/s against plain
prompt processing of the same prompts, packed the same way.

Protocol: one warm-up run of everything, then repetitions interleaved (A, B, C, A, B, C, ...)
so that drift in machine load hits every variant alike; ratios are of mean tokens/s (the
median of per-repetition ratios is reported too). Generation is greedy without repetition
penalty, so the engine and the bare loop compute the same tokens, which is checked. The
vectors are random directions on every block, each `scale` (2%) of the model's hidden-state
norm there: as large as real steering, and on all blocks, the most work llama.cpp can do.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import llama_cpp as ll
import numpy as np

from . import dataset, library, machine, steering, training, vectors
from .constants import DEFAULT_CTX
from .engine import (
    Context,
    Model,
    Sampler,
    SamplerSettings,
    backend_info,
    bare_decode,
    default_threads,
    hidden,
    prefill,
)
from .errors import BadInput

PROMPT = (
    "The history of the Roman Empire is long and full of surprises. It began as a small "
    "city-state on the banks of the Tiber, and"
)
STRENGTHS = (1.0, 0.5, -1.0)  # of the three random vectors
GREEDY = SamplerSettings(temperature=0, repeat_penalty=1.0)
BATCH = 512  # n_batch = n_ubatch, as `edge-steer generate` makes its context
TARGETS = {  # ratio name -> the lowest acceptable value
    "tg: 1 vector / none": 0.99,
    "tg: 3 vectors / none": 0.99,
    "tg: engine / bare loop": 0.95,
    "capture / prompt processing": 0.8,
}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BenchSettings:
    pp: int = 512
    tg: int = 128
    reps: int = 5
    concept: str = "happy"
    pairs: int = library.DEFAULT_PAIRS
    n_ctx: int = DEFAULT_CTX
    threads: int | None = None
    gpu_layers: str = "auto"  # the options as given; where weights went is in backend()
    moe_offload: str = "auto"
    scale: float = 0.02  # random direction norm / hidden-state norm, per block
    seed: int = 0


@dataclass
class Series:
    """Repeated timings of one test (e.g. tg128) of one variant (e.g. engine + 1 vector)."""

    test: str
    variant: str
    tokens: int  # per run; generation may stop early at end-of-generation, see `counts`
    seconds: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # tokens each run really processed
    outputs: list[tuple[int, ...]] = field(default_factory=list)  # generated tokens, tg only

    def add(self, seconds: float, output: tuple[int, ...] | None) -> None:
        self.seconds.append(seconds)
        self.counts.append(self.tokens if output is None else len(output))
        if output is not None:
            self.outputs.append(output)

    @property
    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.counts, self.seconds, strict=True)]

    def row(self) -> dict:
        rates = self.rates
        return {
            "test": self.test,
            "variant": self.variant,
            "tokens": self.tokens,
            "tps_mean": round(statistics.fmean(rates), 2),
            "tps_sd": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
            "runs_tps": [round(r, 2) for r in rates],
        }


# -- setup ---------------------------------------------------------------------------------------


def backend(model: Model, threads: int, settings: BenchSettings) -> dict:
    """The one place that reports backend and offload settings: the options, and where
    llama.cpp put the weights (its buffers, and how many tensors were kept in RAM)."""
    return {
        "threads": threads,
        "gpu_layers": settings.gpu_layers,
        "moe_offload": settings.moe_offload,
        "buffers": {name: size for name, size in model.buffers.items()},
        "tensors_kept_in_ram": len(model.overridden),
        **backend_info(),
        "gpu_backends": machine.gpu_backends(),  # what doctor lists: local GPUs, not RPC
        "llama_cpp_python": metadata.version("llama-cpp-python"),
        "model_bytes": model.path.stat().st_size,
    }


def text_tokens(model: Model, n: int) -> list[int]:
    """BOS and then n - 1 tokens of neutral prose (repeated if it is too short)."""
    text = model.tokenize(dataset.neutral_text(), add_special=False)
    head = [model.bos] if model.bos >= 0 else []
    body = (text * (n // max(1, len(text)) + 1))[: n - len(head)]
    return head + body


def hidden_norms(model: Model, prompt: list[int], threads: int) -> np.ndarray:
    """Median norm of each block's output over the prompt (BOS excluded): (n_layer,)."""
    size = max(64, len(prompt))
    with Context(model, n_ctx=size, n_batch=size, threads=threads, capture=True) as ctx:
        positions = list(range(min(1, len(prompt) - 1), len(prompt)))
        captured = hidden.capture(ctx, [prompt], [positions])[0]
    return np.median(np.linalg.norm(captured, axis=-1), axis=0)


def random_vectors(model: Model, norms: np.ndarray, settings: BenchSettings, folder: Path):
    """Three vector files of random directions on every block; returns their specs."""
    rng = np.random.default_rng(settings.seed)
    specs = []
    for i, strength in enumerate(STRENGTHS):
        directions = {}
        for layer in range(1, model.n_layer):
            d = rng.standard_normal(model.n_embd).astype(np.float32)
            directions[layer] = d * np.float32(settings.scale * norms[layer] / np.linalg.norm(d))
        vector = vectors.ControlVector(directions, model.architecture, {"made_by": "bench"})
        specs.append(f"{vectors.write(vector, folder / f'random{i}.gguf')}:{strength:g}")
    return specs


# -- one run of each kind ------------------------------------------------------------------------


Run = tuple[float, tuple[int, ...] | None]  # seconds, and the generated tokens (tg only)


def engine_pp(ctx: Context, steer: steering.Steering | None, tokens: list[int]) -> Run:
    """Seconds for `Context.ingest` of the tokens, from an empty cache."""
    _steer(ctx, steer)
    ctx.forget(0)
    start = time.perf_counter()
    ctx.ingest(tokens)
    ll.llama_synchronize(ctx.live)  # as bare_decode: CUDA and RPC may still be computing
    seconds = time.perf_counter() - start
    ctx.forget(0)
    return seconds, None


def engine_tg(ctx: Context, steer: steering.Steering | None, prompt: list[int], n: int) -> Run:
    """`edge-steer generate` greedily: a fresh Sampler, `Context.generate`, its own timing."""
    _steer(ctx, steer)
    ctx.forget(0)
    sampler = Sampler(ctx.model, GREEDY)
    try:
        pieces = ctx.generate(prompt, sampler, max_tokens=n)
        for _ in pieces:
            pass
    finally:
        sampler.close()
    output = tuple(ctx.tokens[len(prompt) :])
    ctx.forget(0)
    return pieces.stats.seconds, output


def _steer(ctx: Context, steer: steering.Steering | None) -> None:
    if steer is None:
        ctx.set_steering(None)
    else:
        steer.apply(ctx)


# -- the benchmark -------------------------------------------------------------------------------


def run(model: Model, settings: BenchSettings, progress: Progress | None = None) -> dict:
    """Measure everything; returns the report (see `edge-steer bench --json`)."""
    threads = settings.threads or default_threads()
    load_before = os.getloadavg()[0]
    pp_tokens = text_tokens(model, settings.pp)
    prompt = model.tokenize(PROMPT)
    _check(settings, len(prompt))
    total = (settings.reps + 1) * 5  # per round: 4 generation variants, 1 training
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    with tempfile.TemporaryDirectory(prefix="edge-steer-bench-") as tmp:
        specs = random_vectors(model, hidden_norms(model, prompt, threads), settings, Path(tmp))
        with Context(model, n_ctx=settings.n_ctx, n_batch=BATCH, threads=threads) as ctx:
            series = _generation(ctx, settings, specs, pp_tokens, prompt, step)
    training, capture, plain = _training(model, settings, threads, step)
    series += [capture, plain]
    return _report(model, settings, threads, series, training, load_before)


def _check(settings: BenchSettings, prompt_tokens: int) -> None:
    if settings.reps < 1 or settings.pp < 2 or settings.tg < 1:
        raise BadInput("--reps and --tg must be at least 1, and --pp at least 2")
    if settings.pp > settings.n_ctx or prompt_tokens + settings.tg > settings.n_ctx:
        raise BadInput(
            f"--pp {settings.pp} or --tg {settings.tg} (after a {prompt_tokens}-token prompt) "
            f"does not fit --ctx {settings.n_ctx}: raise --ctx"
        )
    if settings.pairs < 2:
        raise BadInput("--pairs must be at least 2 to train a vector")


def _generation(ctx, settings, specs, pp_tokens, prompt, step) -> list[Series]:
    """pp and tg for each variant, interleaved, after one warm-up round."""
    model = ctx.model
    variants = {
        "engine": None,
        "engine + 1 vector": steering.build(model, specs[:1], None),
        "engine + 3 vectors": steering.build(model, specs, None),
    }
    pp_name, tg_name = f"pp{settings.pp}", f"tg{settings.tg}"
    series: list[tuple[Series, Callable[[], tuple[float, tuple[int, ...] | None]]]] = []
    for name, steer in variants.items():
        pp = Series(pp_name, name, len(pp_tokens))
        tg = Series(tg_name, name, settings.tg)
        series.append((pp, functools.partial(engine_pp, ctx, steer, pp_tokens)))
        series.append((tg, functools.partial(engine_tg, ctx, steer, prompt, settings.tg)))
    bare = "bare llama_decode loop"
    series.append((Series(pp_name, bare, len(pp_tokens)), lambda: _bare_pp(ctx, pp_tokens)))
    series.append((Series(tg_name, bare, settings.tg), lambda: _bare_tg(ctx, prompt, settings.tg)))
    for rep in range(settings.reps + 1):
        for item, measure in series:
            seconds, output = measure()
            if rep:  # round 0 is the warm-up
                item.add(seconds, output)
            if item.test == tg_name:
                step()
    ctx.set_steering(None)
    return [item for item, _ in series]


def _bare_pp(ctx: Context, tokens: list[int]) -> Run:
    ctx.set_steering(None)
    return bare_decode(ctx, tokens, 0)[0], None


def _bare_tg(ctx: Context, prompt: list[int], n: int) -> Run:
    ctx.set_steering(None)
    _, tokens, seconds = bare_decode(ctx, prompt, n)
    return seconds, tuple(tokens)


def _training(model: Model, settings: BenchSettings, threads: int, step):
    """Train `concept` on `pairs` pairs as `train` does: capture (timed), directions and
    strength calibration (timed), and plain prompt processing of the same prompts in a
    context of the same shape (timed)."""
    name = settings.concept
    pairs = library.contrast_pairs(model, name, limit=settings.pairs)
    prompts = [p for pair in pairs for p in pair]
    options = training.TrainOptions(threads=threads)
    tokens = [model.tokenize(p, parse_special=True) for p in prompts]
    n_tokens = sum(map(len, tokens))
    capture = Series("capture", "training", n_tokens)
    plain = Series("capture", "plain prompt processing", n_tokens)
    fit: list[float] = []
    for rep in range(settings.reps + 1):  # round 0 warms capture up; it trains no vector
        start = time.perf_counter()
        states = training.hidden_states(model, prompts, options)
        middle = time.perf_counter()
        if rep:
            training.finish(model, states[0::2], states[1::2], options, name=name)
        end = time.perf_counter()
        plain_s = _plain(model, tokens, options)
        if rep:
            capture.add(middle - start, None)
            plain.add(plain_s, None)
            fit.append(end - middle)
        step()
    train_s = [c + f for c, f in zip(capture.seconds, fit, strict=True)]
    return (
        {
            "concept": settings.concept,
            "pairs": len(pairs),
            "prompt_tokens": n_tokens,
            "train_s_mean": round(statistics.fmean(train_s), 3),
            "train_s_sd": round(statistics.stdev(train_s), 3) if len(train_s) > 1 else 0.0,
        },
        capture,
        plain,
    )


def _plain(model: Model, tokens: list[list[int]], options: training.TrainOptions) -> float:
    """What `training.hidden_states` does, without the eval callback: make the context, decode."""
    batch = max(options.batch, max(map(len, tokens)))
    start = time.perf_counter()
    with Context(
        model, n_ctx=batch, n_batch=batch, n_seq=training.SEQUENCES, threads=options.threads
    ) as ctx:
        for begin in range(0, len(tokens), training.SEQUENCES):
            prefill(ctx, tokens[begin : begin + training.SEQUENCES])
    return time.perf_counter() - start


# -- the report ----------------------------------------------------------------------------------


def ratio(num: Series, den: Series) -> dict:
    """Ratio of mean tokens/s, the median of the per-repetition ratios, and their noise:
    twice the standard error of the paired ratios (None with one repetition: unknown)."""
    paired = [a / b for a, b in zip(num.rates, den.rates, strict=True)]
    value = statistics.fmean(num.rates) / statistics.fmean(den.rates)
    noise = 2 * statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else None
    return {
        "value": round(value, 4),
        "paired_median": round(statistics.median(paired), 4),
        "noise": None if noise is None else round(noise, 4),
    }


def judge(result: dict, target: float) -> dict:
    """`ok`: true where the ratio meets the target by more than its noise, false where it
    misses by more, and None where the noise cannot tell (more --reps, a quieter machine)."""
    value, noise = result["value"], result["noise"]
    if noise is None:  # one repetition cannot tell a ratio from its noise
        return result | {"target": target, "ok": None}
    ok = True if value - noise >= target else False if value + noise < target else None
    return result | {"target": target, "ok": ok}


def _report(model, settings, threads, series, training, load_before) -> dict:
    by = {(s.test, s.variant): s for s in series}
    pp, tg = f"pp{settings.pp}", f"tg{settings.tg}"
    none, bare = "engine", "bare llama_decode loop"
    capture, plain = by["capture", "training"], by["capture", "plain prompt processing"]
    ratios = {
        "tg: 1 vector / none": ratio(by[tg, "engine + 1 vector"], by[tg, none]),
        "tg: 3 vectors / none": ratio(by[tg, "engine + 3 vectors"], by[tg, none]),
        "tg: engine / bare loop": ratio(by[tg, none], by[tg, bare]),
        "pp: 3 vectors / none": ratio(by[pp, "engine + 3 vectors"], by[pp, none]),
        "pp: engine / bare loop": ratio(by[pp, none], by[pp, bare]),
        "capture / prompt processing": ratio(capture, plain),
    }
    for name, target in TARGETS.items():
        ratios[name] = judge(ratios[name], target)
    checks, warnings = _checks(model, by, tg, settings.tg)
    warnings += _busy(load_before, threads)
    return {
        "model": model.name,
        "path": str(model.path),
        "backend": backend(model, threads, settings),
        "settings": {
            "n_ctx": settings.n_ctx,
            "n_batch": BATCH,
            "reps": settings.reps,
            "prompt_tokens_for_tg": len(model.tokenize(PROMPT)),
            "vectors": [f"random:{s:g}" for s in STRENGTHS],
            "direction_norm_over_hidden_norm": settings.scale,
        },
        "results": [s.row() for s in series],
        "training": training,
        "ratios": ratios,
        "peak_rss_bytes": peak_rss(),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "checks": checks,
        "warnings": warnings,
    }


def _checks(model: Model, by: dict, tg: str, n: int) -> tuple[dict, list[str]]:
    """Steering really on, engine == bare loop, determinism, early end-of-generation."""
    warnings = []
    plain = by[tg, "engine"].outputs[0]
    steered = by[tg, "engine + 3 vectors"].outputs[0]
    bare = by[tg, "bare llama_decode loop"].outputs[0][: len(plain)]
    for (test, variant), s in by.items():
        if test == tg and len(set(s.outputs)) > 1:
            warnings.append(f"{variant}: repetitions generated different tokens")
        if test == tg and min(map(len, s.outputs)) < n:
            warnings.append(f"{variant}: stopped at end-of-generation before {n} tokens")
    if plain == steered:
        warnings.append("steered output equals unsteered output: steering may not be applied")
    if plain != bare:
        warnings.append("the engine and the bare loop generated different tokens")
    checks = {
        "steered_differs": plain != steered,
        "engine_matches_bare": plain == bare,
        "unsteered_text": model.detokenize(plain[:24]),
        "steered_text": model.detokenize(steered[:24]),
    }
    return checks, warnings


def _busy(load: float, threads: int) -> list[str]:
    """Other processes on our cores make llama.cpp's threads wait for each other."""
    spare = (os.cpu_count() or 1) - threads
    if load <= spare + 0.5:
        return []
    return [
        f"the machine was busy before the run (1-min load {load:.2f}, {os.cpu_count()} CPUs, "
        f"{threads} threads): absolute tokens/s are unreliable, ratios less so"
    ]


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
