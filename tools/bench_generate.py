"""Benchmark: does steering, or the engine's Python, cost generation speed?

Measures generation tokens/s (prompt processing excluded) of three variants on ONE loaded model
in ONE process, with the same prompt tokens, threads, n_ctx and n_batch:

- ``unsteered``: the engine path exactly as ``edge-steer generate`` runs it (``Context.generate``
  with a ``Sampler``), no control vector; the time is the engine's own ``ctx.stats``.
- ``steered``: the same with three random-direction control vectors, written to a temp dir as
  GGUF files and applied through ``steering.build(...).apply(ctx)`` like the CLI. Each direction's
  norm is ``--scale`` (2%) of the model's median hidden-state norm at that block, measured on the
  prompt, so the additions are as large as real steering and do change the output.
- ``bare``: the smallest Python loop over llama.cpp's C API (``llama_batch_get_one``,
  ``llama_decode``, a greedy ``llama_sampler_sample``) on its own context: the floor of what any
  Python code can do, so engine/bare is the engine's overhead.

Why: steering is llama.cpp's own ``llama_set_adapter_cvec``, so it should cost nothing per token
(target steered/unsteered >= 0.99), and the engine should run close to the bare loop (target
engine/bare >= 0.95). Protocol: one warm-up run per variant, then repetitions interleaved
(A, B, C, A, B, C, ...) so drift in machine load hits every variant alike, a cleared KV cache and
a fresh sampler before every run. Sampling is greedy (argmax) by default with no repetition
penalty, so the engine and the bare loop compute the same tokens (checked); ``--repeat-penalty
1.1`` reproduces ``edge-steer generate --temp 0`` exactly. The engine stops at end-of-generation
(the bare loop does not); the default prompt does not end within 128 tokens, and the actual
counts are reported. The script also checks that the vectors change the generated tokens.

Run: ``python tools/bench_generate.py [--model demo] [--tokens 128] [--reps 5] [--threads N]
[--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as ll
import numpy as np
from rich.console import Console
from rich.table import Table

from edge_steer import hub, steering, vectors
from edge_steer.engine import Context, Model, Sampler, SamplerSettings, default_threads

PROMPT = (
    "The history of the Roman Empire is long and full of surprises. It began as a small "
    "city-state on the banks of the Tiber, and"
)
STRENGTHS = (1.0, 0.5, -1.0)  # the three vectors, as NAME:STRENGTH specs
TARGET_STEERED = 0.99
TARGET_ENGINE = 0.95

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@dataclass(frozen=True)
class Run:
    """One generation: the tokens it produced and the seconds spent producing them."""

    tokens: tuple[int, ...]
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Variant:
    """A named way to generate, and the runs measured for it."""

    name: str
    label: str
    run: Callable[[], Run]
    runs: list[Run] = field(default_factory=list)


# -- the variants ---------------------------------------------------------------------------
def engine_runner(
    ctx: Context, prompt: list[int], n: int, settings: SamplerSettings
) -> Callable[[], Run]:
    """`edge-steer generate`: a fresh Sampler, Context.generate, the engine's own stats."""

    def run() -> Run:
        ctx.forget(0)
        sampler = Sampler(ctx.model, settings)
        try:
            "".join(ctx.generate(prompt, sampler, max_tokens=n))
        finally:
            sampler.close()
        tokens = tuple(ctx.tokens[len(prompt) :])
        if len(tokens) != ctx.stats.generated:
            raise RuntimeError(f"ctx.stats says {ctx.stats.generated}, KV holds {len(tokens)}")
        return Run(tokens, ctx.stats.seconds)

    return run


class BareLoop:
    """The floor: llama.cpp's C API driven by the shortest Python loop that generates."""

    def __init__(self, model: Model, n_ctx: int, n_batch: int, threads: int):
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # as engine.Context makes its contexts
        self.ptr = ll.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeError("llama.cpp could not create the bare context")
        self.sampler = ll.llama_sampler_init_greedy()
        self.one = (ll.llama_token * 1)()  # llama_decode reads the token through this array
        self.step = ll.llama_batch_get_one(self.one, 1)

    def run(self, prompt: Sequence[int], n: int) -> Run:
        ll.llama_memory_clear(ll.llama_get_memory(self.ptr), True)
        ll.llama_sampler_reset(self.sampler)
        tokens = (ll.llama_token * len(prompt))(*prompt)  # referenced until decode returns
        self._decode(ll.llama_batch_get_one(tokens, len(prompt)))
        out: list[int] = []
        ctx, sampler, one, step = self.ptr, self.sampler, self.one, self.step
        start = time.perf_counter()
        for _ in range(n):  # ignores end-of-generation: always n tokens
            one[0] = token = ll.llama_sampler_sample(sampler, ctx, -1)
            if ll.llama_decode(ctx, step):
                raise RuntimeError("llama_decode failed in the bare loop")
            out.append(token)
        return Run(tuple(out), time.perf_counter() - start)

    def _decode(self, batch: ll.llama_batch) -> None:
        if ll.llama_decode(self.ptr, batch):
            raise RuntimeError("llama_decode failed on the prompt in the bare loop")

    def close(self) -> None:
        ll.llama_sampler_free(self.sampler)
        ll.llama_free(self.ptr)


# -- realistic random control vectors ---------------------------------------------------------
def hidden_norms(model: Model, prompt: list[int], threads: int) -> np.ndarray:
    """Median norm of each block's output over the prompt (BOS excluded): shape (n_layer,)."""
    size = max(64, len(prompt))
    with Context(model, n_ctx=size, n_batch=size, threads=threads, capture=True) as ctx:
        positions = list(range(min(1, len(prompt) - 1), len(prompt)))
        states = ctx.capture([prompt], [positions])[0]
    return np.median(np.linalg.norm(states, axis=-1), axis=0)


def write_random_vectors(
    model: Model, norms: np.ndarray, scale: float, seed: int, folder: Path
) -> list[str]:
    """Three GGUF vectors of random directions, each block's norm = scale * hidden norm."""
    rng = np.random.default_rng(seed)
    specs = []
    for i, strength in enumerate(STRENGTHS):
        directions = {}
        for layer in range(1, model.n_layer):
            d = rng.standard_normal(model.n_embd).astype(np.float32)
            directions[layer] = d * np.float32(scale * norms[layer] / np.linalg.norm(d))
        vector = vectors.ControlVector(directions, model.name, {"made_by": "bench_generate"})
        path = vectors.write(vector, folder / f"random{i}.gguf")
        specs.append(f"{path}:{strength:g}")
    return specs


# -- measuring --------------------------------------------------------------------------------
def measure(variants: list[Variant], reps: int, quiet: bool) -> None:
    """One warm-up run each, then `reps` interleaved rounds A, B, C, A, B, C, ..."""
    for variant in variants:
        variant.run()
    for rep in range(reps):
        for variant in variants:
            variant.runs.append(variant.run())
        if not quiet:
            rates = "  ".join(f"{v.name} {v.runs[-1].rate:.1f}" for v in variants)
            err.print(f"[dim]rep {rep + 1}/{reps}: {rates} tok/s[/]")


def summary(variant: Variant) -> dict:
    rates = [r.rate for r in variant.runs]
    counts = [len(r.tokens) for r in variant.runs]
    median = statistics.median(rates)
    return {
        "label": variant.label,
        "generated": [min(counts), max(counts)],
        "median_tps": round(median, 2),
        "min_tps": round(min(rates), 2),
        "max_tps": round(max(rates), 2),
        "sd_tps": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
        "ms_per_token": round(1000 / median, 3) if median else None,
        "runs_tps": [round(x, 2) for x in rates],
    }


def ratios(num: Variant, den: Variant) -> dict:
    """Ratio of the medians, and the median of the per-round (paired) ratios."""
    a = statistics.median(r.rate for r in num.runs)
    b = statistics.median(r.rate for r in den.runs)
    paired = statistics.median(x.rate / y.rate for x, y in zip(num.runs, den.runs, strict=True))
    return {"of_medians": round(a / b, 4), "paired_median": round(paired, 4)}


# -- checks -----------------------------------------------------------------------------------
def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def checks(
    model: Model, by_name: dict[str, Variant], n: int, greedy_only: bool
) -> tuple[dict, list[str]]:
    """Determinism, early stops, steering really on, engine == bare loop (pure greedy only)."""
    warnings = []
    for v in by_name.values():
        if len({r.tokens for r in v.runs}) > 1:
            warnings.append(f"{v.name}: repetitions produced different tokens (nondeterminism)")
        short = min(len(r.tokens) for r in v.runs)
        if short < n:
            warnings.append(f"{v.name}: stopped at end-of-generation after {short} of {n} tokens")
    plain, steered = by_name["unsteered"].runs[0].tokens, by_name["steered"].runs[0].tokens
    diverges = first_difference(plain, steered)
    if diverges is None:
        warnings.append("steered output equals unsteered output: steering may not be applied")
    bare = by_name["bare"].runs[0].tokens[: len(plain)]
    agree = plain == bare
    if greedy_only and not agree:
        at = first_difference(plain, bare)
        warnings.append(f"engine and bare loop disagree from generated token {at}")
    result = {
        "steered_diverges_at": diverges,
        "engine_matches_bare": agree,
        "unsteered_text": model.detokenize(plain[:24]),
        "steered_text": model.detokenize(steered[:24]),
    }
    return result, warnings


def busy_warning(load: float, threads: int) -> list[str]:
    """Other processes on our cores make llama.cpp's spinning threads wait for each other."""
    spare = (os.cpu_count() or 1) - threads
    if load <= spare + 0.5:
        return []
    return [
        f"the machine was busy before the run (1-min load {load:.2f}, {os.cpu_count()} CPUs, "
        f"{threads} threads used): absolute tokens/s are unreliable; ratios less so"
    ]


# -- output -----------------------------------------------------------------------------------
def render(report: dict) -> None:
    s = report["setup"]
    out.print(
        f"[bold]{s['model']}[/] · {s['threads']} threads · n_ctx {s['n_ctx']} · "
        f"n_batch {s['n_batch']}\nprompt {s['prompt_tokens']} tokens · "
        f"{s['tokens']} generated x {s['reps']} reps · "
        f"1-min load {s['loadavg_before']} before, {s['loadavg_after']} after"
    )
    table = Table(title="generation tokens/s (prompt excluded)")
    for col in ("variant", "path", "generated", "median", "min", "max", "sd", "ms/token"):
        table.add_column(col, justify="left" if col in ("variant", "path") else "right")
    for name, v in report["variants"].items():
        lo, hi = v["generated"]
        table.add_row(
            name,
            v["label"],
            str(lo) if lo == hi else f"{lo}-{hi}",
            f"{v['median_tps']:.1f}",
            f"{v['min_tps']:.1f}",
            f"{v['max_tps']:.1f}",
            f"{v['sd_tps']:.2f}",
            f"{v['ms_per_token'] or 0:.2f}",
        )
    out.print(table)
    for name, r in report["ratios"].items():
        ok = r["of_medians"] >= r["target"]
        mark = "[green]ok[/]" if ok else "[red]below target[/]"
        out.print(
            f"{name}: {r['of_medians']:.3f} (paired {r['paired_median']:.3f}, "
            f"target >= {r['target']}) {mark}"
        )
    c = report["checks"]
    out.print(
        f"steered output diverges from unsteered at token {c['steered_diverges_at']}; "
        f"engine tokens match bare loop: {c['engine_matches_bare']}"
    )
    out.print(f"unsteered: {c['unsteered_text']!r}", markup=False)
    out.print(f"steered:   {c['steered_text']!r}", markup=False)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="GGUF path or 'demo' (Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    p.add_argument("--reps", type=int, default=5, help="measured runs per variant")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--ctx", type=int, default=4096, help="n_ctx (the CLI's default)")
    p.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch")
    p.add_argument("--prompt", default=PROMPT, help="text to continue")
    p.add_argument("--scale", type=float, default=0.02, help="direction norm / hidden norm")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = pure greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.reps < 1:
        p.error("--tokens and --reps must be at least 1")
    return args


def build_variants(
    model: Model,
    prompt: list[int],
    args: argparse.Namespace,
    specs: list[str],
    stack: contextlib.ExitStack,
) -> list[Variant]:
    threads = args.threads or default_threads()
    settings = SamplerSettings(temperature=0, repeat_penalty=args.repeat_penalty)
    shape = {"n_ctx": args.ctx, "n_batch": args.batch, "threads": threads}
    plain = stack.enter_context(Context(model, **shape))
    steered = stack.enter_context(Context(model, **shape))
    steering.build(model, specs, None).apply(steered)
    bare = BareLoop(model, args.ctx, args.batch, threads)
    stack.callback(bare.close)
    n = args.tokens
    return [
        Variant("unsteered", "engine", engine_runner(plain, prompt, n, settings)),
        Variant("steered", "engine+3 vec", engine_runner(steered, prompt, n, settings)),
        Variant("bare", "C loop", lambda: bare.run(prompt, n)),
    ]


def benchmark(args: argparse.Namespace) -> dict:
    model = Model(hub.resolve_model(args.model))
    prompt = model.tokenize(args.prompt)
    if len(prompt) + args.tokens > args.ctx or len(prompt) > args.batch:
        raise SystemExit("prompt + --tokens must fit --ctx, and the prompt must fit --batch")
    threads = args.threads or default_threads()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp, contextlib.ExitStack() as st:
        norms = hidden_norms(model, prompt, threads)
        specs = write_random_vectors(model, norms, args.scale, args.seed, Path(tmp))
        variants = build_variants(model, prompt, args, specs, st)
        measure(variants, args.reps, args.json)
    by_name = {v.name: v for v in variants}
    found, warnings = checks(model, by_name, args.tokens, args.repeat_penalty == 1.0)
    warnings += busy_warning(load_before, threads)
    unsteered, steered, bare = variants
    return {
        "setup": {
            "model": model.name,
            "path": str(model.path),
            "threads": threads,
            "n_ctx": args.ctx,
            "n_batch": args.batch,
            "prompt_tokens": len(prompt),
            "tokens": args.tokens,
            "reps": args.reps,
            "repeat_penalty": args.repeat_penalty,
            "vectors": [f"{Path(s.rsplit(':', 1)[0]).name}:{s.rsplit(':', 1)[1]}" for s in specs],
            "direction_norm_over_hidden_norm": args.scale,
            "loadavg_before": round(load_before, 2),
            "loadavg_after": round(os.getloadavg()[0], 2),
        },
        "variants": {v.name: summary(v) for v in variants},
        "ratios": {
            "steered/unsteered": {**ratios(steered, unsteered), "target": TARGET_STEERED},
            "engine/bare": {**ratios(unsteered, bare), "target": TARGET_ENGINE},
        },
        "checks": found,
        "warnings": warnings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = benchmark(args)
    for warning in report["warnings"]:
        err.print(f"[bold yellow]warning:[/] {warning}")
    if args.json:
        print(json.dumps(report))
    else:
        render(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
